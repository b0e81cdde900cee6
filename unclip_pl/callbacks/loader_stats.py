"""The data loader's fault counts as metrics: ``data/<split>/<counter>`` from the data module's ``stats``.

The counters (:class:`~unclip_pl.data.stats.LoaderStats`, shared by the loader workers of a rank) are running totals
of this rank: ``skipped_<reason>`` per reason a sample was skipped (``corrupt``, ``no_image``, ``no_txt``,
``no_img_emb``, ``no_txt_emb``, ``no_json``), ``filtered`` (dropped by ``data.filters``), ``bad_shards`` (skipped
as unreadable), ``shards_read``, ``samples_read`` and ``samples`` (delivered). Logged every ``log_every_n_steps``
for training and at the end of each validation; a data module without ``stats`` logs nothing.
"""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl


class LoaderStatsMonitor(pl.Callback):
    """Logs the data module's ``stats[split].as_dict()`` as ``data/<split>/<counter>`` (rank zero's counts)."""

    @staticmethod
    def _counts(trainer: pl.Trainer, split: str) -> dict[str, float]:
        stats = getattr(trainer.datamodule, "stats", None) if trainer.datamodule is not None else None
        s = stats.get(split) if isinstance(stats, dict) else None
        if s is None or not hasattr(s, "as_dict"):
            return {}
        return {f"data/{split}/{k}": float(v) for k, v in s.as_dict().items()}

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if (batch_idx + 1) % max(1, trainer.log_every_n_steps):
            return
        counts = self._counts(trainer, "train")
        if counts:
            pl_module.log_dict(counts, on_step=True, on_epoch=False, rank_zero_only=True)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        counts = self._counts(trainer, "val")
        if counts:
            pl_module.log_dict(counts, on_step=False, on_epoch=True, rank_zero_only=True)
