"""PerfMonitor: samples/s over whole steps read from dict batches (Lightning's ThroughputMonitor needs a
batch_size_fn) and the global batch (which Lightning's does not log)."""

from __future__ import annotations

import itertools
from types import SimpleNamespace

import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset

from unclip_pl.callbacks import throughput
from unclip_pl.callbacks.throughput import PerfMonitor


class _Dicts(Dataset):
    def __len__(self) -> int:
        return 24

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"x": torch.full((2,), float(i))}


class _Data(pl.LightningDataModule):
    batch_size = 4

    def train_dataloader(self) -> DataLoader:
        return DataLoader(_Dicts(), batch_size=self.batch_size)


class _Linear(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Linear(2, 1)

    def training_step(self, batch, batch_idx):
        return self.net(batch["x"]).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def test_perf_monitor_rate_and_global_batch_from_dict_batches(tmp_path, monkeypatch):
    clock = itertools.count()  # one second per perf_counter() call: one call per logging point
    monkeypatch.setattr(throughput, "time", SimpleNamespace(perf_counter=lambda: float(next(clock))))
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=6, log_every_n_steps=2, accumulate_grad_batches=1,
                         callbacks=[PerfMonitor()], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(_Linear(), datamodule=_Data())
    metrics = trainer.logged_metrics
    assert float(metrics["perf/global_batch"]) == 4.0  # 4 per device x 1 device x 1 accumulation
    assert float(metrics["perf/samples_per_sec"]) == pytest.approx(8.0)  # 2 steps x 4 samples in 1 s
    assert "perf/max_memory_gb" not in metrics  # CUDA only
