"""Diffusion upsamplers (paper section 2.1): 64->256 and 256->1024, conditioned only on the low-resolution image.

No caption, no CLIP embedding, no guidance, no attention. In training the low-resolution input is made by
down-sampling the high-resolution image and corrupting it (Gaussian blur for the first stage, BSR degradation for the
second); the model trains on random crops of a quarter of the target size and runs at full size at inference
(the U-Net is convolutional only).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from unclip_pl.diffusion import GaussianDiffusion, get_sampler, initial_noise, step_generator
from unclip_pl.nets.unet import resize_low_res


def random_crop_pair(a: torch.Tensor, b: torch.Tensor, size: int, generator: torch.Generator | None = None):
    """The same random (size x size) window of a and b (B, C, H, W), a different window per sample; no host sync.

    Returns (a_crop (B, Ca, size, size), b_crop (B, Cb, size, size))."""
    B, _, H, W = a.shape
    dev = generator.device if generator is not None else a.device
    oy = torch.randint(0, H - size + 1, (B,), generator=generator, device=dev).to(a.device)
    ox = torch.randint(0, W - size + 1, (B,), generator=generator, device=dev).to(a.device)
    ar = torch.arange(size, device=a.device)
    rows = (oy[:, None] + ar)[:, :, None]                          # (B, size, 1)
    cols = (ox[:, None] + ar)[:, None, :]                          # (B, 1, size)
    bidx = torch.arange(B, device=a.device)[:, None, None]

    def crop(x):  # advanced indices around a slice -> (B, size, size, C); permuted back it is channels_last
        return x[bidx, :, rows, cols].permute(0, 3, 1, 2)
    return crop(a), crop(b)


class LowRes:
    """The upsamplers' training corruption as a picklable callable: (B, 3, H, W) high-res in [-1, 1] ->
    (B, 3, size, size): antialiased down-sample, then ``degradation`` (blur / BSR), clamped to [-1, 1].

    Runs inside the training step (``Upsampler.make_low_res``) or in the data-loader workers (the upsampler module's
    ``degrade_in_loader``), where BSR's per-image Python loop and CPU JPEG cost no accelerator time."""

    def __init__(self, size: int, mode: str = "bicubic",
                 degradation: Callable[[torch.Tensor], torch.Tensor] | None = None):
        self.size, self.mode, self.degradation = int(size), mode, degradation

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        antialias = self.mode in ("bilinear", "bicubic")
        low = F.interpolate(images.float(), size=(self.size, self.size), mode=self.mode,
                            **({"antialias": True, "align_corners": False} if antialias else {}))
        low = low.clamp(-1, 1)
        if self.degradation is not None:
            low = self.degradation(low).clamp(-1, 1)
        return low.to(images.dtype)


