"""Embeddings kept beside the image shards instead of inside them: sidecar shard sets, and embedding folders.

A sidecar shard has the file name of its image shard and one sample per image sample, same keys, same order:
``KEY.img_emb.npy`` (the image's CLIP embedding, float16 ``(D,)``), ``KEY.txt_emb.npy`` where the sample has a
caption, or ``KEY.embed_error.txt`` (why there is no embedding, e.g. an image that does not decode). Written by
``python -m unclip_pl.data.embed`` (its default mode); read in lockstep with the image shards by
:func:`~unclip_pl.data.tar_reader.with_sidecar`, so the image shards are never rewritten.

An embedding folder (clip-retrieval / LAION layout, :class:`~unclip_pl.data.embedding_folder.EmbeddingFolder`) is
joined by key instead: :class:`JoinEmbeddingFolder` looks each sample's key (img2dataset's ``key``, which
clip-retrieval carries into the metadata parquet) up in the folder's key index.
"""
from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from .urls import expand_urls

#: Member a sidecar sample holds instead of embeddings when its image could not be embedded.
ERROR_MEMBER = "embed_error.txt"


def shard_name(url: str) -> str:
    """The file name that pairs an image shard with its sidecar shard: ``.../00012.tar.gz`` -> ``00012.tar``."""
    name = url.rstrip("/").rsplit("/", 1)[-1]
    for ext in (".tar.gz", ".tgz"):
        if name.endswith(ext):
            name = name[: -len(ext)] + ".tar"
    return name if name.endswith(".tar") else name + ".tar"


def pair_sidecars(urls: Sequence[str], sidecar_spec) -> dict[str, str]:
    """``{image shard url: sidecar shard url}``, matched by file name (:func:`shard_name`).

    ``sidecar_spec``: any shard spec (a directory, glob, brace pattern, list), which may hold more shards than
    ``urls`` (e.g. one directory for the train and val sidecars). Raises ``FileNotFoundError`` naming the image
    shards without a sidecar, and ``ValueError`` when two sidecar shards share a name.
    """
    by_name: dict[str, str] = {}
    for s in expand_urls(sidecar_spec):
        name = shard_name(s)
        if name in by_name and by_name[name] != s:
            raise ValueError(f"sidecar shards {by_name[name]} and {s} have the same file name; give the sidecar "
                             f"shards of one split only")
        by_name[name] = s
    missing = [u for u in urls if shard_name(u) not in by_name]
    if missing:
        shown = ", ".join(os.path.basename(u) for u in missing[:3]) + (
            f" ... ({len(missing)} in all)" if len(missing) > 3 else "")
        raise FileNotFoundError(f"no sidecar shard for image shard(s) {shown} in {sidecar_spec!r}; write them with: "
                                f"python -m unclip_pl.data.embed IMAGE_SHARDS SIDECAR_DIR --clip ...")
    return {u: by_name[shard_name(u)] for u in urls}


class JoinEmbeddingFolder:
    """Pipeline stage: raw samples -> the same samples with ``img_emb.npy`` (and ``txt_emb.npy``) from ``folder``.

    The members are float32 arrays ``(D,)`` (the decode stage takes arrays or ``.npy`` bytes). A key the folder
    does not hold gets no member (the decode stage then raises or, with ``on_error: skip``, skips and counts
    ``no_img_emb``). The key index is built once per process (each loader worker), on its first sample.

    Args:
        folder: an :class:`~unclip_pl.data.embedding_folder.EmbeddingFolder` (opened with its metadata: keys).
        fields: ``"img_emb"`` and/or ``"txt_emb"``.
    """

    def __init__(self, folder, fields=("img_emb", "txt_emb")):
        self.folder, self.fields = folder, tuple(fields)

    def __call__(self, src):
        index = None
        for s in src:
            if index is None:
                index = self.folder.key_index()
            hit = index.get(s["__key__"])
            if hit is not None:
                for f in self.fields:
                    s.setdefault(f"{f}.npy", np.asarray(self.folder.array(f, hit[0])[hit[1]], np.float32))
            else:
                s["__not_in_folder__"] = str(self.folder.root)  # named by the decode stage's message
            yield s


__all__ = ["ERROR_MEMBER", "shard_name", "pair_sidecars", "JoinEmbeddingFolder"]
