"""Multirun-safe job wrapper and a sweep summary.

In a multirun (``python train.py -m ...``) one failing job must not stop the others: :func:`job_wrapper` catches
the job's exception (or ``sys.exit`` from a config error), logs it with its traceback into the job's own log,
writes ``<run dir>/job_status.json`` and returns NaN as the job's metric (sweepers such as optuna record that
trial as failed). In a single run the exception propagates unchanged (non-zero exit code).
:func:`metric_value` picks the job's return value, ``optimized_metric`` (``conf/train.yaml``), from the fit's metrics.
:class:`SweepSummary` (a Hydra callback, ``conf/hydra/default.yaml``) prints one line per failed job when the
sweep ends and writes ``<sweep dir>/summary.json``; the sweep then exits with code 1 when any job failed, unless
``tolerate_failures`` (``conf/train.yaml``) is true.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import traceback
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

log = logging.getLogger(__name__)

STATUS_FILE = "job_status.json"


def is_multirun() -> bool:
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
    except Exception:  # noqa: BLE001
        return False


def _output_dir() -> Path | None:
    try:
        from hydra.core.hydra_config import HydraConfig

        return Path(HydraConfig.get().runtime.output_dir)
    except Exception:  # noqa: BLE001
        return None


def _global_rank() -> int:
    for key in ("RANK", "SLURM_PROCID", "LOCAL_RANK"):
        if os.environ.get(key):
            return int(os.environ[key])
    return 0


def write_status(out_dir: Path | None, status: str, metric: float | None = None, error: str | None = None) -> None:
    if out_dir is None or _global_rank() != 0:
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    record = {"status": status, "metric": None if metric is None or math.isnan(metric) else metric, "error": error}
    tmp = out_dir / f"{STATUS_FILE}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(record, indent=1))
    os.replace(tmp, out_dir / STATUS_FILE)


def metric_value(metrics: Mapping[str, float], name: str | None) -> float | None:
    """The value of the logged metric ``name`` (``optimized_metric``) in ``metrics`` ({name: float}, the fit's
    final metrics); None when ``name`` is None. A name that was not logged is a ``ValueError`` naming those that
    were (a sweeper would otherwise record a trial without a value)."""
    if name is None:
        return None
    if name not in metrics:
        raise ValueError(f"optimized_metric={name} was not logged by this run; logged: {', '.join(sorted(metrics))}")
    return float(metrics[name])


def job_wrapper(task: Callable[[DictConfig], Any]) -> Callable[[DictConfig], Any]:
    """Decorate the Hydra task function (see the module docstring)."""

    @functools.wraps(task)
    def wrapped(cfg: DictConfig) -> Any:
        out_dir = _output_dir()
        try:
            value = task(cfg)
        except (Exception, SystemExit) as e:  # noqa: BLE001
            if isinstance(e, SystemExit) and not e.code:
                raise
            message = f"{type(e).__name__}: {e}".strip() if not isinstance(e, SystemExit) else f"exit code {e.code}"
            write_status(out_dir, "FAILED", error=message.splitlines()[0][:500] if message else type(e).__name__)
            if not is_multirun():
                raise
            log.error("Job failed (the sweep goes on): %s\n%s", message, traceback.format_exc())
            return float("nan")
        metric = float(value) if isinstance(value, (int, float)) else None
        write_status(out_dir, "COMPLETED", metric=metric)
        return value

    return wrapped


class SweepSummary(Callback):
    """At the end of a multirun: list failed jobs (one line each) and write ``summary.json`` in the sweep dir; then
    exit with code 1 when a job failed and the config's ``tolerate_failures`` is not true (``SystemExit`` passes
    through Hydra's callback and error handling: the process's exit code is the sweep's outcome)."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        jobs = []
        for status_file in sorted(sweep_dir.glob(f"*/{STATUS_FILE}")):
            try:
                record = json.loads(status_file.read_text())
            except (OSError, ValueError):
                record = {"status": "UNKNOWN", "error": "unreadable status file"}
            jobs.append({"job": status_file.parent.name, **record})
        failed = [j for j in jobs if j.get("status") != "COMPLETED"]
        (sweep_dir / "summary.json").write_text(json.dumps({"jobs": jobs, "failed": len(failed)}, indent=1))
        log.info("Sweep finished: %d job(s), %d completed, %d failed (%s).", len(jobs), len(jobs) - len(failed),
                 len(failed), sweep_dir / "summary.json")
        for j in failed:
            log.error("  job %s FAILED: %s (log: %s)", j["job"], j.get("error"), sweep_dir / j["job"])
        if failed and not config.get("tolerate_failures", False):
            log.error("Exiting with code 1: %d sweep job(s) failed (tolerate_failures=true exits 0).", len(failed))
            raise SystemExit(1)
