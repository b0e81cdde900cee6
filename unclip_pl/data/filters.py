"""Sample filters on img2dataset's ``json`` metadata, applied in the loader before any image is decoded.

img2dataset writes one ``KEY.json`` per sample with, among others, ``url``, ``key``, ``status``, ``caption``,
``width`` / ``height`` (as stored) and ``original_width`` / ``original_height`` (as downloaded). One filter today:
``min_original_size`` (drop images whose downloaded shorter side is smaller, e.g. thumbnails that were upscaled).
"""
from __future__ import annotations

import json
from collections.abc import Mapping

from .decode import MissingKeyError

FILTER_KEYS = ("min_original_size",)


class SampleFilter:
    """``filter(raw_sample) -> bool`` (keep it?) from the sample's ``json`` member.

    Args:
        min_original_size: keep a sample when ``min(original_width, original_height)`` is at least this (falls
            back to ``width`` / ``height`` when the originals are not recorded).
    Raises :class:`~unclip_pl.data.decode.MissingKeyError` (counted as ``no_json`` with ``on_error: skip``) when
    the sample has no ``json`` member, or one without the sizes.
    """

    def __init__(self, min_original_size: int | None = None):
        self.min_original_size = int(min_original_size) if min_original_size else None

    @classmethod
    def from_config(cls, cfg: Mapping | None) -> SampleFilter | None:
        """``data.filters`` -> a filter, or None when no filter is set; an unknown key is a ``ValueError``."""
        cfg = dict(cfg or {})
        unknown = sorted(set(cfg) - set(FILTER_KEYS))
        if unknown:
            raise ValueError(f"data.filters: unknown filter(s) {unknown}; valid: {list(FILTER_KEYS)}")
        f = cls(**cfg)
        return f if f.min_original_size else None

    def _meta(self, raw: dict) -> dict:
        where = f"sample {raw.get('__key__')!r} in shard {raw.get('__url__', '?')}"
        if "json" not in raw:
            raise MissingKeyError(f"{where} has no 'json' member (needed by data.filters); img2dataset writes one "
                                  f"per sample")
        try:
            meta = json.loads(raw["json"])
        except ValueError as e:
            raise MissingKeyError(f"{where}: its 'json' member does not parse ({e})") from None
        if not isinstance(meta, dict):
            raise MissingKeyError(f"{where}: its 'json' member is not an object")
        return meta

    def __call__(self, raw: dict) -> bool:
        meta = self._meta(raw)
        if self.min_original_size:
            w = meta.get("original_width") or meta.get("width")
            h = meta.get("original_height") or meta.get("height")
            if not w or not h:
                raise MissingKeyError(f"sample {raw.get('__key__')!r} in shard {raw.get('__url__', '?')}: its "
                                      f"'json' member records no original_width/original_height "
                                      f"(data.filters.min_original_size needs them)")
            if min(int(w), int(h)) < self.min_original_size:
                return False
        return True


__all__ = ["FILTER_KEYS", "SampleFilter"]
