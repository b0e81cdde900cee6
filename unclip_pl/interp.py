"""Embedding-space manipulations used by the pipeline: spherical interpolation and text diffs (unCLIP section 3).

All functions take unit-norm CLIP embeddings (..., D) and return unit-norm embeddings; the arithmetic is done in
float64 and cast back to the input dtype.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

#: Below this angle (radians) between the two vectors slerp falls back to normalised linear interpolation:
#: sin(Omega) ~ Omega is too small to divide by safely, and the two paths agree to O(Omega^2) there.
PARALLEL_EPS = 1e-4


def slerp(a: torch.Tensor, b: torch.Tensor, t: float | torch.Tensor, eps: float = PARALLEL_EPS) -> torch.Tensor:
    """Spherical interpolation between directions ``a`` and ``b``.

    slerp(a, b; t) = sin((1 - t) Omega) / sin(Omega) * a + sin(t Omega) / sin(Omega) * b, cos(Omega) = a . b,
    on the normalised inputs. Where Omega < ``eps`` (nearly parallel) it returns normalise((1 - t) a + t b).
    Anti-parallel inputs (Omega ~ pi) have no unique great circle; sin(Omega) is clamped, so the result is finite
    but arbitrary -- avoid them.

    Args:
        a, b: (..., D) tensors (normalised here), broadcastable to each other.
        t: scalar or tensor broadcastable to a's leading dims ``(...)`` (0 -> a, 1 -> b).
    Returns:
        (..., D) unit-norm tensor in a's dtype.
    """
    dtype = torch.promote_types(a.dtype, b.dtype)
    a64 = F.normalize(a.double(), dim=-1)
    b64 = F.normalize(b.double(), dim=-1)
    t = torch.as_tensor(t, dtype=torch.float64, device=a64.device)
    if t.ndim > 0:
        t = t[..., None]  # (..., 1) to broadcast over D
    cos = (a64 * b64).sum(-1, keepdim=True).clamp(-1.0, 1.0)  # (..., 1)
    omega = torch.arccos(cos)
    sin = torch.sin(omega)
    parallel = omega < eps
    safe_sin = torch.where(parallel, torch.ones_like(sin), sin.clamp(min=1e-12))
    w_a = torch.sin((1.0 - t) * omega) / safe_sin
    w_b = torch.sin(t * omega) / safe_sin
    spherical = w_a * a64 + w_b * b64
    linear = (1.0 - t) * a64 + t * b64
    out = torch.where(parallel, linear, spherical)
    return F.normalize(out, dim=-1).to(dtype if dtype.is_floating_point else torch.float32)


def slerp_path(a: torch.Tensor, b: torch.Tensor, k: int) -> torch.Tensor:
    """``k`` evenly spaced points from a to b (both included).

    Args:
        a, b: (D,) or (B, D).
    Returns:
        (k, D) or (B, k, D).
    """
    if k < 2:
        raise ValueError(f"an interpolation path needs k >= 2 points, got {k}")
    ts = torch.linspace(0.0, 1.0, k, dtype=torch.float64)
    return torch.stack([slerp(a, b, float(t)) for t in ts], dim=-2)


def text_diff_direction(z_t_old: torch.Tensor, z_t_new: torch.Tensor) -> torch.Tensor:
    """z_d = normalise(z_t_new - z_t_old): (..., D) -> (..., D)."""
    diff = F.normalize(z_t_new.double(), dim=-1) - F.normalize(z_t_old.double(), dim=-1)
    if bool((diff.norm(dim=-1) < 1e-8).any()):
        raise ValueError("the old and new captions have the same CLIP text embedding: there is no text diff")
    return F.normalize(diff, dim=-1).to(z_t_new.dtype)


def text_diff_embedding(z_i: torch.Tensor, z_t_old: torch.Tensor, z_t_new: torch.Tensor,
                        theta: float | torch.Tensor) -> torch.Tensor:
    """The paper's text diff: slerp(z_i, z_d, theta), z_d = normalise(z_t_new - z_t_old).

    Args:
        z_i: (..., D) image embedding; z_t_old, z_t_new: (..., D) text embeddings of the current and the new caption.
        theta: interpolation fraction (paper: 0 .. ~0.5; 0 returns z_i).
    Returns:
        (..., D) unit-norm embedding.
    """
    return slerp(z_i, text_diff_direction(z_t_old, z_t_new), theta)


def text_diff_path(z_i: torch.Tensor, z_t_old: torch.Tensor, z_t_new: torch.Tensor,
                   thetas: Sequence[float]) -> torch.Tensor:
    """Stack of :func:`text_diff_embedding` over ``thetas``: (D,) inputs -> (len(thetas), D)."""
    z_d = text_diff_direction(z_t_old, z_t_new)
    return torch.stack([slerp(z_i, z_d, float(th)) for th in thetas], dim=-2)
