"""The unCLIP decoder P(x | z_i, y): a GLIDE-style U-Net diffusion model conditioned on the CLIP image embedding and
(optionally) the caption (paper section 2.1).

- The CLIP embedding reaches the U-Net twice: projected and added to the timestep embedding, and projected into 4
  extra context tokens appended to the caption encoder's output sequence (see ``unclip_pl.nets.unet.UNet``).
- Classifier-free guidance: in training the CLIP embedding is replaced by a learned null (or zeros) with probability
  ``clip_drop_prob`` and the caption is dropped (all caption tokens masked out, only the 4 CLIP tokens remain) with
  probability ``text_drop_prob``. The unconditional branch at sampling has both dropped; conditional and
  unconditional passes run batched in one forward (``classifier_free_guidance``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from unclip_pl.diffusion import (
    GaussianDiffusion,
    classifier_free_guidance,
    ddim_invert,
    get_sampler,
    initial_noise,
    step_generator,
)


class Decoder(nn.Module):
    """U-Net + diffusion + caption encoder, with classifier-free-guidance dropout.

    Args:
        unet: ``UNet`` with ``clip_dim`` = D and ``context_dim`` = the caption state width.
        diffusion: training ``GaussianDiffusion`` (paper: cosine, 1000 steps; target eps/v/x0; learn_sigma+hybrid).
        text_encoder: ``TextEncoder`` (tokens -> states, mask), or None: then captions come as precomputed states
            (``text=(states, mask)``, e.g. the frozen CLIP's per-token outputs) or not at all.
        clip_drop_prob: probability of replacing the CLIP embedding by the null embedding in training.
        text_drop_prob: probability of dropping the caption in training.
        null_clip: "learned" (a trained (D,) vector) or "zeros".
        clip_scale: the CLIP embedding is multiplied by this before the U-Net; None = sqrt(D), so a unit-norm
            embedding has about unit variance per dimension.

    Sampler settings are not part of the model: :meth:`sample` takes them explicitly (the stage's ``sample:``
    config block holds them, stored in its checkpoint).
    """

    def __init__(self, unet: nn.Module, diffusion: GaussianDiffusion, text_encoder: nn.Module | None = None,
                 clip_drop_prob: float = 0.05, text_drop_prob: float = 0.5, null_clip: str = "learned",
                 clip_scale: float | None = None):
        super().__init__()
        if null_clip not in ("learned", "zeros"):
            raise ValueError(f"null_clip must be 'learned' or 'zeros', got {null_clip!r}")
        if getattr(unet, "clip_dim", None) is None:
            raise ValueError("the decoder's U-Net needs clip_dim (the CLIP embedding width)")
        if getattr(unet, "learn_sigma", False) != diffusion.learn_sigma:
            raise ValueError(f"unet.learn_sigma={unet.learn_sigma} but diffusion.learn_sigma={diffusion.learn_sigma}")
        self.unet = unet
        self.diffusion = diffusion
        self.text_encoder = text_encoder
        self.clip_drop_prob = float(clip_drop_prob)
        self.text_drop_prob = float(text_drop_prob)
        self.null_clip = null_clip
        self.clip_dim = unet.clip_dim
        self.clip_scale = float(clip_scale) if clip_scale is not None else math.sqrt(self.clip_dim)
        if null_clip == "learned":
            self.clip_null = nn.Parameter(torch.zeros(self.clip_dim))
        else:
            self.register_buffer("clip_null", torch.zeros(self.clip_dim), persistent=False)

    @property
    def image_size(self) -> int:
        return self.unet.image_size

    # ------------------------------------------------------------------ conditioning
    def encode_text(self, tokens: torch.Tensor | None = None, text: Any = None):
        """Caption states: ``text`` if given ((states, mask) tuple or an object with ``.tokens``/``.mask``, e.g.
        ``FrozenCLIP.encode_text``), else ``text_encoder(tokens)``, else (None, None).
        Returns (context (B, S, Cctx) | None, mask (B, S) bool | None)."""
        if text is not None:
            states, mask = (text.tokens, text.mask) if hasattr(text, "mask") else text
        elif tokens is not None and self.text_encoder is not None:
            states, mask = self.text_encoder(tokens)
        elif tokens is not None:
            raise ValueError("this decoder has no text encoder: pass text=(states, mask) (e.g. the frozen CLIP's "
                             "per-token outputs) instead of tokens")
        else:
            return None, None
        if mask is None:
            mask = torch.ones(states.shape[:2], dtype=torch.bool, device=states.device)
        return states, mask.to(torch.bool)

    def null_clip_emb(self, batch: int) -> torch.Tensor:
        """(B, D) null CLIP embedding (learned or zeros)."""
        return self.clip_null[None].expand(batch, -1)

    def drop_conditions(self, clip_emb: torch.Tensor, mask: torch.Tensor | None,
                        generator: torch.Generator | None = None):
        """Classifier-free-guidance dropout (no host syncs).

        Returns (clip_emb (B, D), mask (B, S) | None, clip_dropped (B,) bool, text_dropped (B,) bool)."""
        B = clip_emb.shape[0]
        dev = generator.device if generator is not None else clip_emb.device
        u = torch.rand(2, B, generator=generator, device=dev).to(clip_emb.device)
        clip_dropped = u[0] < self.clip_drop_prob
        text_dropped = u[1] < self.text_drop_prob
        clip_emb = torch.where(clip_dropped[:, None], self.null_clip_emb(B).to(clip_emb.dtype), clip_emb)
        if mask is not None:
            mask = mask & ~text_dropped[:, None]
        return clip_emb, mask, clip_dropped, text_dropped

    def cond_kwargs(self, clip_emb: torch.Tensor, context, mask) -> dict:
        kw = {"clip_emb": clip_emb * self.clip_scale}
        if context is not None:
            kw["context"], kw["context_mask"] = context, mask
        return kw

    # ------------------------------------------------------------------ training
    def loss(self, images: torch.Tensor, clip_emb: torch.Tensor, tokens: torch.Tensor | None = None, *,
             text: Any = None, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """images (B, 3, H, W) in [-1, 1]; clip_emb (B, D) unit-norm; tokens (B, L) or text=(states, mask).
        Returns dict(loss, mse[, vb]) of scalars."""
        B = images.shape[0]
        context, mask = self.encode_text(tokens, text)
        clip_emb, mask, _, _ = self.drop_conditions(clip_emb, mask, generator)
        dev = generator.device if generator is not None else images.device
        t = self.diffusion.sample_timesteps(B, dev, generator).to(images.device)
        noise = torch.randn(images.shape, generator=generator, device=dev).to(images)
        terms = self.diffusion.training_losses(self.unet, images, t, model_kwargs=self.cond_kwargs(
            clip_emb, context, mask), noise=noise)
        return {k: v.mean() for k, v in terms.items()}

    # ------------------------------------------------------------------ sampling
    def guided_model(self, clip_emb: torch.Tensor, tokens: torch.Tensor | None = None, text: Any = None, *,
                     guidance_scale: float):
        """model_fn(x, t) with classifier-free guidance (cond and uncond batched in one forward; 1 = cond only)."""
        scale = float(guidance_scale)
        context, mask = self.encode_text(tokens, text)
        cond = self.cond_kwargs(clip_emb, context, mask)
        if scale == 1:
            return lambda x, t: self.unet(x, t, **cond)
        uncond = self.cond_kwargs(self.null_clip_emb(clip_emb.shape[0]).to(clip_emb.dtype), context,
                                  torch.zeros_like(mask) if mask is not None else None)
        split = self.unet.out_channels // 2 if self.diffusion.learn_sigma else None
        return classifier_free_guidance(self.unet, scale, cond, uncond, split_channels=split)

    @torch.no_grad()
    def sample(self, clip_emb: torch.Tensor, tokens: torch.Tensor | None = None, *, text: Any = None,
               steps: Any, sampler: str, eta: float, guidance_scale: float, generator: torch.Generator | None = None,
               seeds: Sequence[int] | None = None, x_T: torch.Tensor | None = None, image_size: int | None = None,
               progress: bool = False, stream: str = "decoder") -> torch.Tensor:
        """Generate images (B, 3, S, S) in [-1, 1] from clip_emb (B, D) and captions (tokens (B, L) or text states).

        ``steps`` (respacing spec), ``sampler`` (a name of ``unclip_pl.diffusion.SAMPLERS``), ``eta`` and
        ``guidance_scale``: the sampler settings, usually the stage's ``sample:`` block.

        ``seeds`` (one per image) makes image i depend only on seeds[i] (its starting noise, and the step noise of
        ddpm / ddim eta > 0, in the streams of stage ``stream``, see ``unclip_pl.diffusion.seeds``), not on the rest
        of the batch; ``generator`` otherwise (one stream for the batch); ``x_T`` (B, 3, S, S) replaces the starting
        noise (e.g. from ``invert``). The predicted x0 is clipped to [-1, 1] at every step."""
        sample_fn = get_sampler(sampler)
        B = clip_emb.shape[0]
        size = image_size or self.image_size
        if x_T is None:
            x_T = initial_noise((B, self.unet.in_channels, size, size), clip_emb.device, generator=generator,
                                seeds=seeds, stage=stream)
        model_fn = self.guided_model(clip_emb, tokens, text, guidance_scale=guidance_scale)
        x = sample_fn(self.diffusion, model_fn, x_T, steps, eta=eta, clip_denoised=True, progress=progress,
                      generator=step_generator(seeds, generator, x_T.device, stage=stream))
        return x.clamp(-1, 1)

    @torch.no_grad()
    def invert(self, images: torch.Tensor, clip_emb: torch.Tensor, tokens: torch.Tensor | None = None, *,
               text: Any = None, steps: Any, guidance_scale: float) -> torch.Tensor:
        """DDIM-invert images (B, 3, S, S) to their starting noise x_T (B, 3, S, S) under this conditioning
        (paper: variations start from it and sample with DDIM, eta > 0). Deterministic; the model function and x0
        clipping are those of :meth:`sample`, so
        ``sample(..., sampler="ddim", eta=0, steps=steps, guidance_scale=<the same>, x_T=x_T)`` maps it back to
        the images up to the discretisation error of the ODE."""
        model_fn = self.guided_model(clip_emb, tokens, text, guidance_scale=guidance_scale)
        return ddim_invert(self.diffusion, model_fn, images, steps=steps, clip_denoised=True)
