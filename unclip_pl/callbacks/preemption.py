"""Save a checkpoint and stop (and requeue on SLURM) when the job is told to go away.

SLURM sends a warning signal before the time limit (``#SBATCH --signal=USR1@120``, or USR2 through submitit's
``signal_delay_s``) and SIGTERM on preemption or ``scancel``. While ``fit`` runs this callback owns those signals:

* the handler only sets a flag (nothing heavy inside a signal handler);
* at the next optimiser-step boundary all ranks agree (one all-reduce of the flag) and save
  ``<checkpoint dir>/last.ckpt`` (atomic with :class:`unclip_pl.checkpoint.AtomicCheckpointIO`);
* for a ``requeue_signals`` signal under SLURM, global rank 0 runs ``scontrol requeue <job>``; a handler that was
  installed before training started by anything other than Lightning (submitit's requeue handler, say) is
  called after the save, so submitit requeues with its own bookkeeping;
* the trainer then stops cleanly. The restarted job (same run directory, ``resume: auto``) continues from
  ``last.ckpt`` with the same global step and wandb run. When nothing requeues the job, the message prints the
  command that does: the original command line with ``run_name=<this run>`` (the default run name is a time stamp,
  so the same command alone would start a new run directory).

This replaces Lightning's own SLURM auto-requeue handlers during training (they would write a separate
``hpc_ckpt_*.ckpt`` mid-step); the previous handlers are restored at teardown.
"""

from __future__ import annotations

import logging
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Sequence
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


_RUN_NAME_OVERRIDE = re.compile(r"^\+{0,2}run_name=")


def resume_command(argv: Sequence[str], run_name: str, python: str = "python",
                   extra: Sequence[str] = ()) -> str:
    """The shell command that continues this run: ``python <argv>`` with ``run_name=<run_name>`` in place of any
    ``run_name=`` override (or appended), then ``extra`` overrides, each argument shell-quoted."""
    args, named = [], False
    for a in argv[1:]:
        if _RUN_NAME_OVERRIDE.match(a):
            if not named:
                args.append(f"run_name={run_name}")
            named = True
        else:
            args.append(a)
    if not named:
        args.append(f"run_name={run_name}")
    return shlex.join([python, argv[0], *args, *extra])


def _python() -> str:
    """``python`` when that is the interpreter running now on the PATH, else the interpreter's full path."""
    found = shutil.which("python")
    return "python" if found and os.path.abspath(found) == os.path.abspath(sys.executable) else sys.executable


def _this_run_command(run_name: str, ckpt: str) -> str:
    """The resume command for the running process: its own command line; in a Hydra multirun, this job's
    overrides plus ``ckpt_path`` (a sweep job's directory is not chosen by ``run_name``)."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hc = HydraConfig.get() if HydraConfig.initialized() else None
    except Exception:  # no Hydra
        hc = None
    if hc is not None and hc.get("mode") == RunMode.MULTIRUN:
        return resume_command([sys.argv[0], *hc.overrides.task], run_name, _python(), extra=[f"ckpt_path={ckpt}"])
    return resume_command(sys.argv, run_name, _python())


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
        run_name: this run's ``run_name`` (``${run_name}`` in the config; a number too, e.g. `run_name=42`), for the
            resume command printed on stop.
    """

    def __init__(self, requeue_signals: list[str | int] = ("USR1",), stop_signals: list[str | int] = ("TERM", "USR2"),
                 requeue: bool = True, sync_every_n_steps: int = 1, run_name: Any = None):
        self.requeue_signals = [_signum(s) for s in requeue_signals]
        self.stop_signals = [_signum(s) for s in stop_signals]
        self.requeue = bool(requeue)
        self.sync_every_n_steps = max(1, int(sync_every_n_steps))
        self.run_name = None if run_name is None else str(run_name)
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
        # The module's on_train_batch_end (StageModule: the EMA update) runs after this hook: do that step's update
        # now, so this checkpoint, often the last one before the job is killed, holds it.
        update_ema = getattr(trainer.lightning_module, "update_ema", None)
        if callable(update_ema):
            update_ema()
        trainer.save_checkpoint(path)
        self.saved_path = path
        trainer.should_stop = True
        requeue = self.received in self.requeue_signals
        previous = self._previous.get(self.received) if self.received is not None else None
        chained = callable(previous) and not _is_lightning_handler(previous)
        pl.utilities.rank_zero_info(
            f"Received {sig}: saved {path} at global step {trainer.global_step} and stopping"
            + self._next_step_hint(requeue and self.requeue and bool(slurm_job_id()), chained, path))
        if requeue and self.requeue and not chained and trainer.is_global_zero:
            requeue_slurm_job()
        if chained:  # e.g. submitit: requeues itself (and exits) now that the state is saved
            self._restore()
            previous(int(self.received), None)

    def _next_step_hint(self, requeueing: bool, chained: bool, path: str) -> str:
        if requeueing:
            return " (requeueing)."
        if chained:
            return " (handing over to the signal handler installed before training, e.g. submitit's requeue)."
        if self.run_name is None:
            return "; rerun the same command in the same run directory to resume."
        # under SLURM a SIGTERM may come with a requeue (scontrol requeue, preemption): the job then resumes itself
        unless = "; unless SLURM requeues the job" if slurm_job_id() else ""
        return f"{unless}; to resume, run:\n  {_this_run_command(self.run_name, path)}"


def stopped_to_resume(trainer: pl.Trainer) -> bool:
    """Whether this fit was stopped by a :class:`PreemptionCheckpoint` signal (saved, to be resumed), not finished."""
    return any(isinstance(cb, PreemptionCheckpoint) and cb.saved_path for cb in trainer.callbacks)


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
