"""A CSV logger whose ``metrics.csv`` survives a resume in the same run directory.

Lightning's ``CSVLogger`` deletes ``<save_dir>/<name>/<version>/metrics.csv`` when it finds the folder not empty, so
a run resumed in its own directory (``resume: auto``, a SLURM requeue) would keep only the metrics logged after the
resume. :class:`ResumableCSVLogger` keeps the file and appends to it, with the union of the old and new columns.
Rows logged by the stopped attempt after its last checkpoint are kept too: the steps it repeats then appear twice
(the later row is the resumed run's).
"""

from __future__ import annotations

import csv

from lightning_fabric.loggers.logger import rank_zero_experiment
from pytorch_lightning.loggers import CSVLogger
from pytorch_lightning.loggers.csv_logs import ExperimentWriter


class _AppendingWriter(ExperimentWriter):
    """Lightning's writer, except that an existing ``metrics.csv`` is continued instead of deleted."""

    def _check_log_dir_exists(self) -> None:
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as f:
                header = next(csv.reader(f), [])
            self.metrics_keys = sorted(header)  # the writer rewrites the file when new columns appear


class ResumableCSVLogger(CSVLogger):
    """``pytorch_lightning.loggers.CSVLogger`` (same arguments) that appends to the ``metrics.csv`` of an earlier
    attempt of the run (see the module docstring)."""

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment


__all__ = ["ResumableCSVLogger"]
