"""Stable per-run identifiers kept in the run directory, so a restarted run (preemption, requeue) continues the
same logger run: the wandb run id lives in ``<run dir>/wandb_id.txt``."""

from __future__ import annotations

import os
import secrets
import string
from pathlib import Path

ID_FILE = "wandb_id.txt"


def _global_rank() -> int:
    for key in ("RANK", "SLURM_PROCID", "LOCAL_RANK"):
        if os.environ.get(key):
            return int(os.environ[key])
    return 0


def persistent_run_id(run_dir: str | os.PathLike, filename: str = ID_FILE) -> str:
    """Return the id stored in ``run_dir/filename``, creating it (rank 0 only, atomically) on first use."""
    path = Path(run_dir) / filename
    if path.exists():
        text = path.read_text().strip()
        if text:
            return text
    run_id = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))
    if _global_rank() == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{filename}.tmp-{os.getpid()}")
        tmp.write_text(run_id + "\n")
        os.replace(tmp, path)
    return run_id
