"""Log a grid of images to whatever Lightning loggers a run has.

TensorBoard: ``add_image``; Weights & Biases: ``log_image``; every other logger (CSV, none): a PNG written under
``<log dir or trainer.default_root_dir>/samples/<tag>_step<step>.png``. One helper, used by the decoder and upsampler
modules at validation time.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torchvision.utils import make_grid, save_image

log = logging.getLogger(__name__)


def to_grid(rows: Sequence[torch.Tensor], nrow: int | None = None) -> torch.Tensor:
    """Images in [-1, 1], a list of (N, 3, H, W) rows of equal N (each row resized to the largest H, W with
    nearest neighbour) -> (3, H', W') float grid in [0, 1], one input row per grid row."""
    size = max(r.shape[-1] for r in rows)
    resized = []
    for r in rows:
        r = r.detach().float().cpu()
        if r.shape[-1] != size:
            r = torch.nn.functional.interpolate(r, size=(size, size), mode="nearest")
        resized.append(r)
    images = torch.cat(resized)
    return make_grid((images.clamp(-1, 1) + 1) / 2, nrow=nrow or rows[0].shape[0], padding=2, pad_value=1.0)


def log_image_grid(trainer: Any, tag: str, grid: torch.Tensor, step: int | None = None) -> list[str]:
    """Send ``grid`` (3, H, W) in [0, 1] to each logger of ``trainer``; returns where it went (for messages/tests).

    Loggers that cannot show images (CSV, or no logger at all) get a PNG in their directory instead."""
    step = int(trainer.global_step if step is None else step)
    loggers = list(getattr(trainer, "loggers", None) or [])
    sent, wrote_png = [], False
    for logger in loggers:
        name = type(logger).__name__
        try:
            if name == "TensorBoardLogger":
                logger.experiment.add_image(tag, grid, global_step=step)
                sent.append("tensorboard")
                continue
            if name == "WandbLogger":
                logger.log_image(key=tag, images=[grid], step=step)
                sent.append("wandb")
                continue
        except Exception as e:  # a logging failure must not stop training
            log.warning("could not log image %s to %s: %s", tag, name, e)
        directory = getattr(logger, "log_dir", None) or getattr(trainer, "default_root_dir", ".")
        sent.append(_save_png(grid, directory, tag, step))
        wrote_png = True
    if not loggers and not wrote_png:
        sent.append(_save_png(grid, getattr(trainer, "default_root_dir", "."), tag, step))
    return sent


def _save_png(grid: torch.Tensor, directory: str | Path, tag: str, step: int) -> str:
    path = Path(directory) / "samples" / f"{tag.replace('/', '_')}_step{step:07d}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(grid, path)
    return str(path)
