"""Data: webdataset shards (read/write), LightningDataModules, shard writer, CLIP embedder, built-in emoji data.

Modules, one job each: ``urls`` (shard URL expansion), ``tar_reader`` (tar parsing into raw samples), ``writer``
(capped, atomic shard writing), ``stats`` (loader counters shared with workers), ``decode`` (raw samples ->
decoded samples -> batches), ``pipeline`` (the batched reading pipeline), ``datamodule`` / ``emoji``
(LightningDataModules), ``make_shards`` / ``embed`` (command-line tools).

Submodules are imported lazily so ``import unclip_pl.data.pipeline`` does not pull in Lightning.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "expand_urls": "urls", "build_pipeline": "pipeline", "TrainOrder": "pipeline", "ShardWriter": "writer",
    "write_shards": "writer", "LoaderStats": "stats", "ShardError": "tar_reader", "MissingKeyError": "decode",
    "iter_tar": "tar_reader", "ShardDataModule": "datamodule", "make_shards": "make_shards",
    "embed_shards": "embed", "prepare_emoji": "emoji", "EmojiDataModule": "emoji",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
