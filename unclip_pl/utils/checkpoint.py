"""Atomic checkpoint writes, verified loads and short mismatch messages.

* :class:`AtomicCheckpointIO` writes ``<file>.tmp-<pid>`` then ``os.replace``s it: a run killed mid-save leaves the
  previous checkpoint intact and never a half-written ``.ckpt`` under the final name.
* :func:`verify_checkpoint` opens a checkpoint before ``fit`` and raises :class:`CheckpointError` naming the file
  when it is truncated, corrupt or not a Lightning checkpoint.
* :func:`state_dict_mismatches` / :func:`check_fits` compare a checkpoint's weights with a module and list the
  missing, unexpected and differently shaped keys in a few lines instead of PyTorch's page-long strict-load error.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO

log = logging.getLogger(__name__)

#: Parameters/buffers never compared (the frozen CLIP is stripped from checkpoints and rebuilt from its config).
IGNORED_PREFIXES = ("clip.",)


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the file and what is wrong."""


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose saves are atomic: temp file in the same folder, fsync, ``os.replace``."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO does not take storage_options")
        path = Path(path)
        if "://" in str(path):  # remote filesystems: fall back to Lightning's writer
            return super().save_checkpoint(checkpoint, path, storage_options)
        atomic_save(checkpoint, path)


def atomic_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` to a temp file in the same folder, fsync, then ``os.replace``: never a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def _short(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:200] if text else type(e).__name__


def verify_checkpoint(path: str | os.PathLike, load: bool = True) -> dict[str, Any] | None:
    """Check that ``path`` is a complete Lightning checkpoint; return it (memory-mapped, on CPU) when ``load``.

    Raises:
        CheckpointError: missing file, empty/truncated/corrupt file, or no ``state_dict`` inside.
    """
    path = Path(path)
    if path.is_dir():  # a sharded (FSDP/DeepSpeed) checkpoint folder: Lightning's strategy reads it
        return None
    if not path.exists():
        raise CheckpointError(f"Checkpoint {path} does not exist.")
    if path.stat().st_size == 0:
        raise CheckpointError(f"Checkpoint {path} is empty (0 bytes): it was not written completely. Delete it "
                              f"(or pass another ckpt_path) to continue.")
    try:
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
        except RuntimeError as e:  # mmap needs the zip format; retry plainly for legacy files
            if "mmap" not in str(e):
                raise
            ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - any failure to unpickle means an unusable file
        raise CheckpointError(f"Checkpoint {path} is corrupt or truncated ({type(e).__name__}: {_short(e)}). "
                              f"Delete it or pass another ckpt_path (an older step*.ckpt in the same folder).") \
            from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise CheckpointError(f"Checkpoint {path} is not a Lightning checkpoint (no 'state_dict' entry).")
    return ckpt if load else None


def _norm(key: str) -> str:
    return key.replace("._orig_mod.", ".").replace("_orig_mod.", "")


def state_dict_mismatches(module: torch.nn.Module, state_dict: dict[str, Any]) -> dict[str, list[str]]:
    """Compare ``state_dict`` (from a checkpoint) with ``module.state_dict()``.

    Returns:
        ``{"shape": ["key: checkpoint (a, b) vs model (c, d)", ...], "missing": [keys in the model only],
        "unexpected": [keys in the checkpoint only]}``; all empty when they fit.
    """
    want = {_norm(k): v for k, v in module.state_dict().items() if not k.startswith(IGNORED_PREFIXES)}
    have = {_norm(k): v for k, v in state_dict.items() if not k.startswith(IGNORED_PREFIXES)}
    shape = [f"{k}: checkpoint {tuple(have[k].shape)} vs model {tuple(want[k].shape)}"
             for k in want if k in have and hasattr(have[k], "shape") and tuple(have[k].shape) != tuple(want[k].shape)]
    return {"shape": shape, "missing": sorted(set(want) - set(have)), "unexpected": sorted(set(have) - set(want))}


def check_fits(module: torch.nn.Module, ckpt: dict[str, Any], path: str | os.PathLike, what: str = "the model",
               limit: int = 5) -> None:
    """Raise :class:`CheckpointError` listing (at most ``limit`` per kind) the keys that do not fit."""
    mm = state_dict_mismatches(module, ckpt["state_dict"])
    if not any(mm.values()):
        return
    parts = []
    for kind, label in (("shape", "shape mismatch"), ("missing", "missing in checkpoint"),
                        ("unexpected", "not in model")):
        keys = mm[kind]
        if keys:
            more = f" (+{len(keys) - limit} more)" if len(keys) > limit else ""
            parts.append(f"{len(keys)} {label}: " + "; ".join(keys[:limit]) + more)
    raise CheckpointError(f"Checkpoint {path} does not fit {what} (was it trained with another config?):\n  "
                          + "\n  ".join(parts))


def last_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """``<output_dir>/checkpoints/last.ckpt`` when it exists (the file preemption and ``save_last`` write)."""
    last = Path(output_dir) / "checkpoints" / "last.ckpt"
    return last if last.exists() else None
