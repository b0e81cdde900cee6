"""LightningModule of the unCLIP decoder (``python train.py decoder=base``).

Training: ``Decoder.loss(image, img_emb, tokens)``; the caption comes either from the decoder's own text encoder
(``text_source="own"``, token ids) or from the frozen CLIP's per-token outputs (``text_source="clip"``).
Validation (EMA weights): ``val/loss`` with fixed noise; every ``sample_every_n_val``-th validation run a grid of
samples for the first ``num_grid_items`` validation items (fixed at the first run, fixed per-image seeds) is logged
with ``unclip_pl.callbacks.image_grid`` (row 1: the real images, row 2: decoded from their CLIP image embeddings).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from unclip_pl.callbacks.image_grid import log_image_grid, to_grid
from unclip_pl.lit.base import ImageStageMixin, StageModule
from unclip_pl.sample_settings import DecoderSettings


class DecoderModule(ImageStageMixin, StageModule):
    """Decoder training/validation glue.

    Args:
        model: ``unclip_pl.models.decoder.Decoder``.
        optimizer, warmup_steps, ema_decay, clip: see ``StageModule``.
        text_source: "own" (token ids through ``model.text_encoder``) or "clip" (frozen CLIP per-token states;
            needs ``clip`` and a model built with ``text_encoder=None`` and U-Net ``context_dim = clip.text_width``).
        channels_last: convert images to channels_last memory format (faster convolutions on GPU).
        sample_every_n_val: log a sample grid on every n-th validation run (0 = never).
        num_grid_items: validation items in the grid (the first ones of the first validation batch).
        sample: the stage's ``sample:`` block (steps, sampler, eta, guidance_scale[, invert_steps, variation_eta];
            ``sample: ${decoder.sample}`` in the config), the sampler settings of the grids.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        warmup_steps: int = 0,
        ema_decay: float | None = 0.999,
        clip: nn.Module | None = None,
        text_source: str = "own",
        channels_last: bool = False,
        sample_every_n_val: int = 1,
        num_grid_items: int = 8,
        sample: dict[str, Any] | None = None,
        run_config: dict[str, Any] | None = None,
    ):
        super().__init__(model, optimizer, warmup_steps, ema_decay, clip, run_config=run_config)
        if text_source not in ("own", "clip"):
            raise ValueError(f"text_source must be 'own' or 'clip', got {text_source!r}")
        if text_source == "own" and getattr(model, "text_encoder", None) is None:
            raise ValueError("text_source='own' needs the decoder built with a text_encoder")
        if text_source == "clip" and getattr(model, "text_encoder", None) is not None:
            raise ValueError("text_source='clip' uses the frozen CLIP's token states: build the decoder with "
                             "text_encoder=null")
        self.text_source = text_source
        self._init_image_stage(channels_last, sample_every_n_val, num_grid_items)
        self.sample_settings = DecoderSettings.from_block(sample)

    # ------------------------------------------------------------------ inputs

    def _text(self, tokens: torch.Tensor) -> dict[str, Any]:
        """kwargs for Decoder.loss/sample: ``tokens=`` for the own encoder, ``text=(states, mask)`` for CLIP (and,
        for a decoder that takes it, ``text_emb`` and the empty caption's encoding as ``uncond_text``)."""
        if self.text_source == "own":
            return {"tokens": tokens}
        if self.clip is None:
            raise RuntimeError("text_source='clip' needs the frozen CLIP (clip=...)")
        with torch.no_grad():
            enc = self.clip.encode_text(tokens)
            out = {"text": (enc.tokens.float(), enc.mask)}
            if getattr(self.model, "takes_text_emb", False):  # Karlo's decoder: CLIP's text embedding, and the
                empty = self.clip.encode_text(self.clip.tokenize([""]).to(tokens.device))  # empty caption as
                out.update(text_emb=enc.emb.float(),                                    # the dropped caption
                           uncond_text=(empty.tokens.float(), empty.mask, empty.emb.float()))
        return out

    # ------------------------------------------------------------------ training
    def compute_loss(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        return self.model.loss(self._images(batch["image"]), batch["img_emb"].float(), **self._text(batch["tokens"]))

    # ------------------------------------------------------------------ validation
    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        out = self.eval_model.loss(self._images(batch["image"]), batch["img_emb"].float(),
                                   **self._text(batch["tokens"]), generator=self._generator(batch_idx))
        bs = batch["image"].shape[0]
        self.log("val/loss", out["loss"], on_epoch=True, sync_dist=True, batch_size=bs)
        if "vb" in out:
            self.log("val/vb", out["vb"], on_epoch=True, sync_dist=True, batch_size=bs)
        self._keep_grid_items(batch, ("image", "img_emb", "tokens"))

    def on_validation_epoch_end(self) -> None:
        if self._grid_due():
            self.log_samples()

    @torch.no_grad()
    def sample_grid_items(self) -> torch.Tensor:
        """Decode the fixed validation items' CLIP image embeddings with fixed seeds: (N, 3, S, S) in [-1, 1]."""
        items = {k: v.to(self.device) for k, v in self._grid_items.items()}
        n = items["img_emb"].shape[0]
        with self._autocast():
            return self.eval_model.sample(items["img_emb"].float(), **self._text(items["tokens"]),
                                          seeds=list(range(n)), **self.sample_settings.sampler_kwargs()).float()

    def log_samples(self) -> list[str]:
        samples = self.sample_grid_items()
        grid = to_grid([self._grid_items["image"], samples])
        return log_image_grid(self.trainer, "val/samples", grid)
