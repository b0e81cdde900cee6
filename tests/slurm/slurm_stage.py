"""The tiny ops stage (tests/ops/tiny_stage.py) with what the SLURM tests observe from inside a job:

* ``attempts.jsonl`` in ``record_dir``: one line per start of training (rank 0): the SLURM job id,
  ``SLURM_RESTART_COUNT``, the run directory and the global step it starts from;
* ``weights_rank<r>.pt``: each rank's final weights, written when training ends;
* ``wait_at_step``: on the job's first attempt (``SLURM_RESTART_COUNT`` unset or 0) the training step with that
  index writes ``<record_dir>/waiting`` and waits (at most ``wait_s`` seconds) until the preemption callback has
  received a signal, so a test can signal the job while it is known to be mid-training.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch
from tiny_stage import TinyStage

from unclip_pl.callbacks.preemption import PreemptionCheckpoint


class SlurmTinyStage(TinyStage):
    def __init__(self, model, optimizer=None, warmup_steps: int = 0, ema_decay: float | None = 0.9,
                 record_dir: str | None = None, signal_at_step: int | None = None, signal_name: str = "SIGTERM",
                 fail: bool = False, run_config: dict | None = None, wait_at_step: int | None = None,
                 wait_s: float = 600.0):
        super().__init__(model, optimizer=optimizer, warmup_steps=warmup_steps, ema_decay=ema_decay,
                         record_dir=record_dir, signal_at_step=signal_at_step, signal_name=signal_name, fail=fail,
                         run_config=run_config)
        self.wait_at_step, self.wait_s = wait_at_step, wait_s

    def _record(self) -> Path:
        path = Path(self.record_dir)
        path.mkdir(parents=True, exist_ok=True)
        return path

    def on_train_start(self) -> None:
        super().on_train_start()
        if self.record_dir and self.global_rank == 0:
            line = {"job": os.environ.get("SLURM_JOB_ID"), "restart": int(os.environ.get("SLURM_RESTART_COUNT", 0)),
                    "run_dir": str(Path(self.trainer.default_root_dir).resolve()), "step": self.global_step}
            with open(self._record() / "attempts.jsonl", "a") as f:
                f.write(json.dumps(line) + "\n")

    def on_train_end(self) -> None:
        super().on_train_end()
        if self.record_dir:
            weights = {k: v.detach().cpu() for k, v in self.model.state_dict().items()}
            torch.save({"step": self.global_step, "weights": weights},
                       self._record() / f"weights_rank{self.global_rank}.pt")

    def compute_loss(self, batch: dict) -> dict[str, torch.Tensor]:
        first_attempt = int(os.environ.get("SLURM_RESTART_COUNT", 0)) == 0
        if self.training and self.record_dir and first_attempt and self.global_step == self.wait_at_step:
            callbacks = [c for c in self.trainer.callbacks if isinstance(c, PreemptionCheckpoint)]
            (self._record() / "waiting").write_text(f"{self.global_step}\n")
            deadline = time.monotonic() + self.wait_s
            while time.monotonic() < deadline and not any(c.received for c in callbacks):
                time.sleep(0.05)
        return super().compute_loss(batch)
