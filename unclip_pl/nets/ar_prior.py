"""The autoregressive prior's network (unCLIP, Ramesh et al. 2022, section 2.2).

A decoder-only, pre-LayerNorm Transformer with a causal attention mask over the sequence

    [caption token states (L), z_t, dot-product token, code_1, ..., code_{k-1}]

predicting the next token: the output at z_t gives the logits of the quantised dot product z_i.z_t, the output at the
dot token gives code_1, and the output at code_i gives code_{i+1} (code_k is never an input). Padding caption tokens
are masked as keys. For classifier-free guidance the text conditioning (caption states and z_t) of the rows where
``drop_cond`` is True is replaced by learned nulls: one learned null token at the first caption position with the
other caption positions masked, and a learned null z_t.

Token embeddings: one table for the dot token, one table shared by every code plus a learned embedding per component
index (which also serves as the code tokens' position). The caption tokens, z_t and the dot token have their own
learned positional embeddings, so the output does not depend on how far the captions were padded.

Two ways to run it: :meth:`ARPriorTransformer.forward` scores a whole sequence in one pass (teacher forcing), and
:meth:`ARPriorTransformer.start` / :meth:`ARPriorTransformer.step` decode one token at a time with a K/V cache (the
same logits, eval mode), so k codes cost one prefix pass and k single-token steps.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from unclip_pl.nets.prior import Block, gpt2_init_


class ARPriorTransformer(nn.Module):
    """Causal Transformer over [caption states, z_t, dot token, codes] predicting the next token.

    Args:
        text_width: W, the width of the CLIP text encoder's per-token states.
        embed_dim: D, the CLIP embedding width (z_t).
        num_components: k, the number of codes per embedding (PCA components).
        num_buckets: the size of each code's vocabulary (quantisation buckets, shared by all components).
        num_dot_buckets: the vocabulary of the dot-product token.
        dim: Transformer width.
        depth: number of blocks.
        heads: attention heads.
        ff_mult: MLP hidden width multiplier.
        max_text_len: the most caption tokens L accepted.
        dropout: dropout on attention weights and residual branches.
    """

    def __init__(self, text_width: int, embed_dim: int, num_components: int, num_buckets: int, num_dot_buckets: int,
                 dim: int = 256, depth: int = 4, heads: int = 4, ff_mult: int = 4, max_text_len: int = 77,
                 dropout: float = 0.0):
        super().__init__()
        if num_components < 1 or num_buckets < 2 or num_dot_buckets < 2:
            raise ValueError(f"need num_components >= 1 and >= 2 buckets, got {num_components}, {num_buckets}, "
                             f"{num_dot_buckets}")
        if dim % heads:
            raise ValueError(f"dim {dim} must be divisible by heads {heads}")
        self.text_width = int(text_width)
        self.embed_dim = int(embed_dim)
        self.num_components = int(num_components)
        self.num_buckets = int(num_buckets)
        self.num_dot_buckets = int(num_dot_buckets)
        self.dim = int(dim)
        self.depth = int(depth)
        self.heads = int(heads)
        self.max_text_len = int(max_text_len)

        self.text_proj = nn.Linear(text_width, dim)              # caption states W -> dim
        self.txt_emb_proj = nn.Linear(embed_dim, dim)            # z_t * sqrt(D) -> dim
        self.dot_embed = nn.Embedding(num_dot_buckets, dim)      # the dot-product token
        self.code_embed = nn.Embedding(num_buckets, dim)         # shared by every component
        self.component_embed = nn.Embedding(num_components, dim)  # code_i gets component_embed[i - 1]
        self.pos_embedding_text = nn.Parameter(torch.zeros(max_text_len, dim))
        self.pos_embedding_tail = nn.Parameter(torch.zeros(2, dim))  # z_t, dot token
        self.null_text_token = nn.Parameter(torch.zeros(dim))
        self.null_txt_emb = nn.Parameter(torch.zeros(dim))

        self.blocks = nn.ModuleList([Block(dim, heads, ff_mult, dropout) for _ in range(depth)])
        self.norm_out = nn.LayerNorm(dim)
        self.dot_head = nn.Linear(dim, num_dot_buckets)
        self.code_head = nn.Linear(dim, num_buckets)
        self._init_weights(depth)

    def _init_weights(self, depth: int) -> None:
        gpt2_init_(self, self.blocks, (self.pos_embedding_text, self.pos_embedding_tail, self.null_text_token,
                                       self.null_txt_emb), depth)

    # ------------------------------------------------------------------ embeddings
    def _embed_prefix(self, text_states, text_mask, txt_emb, drop_cond):
        """[caption states, z_t] -> (B, L+1, dim) and its key mask (B, L+1) bool."""
        b, lt = text_states.shape[:2]
        if lt > self.max_text_len:
            raise ValueError(f"{lt} caption tokens exceed max_text_len={self.max_text_len}")
        if text_mask.shape != (b, lt):
            raise ValueError(f"text_mask must be {(b, lt)}, got {tuple(text_mask.shape)}")
        dtype = self.text_proj.weight.dtype
        text_mask = text_mask.to(device=text_states.device, dtype=torch.bool)
        tok = self.text_proj(text_states.to(dtype))                         # (B, L, dim)
        zt = self.txt_emb_proj(txt_emb.to(dtype) * math.sqrt(self.embed_dim))  # (B, dim)
        if drop_cond is not None:
            drop = drop_cond.to(device=tok.device, dtype=torch.bool)
            first = torch.arange(lt, device=tok.device) == 0
            tok = torch.where(drop[:, None, None], self.null_text_token.to(dtype), tok)
            text_mask = torch.where(drop[:, None], first[None, :], text_mask)
            zt = torch.where(drop[:, None], self.null_txt_emb.to(dtype), zt)
        tok = tok + self.pos_embedding_text[:lt].to(dtype)
        zt = zt + self.pos_embedding_tail[0].to(dtype)
        prefix = torch.cat([tok, zt[:, None]], dim=1)
        key_mask = torch.cat([text_mask, text_mask.new_ones(b, 1)], dim=1)
        return prefix, key_mask

    def embed_token(self, token: torch.Tensor, index: int) -> torch.Tensor:
        """(B,) long token at tail position ``index`` (0: the dot token, i >= 1: code_i) -> (B, dim)."""
        if index == 0:
            return self.dot_embed(token) + self.pos_embedding_tail[1]
        if not 1 <= index < self.num_components:
            raise ValueError(f"index must be in [0, {self.num_components - 1}], got {index}")
        return self.code_embed(token) + self.component_embed.weight[index - 1]

    def _embed_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (B, j) long, j <= k - 1: code_1..code_j -> (B, j, dim)."""
        j = codes.shape[1]
        return self.code_embed(codes) + self.component_embed.weight[:j]

    @staticmethod
    def _mask(key_mask: torch.Tensor, n_new: int) -> torch.Tensor:
        """Causal mask of ``n_new`` new queries over ``key_mask`` (B, S) keys whose last n_new are the queries.

        Returns (B, 1, n_new, S) bool, True = may attend; every query may attend to itself (no row fully masked).
        """
        b, s = key_mask.shape
        past = s - n_new
        q_pos = torch.arange(past, s, device=key_mask.device)
        k_pos = torch.arange(s, device=key_mask.device)
        causal = k_pos[None, :] <= q_pos[:, None]                          # (n_new, S)
        eye = k_pos[None, :] == q_pos[:, None]
        return (causal[None] & (key_mask[:, None, :] | eye[None]))[:, None]

    # ------------------------------------------------------------------ teacher forcing
    def forward(self, text_states: torch.Tensor, text_mask: torch.Tensor, txt_emb: torch.Tensor, dot: torch.Tensor,
                codes: torch.Tensor, drop_cond: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Score a whole sequence in one pass.

        Args:
            text_states: (B, L, W) caption token states from the frozen CLIP text encoder, L <= max_text_len.
            text_mask: (B, L) bool, True = real token.
            txt_emb: (B, D) unit-norm CLIP text embedding z_t (fed as z_t * sqrt(D)).
            dot: (B,) long dot-product token.
            codes: (B, k) long codes (code_k is a target only, never an input).
            drop_cond: optional (B,) bool; True rows get the learned null text conditioning.
        Returns:
            dot_logits (B, num_dot_buckets) from the z_t position, and code_logits (B, k, num_buckets) where
            code_logits[:, i] predicts code_{i+1} from the tokens before it.
        """
        k = self.num_components
        if codes.ndim != 2 or codes.shape[1] != k:
            raise ValueError(f"codes must be (B, {k}), got {tuple(codes.shape)}")
        prefix, key_mask = self._embed_prefix(text_states, text_mask, txt_emb, drop_cond)
        dot_tok = self.embed_token(dot, 0)[:, None].to(prefix.dtype)      # (B, 1, dim)
        code_tok = self._embed_codes(codes[:, :k - 1]).to(prefix.dtype)   # (B, k-1, dim)
        h = torch.cat([prefix, dot_tok, code_tok], dim=1)                              # (B, L+1+k, dim)
        key_mask = torch.cat([key_mask, key_mask.new_ones(h.shape[0], k)], dim=1)
        mask = self._mask(key_mask, h.shape[1])
        for blk in self.blocks:
            h = blk(h, mask)
        h = self.norm_out(h[:, -(k + 1):])                                 # outputs at z_t, dot, code_1..code_{k-1}
        return self.dot_head(h[:, 0]), self.code_head(h[:, 1:])

    # ------------------------------------------------------------------ incremental decoding with a K/V cache
    def _run(self, h: torch.Tensor, new_mask: torch.Tensor, cache: dict[str, Any]) -> torch.Tensor:
        """Run new tokens h (B, n, dim), key mask new_mask (B, n) bool, over the cached keys/values and append theirs.

        Returns the new tokens' final-LayerNorm states (B, n, dim).
        """
        key_mask = torch.cat([cache["key_mask"], new_mask], dim=1)
        mask = self._mask(key_mask, h.shape[1])
        for i, blk in enumerate(self.blocks):
            q, k, v = blk.attn.qkv_heads(blk.norm1(h))
            if cache["k"][i] is not None:
                k = torch.cat([cache["k"][i], k], dim=2)
                v = torch.cat([cache["v"][i], v], dim=2)
            cache["k"][i], cache["v"][i] = k, v
            h = h + blk.attn.attend(q, k, v, mask)
            h = h + blk.mlp(blk.norm2(h))
        cache["key_mask"] = key_mask
        return self.norm_out(h)

    @torch.no_grad()
    def start(self, text_states: torch.Tensor, text_mask: torch.Tensor, txt_emb: torch.Tensor,
              drop_cond: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, Any]]:
        """Encode the prefix [caption states, z_t] once and keep every layer's keys and values.

        Arguments as in :meth:`forward`. Returns the dot-token logits (B, num_dot_buckets) and the cache for
        :meth:`step`: dict(k, v: per-layer lists of (B, H, S, dim / H), key_mask: (B, S) bool, next_index: int).
        """
        prefix, key_mask = self._embed_prefix(text_states, text_mask, txt_emb, drop_cond)
        cache: dict[str, Any] = {"k": [None] * self.depth, "v": [None] * self.depth,
                                 "key_mask": key_mask[:, :0], "next_index": 0}
        h = self._run(prefix, key_mask, cache)
        return self.dot_head(h[:, -1]), cache

    @torch.no_grad()
    def step(self, token: torch.Tensor, index: int, cache: dict[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
        """Feed one token and get the next code's logits.

        Args:
            token: (B,) long; index 0 feeds the dot token, index i >= 1 feeds code_i (1 <= i <= k - 1).
            index: the tail position; must follow the previous call (0 right after :meth:`start`).
            cache: from :meth:`start` or the previous :meth:`step` (updated in place and returned).
        Returns:
            logits (B, num_buckets) of code_{index+1}, and the cache.
        """
        if index != cache["next_index"]:
            raise ValueError(f"step index {index} out of order; expected {cache['next_index']}")
        h = self.embed_token(token, index)[:, None].to(self.text_proj.weight.dtype)
        h = self._run(h, cache["key_mask"].new_ones(h.shape[0], 1), cache)
        cache["next_index"] = index + 1
        return self.code_head(h[:, -1]), cache
