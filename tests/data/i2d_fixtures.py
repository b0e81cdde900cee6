"""img2dataset output in its real layout, for tests: ``{NNNNN}.tar`` (``KEY.jpg``, ``KEY.txt``, ``KEY.json``),
``{NNNNN}.parquet`` (one row per url, failed ones included) and ``{NNNNN}_stats.json`` beside each tar.

Field names and key format as img2dataset's webdataset writer and downloader write them: the key is
``shard_id * 10**ceil(log10(number_sample_per_shard)) + index`` zero-padded to ``oom_shard_count`` plus that many
digits; the json holds the input columns (``url``, ``caption``) then ``key``, ``status``, ``error_message``,
``width``, ``height``, ``original_width``, ``original_height``, ``exif``, ``sha256``; samples that failed to
download are absent from the tar (their parquet row has ``status: failed_to_download``); tar members come in
download-completion order, not key order.
"""
from __future__ import annotations

import hashlib
import io
import json
import math
import random
from pathlib import Path

import numpy as np
from PIL import Image

OOM_SHARD_COUNT = 5


def jpeg_bytes(seed: int, w: int, h: int) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def i2d_key(shard_id: int, index: int, per_shard: int) -> str:
    oom_sample = math.ceil(math.log10(per_shard))
    return f"{10**oom_sample * shard_id + index:0{oom_sample + OOM_SHARD_COUNT}d}"


def write_img2dataset(out: Path, n_shards: int = 3, per_shard: int = 10, failed: frozenset = frozenset({3, 7}),
                      no_caption: frozenset = frozenset(), small: frozenset = frozenset(), size: int = 40) -> dict:
    """Write ``n_shards`` shards of ``per_shard`` urls each; url index ``i`` (within a shard) in ``failed`` is
    absent from the tar, in ``no_caption`` has an empty caption and no ``txt`` member, in ``small`` has
    ``original_width/height`` 16 (below the others' 64 x 48). Returns ``{"tars": [...], "keys": {tar: [keys in
    tar order]}}``."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import webdataset as wds

    out.mkdir(parents=True, exist_ok=True)
    tars, keys = [], {}
    for shard in range(n_shards):
        name = f"{shard:0{OOM_SHARD_COUNT}d}"
        rows, samples = [], []
        for i in range(per_shard):
            key = i2d_key(shard, i, per_shard)
            seed = shard * 1000 + i
            caption = "" if i in no_caption else f"a photo number {shard}-{i}"
            meta = {"url": f"http://127.0.0.1/img/{key}.jpg", "caption": caption, "key": key, "status": None,
                    "error_message": None, "width": None, "height": None, "original_width": None,
                    "original_height": None, "exif": None, "sha256": None}
            if i in failed:
                meta.update(status="failed_to_download", error_message="<urlopen error [Errno 111] refused>")
            else:
                img = jpeg_bytes(seed, size, size)
                ow, oh = (16, 16) if i in small else (64, 48)
                meta.update(status="success", width=size, height=size, original_width=ow, original_height=oh,
                            exif="{}", sha256=hashlib.sha256(img).hexdigest())
                sample = {"__key__": key, "jpg": img, "json": json.dumps(meta, indent=4).encode()}
                if i not in no_caption:
                    sample["txt"] = caption.encode()
                samples.append(sample)
            rows.append(meta)
        random.Random(shard).shuffle(samples)  # download-completion order
        tar = out / f"{name}.tar"
        with open(tar, "wb") as f:
            w = wds.TarWriter(f, encoder=False)
            for s in samples:
                w.write(s)
            w.close()
        pq.write_table(pa.Table.from_pylist(rows), out / f"{name}.parquet")
        ok = len(samples)
        (out / f"{name}_stats.json").write_text(json.dumps({
            "count": per_shard, "successes": ok, "failed_to_download": per_shard - ok, "failed_to_resize": 0,
            "duration": 0.1, "start_time": 0.0, "end_time": 0.1,
            "status_dict": {"success": ok, **({"<urlopen error [Errno 111] refused>": per_shard - ok}
                                              if per_shard - ok else {})}}, indent=4))
        tars.append(str(tar))
        keys[str(tar)] = [s["__key__"] for s in samples]
    return {"tars": tars, "keys": keys}


def truncate(path: Path, keep: float = 0.5) -> None:
    """Cut a tar to ``keep`` of its bytes (an interrupted copy)."""
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[: int(len(data) * keep)])
