"""The diffusion prior's network (unCLIP, Ramesh et al. 2022, section 2.2).

A decoder-only, pre-LayerNorm Transformer with a causal attention mask over the sequence

    [caption token encodings (L'), z_t, timestep embedding, noised z_i, final query]

whose output at the final query token, projected to the CLIP embedding width, is the predicted *unnoised* z_i
(x0 parameterisation). Padding caption tokens are masked as keys. For classifier-free guidance the text conditioning
(token encodings and z_t) of the rows where ``drop_cond`` is True is replaced by learned null embeddings: a single
learned null token at the first caption position with the remaining caption positions masked, and a learned null z_t.

The caption tokens and the four trailing tokens have separate learned positional embeddings, so the output does not
depend on how far the caption sequence was padded (L' may be trimmed to the longest caption in the batch).

No Lightning/Hydra imports; no data-dependent Python control flow in ``forward`` (torch.compile friendly).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from unclip_pl.nets.layers import TimestepEmbedder

NUM_TAIL_TOKENS = 4  # z_t, timestep, noised z_i, final query


class SelfAttention(nn.Module):
    """Multi-head self-attention with a fused QKV projection (bias-free unless ``bias``) and SDPA."""

    def __init__(self, dim: int, heads: int, dropout: float = 0.0, bias: bool = False):
        super().__init__()
        assert dim % heads == 0, f"dim {dim} must be divisible by heads {heads}"
        self.heads = heads
        self.dropout = dropout
        self.qkv = nn.Linear(dim, 3 * dim, bias=bias)
        self.proj = nn.Linear(dim, dim, bias=bias)

    def qkv_heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x: (B, S, dim) -> q, k, v, each (B, H, S, dim / H)."""
        b, s, d = x.shape
        return self.qkv(x).view(b, s, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4).unbind(0)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor) -> torch.Tensor:
        """q: (B, H, Sq, hd), k/v: (B, H, Sk, hd), attn_mask: (B, 1, Sq, Sk) bool (True = may attend).
        Returns (B, Sq, dim)."""
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=self.dropout if self.training else 0.0
        )  # (B, H, Sq, hd)
        b, h, sq, hd = out.shape
        return self.proj(out.transpose(1, 2).reshape(b, sq, h * hd))

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor) -> torch.Tensor:
        """x: (B, S, dim); attn_mask: (B, 1, S, S) bool, True = may attend. Returns (B, S, dim)."""
        q, k, v = self.qkv_heads(x)
        return self.attend(q, k, v, attn_mask)


class Block(nn.Module):
    """Pre-LN Transformer block: x + Attn(LN(x)), then x + MLP(LN(x)). ``bias``: biases on every linear layer
    (attention and MLP); ``gelu``: the MLP's GELU, "tanh" (approximation) or "none" (exact erf)."""

    def __init__(self, dim: int, heads: int, ff_mult: int = 4, dropout: float = 0.0, bias: bool = False,
                 gelu: str = "tanh"):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = SelfAttention(dim, heads, dropout, bias)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(
            nn.Linear(dim, ff_mult * dim, bias=bias),
            nn.GELU(approximate=gelu),
            nn.Linear(ff_mult * dim, dim, bias=bias),
        )
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor) -> torch.Tensor:
        """x: (B, S, dim) -> (B, S, dim)."""
        x = x + self.drop(self.attn(self.norm1(x), attn_mask))
        return x + self.drop(self.mlp(self.norm2(x)))


def gpt2_init_(model: nn.Module, blocks: Sequence[Block], params: Sequence[torch.Tensor], depth: int) -> None:
    """GPT-2 initialisation in place: linear and embedding weights and ``params`` (learned tokens, position
    embeddings) ~ N(0, 0.02), biases zero, and each block's residual output projections scaled by 1/sqrt(2 depth)."""
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=0.02)
    for p in params:
        nn.init.normal_(p, std=0.02)
    for blk in blocks:
        nn.init.normal_(blk.attn.proj.weight, std=0.02 / math.sqrt(2 * depth))
        nn.init.normal_(blk.mlp[2].weight, std=0.02 / math.sqrt(2 * depth))


