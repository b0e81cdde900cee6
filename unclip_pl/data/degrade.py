"""Low-resolution corruptions used to train the diffusion upsamplers (paper section 2.1).

Both functions take and return (B, C, H, W) tensors in [-1, 1] of the same shape and device; configure them in Hydra
with ``_partial_: true``:
- ``gaussian_blur``: the first upsampler's corruption (kernel 3, sigma 0.6).
- ``bsr_degrade``: a BSR-like (Zhang et al. 2021, BSRGAN) random pipeline for the second upsampler: isotropic and
  anisotropic Gaussian blurs, a down-and-up resize with a random kernel (bilinear / bicubic / area), Gaussian noise
  (these four in random order, each with its probability), then JPEG re-compression. Parameters are drawn per
  image from ``generator`` (CPU); JPEG runs on the CPU (torchvision.io), so prefer calling it in data workers for
  large batches on an accelerator.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torchvision.io import decode_jpeg, encode_jpeg


def _gaussian_kernel2d(size: int, sigma_x: float, sigma_y: float, theta: float = 0.0) -> torch.Tensor:
    """(size, size) normalised (possibly rotated, anisotropic) Gaussian kernel, float64."""
    r = (size - 1) / 2
    ax = torch.arange(size, dtype=torch.float64) - r
    yy, xx = torch.meshgrid(ax, ax, indexing="ij")
    c, s = math.cos(theta), math.sin(theta)
    u = c * xx + s * yy
    v = -s * xx + c * yy
    k = torch.exp(-0.5 * ((u / sigma_x) ** 2 + (v / sigma_y) ** 2))
    return k / k.sum()


def _filter(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Depthwise 2-d filter with reflect padding: x (B, C, H, W), kernel (k, k) -> (B, C, H, W)."""
    C = x.shape[1]
    k = kernel.shape[-1]
    pad = k // 2
    mode = "reflect" if min(x.shape[-2:]) > pad else "replicate"
    w = kernel.to(device=x.device, dtype=x.dtype)[None, None].expand(C, 1, k, k)
    return F.conv2d(F.pad(x, (pad, pad, pad, pad), mode=mode), w, groups=C)


def gaussian_blur(x: torch.Tensor, kernel: int = 3, sigma: float = 0.6) -> torch.Tensor:
    """Isotropic Gaussian blur (B, C, H, W) -> (B, C, H, W); a convex combination, so [-1, 1] stays in range."""
    if kernel % 2 != 1:
        raise ValueError(f"kernel size must be odd, got {kernel}")
    return _filter(x, _gaussian_kernel2d(kernel, sigma, sigma)).clamp(-1, 1)


def _uniform(g: torch.Generator | None, lo: float, hi: float) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=g))


def _kernel_size(sigma: float, max_kernel: int) -> int:
    return min(max_kernel, 2 * math.ceil(3 * sigma) + 1)


def bsr_degrade(
    x: torch.Tensor,
    generator: torch.Generator | None = None,
    *,
    p_iso_blur: float = 0.5,
    iso_sigma: Sequence[float] = (0.2, 2.0),
    p_aniso_blur: float = 0.5,
    aniso_sigma: Sequence[float] = (0.5, 3.0),
    max_kernel: int = 21,
    p_resize: float = 0.5,
    resize_scale: Sequence[float] = (0.5, 1.0),
    resize_modes: Sequence[str] = ("bilinear", "bicubic", "area"),
    p_noise: float = 0.5,
    noise_sigma: Sequence[float] = (1.0 / 255, 25.0 / 255),
    p_jpeg: float = 0.7,
    jpeg_quality: Sequence[int] = (30, 95),
) -> torch.Tensor:
    """BSR-like random degradation, per image. x: (B, C, H, W) in [-1, 1] -> same shape, dtype, device, range.

    Noise sigmas are in [0, 1] image units (doubled for the [-1, 1] range)."""
    g = generator
    out = []
    for xi in x.float().split(1):                                             # (1, C, H, W)
        H, W = xi.shape[-2:]
        ops = torch.randperm(4, generator=g).tolist()
        for op in ops:
            if op == 0 and _uniform(g, 0, 1) < p_iso_blur:
                s = _uniform(g, *iso_sigma)
                xi = _filter(xi, _gaussian_kernel2d(_kernel_size(s, max_kernel), s, s))
            elif op == 1 and _uniform(g, 0, 1) < p_aniso_blur:
                sx, sy = _uniform(g, *aniso_sigma), _uniform(g, *aniso_sigma)
                theta = _uniform(g, 0, math.pi)
                xi = _filter(xi, _gaussian_kernel2d(_kernel_size(max(sx, sy), max_kernel), sx, sy, theta))
            elif op == 2 and _uniform(g, 0, 1) < p_resize:
                scale = _uniform(g, *resize_scale)
                down_mode = resize_modes[int(torch.randint(len(resize_modes), (), generator=g))]
                size = (max(1, round(H * scale)), max(1, round(W * scale)))
                kw = {"align_corners": False, "antialias": True} if down_mode in ("bilinear", "bicubic") else {}
                xi = F.interpolate(xi, size=size, mode=down_mode, **kw)
                up_mode = ("bilinear", "bicubic")[int(torch.randint(2, (), generator=g))]
                xi = F.interpolate(xi, size=(H, W), mode=up_mode, align_corners=False)
            elif op == 3 and _uniform(g, 0, 1) < p_noise:
                s = 2.0 * _uniform(g, *noise_sigma)
                xi = xi + s * torch.randn(xi.shape, generator=g).to(xi.device)
            xi = xi.clamp(-1, 1)
        if _uniform(g, 0, 1) < p_jpeg:
            q = int(torch.randint(int(jpeg_quality[0]), int(jpeg_quality[1]) + 1, (), generator=g))
            u8 = ((xi[0] + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).cpu()
            dec = decode_jpeg(encode_jpeg(u8, quality=q))
            xi = (dec.float() / 127.5 - 1).to(xi.device)[None]
        out.append(xi)
    return torch.cat(out).clamp(-1, 1).to(x.dtype)
