"""Write image-caption pairs into size-capped webdataset shards.

    python -m unclip_pl.data.make_shards photos/ data/photos_shards            # photos/a.jpg + photos/a.txt, ...
    python -m unclip_pl.data.make_shards pairs.csv data/pairs --maxcount 5000   # CSV with path,caption columns
    python -m unclip_pl.data.make_shards pairs.parquet data/pairs               # needs pandas or pyarrow

Images are stored with their original bytes (``.png``/``.jpg``/``.webp``); each is checked to decode first.
Relative CSV/parquet paths are resolved against the table's folder. Prints one summary line: written, skipped, why.
"""
from __future__ import annotations

import argparse
import collections
import csv
import io
import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path

from PIL import Image
from tqdm.auto import tqdm

from .transforms import DECODE_ERRORS
from .writer import ShardWriter

IMAGE_SUFFIXES = {".png": "png", ".jpg": "jpg", ".jpeg": "jpg", ".webp": "webp"}
PATH_COLUMNS = ("path", "image", "image_path", "file", "filepath", "filename")
CAPTION_COLUMNS = ("caption", "text", "txt")


def _pairs_from_folder(root: Path) -> list[tuple[Path, str | None, str]]:
    """(image path, caption or None, key) for every image under ``root`` (recursive, sorted)."""
    pairs = []
    for p in sorted(root.rglob("*")):
        if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file():
            cap_file = p.with_suffix(".txt")
            caption = cap_file.read_text(encoding="utf-8") if cap_file.exists() else None
            pairs.append((p, caption, str(p.relative_to(root).with_suffix(""))))
    return pairs


def _pick(columns: list[str], wanted: tuple[str, ...], what: str, src) -> str:
    lower = {c.lower(): c for c in columns}
    for w in wanted:
        if w in lower:
            return lower[w]
    raise ValueError(f"{src}: no {what} column (looked for {', '.join(wanted)}; found {', '.join(columns)})")


def _read_table(path: Path) -> list[dict]:
    if path.suffix.lower() == ".parquet":
        try:
            import pandas as pd

            return pd.read_parquet(path).to_dict("records")
        except ImportError:
            try:
                import pyarrow.parquet as pq
            except ImportError:
                raise SystemExit(f"reading {path} needs pandas or pyarrow (pip install pyarrow); "
                                 f"or convert it to CSV with columns path,caption") from None
            return pq.read_table(path).to_pylist()
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _pairs_from_table(path: Path) -> list[tuple[Path, str | None, str]]:
    rows = _read_table(path)
    if not rows:
        return []
    cols = list(rows[0].keys())
    pcol, ccol = _pick(cols, PATH_COLUMNS, "image path", path), _pick(cols, CAPTION_COLUMNS, "caption", path)
    pairs = []
    for i, r in enumerate(rows):
        p = Path(str(r[pcol]))
        if not p.is_absolute():
            p = path.parent / p
        cap = r[ccol]
        pairs.append((p, None if cap is None else str(cap), f"{i:09d}_{p.stem}"))
    return pairs


def _safe_key(key: str, used: set[str]) -> str:
    # webdataset splits "KEY.ext" at the first dot of the file name: keys must not contain dots
    k = re.sub(r"[^A-Za-z0-9_\-/]", "_", key).strip("/") or "sample"
    base, n = k, 1
    while k in used:
        n += 1
        k = f"{base}_{n}"
    used.add(k)
    return k


def iter_samples(src: str | os.PathLike, skipped: collections.Counter) -> Iterator[dict]:
    """Yield shard samples from a folder or a CSV/parquet table; bad pairs are counted in ``skipped`` by reason."""
    src = Path(src)
    if src.is_dir():
        pairs = _pairs_from_folder(src)
    elif src.is_file() and src.suffix.lower() in (".csv", ".parquet", ".tsv"):
        pairs = _pairs_from_table(src)
    else:
        raise FileNotFoundError(f"{src}: expected a folder of images + .txt captions, or a .csv/.parquet table")
    used: set[str] = set()
    for path, caption, key in tqdm(pairs, desc="make_shards", unit="img"):
        ext = IMAGE_SUFFIXES.get(path.suffix.lower())
        if ext is None:
            skipped["unsupported image type"] += 1
            continue
        if caption is None:
            skipped["no caption"] += 1
            continue
        caption = caption.strip()
        if not caption:
            skipped["empty caption"] += 1
            continue
        try:
            data = path.read_bytes()
        except OSError:
            skipped["image file missing"] += 1
            continue
        try:
            with Image.open(io.BytesIO(data)) as im:
                im.load()
        except DECODE_ERRORS:
            skipped["corrupt image"] += 1
            continue
        yield {"__key__": _safe_key(key, used), ext: data, "txt": caption}


def make_shards(src: str | os.PathLike, out_dir: str | os.PathLike, maxcount: int = 10_000, maxsize: float = 1e9,
                prefix: str = "shard") -> dict:
    """Write ``src`` (folder or CSV/parquet of path,caption) into ``out_dir/{prefix}-NNNNNN.tar``.

    Returns ``{"urls": [...], "written": int, "skipped": int, "reasons": {reason: count}, "summary": str}``.
    """
    skipped: collections.Counter = collections.Counter()
    with ShardWriter(out_dir, prefix=prefix, maxcount=maxcount, maxsize=maxsize) as w:
        for sample in iter_samples(src, skipped):
            w.write(sample)
    n_skip = sum(skipped.values())
    why = ", ".join(f"{k}: {v}" for k, v in skipped.most_common()) or "none"
    summary = (f"wrote {w.total} samples in {len(w.urls)} shard(s) to {out_dir}; skipped {n_skip} ({why})")
    return {"urls": w.urls, "written": w.total, "skipped": n_skip, "reasons": dict(skipped), "summary": summary}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m unclip_pl.data.make_shards", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("src", help="folder of images with same-named .txt captions, or a .csv/.parquet (path, caption)")
    p.add_argument("out_dir")
    p.add_argument("--maxcount", type=int, default=10_000, help="max samples per shard")
    p.add_argument("--maxsize", type=float, default=1e9, help="max bytes per shard")
    p.add_argument("--prefix", default="shard", help="shard file prefix (PREFIX-000000.tar)")
    args = p.parse_args(argv)
    try:
        result = make_shards(args.src, args.out_dir, args.maxcount, args.maxsize, args.prefix)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(result["summary"])
    return 0 if result["written"] else 1


if __name__ == "__main__":
    sys.exit(main())
