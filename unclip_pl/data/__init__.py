"""Data: webdataset shards (read/write), LightningDataModules, shard writer, CLIP embedder, built-in emoji data.

Submodules are imported lazily so ``import unclip_pl.data.shards`` does not pull in Lightning.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "expand_urls": "shards", "build_pipeline": "shards", "ShardWriter": "shards", "write_shards": "shards",
    "LoaderStats": "shards", "ShardError": "shards", "MissingKeyError": "shards", "iter_tar": "shards",
    "ShardDataModule": "datamodule", "make_shards": "make_shards", "embed_shards": "embed",
    "prepare_emoji": "emoji", "EmojiDataModule": "emoji",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