class Upsampler(nn.Module):
    """Low-res-conditioned diffusion super-resolution model.

    Args:
        unet: ``UNet`` with ``low_res_channels=3`` and no attention (``attention_resolutions=[]``).
        diffusion: training ``GaussianDiffusion`` (cosine 1000 for 64->256, linear 1000 for 256->1024).
        low_res_size: side of the low-resolution input in training (64 / 256).
        image_size: target side (256 / 1024); default ``unet.image_size``.
        degradation: callable (B, 3, h, w) -> (B, 3, h, w) in [-1, 1] applied to the down-sampled image in
            training (``unclip_pl.data.degrade.gaussian_blur`` / ``bsr_degrade`` with Hydra ``_partial_``); None = none.
        crop_size: training crop side at the target resolution; default ``image_size // 4`` (paper).
        downsample_mode: interpolation used to make the low-res training input ("bicubic", "area", "bilinear").
        last_unet: an optional second ``UNet`` of the same layout that replaces ``unet`` at the final sampler step
            only (Karlo's 64 -> 256 stage: ``super_res_last``, fine-tuned for that step with its own loss). Training
            (``loss``) trains ``unet`` alone; ``last_unet`` is frozen (``requires_grad`` off) and kept as loaded.

    Sampler settings are not part of the model: :meth:`sample` takes them explicitly (the stage's ``sample:``
    config block holds them, stored in its checkpoint; paper: DDIM 27 and 15 steps).
    """

    def __init__(self, unet: nn.Module, diffusion: GaussianDiffusion, low_res_size: int, image_size: int | None = None,
                 degradation: Callable[[torch.Tensor], torch.Tensor] | None = None, crop_size: int | None = None,
                 downsample_mode: str = "bicubic", last_unet: nn.Module | None = None):
        super().__init__()
        if getattr(unet, "low_res_channels", 0) <= 0:
            raise ValueError("the upsampler's U-Net needs low_res_channels > 0")
        if getattr(unet, "learn_sigma", False) != diffusion.learn_sigma:
            raise ValueError(f"unet.learn_sigma={unet.learn_sigma} but diffusion.learn_sigma={diffusion.learn_sigma}")
        self.unet = unet
        self.diffusion = diffusion
        self.low_res_size = int(low_res_size)
        self.image_size = int(image_size or unet.image_size)
        if self.image_size % self.low_res_size:
            raise ValueError(f"image_size {self.image_size} must be a multiple of low_res_size {self.low_res_size}")
        self.scale = self.image_size // self.low_res_size
        self.degradation = degradation
        self.crop_size = int(crop_size or self.image_size // 4)
        multiple = 2 ** (unet.num_levels - 1)
        if self.crop_size % multiple or self.crop_size > self.image_size:
            raise ValueError(f"crop_size {self.crop_size} must be <= image_size and a multiple of {multiple}")
        self.downsample_mode = downsample_mode
        if last_unet is not None:
            if getattr(last_unet, "low_res_channels", 0) != unet.low_res_channels or \
                    getattr(last_unet, "learn_sigma", False) != unet.learn_sigma:
                raise ValueError("last_unet must take the same inputs and give the same outputs as unet")
            last_unet.requires_grad_(False)
        self.last_unet = last_unet

    @property
    def low_res_maker(self) -> LowRes:
        """The training corruption (down-sample + ``degradation``) as a picklable callable, e.g. for loader workers."""
        return LowRes(self.low_res_size, self.downsample_mode, self.degradation)

    def make_low_res(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) high-res -> (B, 3, low_res_size, low_res_size): down-sample (antialiased) + degradation."""
        return self.low_res_maker(images)

    def loss(self, images: torch.Tensor, *, low_res: torch.Tensor | None = None,
             generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """images (B, 3, H, W) in [-1, 1] at the target resolution; low_res (B, 3, h, w): the corrupted low-res input
        when made elsewhere (the loader workers), else made here. Returns dict(loss, mse[, vb]) of scalars.

        The low-res input is built from the whole image, bilinearly up-sampled to full size (as at inference), and
        the same random crop of a quarter of the target size is taken from both."""
        B, _, H, W = images.shape
        low = self.make_low_res(images) if low_res is None else low_res.to(images.device, images.dtype)
        up = resize_low_res(low, (H, W), getattr(self.unet, "low_res_mode", "bilinear"))
        if self.crop_size < min(H, W):
            x0, cond = random_crop_pair(images, up, self.crop_size, generator)
        else:
            x0, cond = images, up
        dev = generator.device if generator is not None else images.device
        t = self.diffusion.sample_timesteps(B, dev, generator).to(images.device)
        noise = torch.randn(x0.shape, generator=generator, device=dev).to(x0)
        terms = self.diffusion.training_losses(self.unet, x0, t, model_kwargs={"low_res": cond}, noise=noise)
        return {k: v.mean() for k, v in terms.items()}

    @torch.no_grad()
    def sample(self, low_res: torch.Tensor, *, steps: Any, sampler: str, eta: float,
               generator: torch.Generator | None = None, seeds: Sequence[int] | None = None,
               x_T: torch.Tensor | None = None, progress: bool = False, stream: str = "upsampler0") -> torch.Tensor:
        """low_res (B, 3, h, w) in [-1, 1] -> (B, 3, h * scale, w * scale) in [-1, 1] (any h, w that make the
        output a multiple of the U-Net's down-sampling factor). ``seeds``: one per image, its noise drawn in the
        streams of stage ``stream`` (the pipeline's upsampler j uses ``"upsampler<j>"``). ``steps`` / ``sampler`` (a
        name of ``unclip_pl.diffusion.SAMPLERS``) / ``eta``: the sampler settings, usually the ``sample:`` block."""
        sample_fn = get_sampler(sampler)
        B, C, h, w = low_res.shape
        if x_T is None:
            x_T = initial_noise((B, self.unet.in_channels, h * self.scale, w * self.scale), low_res.device,
                                generator=generator, seeds=seeds, stage=stream)
        cond = {"low_res": low_res.clamp(-1, 1)}
        n_steps = (self.diffusion.respaced(steps) if steps is not None else self.diffusion).num_steps
        final = {"step": n_steps == 1}          # with last_unet: is the next network call the final step?

        def model_fn(x, t):
            net = self.last_unet if self.last_unet is not None and final["step"] else self.unet
            return net(x, t, **cond)

        def after_step(i, x, x0):                # the sampler's step i (counting down) is done: is i - 1 the last?
            final["step"] = i == 1

        x = sample_fn(self.diffusion, model_fn, x_T, steps, eta=eta, clip_denoised=True, progress=progress,
                      generator=step_generator(seeds, generator, x_T.device, stage=stream), callback=after_step)
        return x.clamp(-1, 1)
