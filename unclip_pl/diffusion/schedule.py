"""Noise schedules (betas), computed in float64.

Committed schedules must never change: a trained model is tied to the exact betas it was trained with.
"""
import math

import torch

SCHEDULES = ("cosine", "linear")


def cosine_alpha_bar(u: torch.Tensor, s: float = 0.008) -> torch.Tensor:
    """Continuous cosine alpha_bar(u) for u in [0, 1] (Nichol & Dhariwal 2021, eq. 17)."""
    return torch.cos((u + s) / (1 + s) * math.pi / 2) ** 2


def get_betas(name: str, num_steps: int = 1000) -> torch.Tensor:
    """Betas of a named schedule.

    Args:
        name: "cosine" (Improved DDPM, betas clipped at 0.999) or "linear" (DDPM, 1e-4..2e-2 scaled by 1000/T).
        num_steps: number of diffusion steps T.
    Returns:
        float64 tensor (T,) with values in (0, 1).
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if name == "cosine":
        u = torch.arange(num_steps + 1, dtype=torch.float64) / num_steps
        abar = cosine_alpha_bar(u)
        betas = 1 - abar[1:] / abar[:-1]
        return betas.clamp(max=0.999)
    if name == "linear":
        scale = 1000 / num_steps
        return torch.linspace(scale * 1e-4, scale * 2e-2, num_steps, dtype=torch.float64)
    raise ValueError(f"unknown beta schedule {name!r}; valid choices: {', '.join(SCHEDULES)}")
