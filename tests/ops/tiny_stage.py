"""A tiny test-only stage for the operations tests: a 2-layer MLP trained to reverse its input, fed either by an
in-memory datamodule (deterministic, one batch per epoch) or by the real ShardDataModule over tiny shards.

Test hooks: ``record_dir`` (each rank appends the sample keys it trained on to ``keys_rank<r>.txt``),
``signal_at_step`` (the process sends itself ``signal_name`` in that training step, like SLURM would) and
``fail`` (the constructor raises, for multirun failure tests).
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from unclip_pl.lit.base import StageModule


class TinyModel(nn.Module):
    def __init__(self, dim: int = 12, hidden: int = 16):
        super().__init__()
        self.dim = dim
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.Tanh(), nn.Linear(hidden, dim))

    def loss(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, dim) -> scalar MSE to the reversed input."""
        return (self.net(x) - x.flip(-1)).pow(2).mean()


class TinyStage(StageModule):
    def __init__(self, model: nn.Module, optimizer=None, warmup_steps: int = 0, ema_decay: float | None = 0.9,
                 record_dir: str | None = None, signal_at_step: int | None = None, signal_name: str = "SIGTERM",
                 fail: bool = False, run_config: dict | None = None):
        if fail:
            raise RuntimeError("deliberate failure (test)")
        super().__init__(model, optimizer=optimizer, warmup_steps=warmup_steps, ema_decay=ema_decay,
                         run_config=run_config)
        self.record_dir, self.signal_at_step, self.signal_name = record_dir, signal_at_step, signal_name

    def features(self, batch: dict) -> torch.Tensor:
        if "x" in batch:
            return batch["x"]
        x = batch["image"].flatten(1)
        return x[:, : self.model.dim]

    def compute_loss(self, batch: dict) -> dict[str, torch.Tensor]:
        if self.record_dir:
            path = Path(self.record_dir) / f"keys_rank{self.global_rank}.txt"
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "a") as f:
                f.write("".join(f"{k}\n" for k in batch["key"]))
        if self.signal_at_step is not None and self.global_step == self.signal_at_step and self.training:
            os.kill(os.getpid(), getattr(signal, self.signal_name))
        return {"loss": self.model.loss(self.features(batch))}

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        # StageModule.training_step logs train/loss twice with different arguments (reported to the lead);
        # log it once here.
        loss = self.compute_loss(batch)["loss"]
        self.log("train/loss", loss.detach(), prog_bar=True, batch_size=len(batch["key"]))
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        # plain: no key recording, no signal (validation in between training steps, for the data-resume tests)
        self.log("val/loss", self.model.loss(self.features(batch)), batch_size=len(batch["key"]))


class _Fixed(Dataset):
    def __init__(self, n: int, dim: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, dim, generator=g)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict:
        return {"x": self.x[i], "key": f"s{i:04d}"}


class TinyDataModule(pl.LightningDataModule):
    """``n`` fixed random vectors, no shuffling: with ``batch_size = n`` every step sees the same batch."""

    def __init__(self, n: int = 8, dim: int = 12, batch_size: int = 8, seed: int = 0, **_ignored):
        super().__init__()
        self.n, self.dim, self.batch_size, self.seed = n, dim, batch_size, seed
        self.needs: tuple[str, ...] = ()
        self.image_size = None

    def train_dataloader(self):
        return DataLoader(_Fixed(self.n, self.dim, self.seed), batch_size=self.batch_size, shuffle=False)
