"""Training throughput (samples/s), the global batch and peak accelerator memory, logged every
``log_every_n_steps`` under ``perf/``.

Why not Lightning's ``ThroughputMonitor`` (``pytorch_lightning.callbacks``): it calls ``torch.cuda.synchronize()``
after every training batch (a device stall per step), needs a ``batch_size_fn`` and warns unless the module defines
``flops_per_batch`` (none of ours do), and logs neither the global batch nor memory. ``PerfMonitor`` reads the
batch size from the dict batch, times whole steps between logging points without syncs, and adds
``perf/global_batch`` and ``perf/max_memory_gb``. Use Lightning's when FLOPs/MFU or validation throughput matter.
"""

from __future__ import annotations

import time
from typing import Any

import pytorch_lightning as pl
import torch


class PerfMonitor(pl.Callback):
    """Logs ``perf/samples_per_sec`` (global: summed over ranks), ``perf/global_batch`` and, on CUDA,
    ``perf/max_memory_gb``. Times whole optimisation steps between logging points, so no extra device syncs."""

    def __init__(self) -> None:
        self._t0: float | None = None
        self._samples = 0

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        world = trainer.world_size
        per_device = getattr(trainer.datamodule, "batch_size", None) if trainer.datamodule is not None else None
        if per_device:
            global_batch = per_device * world * trainer.accumulate_grad_batches
            pl_module.log("perf/global_batch", float(global_batch), rank_zero_only=True)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        self._samples += _batch_len(batch)
        every = max(1, trainer.log_every_n_steps)
        if (batch_idx + 1) % every:
            return
        now = time.perf_counter()
        if self._t0 is not None and now > self._t0:
            rate = self._samples * trainer.world_size / (now - self._t0)
            pl_module.log("perf/samples_per_sec", rate, rank_zero_only=True)
            if torch.cuda.is_available() and pl_module.device.type == "cuda":
                pl_module.log("perf/max_memory_gb", torch.cuda.max_memory_allocated(pl_module.device) / 2**30,
                              rank_zero_only=True)
        self._t0, self._samples = now, 0


def _batch_len(batch: Any) -> int:
    if isinstance(batch, dict):
        for v in batch.values():
            if isinstance(v, torch.Tensor) or isinstance(v, (list, tuple)):
                return len(v)
    return 0
