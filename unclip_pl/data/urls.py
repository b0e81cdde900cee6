"""Shard URL expansion: brace patterns, globs, directories, lists and remote URLs -> a list of shard URLs."""
from __future__ import annotations

import glob
import os
from collections.abc import Sequence

import braceexpand

SHARD_EXTS = (".tar", ".tar.gz", ".tgz")


def is_remote(url: str) -> bool:
    """True for ``pipe:`` commands and non-``file://`` URLs (read through gopen/fsspec, never checked locally)."""
    return url.startswith("pipe:") or ("://" in url and not url.startswith("file://"))


def expand_urls(spec: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """Expand a shard specification into a list of URLs.

    Accepts a list (each entry expanded), ``::``-separated strings, brace patterns (``shard-{000..009}.tar``),
    globs (``dir/*``: the ``.tar``/``.tar.gz``/``.tgz`` files it matches), directories (all ``*.tar``/``*.tar.gz``/
    ``*.tgz`` inside, sorted; other files such as img2dataset's ``.parquet`` and ``_stats.json`` are ignored) and
    remote URLs (``pipe:...``, ``s3://...`` and other fsspec/gopen URLs: brace-expanded, passed through unchecked).

    Raises ``FileNotFoundError`` naming the pattern when a local pattern matches nothing (or names missing files).
    """
    if isinstance(spec, (str, os.PathLike)):
        spec = [os.fspath(spec)]
    urls: list[str] = []
    for item in spec:
        item = os.fspath(item)
        for part in item.split("::"):
            part = part.strip()
            if part:
                urls.extend(_expand_one(part))
    if not urls:
        raise FileNotFoundError(f"no shards given (spec={spec!r})")
    return urls


def _expand_one(pattern: str) -> list[str]:
    if is_remote(pattern):
        return list(braceexpand.braceexpand(pattern))
    local = os.path.expanduser(os.path.expandvars(pattern.removeprefix("file://")))
    if os.path.isdir(local):
        found = sorted(p for p in glob.glob(os.path.join(local, "*")) if p.endswith(SHARD_EXTS))
        if not found:
            raise FileNotFoundError(f"no shards (*.tar, *.tar.gz, *.tgz) in directory {pattern!r}")
        return found
    out, missing = [], []
    for p in braceexpand.braceexpand(local):
        if glob.has_magic(p):  # shard files only: not img2dataset's .parquet / _stats.json beside them
            out.extend(sorted(f for f in glob.glob(p) if f.endswith(SHARD_EXTS)))
        elif os.path.isfile(p):
            out.append(p)
        else:
            missing.append(p)
    if not out:
        raise FileNotFoundError(f"shard pattern {pattern!r} matches no files")
    if missing:
        shown = ", ".join(missing[:3]) + (f" ... ({len(missing)} missing)" if len(missing) > 3 else "")
        raise FileNotFoundError(f"shard pattern {pattern!r}: missing files {shown}")
    return out


__all__ = ["SHARD_EXTS", "is_remote", "expand_urls"]
