"""The open_clip text tower run token by token: finding the tower, trimming caption padding, per-token states.

Shared by :class:`unclip_pl.clip.frozen.FrozenCLIP` and the contrastive trainer so both see identical inputs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn


class UnsupportedTextTower(TypeError):
    """A CLIP whose text tower is not an open_clip text transformer (e.g. a Hugging Face one)."""


def text_tower(model: nn.Module) -> nn.Module:
    """The module holding token_embedding/positional_embedding/transformer/ln_final/text_projection/attn_mask:
    the CLIP itself (open_clip ``CLIP``) or its ``.text`` (``CustomTextCLIP`` with an open_clip TextTransformer)."""
    tower = model if hasattr(model, "token_embedding") else getattr(model, "text", None)
    if tower is None or not hasattr(tower, "token_embedding") or not hasattr(tower, "transformer"):
        raise UnsupportedTextTower(f"{type(model).__name__}: only open_clip text transformers are supported "
                                   "(not Hugging Face text towers)")
    return tower


def can_trim(model: nn.Module) -> bool:
    """True when trimming padding is exact: causal mask and end-token (argmax) pooling, no class token."""
    tower = text_tower(model)
    pool = getattr(tower, "text_pool_type", getattr(tower, "pool_type", "argmax"))
    causal = getattr(tower, "attn_mask", None) is not None
    return causal and pool == "argmax" and getattr(tower, "cls_emb", None) is None


TRIM_MULTIPLE = 8  # trimmed caption lengths are rounded up to this: few distinct shapes (torch.compile), aligned


def trim_tokens(tokens: torch.Tensor, multiple: int = TRIM_MULTIPLE) -> torch.Tensor:
    """(B, L) token ids -> (B, L') with the padding after the longest caption cut, L' = its length (start .. end
    token) rounded up to ``multiple`` and capped at L. Reads the lengths back to the host: call it on CPU tensors
    (in the loader, when tokenising), never on device tensors inside a training step."""
    if tokens.numel() == 0:
        return tokens
    need = int(tokens.argmax(dim=-1).max()) + 1
    length = min(tokens.shape[1], -(-need // multiple) * multiple)
    return tokens[:, :length]


class TrimmingTokenizer:
    """Picklable ``list[str] -> (B, L')`` tokenizer for loader workers: the wrapped tokenizer, then
    :func:`trim_tokens` on the CPU. Use it only for text towers where :func:`can_trim` holds (see
    :func:`loader_tokenizer`)."""

    def __init__(self, tokenizer: Any, multiple: int = TRIM_MULTIPLE):
        self.tokenizer = tokenizer
        self.multiple = int(multiple)

    def __call__(self, texts: Sequence[str]) -> torch.Tensor:
        return trim_tokens(torch.as_tensor(self.tokenizer(list(texts)), dtype=torch.long), self.multiple)


def loader_tokenizer(tokenizer: Any, model: nn.Module, trim: bool = True) -> Any:
    """The picklable tokenizer to give data loaders for ``model``'s text tower: ``tokenizer`` wrapped in a
    :class:`TrimmingTokenizer` when ``trim`` and trimming is exact for the tower, else ``tokenizer`` itself."""
    return TrimmingTokenizer(tokenizer) if trim and can_trim(model) else tokenizer


def encode_text_tokens(model: nn.Module, tokens: torch.Tensor, trim: bool = True
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run an open_clip text tower keeping per-token states.

    tokens: (B, L) int64, open_clip SimpleTokenizer ids (start .. end token, 0-padded; id 0 is also a real BPE token,
    so real tokens are found by position: up to the end token = argmax id). L may be shorter than the context length.
    trim: when ``tokens`` is on the CPU and trimming is exact for this tower, cut the padding first
    (:func:`trim_tokens`), then move them to the model's device.
    Device tensors are used at the length given, with no host sync: trim them on the CPU beforehand (the loaders do,
    with :class:`TrimmingTokenizer`).
    Returns (pooled (B, D) NOT normalised, states (B, L', W) after ln_final, mask (B, L') bool).
    """
    tower = text_tower(model)
    if trim and tokens.device.type == "cpu" and can_trim(model):
        tokens = trim_tokens(tokens)
    tokens = tokens.to(device_of(model))
    length = tokens.shape[1]
    eot = tokens.argmax(dim=-1)  # (B,) end-token position
    transformer = tower.transformer
    cast_dtype = transformer.get_cast_dtype() if hasattr(transformer, "get_cast_dtype") else torch.float32
    x = tower.token_embedding(tokens).to(cast_dtype)  # (B, L', W)
    x = x + tower.positional_embedding[:length].to(cast_dtype)
    attn_mask = getattr(tower, "attn_mask", None)
    if attn_mask is not None:
        attn_mask = attn_mask[:length, :length]
    # open_clip >= 2.24: Transformer has `batch_first` and takes (B, L, W) (transposing itself when False);
    # older versions have no attribute and expect (L, B, W).
    if hasattr(transformer, "batch_first"):
        x = transformer(x, attn_mask=attn_mask)
    else:
        x = transformer(x.permute(1, 0, 2), attn_mask=attn_mask).permute(1, 0, 2)
    x = tower.ln_final(x)  # (B, L', W)
    pooled = x[torch.arange(x.shape[0], device=x.device), eot]  # (B, W)
    proj = tower.text_projection
    if proj is not None:
        pooled = proj(pooled) if isinstance(proj, nn.Module) else pooled @ proj
    mask = torch.arange(length, device=tokens.device)[None, :] <= eot[:, None]
    return pooled, x, mask


def device_of(module: nn.Module) -> torch.device:
    """The device of ``module``'s first parameter (CPU when it has none)."""
    for p in module.parameters():
        return p.device
    return torch.device("cpu")
