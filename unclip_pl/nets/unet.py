"""ADM/GLIDE-style U-Net used by the unCLIP decoder and the diffusion upsamplers.

Layout (Dhariwal & Nichol 2021, GLIDE): a stem conv, ``len(channel_mult)`` levels of ``num_res_blocks`` residual
blocks (timestep scale-shift GroupNorm) with optional self/cross attention, stride-2 conv down-sampling, a middle
block, the mirrored decoder path with skip connections and nearest + conv up-sampling, and a zero-initialised output
conv.

Conditioning:
- ``t`` (B,): sinusoidal embedding -> MLP -> ``emb`` (B, 4 * model_channels) that modulates every residual block.
- ``clip_emb`` (B, D) (decoder): projected and ADDED to ``emb`` and projected into ``num_clip_tokens`` extra context
  tokens appended to the caption sequence ``context`` (B, S, Cctx); every attention layer attends over its own
  positions plus all context tokens (GLIDE: the context is projected into each attention block's keys/values).
- ``low_res`` (B, C, h, w) (upsamplers): bilinearly resized to x's size and concatenated to x on channels.

With ``attention_resolutions=()`` no attention module exists at all; the network is then purely convolutional and
runs at any size divisible by ``2 ** (len(channel_mult) - 1)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from unclip_pl.nets.layers import timestep_embedding


def _groups(channels: int, groups: int = 32) -> int:
    """``groups`` groups when possible (ADM: 32), else the largest divisor of ``channels`` that divides ``groups``."""
    return math.gcd(groups, channels)


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 and cast back to the input dtype (stable under bf16/fp16, with float32 or
    low-precision weights alike)."""

    def __init__(self, channels: int, groups: int = 32, eps: float = 1e-5):
        super().__init__(_groups(channels, groups), channels, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.float() if self.weight is not None else None
        b = self.bias.float() if self.bias is not None else None
        return F.group_norm(x.float(), self.num_groups, w, b, self.eps).to(x.dtype)


def zero_module(m: nn.Module) -> nn.Module:
    for p in m.parameters():
        nn.init.zeros_(p)
    return m


class Downsample(nn.Module):
    """Stride-2 3x3 conv: (B, C, H, W) -> (B, C, H/2, W/2)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest x2 then 3x3 conv: (B, C, H, W) -> (B, C, 2H, 2W)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class ResBlock(nn.Module):
    """Residual block with timestep scale-shift normalisation: ``out = skip(x) + conv(drop(act(norm(h)*(1+s)+b)))``.

    x: (B, C_in, H, W), emb: (B, E) -> (B, C_out, H, W); (B, C_out, H/2, W/2) or (B, C_out, 2H, 2W) with
    ``updown`` "down" / "up" (ADM's resblock_updown: after the first norm and activation, both the residual path and
    the skip are 2x2-average-pooled or nearest-upsampled; the block is then the level's resampler).
    ``scale_shift=False``: the projected embedding is added before the second norm instead
    (``out = skip(x) + conv(drop(act(norm(h + e))))``). ``groups`` / ``eps``: the two GroupNorms' settings.
    ``context_dim``: the block cross-attends from its first conv's output to the context tokens (B, S, context_dim)
    before the timestep modulation (:class:`ContextCrossAttention`, DALLE2-pytorch's residual-block layout); then
    ``forward(x, emb, context, context_mask)``. None (default): no such layer.
    """

    def __init__(self, in_ch: int, emb_ch: int, out_ch: int, dropout: float = 0.0, use_checkpoint: bool = False,
                 *, updown: str = "none", scale_shift: bool = True, groups: int = 32, eps: float = 1e-5,
                 context_dim: int | None = None, num_head_channels: int = 64):
        super().__init__()
        if updown not in ("none", "up", "down"):
            raise ValueError(f"updown must be 'none', 'up' or 'down', got {updown!r}")
        self.use_checkpoint = use_checkpoint
        self.updown = updown
        self.scale_shift = bool(scale_shift)
        self.in_layers = nn.Sequential(GroupNorm32(in_ch, groups, eps), nn.SiLU(),
                                       nn.Conv2d(in_ch, out_ch, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_ch, (2 if self.scale_shift else 1) * out_ch))
        self.out_norm = GroupNorm32(out_ch, groups, eps)
        self.out_layers = nn.Sequential(nn.SiLU(), nn.Dropout(dropout),
                                        zero_module(nn.Conv2d(out_ch, out_ch, 3, padding=1)))
        self.skip = nn.Identity() if in_ch == out_ch else nn.Conv2d(in_ch, out_ch, 1)
        if context_dim is not None and updown != "none":
            raise ValueError("a resampling residual block has no context cross-attention")
        self.cross_attn = (ContextCrossAttention(out_ch, context_dim, min(num_head_channels, out_ch), groups)
                           if context_dim is not None else None)

    def _resample(self, x: torch.Tensor) -> torch.Tensor:
        if self.updown == "down":
            return F.avg_pool2d(x, kernel_size=2, stride=2)
        return F.interpolate(x, scale_factor=2.0, mode="nearest")

    def _forward(self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor | None = None,
                 context_mask: torch.Tensor | None = None) -> torch.Tensor:
        if self.updown == "none":
            h = self.in_layers(x)
        else:
            h = self._resample(self.in_layers[1](self.in_layers[0](x)))
            x = self._resample(x)
            h = self.in_layers[2](h)
        if self.cross_attn is not None:
            if context is None:
                raise ValueError("this residual block cross-attends to the context tokens: pass context (B, S, C)")
            h = self.cross_attn(h, context, context_mask)
        e = self.emb_layers(emb).to(h.dtype)[:, :, None, None]
        if self.scale_shift:
            scale, shift = e.chunk(2, dim=1)
            h = self.out_norm(h) * (1 + scale) + shift
        else:
            h = self.out_norm(h + e)
        return self.skip(x) + self.out_layers(h)

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor | None = None,
                context_mask: torch.Tensor | None = None) -> torch.Tensor:
        if self.use_checkpoint and self.training and torch.is_grad_enabled():
            return checkpoint(self._forward, x, emb, context, context_mask, use_reentrant=False)
        return self._forward(x, emb, context, context_mask)


class ContextCrossAttention(nn.Module):
    """Cross-attention from the H*W positions to the context tokens only (DALLE2-pytorch puts one in each residual
    block below the first level); residual, output projection zero-initialised.

    x: (B, C, H, W); context: (B, S, Cctx); context_mask: (B, S) bool (True = attend) or None -> (B, C, H, W).
    A row whose mask is all False attends to nothing (its output is x unchanged).
    """

    def __init__(self, channels: int, context_dim: int, num_head_channels: int = 64, groups: int = 32):
        super().__init__()
        if channels % num_head_channels:
            raise ValueError(f"channels {channels} not divisible by num_head_channels {num_head_channels}")
        self.num_heads = channels // num_head_channels
        self.norm = GroupNorm32(channels, groups)
        self.q = nn.Linear(channels, channels)
        self.context_norm = nn.LayerNorm(context_dim)
        self.kv = nn.Linear(context_dim, 2 * channels)
        self.proj_out = zero_module(nn.Linear(channels, channels))

    def forward(self, x: torch.Tensor, context: torch.Tensor, context_mask: torch.Tensor | None = None):
        B, C, H, W = x.shape
        nh, S = self.num_heads, context.shape[1]
        q = self.q(self.norm(x).flatten(2).transpose(1, 2)).view(B, H * W, nh, C // nh).transpose(1, 2)
        ctx = self.context_norm(context.to(q.dtype))
        k, v = self.kv(ctx).view(B, S, 2, nh, C // nh).permute(2, 0, 3, 1, 4)     # each (B, nh, S, dh)
        mask = keep = None
        if context_mask is not None:
            m = context_mask.to(torch.bool)
            keep = m.any(dim=1)                                                   # (B,)
            mask = (m | ~keep[:, None])[:, None, None, :]                         # (B, 1, 1, S), no empty rows
        out = F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=mask)  # (B, nh, HW, dh)
        out = self.proj_out(out.transpose(1, 2).reshape(B, H * W, C)).transpose(1, 2).reshape(B, C, H, W)
        if keep is not None:
            out = out * keep[:, None, None, None].to(out.dtype)
        return x + out.to(x.dtype)


class AttentionBlock(nn.Module):
    """Multi-head self-attention over the H*W positions, optionally also over context tokens (GLIDE).

    x: (B, C, H, W); context: (B, S, Cctx) or None; context_mask: (B, S) bool (True = attend) or None.
    Keys/values are ``[context tokens, positions]``; queries are the positions. Output is residual, zero-initialised.
    """

    def __init__(self, channels: int, num_head_channels: int = 64, context_dim: int | None = None,
                 use_checkpoint: bool = False, groups: int = 32):
        super().__init__()
        if channels % num_head_channels:
            raise ValueError(f"channels {channels} not divisible by num_head_channels {num_head_channels}")
        self.num_heads = channels // num_head_channels
        self.use_checkpoint = use_checkpoint
        self.norm = GroupNorm32(channels, groups)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.encoder_kv = nn.Linear(context_dim, 2 * channels) if context_dim is not None else None
        self.proj_out = zero_module(nn.Linear(channels, channels))

    def _forward(self, x: torch.Tensor, context: torch.Tensor | None, context_mask: torch.Tensor | None):
        B, C, H, W = x.shape
        nh = self.num_heads
        h = self.norm(x).flatten(2).transpose(1, 2)                       # (B, HW, C); free for channels_last
        q, k, v = self.qkv(h).view(B, H * W, 3, nh, C // nh).permute(2, 0, 3, 1, 4)  # each (B, nh, HW, dh)
        mask = None
        if context is not None and self.encoder_kv is not None:
            S = context.shape[1]
            ek, ev = self.encoder_kv(context).view(B, S, 2, nh, C // nh).permute(2, 0, 3, 1, 4)  # (B, nh, S, dh)
            k = torch.cat([ek.to(k.dtype), k], dim=2)
            v = torch.cat([ev.to(v.dtype), v], dim=2)
            if context_mask is not None:
                own = torch.ones(B, H * W, dtype=torch.bool, device=x.device)
                mask = torch.cat([context_mask.to(torch.bool), own], dim=1)[:, None, None, :]  # (B, 1, 1, S+HW)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)     # (B, nh, HW, dh)
        out = self.proj_out(out.transpose(1, 2).reshape(B, H * W, C))      # (B, HW, C)
        return x + out.transpose(1, 2).reshape(B, C, H, W).to(x.dtype)

    def forward(self, x, context=None, context_mask=None):
        if self.use_checkpoint and self.training and torch.is_grad_enabled():
            return checkpoint(self._forward, x, context, context_mask, use_reentrant=False)
        return self._forward(x, context, context_mask)


class Block(nn.Module):
    """One U-Net step: a residual block (or a resampler) and an optional attention layer."""

    def __init__(self, layer: nn.Module, attn: AttentionBlock | None = None):
        super().__init__()
        self.layer = layer
        self.attn = attn

    def forward(self, h, emb, context, context_mask):
        if isinstance(self.layer, ResBlock):
            h = (self.layer(h, emb, context, context_mask) if self.layer.cross_attn is not None
                 else self.layer(h, emb))
        else:
            h = self.layer(h)
        if self.attn is not None:
            h = self.attn(h, context, context_mask)
        return h


def resize_low_res(low_res: torch.Tensor, size, mode: str = "bilinear") -> torch.Tensor:
    """(B, C, h, w) -> (B, C, *size): the upsamplers' conditioning image at the target size, "bilinear" or
    "bicubic" (antialiased, as Karlo's pipeline resizes its 64px images)."""
    if mode == "bicubic":
        return F.interpolate(low_res, size=tuple(size), mode="bicubic", align_corners=False, antialias=True)
    return F.interpolate(low_res, size=tuple(size), mode="bilinear", align_corners=False)


def last_real_state(context: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """context (B, S, C), mask (B, S) bool -> (B, C): the state at the last real position (a caption's end token);
    zeros where the mask is all False (a dropped caption). No host syncs."""
    if mask is None:
        return context[:, -1]
    pos = torch.arange(mask.shape[1], device=mask.device)
    last = torch.where(mask.to(torch.bool), pos, -1).amax(dim=1)                      # (B,), -1 when empty
    idx = last.clamp(min=0)[:, None, None].expand(-1, 1, context.shape[-1])
    return context.gather(1, idx).squeeze(1) * (last >= 0)[:, None].to(context.dtype)


class UNet(nn.Module):
    """ADM/GLIDE U-Net with CLIP-embedding and caption conditioning (decoder) or low-res conditioning (upsampler).

    Args:
        in_channels: image channels of x (3).
        out_channels: predicted channels (3); doubled when ``learn_sigma``.
        model_channels: base width; level i has ``model_channels * channel_mult[i]`` channels.
        channel_mult: width multiplier per level (``len(channel_mult) - 1`` down-samplings).
        num_res_blocks: residual blocks per level (encoder side; the decoder side has one more, ADM-style).
        attention_resolutions: feature-map sizes in pixels (e.g. [32, 16, 8]) at which attention is applied,
            relative to ``image_size``; empty = no attention module anywhere (not even in the middle block).
        image_size: the nominal input size used to resolve ``attention_resolutions``.
        num_head_channels: channels per attention head.
        dropout: dropout inside the residual blocks.
        use_checkpoint: activation checkpointing of every residual/attention block (training memory vs. compute).
        learn_sigma: output ``2 * out_channels`` channels (target, variance interpolation).
        clip_dim: D of the CLIP embedding (None: no CLIP conditioning).
        num_clip_tokens: extra context tokens made from the CLIP embedding (paper: 4).
        context_dim: width Cctx of the caption states (and of the CLIP tokens). Defaults to ``4 * model_channels``
            when only CLIP tokens are used.
        low_res_channels: channels of the ``low_res`` conditioning image (upsampler), 0 for none.
        pool_context: GLIDE's pooled caption term: the caption state at the last real token (the end token) is
            projected and added to the time embedding too (zero when the caption is dropped). Needs attention.
        resblock_updown: down- and up-sample with residual blocks (``ResBlock(updown=...)``: average pooling /
            nearest inside the block, ADM's resblock_updown) instead of a stride-2 conv / nearest + conv.
        scale_shift_norm: the residual blocks' timestep scale-shift norm; False adds the projected embedding
            before the second norm instead.
        norm_groups / norm_eps: GroupNorm groups (``gcd(norm_groups, channels)``) of every norm, and the eps of the
            residual blocks' and the output's norms (the attention norms keep 1e-5).
        context_in_dim: width of the caption states as given; when set they are projected to ``context_dim`` by a
            Linear and a LayerNorm (``context_proj``, ``context_norm``) before the attention layers see them (the
            CLIP tokens are not).
        text_emb_dim: width of a pooled caption embedding ``text_emb`` (B, Dt) (e.g. CLIP's text embedding) that
            is projected (``text_to_time``) and added to the time embedding; None: no such input.
        low_res_mode: how ``low_res`` is resized to x's size: "bilinear", or "bicubic" (antialiased).
        resblock_cross_attn: every residual block below the first level (encoder and decoder side, and the middle
            block's; not the resamplers) also cross-attends to the context tokens (caption states + CLIP tokens),
            DALLE2-pytorch's layout (:class:`ContextCrossAttention`). Needs the context (attention and
            ``context_dim``). False (default): the network is the one without this option, bit for bit.
    """

    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 3,
        model_channels: int = 128,
        channel_mult: Sequence[int] = (1, 2, 3, 4),
        num_res_blocks: int = 2,
        attention_resolutions: Sequence[int] = (32, 16, 8),
        image_size: int = 64,
        num_head_channels: int = 64,
        dropout: float = 0.0,
        use_checkpoint: bool = False,
        learn_sigma: bool = False,
        clip_dim: int | None = None,
        num_clip_tokens: int = 4,
        context_dim: int | None = None,
        low_res_channels: int = 0,
        pool_context: bool = False,
        resblock_updown: bool = False,
        scale_shift_norm: bool = True,
        norm_groups: int = 32,
        norm_eps: float = 1e-5,
        context_in_dim: int | None = None,
        text_emb_dim: int | None = None,
        low_res_mode: str = "bilinear",
        resblock_cross_attn: bool = False,
    ):
        super().__init__()
        if low_res_mode not in ("bilinear", "bicubic"):
            raise ValueError(f"low_res_mode must be 'bilinear' or 'bicubic', got {low_res_mode!r}")
        self.in_channels = in_channels
        self.out_channels = out_channels * (2 if learn_sigma else 1)
        self.learn_sigma = learn_sigma
        self.model_channels = model_channels
        self.image_size = image_size
        self.num_levels = len(channel_mult)
        self.clip_dim = clip_dim
        self.num_clip_tokens = num_clip_tokens if clip_dim is not None else 0
        self.low_res_channels = low_res_channels
        self.low_res_mode = low_res_mode
        self.text_emb_dim = text_emb_dim
        attention_resolutions = tuple(int(r) for r in (attention_resolutions or ()))
        use_attn = len(attention_resolutions) > 0
        if context_dim is None and self.num_clip_tokens > 0:
            context_dim = 4 * model_channels
        self.context_dim = context_dim if use_attn else None
        ctx_dim = self.context_dim

        emb_ch = 4 * model_channels
        self.time_embed = nn.Sequential(nn.Linear(model_channels, emb_ch), nn.SiLU(), nn.Linear(emb_ch, emb_ch))
        if clip_dim is not None:
            self.clip_to_time = nn.Linear(clip_dim, emb_ch)                     # path 1: added to the time embedding
            self.clip_to_tokens = (nn.Linear(clip_dim, self.num_clip_tokens * ctx_dim)  # path 2: context tokens
                                   if ctx_dim is not None and self.num_clip_tokens > 0 else None)
        else:
            self.clip_to_time = None
            self.clip_to_tokens = None
        if pool_context and ctx_dim is None:
            raise ValueError("pool_context needs caption states, i.e. attention (attention_resolutions) and "
                             "context_dim")
        self.context_to_time = nn.Linear(ctx_dim, emb_ch) if pool_context else None   # GLIDE's pooled caption
        if context_in_dim is not None:
            if ctx_dim is None:
                raise ValueError("context_in_dim needs attention (attention_resolutions) and context_dim")
            self.context_proj = nn.Linear(context_in_dim, ctx_dim)
            self.context_norm = nn.LayerNorm(ctx_dim)
        else:
            self.context_proj = self.context_norm = None
        self.text_to_time = nn.Linear(text_emb_dim, emb_ch) if text_emb_dim is not None else None
        if resblock_cross_attn and ctx_dim is None:
            raise ValueError("resblock_cross_attn needs context tokens, i.e. attention (attention_resolutions) and "
                             "context_dim or CLIP tokens")
        self.resblock_cross_attn = bool(resblock_cross_attn)

        def res(ci: int, co: int, updown: str = "none", level: int = 0) -> ResBlock:
            xattn = self.resblock_cross_attn and updown == "none" and level > 0
            return ResBlock(ci, emb_ch, co, dropout, use_checkpoint, updown=updown, scale_shift=scale_shift_norm,
                            groups=norm_groups, eps=norm_eps, context_dim=ctx_dim if xattn else None,
                            num_head_channels=num_head_channels)

        def attn(ch: int, ds: int) -> AttentionBlock | None:
            if image_size // ds in attention_resolutions:
                return AttentionBlock(ch, min(num_head_channels, ch), ctx_dim, use_checkpoint, norm_groups)
            return None

        ch = model_channels * channel_mult[0]
        self.conv_in = nn.Conv2d(in_channels + low_res_channels, ch, 3, padding=1)
        self.down = nn.ModuleList()
        skips = [ch]
        ds = 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                out = model_channels * mult
                self.down.append(Block(res(ch, out, level=level), attn(out, ds)))
                ch = out
                skips.append(ch)
            if level != len(channel_mult) - 1:
                self.down.append(Block(res(ch, ch, "down") if resblock_updown else Downsample(ch)))
                skips.append(ch)
                ds *= 2
        mid = len(channel_mult) - 1  # the middle blocks count as the last level's
        self.middle = nn.ModuleList([
            Block(res(ch, ch, level=mid), AttentionBlock(ch, min(num_head_channels, ch), ctx_dim, use_checkpoint,
                                                         norm_groups) if use_attn else None),
            Block(res(ch, ch, level=mid)),
        ])
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(num_res_blocks + 1):
                out = model_channels * mult
                self.up.append(Block(res(ch + skips.pop(), out, level=level), attn(out, ds)))
                ch = out
                if level > 0 and i == num_res_blocks:
                    self.up.append(Block(res(ch, ch, "up") if resblock_updown else Upsample(ch)))
                    ds //= 2
        self.out = nn.Sequential(GroupNorm32(ch, norm_groups, norm_eps), nn.SiLU(),
                                 zero_module(nn.Conv2d(ch, self.out_channels, 3, padding=1)))

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        *,
        clip_emb: torch.Tensor | None = None,
        context: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
        low_res: torch.Tensor | None = None,
        text_emb: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x: (B, C, H, W) noisy image, t: (B,) timesteps; clip_emb (B, D); context (B, S, Cctx), or
        (B, S, context_in_dim) with ``context_in_dim``; context_mask (B, S) bool; low_res (B, C, h, w);
        text_emb (B, Dt) with ``text_emb_dim``. Returns (B, C_out, H, W)."""
        wdtype = self.time_embed[0].weight.dtype
        emb = self.time_embed(timestep_embedding(t, self.model_channels).to(wdtype))   # (B, E)
        if self.text_to_time is not None:
            if text_emb is None:
                raise ValueError("this U-Net adds a pooled caption embedding to its time embedding: pass text_emb "
                                 "(B, Dt)")
            emb = emb + self.text_to_time(text_emb.to(wdtype))
        if self.context_proj is not None and context is not None:
            context = self.context_norm(self.context_proj(context.to(wdtype)))
        if self.context_to_time is not None and context is not None:  # GLIDE: pooled caption -> time embedding
            emb = emb + self.context_to_time(last_real_state(context, context_mask).to(wdtype))
        if self.clip_to_time is not None:
            if clip_emb is None:
                raise ValueError("this U-Net is CLIP-conditioned: pass clip_emb (B, D)")
            clip_emb = clip_emb.to(wdtype)
            emb = emb + self.clip_to_time(clip_emb)                   # unCLIP path 1
            if self.clip_to_tokens is not None:                       # unCLIP path 2
                B = x.shape[0]
                clip_tokens = self.clip_to_tokens(clip_emb).view(B, self.num_clip_tokens, -1)  # (B, 4, Cctx)
                if context is None:
                    context = clip_tokens
                    context_mask = None
                else:
                    context = torch.cat([context, clip_tokens.to(context.dtype)], dim=1)
                    if context_mask is not None:
                        ones = torch.ones(B, self.num_clip_tokens, dtype=torch.bool, device=x.device)
                        context_mask = torch.cat([context_mask.to(torch.bool), ones], dim=1)
        if self.low_res_channels:
            if low_res is None:
                raise ValueError("this U-Net is an upsampler: pass low_res (B, C, h, w)")
            if low_res.shape[-2:] != x.shape[-2:]:
                low_res = resize_low_res(low_res, x.shape[-2:], self.low_res_mode)
            x = torch.cat([x, low_res.to(x.dtype)], dim=1)

        if self.conv_in.weight.is_contiguous(memory_format=torch.channels_last) and x.shape[1] > 1:
            x = x.contiguous(memory_format=torch.channels_last)       # keep one memory format through the net
        h = self.conv_in(x)
        hs = [h]
        for block in self.down:
            h = block(h, emb, context, context_mask)
            hs.append(h)
        for block in self.middle:
            h = block(h, emb, context, context_mask)
        for block in self.up:
            if isinstance(block.layer, ResBlock) and block.layer.updown == "none":
                h = torch.cat([h, hs.pop()], dim=1)
            h = block(h, emb, context, context_mask)
        return self.out(h)
