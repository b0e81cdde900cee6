"""Decoding raw shard samples into training samples, and collating them into batches.

Own stage instead of ``wds.decode(..., handler=...)``: a corrupt image is skipped, counted in :class:`LoaderStats`
and reported in one line with shard and key, and a missing member raises :class:`MissingKeyError` with one line
naming the key, the shard and the command that adds the member (webdataset's handlers skip or raise uncounted).
"""
from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator

import numpy as np
import torch

from .stats import FaultPolicy, LoaderStats
from .transforms import DECODE_ERRORS, decode_image, decode_npy, images_to_tensor

log = logging.getLogger(__name__)

IMAGE_EXTS = ("png", "jpg", "jpeg", "webp")
VALID_NEEDS = frozenset({"image", "txt", "tokens", "img_emb", "txt_emb"})
_NEED_TO_MEMBER = {"txt": "txt", "img_emb": "img_emb.npy", "txt_emb": "txt_emb.npy"}
MAKE_SHARDS_CMD = "python -m unclip_pl.data.make_shards SRC OUT_DIR"
EMBED_CMD = "python -m unclip_pl.data.embed '{shards}' OUT_DIR --clip <clip config or model[:pretrained]>"


class MissingKeyError(KeyError):
    """A sample lacks a member the requested batch needs."""

    def __str__(self) -> str:  # KeyError quotes its message; print it plainly
        return str(self.args[0]) if self.args else ""


def _missing_key_message(need: str, member: str, sample: dict) -> str:
    url = sample.get("__url__", "?")
    have = sorted(k for k in sample if not k.startswith("__"))
    if need in ("img_emb", "txt_emb") and "__not_in_folder__" in sample:
        fix = (f"its key is not in the embedding folder {sample['__not_in_folder__']} (data.embedding_folder; keys "
               f"come from its metadata's key column)")
    elif need in ("img_emb", "txt_emb"):
        fix = "add CLIP embeddings with: " + EMBED_CMD.format(shards=url)
    elif need == "txt":
        fix = (f"this stage reads captions, so every sample needs a 'txt' member (img2dataset writes them when given "
               f"--caption_col); write shards with: {MAKE_SHARDS_CMD}")
    else:
        fix = f"shards need an image (png/jpg/webp) and a 'txt' caption per sample; write them with: {MAKE_SHARDS_CMD}"
    return (f"sample {sample.get('__key__')!r} in shard {url} has no {member!r} member (needed for {need!r}; "
            f"it has {have}); {fix}")


class DecodeSamples:
    """Pipeline stage: raw tar samples -> ``{"key", "txt"?, "image"?, "img_emb"?, "txt_emb"?}``.

    A member is required only when ``needs`` reads it: ``txt`` for "txt" and "tokens" (an image-only stage reads
    samples without captions; a caption that is there is still passed on), an image member for "image", the
    ``.npy`` members for the embeddings. ``filters`` (a :class:`~unclip_pl.data.filters.SampleFilter`) sees the
    sample's ``json`` metadata (img2dataset's) before anything is decoded; a dropped sample is counted in
    ``stats.filtered``. Corrupt images are skipped with one warning line (shard + key) and counted in ``stats``.
    A missing member raises :class:`MissingKeyError`, or with ``faults.on_error == "skip"`` is skipped and counted
    per reason (see :class:`~unclip_pl.data.stats.FaultPolicy`).
    """

    def __init__(self, needs: Iterable[str], image_size: int, random_crop: bool, stats: LoaderStats,
                 faults: FaultPolicy | None = None, filters=None):
        self.needs = frozenset(needs)
        self.image_size, self.random_crop, self.stats = image_size, random_crop, stats
        self.faults = faults if faults is not None else FaultPolicy(stats, "raise")
        self.filters = filters

    def _missing(self, need: str, member: str, raw: dict) -> None:
        msg = _missing_key_message(need, member, raw)
        self.faults.bad_sample(f"no_{need}", msg, MissingKeyError(msg))

    def __call__(self, src: Iterable[dict]) -> Iterator[dict]:
        skipped = 0
        want_image = "image" in self.needs
        want_txt = bool(self.needs & {"txt", "tokens"})
        embs = [n for n in ("img_emb", "txt_emb") if n in self.needs]
        for raw in src:
            # one shared-counter add per sample (about 3 us on a 2-core AMD EPYC, under 1% of reading a sample
            # with embeddings and no image): the metric is exact at every step
            self.stats.add("samples_read")
            if self.filters is not None:
                try:
                    keep = self.filters(raw)
                except MissingKeyError as e:  # no (usable) json metadata
                    self.faults.bad_sample("no_json", str(e), e)
                    continue
                if not keep:
                    self.stats.add("filtered")
                    continue
            out = {"key": raw["__key__"]}
            if "txt" in raw:
                out["txt"] = raw["txt"].decode("utf-8").strip()
            elif want_txt:
                self._missing("txt", "txt", raw)
                continue
            if want_image:  # before the embeddings: embed writes none for an image that does not decode
                ext = next((e for e in IMAGE_EXTS if e in raw), None)
                if ext is None:
                    self._missing("image", "png|jpg|webp", raw)
                    continue
                try:
                    out["image"] = decode_image(raw[ext], self.image_size, self.random_crop)
                except DECODE_ERRORS as e:
                    skipped += 1
                    self.stats.add("skipped_corrupt")
                    log.warning("skipping corrupt image: shard=%s key=%s (%s: %s)", raw.get("__url__"),
                                raw["__key__"], type(e).__name__, e)
                    self.faults.check()
                    continue
            missing = next((n for n in embs if _NEED_TO_MEMBER[n] not in raw), None)
            if missing is not None:
                self._missing(missing, _NEED_TO_MEMBER[missing], raw)
                continue
            for need in embs:
                v = raw[_NEED_TO_MEMBER[need]]  # .npy bytes, or an array joined from an embedding folder
                out[need] = v if isinstance(v, np.ndarray) else decode_npy(v)
            yield out
        if skipped:
            log.warning("end of pass: skipped %d corrupt image(s) in this worker (%d in total so far)", skipped,
                        self.stats.skipped_corrupt)
        self.faults.check(final=True)


def collate(samples: list[dict]) -> dict:
    """Samples -> batch: ``key``/``txt`` lists (``txt`` when every sample has a caption), ``image`` float32
    (B,3,H,W) in [-1,1], embeddings float32 (B,D)."""
    batch = {"key": [s["key"] for s in samples]}
    if all("txt" in s for s in samples):
        batch["txt"] = [s["txt"] for s in samples]
    if "image" in samples[0]:
        batch["image"] = images_to_tensor([s["image"] for s in samples])
    for k in ("img_emb", "txt_emb"):
        if k in samples[0]:
            batch[k] = torch.from_numpy(np.stack([s[k] for s in samples]).astype(np.float32, copy=False))
    return batch


__all__ = ["IMAGE_EXTS", "VALID_NEEDS", "MissingKeyError", "DecodeSamples", "collate"]
