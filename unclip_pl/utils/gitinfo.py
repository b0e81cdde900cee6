"""The source revision a run was started from (logged with the hyperparameters)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path


def git_commit(root: str | os.PathLike | None = None) -> str:
    """``git rev-parse HEAD`` of ``root`` (default: the package's repository), ``-dirty`` appended when tracked
    files have uncommitted changes; ``"unknown"`` outside a git checkout or without git."""
    root = Path(root) if root is not None else Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{commit}-dirty" if commit and dirty else (commit or "unknown")
