"""Save a checkpoint and stop (and requeue on SLURM) when the job is told to go away.

SLURM sends a warning signal before the time limit (``#SBATCH --signal=USR1@120``, or USR2 through submitit's
``signal_delay_s``) and SIGTERM on preemption or ``scancel``. While ``fit`` runs this callback owns those signals:

* the handler only sets a flag (nothing heavy inside a signal handler);
* at the next optimiser-step boundary all ranks agree (one all-reduce of the flag) and save
  ``<checkpoint dir>/last.ckpt`` (atomic with :class:`unclip_pl.utils.checkpoint.AtomicCheckpointIO`);
* for a ``requeue_signals`` signal under SLURM, global rank 0 runs ``scontrol requeue <job>``; a handler that was
  installed before training started by anything other than Lightning (submitit's requeue handler, say) is
  called after the save, so submitit requeues with its own bookkeeping;
* the trainer then stops cleanly. The restarted job (same run directory, ``resume: auto``) continues from
  ``last.ckpt`` with the same global step and wandb run.

This replaces Lightning's own SLURM auto-requeue handlers during training (they would write a separate
``hpc_ckpt_*.ckpt`` mid-step); the previous handlers are restored at teardown.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading
from pathlib import Path
from typing import Any

import pytorch_lightning as pl

log = logging.getLogger(__name__)


def _signum(name: str | int) -> signal.Signals:
    if isinstance(name, int):
        return signal.Signals(name)
    name = str(name).upper()
    return getattr(signal, name if name.startswith("SIG") else f"SIG{name}")


def _is_lightning_handler(handler: Any) -> bool:
    owner = getattr(handler, "__self__", handler)
    return type(owner).__module__.startswith(("pytorch_lightning", "lightning"))


def slurm_job_id() -> str | None:
    array = os.environ.get("SLURM_ARRAY_JOB_ID")
    if array and os.environ.get("SLURM_ARRAY_TASK_ID"):
        return f"{array}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return os.environ.get("SLURM_JOB_ID")


class PreemptionCheckpoint(pl.Callback):
    """Checkpoint-and-stop on signals (see module docstring).

    Args:
        requeue_signals: signals after which the job is requeued under SLURM (default: SLURM's warning ``USR1``;
            submitit's ``USR2`` is requeued by submitit's own chained handler).
        stop_signals: signals after which the run only saves and stops (``TERM``: preemption or ``scancel``).
        requeue: allow ``scontrol requeue`` at all.
        sync_every_n_steps: with several ranks, how often (optimiser steps) the ranks agree on the flag.
    """

    def __init__(self, requeue_signals: list[str | int] = ("USR1",), stop_signals: list[str | int] = ("TERM", "USR2"),
                 requeue: bool = True, sync_every_n_steps: int = 1):
        self.requeue_signals = [_signum(s) for s in requeue_signals]
        self.stop_signals = [_signum(s) for s in stop_signals]
        self.requeue = bool(requeue)
        self.sync_every_n_steps = max(1, int(sync_every_n_steps))
        self.received: signal.Signals | None = None
        self.saved_path: str | None = None
        self._previous: dict[signal.Signals, Any] = {}
        self._last_step = -1

    # ------------------------------------------------------------------ signal plumbing
    def _handler(self, signum: int, frame: Any) -> None:
        if self.received is None:
            self.received = signal.Signals(signum)

    def _install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in {*self.requeue_signals, *self.stop_signals}:
            self._previous[sig] = signal.getsignal(sig)
            signal.signal(sig, self._handler)

    def _restore(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig, handler in self._previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        self._previous = {}

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Lightning registers its own handlers just before training starts; ours go on top of them.
        self.received, self.saved_path, self._last_step = None, None, trainer.global_step
        self._install()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._restore()

    # ------------------------------------------------------------------ acting at a step boundary
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = trainer.global_step
        if step == self._last_step:  # inside a gradient accumulation: wait for the optimiser step
            return
        self._last_step = step
        if trainer.world_size > 1:
            if step % self.sync_every_n_steps:
                return
            stop = trainer.strategy.reduce_boolean_decision(self.received is not None, all=False)
        else:
            stop = self.received is not None
        if stop:
            self._save_and_stop(trainer)

    def checkpoint_path(self, trainer: pl.Trainer) -> str:
        cb = trainer.checkpoint_callback
        if cb is not None and getattr(cb, "dirpath", None):
            return os.path.join(cb.dirpath, cb.CHECKPOINT_NAME_LAST + cb.FILE_EXTENSION)
        return os.path.join(trainer.default_root_dir, "checkpoints", "last.ckpt")

    def _save_and_stop(self, trainer: pl.Trainer) -> None:
        sig = trainer.strategy.broadcast(self.received.name if self.received else "a signal on another rank")
        path = self.checkpoint_path(trainer)
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        cb = trainer.checkpoint_callback
        if cb is not None and getattr(cb, "save_last", False):
            # As ModelCheckpoint does for its own last.ckpt: part of the saved state, so after the restart it
            # keeps writing last.ckpt (not last-v1.ckpt).
            cb.last_model_path = path
        trainer.save_checkpoint(path)
        self.saved_path = path
        trainer.should_stop = True
        requeue = self.received in self.requeue_signals
        pl.utilities.rank_zero_info(
            f"Received {sig}: saved {path} at global step {trainer.global_step} and stopping"
            + (" (requeueing)." if requeue and slurm_job_id() else
               "; rerun the same command in the same run directory to resume."))
        previous = self._previous.get(self.received) if self.received is not None else None
        chained = callable(previous) and not _is_lightning_handler(previous)
        if requeue and self.requeue and not chained and trainer.is_global_zero:
            requeue_slurm_job()
        if chained:  # e.g. submitit: requeues itself (and exits) now that the state is saved
            self._restore()
            previous(int(self.received), None)


def requeue_slurm_job() -> bool:
    """``scontrol requeue`` this SLURM job; False (with a log line) outside SLURM or on failure."""
    job = slurm_job_id()
    if not job:
        log.info("Not under SLURM: not requeueing.")
        return False
    try:
        result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as e:
        log.warning("Requeueing SLURM job %s failed: %s", job, e)
        return False
    if result.returncode:
        log.warning("Requeueing SLURM job %s failed: %s", job, result.stderr.strip())
        return False
    log.info("Requeued SLURM job %s.", job)
    return True
