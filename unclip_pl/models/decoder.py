"""The unCLIP decoder P(x | z_i, y): a GLIDE-style U-Net diffusion model conditioned on the CLIP image embedding and
(optionally) the caption (paper section 2.1).

- The CLIP embedding reaches the U-Net twice: projected and added to the timestep embedding, and projected into 4
  extra context tokens appended to the caption encoder's output sequence (see ``unclip_pl.nets.unet.UNet``).
- Classifier-free guidance: in training the CLIP embedding is replaced by a learned null (or zeros) with probability
  ``clip_drop_prob`` and the caption is dropped (all caption tokens masked out, only the 4 CLIP tokens remain) with
  probability ``text_drop_prob``. The unconditional branch at sampling has both dropped; conditional and
  unconditional passes run batched in one forward (``classifier_free_guidance``).
- Karlo's decoder (``conf/decoder/karlo.yaml``, weights from ``unclip_pl.convert``) also adds CLIP's pooled text
  embedding to the time embedding (``text_emb``, the U-Net's ``text_emb_dim``), and its unconditional branch sees the
  encoding of the empty caption rather than no caption: pass ``uncond_text=(states, mask, text_emb)`` of ``""``
  (batch 1 or B) to :meth:`sample` / :meth:`guided_model` / :meth:`loss`. Both reproduce diffusers'
  ``UnCLIPPipeline`` + ``UnCLIPTextProjModel`` computation.
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


def _pad_captions(a, a_mask, b, b_mask):
    """Caption states (B, S1, C) / (B, S2, C) and masks padded (zeros, False) to one length S = max(S1, S2)."""
    S = max(a.shape[1], b.shape[1])

    def pad(x, m):
        n = S - x.shape[1]
        if n == 0:
            return x, m
        return torch.cat([x, x.new_zeros(x.shape[0], n, x.shape[2])], 1), torch.cat([m, m.new_zeros(m.shape[0], n)], 1)
    return (*pad(a, a_mask), *pad(b, b_mask))


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

    def cond_kwargs(self, clip_emb: torch.Tensor, context, mask, text_emb: torch.Tensor | None = None) -> dict:
        kw = {"clip_emb": clip_emb * self.clip_scale}
        if context is not None:
            kw["context"], kw["context_mask"] = context, mask
        if text_emb is not None:
            kw["text_emb"] = text_emb
        return kw

    @property
    def takes_text_emb(self) -> bool:
        """Whether the U-Net adds a pooled caption embedding (``text_emb``) to its time embedding (Karlo)."""
        return getattr(self.unet, "text_emb_dim", None) is not None

    def _check_text_emb(self, text_emb: torch.Tensor | None) -> None:
        if self.takes_text_emb and text_emb is None:
            raise ValueError("this decoder adds CLIP's text embedding to its time embedding: pass text_emb (B, D)")

    def empty_caption(self, uncond_text: Any, batch: int):
        """The unconditional branch's caption (e.g. the encoding of ``""``): ``(states, mask[, text_emb])`` or an
        object with ``.tokens``/``.mask``/``.emb``, batch 1 or ``batch``. Returns (states (B, S, C), mask (B, S)
        bool, text_emb (B, D) | None)."""
        if hasattr(uncond_text, "mask"):
            parts = (uncond_text.tokens, uncond_text.mask, getattr(uncond_text, "emb", None))
        else:
            parts = tuple(uncond_text) + (None,) * (3 - len(uncond_text))
        states, mask, emb = parts
        if mask is None:
            mask = torch.ones(states.shape[:2], dtype=torch.bool, device=states.device)
        if self.takes_text_emb and emb is None:
            raise ValueError("uncond_text needs the empty caption's text embedding too: (states, mask, text_emb)")
        out = []
        for v in (states, mask.to(torch.bool), emb):
            if v is not None and v.shape[0] != batch:
                if v.shape[0] != 1:
                    raise ValueError(f"uncond_text has batch {v.shape[0]}, expected 1 or {batch}")
                v = v.expand(batch, *v.shape[1:])
            out.append(v)
        return tuple(out)


    # ------------------------------------------------------------------ training
    def loss(self, images: torch.Tensor, clip_emb: torch.Tensor, tokens: torch.Tensor | None = None, *,
             text: Any = None, generator: torch.Generator | None = None, text_emb: torch.Tensor | None = None,
             uncond_text: Any = None) -> dict[str, torch.Tensor]:
        """images (B, 3, H, W) in [-1, 1]; clip_emb (B, D) unit-norm; tokens (B, L) or text=(states, mask);
        text_emb (B, D) when the U-Net takes it. A dropped caption is masked out (its text_emb zeroed), or, with
        ``uncond_text`` (see :meth:`empty_caption`), replaced by that caption. Returns dict(loss, mse[, vb])."""
        B = images.shape[0]
        self._check_text_emb(text_emb)
        context, mask = self.encode_text(tokens, text)
        clip_emb, mask, _, text_dropped = self.drop_conditions(clip_emb, mask, generator)
        if text_emb is not None:
            text_emb = torch.where(text_dropped[:, None], torch.zeros_like(text_emb), text_emb)
        if uncond_text is not None and context is not None:
            u_ctx, u_mask, u_emb = self.empty_caption(uncond_text, B)
            context, mask, u_ctx, u_mask = _pad_captions(context, mask, u_ctx.to(context), u_mask)
            context = torch.where(text_dropped[:, None, None], u_ctx, context)
            mask = torch.where(text_dropped[:, None], u_mask, mask)
            if text_emb is not None and u_emb is not None:
                text_emb = torch.where(text_dropped[:, None], u_emb.to(text_emb), text_emb)
        dev = generator.device if generator is not None else images.device
        t = self.diffusion.sample_timesteps(B, dev, generator).to(images.device)
        noise = torch.randn(images.shape, generator=generator, device=dev).to(images)
        terms = self.diffusion.training_losses(self.unet, images, t, model_kwargs=self.cond_kwargs(
            clip_emb, context, mask, text_emb), noise=noise)
        return {k: v.mean() for k, v in terms.items()}

    # ------------------------------------------------------------------ sampling
    def guided_model(self, clip_emb: torch.Tensor, tokens: torch.Tensor | None = None, text: Any = None, *,
                     guidance_scale: float, text_emb: torch.Tensor | None = None, uncond_text: Any = None):
        """model_fn(x, t) with classifier-free guidance (cond and uncond batched in one forward; 1 = cond only).

        The unconditional branch has the null CLIP embedding and no caption, or, with ``uncond_text``, the given
        caption (Karlo: the encoding of ``""``, see :meth:`empty_caption`); ``text_emb`` (B, D): the captions'
        pooled embedding, for a U-Net that takes it."""
        scale = float(guidance_scale)
        self._check_text_emb(text_emb)
        context, mask = self.encode_text(tokens, text)
        cond = self.cond_kwargs(clip_emb, context, mask, text_emb)
        if scale == 1:
            return lambda x, t: self.unet(x, t, **cond)
        null = self.null_clip_emb(clip_emb.shape[0]).to(clip_emb.dtype)
        if uncond_text is not None:
            if context is None:
                raise ValueError("uncond_text is the unconditional branch's caption: give the captions too")
            u_ctx, u_mask, u_emb = self.empty_caption(uncond_text, clip_emb.shape[0])
            context, mask, u_ctx, u_mask = _pad_captions(context, mask, u_ctx.to(context), u_mask)
            cond = self.cond_kwargs(clip_emb, context, mask, text_emb)
            uncond = self.cond_kwargs(null, u_ctx, u_mask, u_emb.to(text_emb) if text_emb is not None else None)
        elif self.takes_text_emb:
            raise ValueError("this decoder's unconditional branch sees the empty caption: pass uncond_text=(states, "
                             "mask, text_emb), the encoding of \"\"")
        else:
            uncond = self.cond_kwargs(null, context, torch.zeros_like(mask) if mask is not None else None)
        split = self.unet.out_channels // 2 if self.diffusion.learn_sigma else None
        return classifier_free_guidance(self.unet, scale, cond, uncond, split_channels=split)

    @torch.no_grad()
    def sample(self, clip_emb: torch.Tensor, tokens: torch.Tensor | None = None, *, text: Any = None,
               steps: Any, sampler: str, eta: float, guidance_scale: float, generator: torch.Generator | None = None,
               seeds: Sequence[int] | None = None, x_T: torch.Tensor | None = None, image_size: int | None = None,
               progress: bool = False, stream: str = "decoder", text_emb: torch.Tensor | None = None,
               uncond_text: Any = None) -> torch.Tensor:
        """Generate images (B, 3, S, S) in [-1, 1] from clip_emb (B, D) and captions (tokens (B, L) or text states).

        ``steps`` (respacing spec), ``sampler`` (a name of ``unclip_pl.diffusion.SAMPLERS``), ``eta`` and
        ``guidance_scale``: the sampler settings, usually the stage's ``sample:`` block.

        ``seeds`` (one per image) makes image i depend only on seeds[i] (its starting noise, and the step noise of
        ddpm / ddim eta > 0, in the streams of stage ``stream``, see ``unclip_pl.diffusion.seeds``), not on the rest
        of the batch; ``generator`` otherwise (one stream for the batch); ``x_T`` (B, 3, S, S) replaces the starting
        noise (e.g. from ``invert``). The predicted x0 is clipped to [-1, 1] at every step. ``text_emb`` /
        ``uncond_text``: see :meth:`guided_model`."""
        sample_fn = get_sampler(sampler)
        B = clip_emb.shape[0]
        size = image_size or self.image_size
        if x_T is None:
            x_T = initial_noise((B, self.unet.in_channels, size, size), clip_emb.device, generator=generator,
                                seeds=seeds, stage=stream)
        model_fn = self.guided_model(clip_emb, tokens, text, guidance_scale=guidance_scale, text_emb=text_emb,
                                     uncond_text=uncond_text)
        x = sample_fn(self.diffusion, model_fn, x_T, steps, eta=eta, clip_denoised=True, progress=progress,
                      generator=step_generator(seeds, generator, x_T.device, stage=stream))
        return x.clamp(-1, 1)

    @torch.no_grad()
    def invert(self, images: torch.Tensor, clip_emb: torch.Tensor, tokens: torch.Tensor | None = None, *,
               text: Any = None, steps: Any, guidance_scale: float, text_emb: torch.Tensor | None = None,
               uncond_text: Any = None) -> torch.Tensor:
        """DDIM-invert images (B, 3, S, S) to their starting noise x_T (B, 3, S, S) under this conditioning
        (paper: variations start from it and sample with DDIM, eta > 0). Deterministic; the model function and x0
        clipping are those of :meth:`sample`, so
        ``sample(..., sampler="ddim", eta=0, steps=steps, guidance_scale=<the same>, x_T=x_T)`` maps it back to
        the images up to the discretisation error of the ODE."""
        model_fn = self.guided_model(clip_emb, tokens, text, guidance_scale=guidance_scale, text_emb=text_emb,
                                     uncond_text=uncond_text)
        return ddim_invert(self.diffusion, model_fn, images, steps=steps, clip_denoised=True)
