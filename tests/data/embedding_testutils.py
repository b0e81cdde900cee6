"""Embedding folders in the real clip-retrieval / LAION layout, for tests: float16 npy files and parquet metadata
with the real column names (``caption``, ``url``, ``key``)."""
from __future__ import annotations

from pathlib import Path

import numpy as np


def row_value(file_number: int, row: int) -> float:
    """The value every entry of img_emb row ``row`` of file ``file_number`` holds (text_emb holds its negative):
    exact in float16 for the sizes used here, so a test can tell which row a batch row came from."""
    return float(file_number * 100 + row)


def write_embedding_folder(root: Path, rows: list[int], dim: int = 8, metadata_folder: Path | None = None,
                           numbers: list[int] | None = None, digits: int = 4) -> Path:
    """Write ``root/img_emb/img_emb_{N}.npy``, ``root/text_emb/text_emb_{N}.npy`` (float16 (rows[i], dim)) and
    ``metadata_{N}.parquet`` (``caption``, ``url``, ``key``; in ``metadata_folder``, default ``root/metadata``)
    for files ``numbers`` (default 0, 1, ...), ``N`` zero-padded to ``digits``. Row r of file N has key
    ``{N:03d}{r:05d}`` (img2dataset's style), caption ``caption {N} {r}`` and embeddings :func:`row_value`."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = Path(root)
    meta_dir = Path(metadata_folder) if metadata_folder else root / "metadata"
    for d in (root / "img_emb", root / "text_emb", meta_dir):
        d.mkdir(parents=True, exist_ok=True)
    numbers = list(range(len(rows))) if numbers is None else numbers
    for n, count in zip(numbers, rows):
        values = np.array([row_value(n, r) for r in range(count)], np.float32)[:, None]
        img = np.repeat(values, dim, axis=1).astype(np.float16)
        np.save(root / "img_emb" / f"img_emb_{n:0{digits}d}.npy", img)
        np.save(root / "text_emb" / f"text_emb_{n:0{digits}d}.npy", -img)
        table = pa.table({"caption": [f"caption {n} {r}" for r in range(count)],
                          "url": [f"http://127.0.0.1/{n}/{r}.jpg" for r in range(count)],
                          "key": [f"{n:03d}{r:05d}" for r in range(count)]})
        pq.write_table(table, meta_dir / f"metadata_{n:0{digits}d}.parquet")
    return root
