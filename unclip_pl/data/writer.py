"""Writing shards: samples (``__key__`` + members) -> size- and count-capped ``.tar`` shards, written atomically.

Built on ``wds.TarWriter``; own rotation instead of ``wds.ShardWriter`` so that a shard appears under its final
name only once complete (written to a temporary name, renamed; an aborted one is removed) and ``maxsize`` counts
tar headers and padding, so a shard never exceeds it.
"""
from __future__ import annotations

import os
from collections.abc import Iterable

import numpy as np
import torch
import webdataset as wds

from .transforms import encode_npy


def encode_sample(sample: dict) -> dict:
    """Encode values to bytes: ``str`` -> UTF-8, ``np.ndarray`` -> ``.npy``; bytes pass through."""
    out = {"__key__": sample["__key__"]}
    for k, v in sample.items():
        if k.startswith("__"):
            continue
        if isinstance(v, str):
            v = v.encode("utf-8")
        elif isinstance(v, np.ndarray):
            v = encode_npy(v)
        elif isinstance(v, torch.Tensor):
            v = encode_npy(v.detach().cpu().numpy())
        if not isinstance(v, (bytes, bytearray, memoryview)):
            raise TypeError(f"sample {sample['__key__']!r}: member {k!r} is {type(v).__name__}, expected bytes")
        out[k] = bytes(v)
    return out


class ShardWriter:
    """Write samples into ``OUT_DIR/{prefix}-{index:06d}.tar``, starting a new shard when ``maxcount`` samples
    or ``maxsize`` bytes are reached. Each shard is written to a temporary name and renamed when complete.

    Usage::

        with ShardWriter("out", prefix="train", maxcount=1000) as w:
            w.write({"__key__": "000001", "png": png_bytes, "txt": "a cat"})
        w.urls  # finished shard paths
    """

    def __init__(self, out_dir: str | os.PathLike, prefix: str = "shard", maxcount: int = 10_000,
                 maxsize: float = 1e9, start_index: int = 0):
        if maxcount < 1 or maxsize < 1:
            raise ValueError("maxcount and maxsize must be positive")
        self.out_dir = os.fspath(out_dir)
        self.prefix, self.maxcount, self.maxsize = prefix, int(maxcount), int(maxsize)
        self.index = start_index
        self.urls: list[str] = []
        self.total = 0
        self._tar: wds.TarWriter | None = None
        self._fobj = None
        self._path = self._tmp = None
        self._count = self._size = 0
        os.makedirs(self.out_dir, exist_ok=True)

    def _open(self):
        self._path = os.path.join(self.out_dir, f"{self.prefix}-{self.index:06d}.tar")
        self._tmp = self._path + f".tmp{os.getpid()}"
        self._fobj = open(self._tmp, "wb")
        self._tar = wds.TarWriter(self._fobj, encoder=False, mtime=0.0)
        self._count = self._size = 0
        self.index += 1

    def _finish(self):
        if self._tar is None:
            return
        self._tar.close()
        self._fobj.close()
        os.replace(self._tmp, self._path)
        self.urls.append(self._path)
        self._tar = self._fobj = None

    def write(self, sample: dict) -> None:
        enc = encode_sample(sample)
        # bytes this sample adds to the tar: a 512-byte header per member + data padded to 512-byte blocks
        nbytes = sum(512 + -(-len(v) // 512) * 512 for k, v in enc.items() if not k.startswith("__"))
        full = self._count and self._size + nbytes + 1024 > self.maxsize  # 1024: end-of-archive blocks
        if self._tar is None or self._count >= self.maxcount or full:
            self._finish()
            self._open()
        self._tar.write(enc)
        self._count += 1
        self._size += nbytes
        self.total += 1

    def close(self) -> list[str]:
        self._finish()
        return self.urls

    def abort(self) -> None:
        """Drop the shard being written (its temporary file is removed)."""
        if self._tar is not None:
            try:
                self._tar.close()
                self._fobj.close()
            finally:
                if os.path.exists(self._tmp):
                    os.remove(self._tmp)
                self._tar = self._fobj = None

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:
            self.abort()


def write_shards(samples: Iterable[dict], out_dir: str | os.PathLike, prefix: str = "shard",
                 maxcount: int = 10_000, maxsize: float = 1e9) -> list[str]:
    """Write an iterable of samples (``__key__`` + members) to capped shards; returns the shard paths."""
    with ShardWriter(out_dir, prefix=prefix, maxcount=maxcount, maxsize=maxsize) as w:
        for s in samples:
            w.write(s)
    return w.urls


__all__ = ["encode_sample", "ShardWriter", "write_shards"]
