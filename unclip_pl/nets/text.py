"""GLIDE-style caption encoder trained together with the decoder.

A pre-LayerNorm Transformer over CLIP token ids (open_clip SimpleTokenizer ids: start token .. end token, then
0-padding). Attention is bidirectional with padding keys masked out; the per-token states (after a final LayerNorm)
become the decoder's context sequence. The alternative is the frozen CLIP's per-token outputs
(``FrozenCLIP.encode_text``), selected in
the decoder config.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class _Block(nn.Module):
    def __init__(self, width: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.heads = heads
        self.ln_1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.ln_2 = nn.LayerNorm(width)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
        B, L, W = x.shape
        q, k, v = self.qkv(self.ln_1(x)).view(B, L, 3, self.heads, W // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)   # (B, heads, L, dh)
        x = x + self.proj(a.transpose(1, 2).reshape(B, L, W))
        return x + self.mlp(self.ln_2(x))


class TextEncoder(nn.Module):
    """Transformer caption encoder.

    Args:
        vocab_size: token vocabulary (49408 for the CLIP BPE).
        context_length: maximum caption length L (positional embeddings).
        width, layers, heads: Transformer shape (paper decoder: 2048 / 24 / 32 with context 256).

    Real tokens are found by position, up to the end token (the largest id, as in CLIP): id 0 is padding but also a
    real BPE token ("!"), so ``tokens != 0`` would mask real punctuation.

    ``forward(tokens (B, L') int64, L' <= context_length) -> (states (B, L', width), mask (B, L') bool)``.
    """

    def __init__(self, vocab_size: int = 49408, context_length: int = 77, width: int = 512, layers: int = 4,
                 heads: int = 8):
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} not divisible by heads {heads}")
        self.context_length = context_length
        self.width = width
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.positional_embedding = nn.Parameter(torch.randn(context_length, width) * 0.01)
        self.blocks = nn.ModuleList([_Block(width, heads) for _ in range(layers)])
        self.ln_final = nn.LayerNorm(width)
        nn.init.normal_(self.token_embedding.weight, std=0.02)

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B, L = tokens.shape
        if L > self.context_length:
            raise ValueError(f"caption length {L} exceeds the text encoder's context length {self.context_length}")
        eot = tokens.argmax(dim=-1)                                          # (B,) end-token position
        mask = torch.arange(L, device=tokens.device)[None, :] <= eot[:, None]  # (B, L), never all False
        attn_mask = mask[:, None, None, :]                                   # (B, 1, 1, L)
        x = self.token_embedding(tokens) + self.positional_embedding[:L]
        for block in self.blocks:
            x = block(x, attn_mask)
        return self.ln_final(x), mask