class PriorTransformer(nn.Module):
    """Causal Transformer predicting the unnoised CLIP image embedding.

    Args:
        embed_dim: D, the CLIP embedding width (z_i, z_t).
        text_width: W, the width of the CLIP text encoder's per-token outputs.
        dim: Transformer width.
        depth: number of blocks.
        heads: attention heads.
        max_text_len: maximum number of caption tokens L' (CLIP context length).
        dropout: dropout on attention weights and residual branches.
        ff_mult: MLP hidden width multiplier.
        bias: biases on the blocks' attention and MLP linear layers (default none).
        gelu: the MLP's GELU: "tanh" (default) or "none" (exact).
        time_freq_dim: width of the sinusoidal timestep features fed to the time-embedding MLP (default 256).

    The defaults are this project's prior; ``bias=True, gelu="none", time_freq_dim=dim`` (and ``max_text_len`` =
    the caption length) is the structure of diffusers' ``PriorTransformer`` with Karlo's options, whose weights
    ``unclip_pl.convert.prior`` maps onto this class.
    """

    def __init__(
        self,
        embed_dim: int,
        text_width: int,
        dim: int = 256,
        depth: int = 4,
        heads: int = 4,
        max_text_len: int = 77,
        dropout: float = 0.0,
        ff_mult: int = 4,
        bias: bool = False,
        gelu: str = "tanh",
        time_freq_dim: int = 256,
    ):
        super().__init__()
        self.embed_dim = embed_dim
        self.text_width = text_width
        self.dim = dim
        self.max_text_len = max_text_len

        self.text_proj = nn.Linear(text_width, dim)          # caption token encodings W -> dim
        self.txt_emb_proj = nn.Linear(embed_dim, dim)        # z_t D -> dim
        self.x_proj = nn.Linear(embed_dim, dim)              # noised z_i D -> dim
        self.time_embed = TimestepEmbedder(dim, time_freq_dim)  # t -> dim
        self.query = nn.Parameter(torch.zeros(dim))          # final query token
        self.pos_embedding_text = nn.Parameter(torch.zeros(max_text_len, dim))
        self.pos_embedding_tail = nn.Parameter(torch.zeros(NUM_TAIL_TOKENS, dim))
        # Learned nulls for classifier-free guidance (in the projected, dim-wide space).
        self.null_text_token = nn.Parameter(torch.zeros(dim))
        self.null_txt_emb = nn.Parameter(torch.zeros(dim))

        self.blocks = nn.ModuleList([Block(dim, heads, ff_mult, dropout, bias, gelu) for _ in range(depth)])
        self.norm_out = nn.LayerNorm(dim)
        self.out = nn.Linear(dim, embed_dim)
        self._init_weights(depth)

    def _init_weights(self, depth: int) -> None:
        gpt2_init_(self, self.blocks, (self.query, self.pos_embedding_text, self.pos_embedding_tail,
                                       self.null_text_token, self.null_txt_emb), depth)

    @staticmethod
    def build_mask(text_mask: torch.Tensor) -> torch.Tensor:
        """Combine the causal mask with caption key padding.

        Args:
            text_mask: (B, L') bool, True = real caption token.

        Returns:
            (B, 1, S, S) bool with S = L' + 4, True = query row may attend to key column. Every row can at least attend
            to itself, so no row is fully masked (padded rows produce ignored outputs and are never attended to).
        """
        b, lt = text_mask.shape
        s = lt + NUM_TAIL_TOKENS
        key_valid = torch.cat([text_mask, text_mask.new_ones(b, NUM_TAIL_TOKENS)], dim=1)  # (B, S)
        causal = torch.ones(s, s, dtype=torch.bool, device=text_mask.device).tril()
        eye = torch.eye(s, dtype=torch.bool, device=text_mask.device)
        mask = causal[None] & (key_valid[:, None, :] | eye[None])  # (B, S, S)
        return mask[:, None]

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        *,
        text_tokens: torch.Tensor,
        text_mask: torch.Tensor,
        txt_emb: torch.Tensor,
        drop_cond: torch.Tensor | None = None,
        return_all: bool = False,
    ) -> torch.Tensor:
        """Predict the unnoised (scaled) image embedding.

        Args:
            x: (B, D) noised image embedding z_i at step t (in the diffusion's scaled space).
            t: (B,) int64 timesteps in the original 0..T-1 indexing.
            text_tokens: (B, L', W) caption token encodings from the frozen CLIP text encoder, L' <= max_text_len.
            text_mask: (B, L') bool, True = real token.
            txt_emb: (B, D) CLIP text embedding z_t (in the same scaled space as x).
            drop_cond: optional (B,) bool; True rows get the learned null text conditioning.
            return_all: if True return the final-LayerNorm hidden states of every position, (B, L'+4, dim).

        Returns:
            (B, D) predicted unnoised z_i (or (B, L'+4, dim) with ``return_all``).
        """
        lt = text_tokens.shape[1]
        prefix, prefix_mask = self._embed_prefix(text_tokens, text_mask, txt_emb, drop_cond)
        h = torch.cat([prefix, self._embed_suffix(x, t).to(prefix.dtype)], dim=1)  # (B, S, dim)
        mask = self.build_mask(prefix_mask[:, :lt])
        for blk in self.blocks:
            h = blk(h, mask)
        h = self.norm_out(h)
        if return_all:
            return h
        return self.out(h[:, -1])                                        # (B, D)

    # ------------------------------------------------------------------ pieces shared by forward and the cache
    def _embed_prefix(self, text_tokens, text_mask, txt_emb, drop_cond):
        """The step-independent prefix [caption tokens, z_t] -> (B, L'+1, dim) and its key mask (B, L'+1) bool."""
        lt = text_tokens.shape[1]
        dtype = self.text_proj.weight.dtype
        text_mask = text_mask.bool()
        tok = self.text_proj(text_tokens.to(dtype))                      # (B, L', dim)
        zt = self.txt_emb_proj(txt_emb.to(dtype))                        # (B, dim)
        if drop_cond is not None:
            drop = drop_cond.to(device=tok.device, dtype=torch.bool)
            first = torch.arange(lt, device=tok.device) == 0             # (L',)
            # Dropped rows: one null token at position 0, every other caption position masked.
            tok = torch.where(drop[:, None, None], self.null_text_token.to(tok.dtype), tok)
            text_mask = torch.where(drop[:, None], first[None, :], text_mask)
            zt = torch.where(drop[:, None], self.null_txt_emb.to(zt.dtype), zt)
        tok = tok + self.pos_embedding_text[:lt].to(tok.dtype)
        zt = zt + self.pos_embedding_tail[0].to(zt.dtype)
        prefix = torch.cat([tok, zt[:, None].to(tok.dtype)], dim=1)      # (B, L'+1, dim)
        prefix_mask = torch.cat([text_mask, text_mask.new_ones(text_mask.shape[0], 1)], dim=1)
        return prefix, prefix_mask

    def _embed_suffix(self, x, t):
        """The step-dependent tokens [timestep embedding, noised z_i, final query] -> (B, 3, dim)."""
        temb = self.time_embed(t)                                        # (B, dim)
        xe = self.x_proj(x.to(self.x_proj.weight.dtype))                 # (B, dim)
        q = self.query.to(xe.dtype).expand(x.shape[0], -1)               # (B, dim)
        suffix = torch.stack([temb.to(xe.dtype), xe, q], dim=1)          # (B, 3, dim)
        return suffix + self.pos_embedding_tail[1:].to(suffix.dtype)

    # ------------------------------------------------------------------ sampling with a cached prefix
    @torch.no_grad()
    def encode_prefix(self, text_tokens: torch.Tensor, text_mask: torch.Tensor, txt_emb: torch.Tensor,
                      drop_cond: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Run the step-independent prefix [caption tokens, z_t] once and keep every layer's keys and values.

        Because the mask is causal, these positions never see x_t or t, so one pass serves every sampling step
        (the per-step cost drops from L'+4 to 3 tokens). Arguments as in :meth:`forward`.

        Returns:
            dict(prefix_k, prefix_v: (B, depth, H, L'+1, dim/H), prefix_mask: (B, L'+1) bool), the keyword
            arguments of :meth:`forward_cached` (tensors only, so guidance wrappers can concatenate them).
        """
        h, prefix_mask = self._embed_prefix(text_tokens, text_mask, txt_emb, drop_cond)
        p = h.shape[1]
        causal = torch.ones(p, p, dtype=torch.bool, device=h.device).tril()
        eye = torch.eye(p, dtype=torch.bool, device=h.device)
        mask = (causal[None] & (prefix_mask[:, None, :] | eye[None]))[:, None]  # (B, 1, P, P)
        ks, vs = [], []
        for blk in self.blocks:
            q, k, v = blk.attn.qkv_heads(blk.norm1(h))
            ks.append(k)
            vs.append(v)
            h = h + blk.attn.attend(q, k, v, mask)
            h = h + blk.mlp(blk.norm2(h))
        return {"prefix_k": torch.stack(ks, 1), "prefix_v": torch.stack(vs, 1), "prefix_mask": prefix_mask}

    def forward_cached(self, x: torch.Tensor, t: torch.Tensor, *, prefix_k: torch.Tensor, prefix_v: torch.Tensor,
                       prefix_mask: torch.Tensor) -> torch.Tensor:
        """Same output as :meth:`forward` (eval mode) from a cache of :meth:`encode_prefix`.

        Args:
            x: (B, D) noised z_i; t: (B,) timesteps; prefix_k/prefix_v: (B, depth, H, P, dim/H); prefix_mask: (B, P).
        Returns:
            (B, D) predicted unnoised z_i.
        """
        h = self._embed_suffix(x, t)                                     # (B, 3, dim)
        b, p = prefix_mask.shape
        n = h.shape[1]
        causal = torch.ones(n, n, dtype=torch.bool, device=h.device).tril()
        mask = torch.cat([prefix_mask.bool()[:, None, :].expand(b, n, p), causal[None].expand(b, n, n)], dim=2)
        mask = mask[:, None]                                             # (B, 1, 3, P+3)
        for i, blk in enumerate(self.blocks):
            q, k, v = blk.attn.qkv_heads(blk.norm1(h))
            k = torch.cat([prefix_k[:, i].to(k.dtype), k], dim=2)
            v = torch.cat([prefix_v[:, i].to(v.dtype), v], dim=2)
            h = h + blk.attn.attend(q, k, v, mask)
            h = h + blk.mlp(blk.norm2(h))
        return self.out(self.norm_out(h[:, -1]))                         # (B, D)
