"""Trainable CLIP with the symmetric InfoNCE loss (no Lightning here; ``unclip_pl.lit.clip`` wraps it)."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from unclip_pl.clip.frozen import (
    encode_text_tokens,
    loader_tokenizer,
    model_image_size,
    preprocess_images,
    tokenizer_for,
)
from unclip_pl.clip.small import DEFAULT_SMALL, SMALL_CLIP_CONFIGS, build_from_config, small_clip_config
from unclip_pl.utils.distributed import gather_counts, gather_rows, is_distributed

MAX_LOGIT_SCALE = math.log(100.0)


class ContrastiveCLIP(nn.Module):
    """An open_clip ``CLIP`` trained contrastively.

    Args:
        model_name: small config name (``unclip-tiny``) the overrides apply to; also stored in the export.
        model_cfg: open_clip model config overrides (``embed_dim``, ``vision_cfg``, ``text_cfg`` dicts).
        trim_text: trim caption padding of CPU token batches (the CLIP stage's loader trims in its workers; exact
            for causal text towers; about halves text-tower cost).
        gather: with torch.distributed initialised and world size > 1, compute the loss against the features of all
            ranks (differentiable all-gather), as in CLIP.
    """

    def __init__(self, model_name: str = DEFAULT_SMALL, model_cfg: dict[str, Any] | None = None,
                 trim_text: bool = True, gather: bool = True):
        super().__init__()
        base = model_name if model_name in SMALL_CLIP_CONFIGS else DEFAULT_SMALL
        self.model_name = model_name
        self.model_cfg = small_clip_config(base, **(dict(model_cfg) if model_cfg else {}))
        self.clip = build_from_config(self.model_cfg)
        self.trim_text = trim_text
        self.gather = gather
        pp = self.clip.visual.preprocess_cfg
        self.image_size = model_image_size(self.clip)
        self.mean, self.std = tuple(pp["mean"]), tuple(pp["std"])

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> (B, D) unit-norm (same preprocessing as FrozenCLIP)."""
        x = preprocess_images(images, self.image_size, self.mean, self.std)
        return F.normalize(self.clip.encode_image(x), dim=-1)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, L) int64 -> (B, D) unit-norm."""
        pooled, _, _ = encode_text_tokens(self.clip, tokens, trim=self.trim_text)
        return F.normalize(pooled, dim=-1)

    @property
    def loader_tokenizer(self) -> Any:
        """Picklable ``list[str] -> (B, L')`` tokenizer for the loader workers, trimming caption padding where
        exact (``trim_text``)."""
        return loader_tokenizer(tokenizer_for(self.clip, self.model_name), self.clip, self.trim_text)

    def logit_scale(self) -> torch.Tensor:
        return self.clip.logit_scale.clamp(max=MAX_LOGIT_SCALE).exp()

    def loss(self, batch: dict[str, Any], pad_to: int | None = None) -> dict[str, torch.Tensor]:
        """batch: image (B, 3, H, W) in [-1, 1], tokens (B, L). Returns loss, acc (in-batch i2t top-1), logit_scale.
        ``pad_to``: see :meth:`contrastive_loss`."""
        with torch.no_grad():  # CLIP's clamp of the temperature (the parameter itself, as open_clip does)
            self.clip.logit_scale.clamp_(0.0, MAX_LOGIT_SCALE)
        img = self.encode_image(batch["image"])
        txt = self.encode_text(batch["tokens"])
        return self.contrastive_loss(img, txt, pad_to=pad_to)

    def contrastive_loss(self, img: torch.Tensor, txt: torch.Tensor, gather: bool | None = None,
                         pad_to: int | None = None) -> dict[str, torch.Tensor]:
        """img, txt: (B, D) unit-norm paired features -> symmetric InfoNCE.

        With ``gather`` (default ``self.gather``) and several ranks, every rank's features are negatives; then every
        rank must call it, and B may differ between ranks. ``pad_to`` (an upper bound on every rank's B, e.g. the
        loader's batch size) makes the exchange free of host syncs: each rank sends ``pad_to`` rows and a validity
        flag, and padded columns are masked out of the softmax. Without it the ranks first exchange their sizes and
        read them back to the host (a sync per step on GPU)."""
        gather = self.gather if gather is None else gather
        offset, all_img, all_txt, valid = 0, img, txt, None
        if gather and is_distributed():
            offset, all_img, all_txt, valid = _gather_features(img, txt, pad_to)
        scale = self.clip.logit_scale.exp()
        logits_i2t = scale * img @ all_txt.T  # (B, N): N = B, the sum of B over ranks, or world * pad_to
        logits_t2i = scale * txt @ all_img.T
        if valid is not None:  # padded rows of other ranks are no negatives
            logits_i2t = logits_i2t.masked_fill(~valid, float("-inf"))
            logits_t2i = logits_t2i.masked_fill(~valid, float("-inf"))
        labels = torch.arange(img.shape[0], device=img.device) + offset
        loss = 0.5 * (F.cross_entropy(logits_i2t, labels) + F.cross_entropy(logits_t2i, labels))
        acc = (logits_i2t.argmax(dim=-1) == labels).float().mean()
        return {"loss": loss, "acc": acc.detach(), "logit_scale": scale.detach()}

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        return self.loss(batch)


def _gather_features(img: torch.Tensor, txt: torch.Tensor, pad_to: int | None = None
                     ) -> tuple[int, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Differentiable all-gather (``gather_rows(sync_grads=True)``) of (B_r, D) features from every rank.

    With ``pad_to``: every rank sends ``pad_to`` rows plus a validity flag; no host sync. Returns (offset of this
    rank's rows = rank * pad_to, (world * pad_to, D) images, texts, valid (world * pad_to,) bool).
    Without: the sizes are exchanged and read back first; returns (offset, (sum B_r, D) images, texts, None)."""
    world, rank = dist.get_world_size(), dist.get_rank()
    b, d = img.shape
    both = torch.cat([img, txt], dim=-1)  # (B, 2D)
    if pad_to is not None:
        if b > pad_to:
            raise ValueError(f"contrastive gather: local batch {b} is larger than pad_to={pad_to}")
        flag = torch.ones(b, 1, dtype=both.dtype, device=both.device)
        rows = F.pad(torch.cat([both, flag], dim=-1), (0, 0, 0, pad_to - b))  # (pad_to, 2D + 1), flag 0 on padding
        full = gather_rows(rows, counts=[pad_to] * world, sync_grads=True)  # (world * pad_to, 2D + 1)
        return rank * pad_to, full[:, :d], full[:, d:2 * d], full[:, -1] > 0.5
    sizes = gather_counts(b)
    full = gather_rows(both, counts=sizes, sync_grads=True)  # (sum B_r, 2D)
    return sum(sizes[:rank]), full[:, :d], full[:, d:], None
