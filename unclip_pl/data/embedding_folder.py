"""Embedding folders: precomputed CLIP embeddings in the clip-retrieval / LAION layout, as training data.

Layout (what ``clip-retrieval inference`` writes, and how LAION publishes its CLIP ViT-L/14 embeddings)::

    EMBEDDING_FOLDER/img_emb/img_emb_{N}.npy      float16 (n_N, D), one row per sample
    EMBEDDING_FOLDER/text_emb/text_emb_{N}.npy    float16 (n_N, D), row-aligned with img_emb_{N}
    METADATA_FOLDER/metadata_{N}.parquet          n_N rows: ``caption`` (and ``url``, ``key``), row-aligned

``N`` is matched as an integer (``img_emb_0.npy`` and ``img_emb_0000.npy`` are both file 0); ``METADATA_FOLDER``
defaults to ``EMBEDDING_FOLDER/metadata``.

:class:`EmbeddingFolder` reads rows of such a folder by (file, row) and, for joins, by ``key``.

**Reading: numpy memory maps, not ``embedding-reader``.** ``embedding-reader`` (the library the LAION tools use)
streams a *contiguous* range of one folder in large pieces through a thread pool: right for one sequential pass
(indexing, inference), but a training loader needs shuffled rows of two folders (img_emb and text_emb) plus the
captions, on disjoint slices per rank and worker. With memory maps every worker gathers exactly its rows with one
fancy-indexing read per file per batch, the page cache is shared by all workers of a machine, and a random-access
row costs no more than a sequential one once the file is cached. Measured on a 2-core AMD EPYC
(``experiments/bench/bench_embeddings.py``, D = 768 float16, table in ``experiments/bench/README.md``): the memmap
loader gives several times the samples/s per worker of two ``embedding-reader`` streams read in lockstep, and both
are far above what the caption tokenizer allows, which bounds the loader.
"""
from __future__ import annotations

import hashlib
import re
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

#: File name patterns of the three parts of a folder (``N``: the file number).
PATTERNS = {"img_emb": re.compile(r"^img_emb_(\d+)\.npy$"), "txt_emb": re.compile(r"^text_emb_(\d+)\.npy$"),
            "metadata": re.compile(r"^metadata_(\d+)\.parquet$")}


class EmbeddingFolderError(ValueError):
    """A malformed embedding folder (missing or misaligned files), reported in one line."""


def _numbered(folder: Path, kind: str) -> dict[int, Path]:
    if not folder.is_dir():
        raise EmbeddingFolderError(f"{folder} is not a folder (an embedding folder has img_emb/, text_emb/ and a "
                                   f"metadata folder with metadata_{{N}}.parquet)")
    out: dict[int, Path] = {}
    for p in folder.iterdir():
        m = PATTERNS[kind].match(p.name)
        if m:
            n = int(m.group(1))
            if n in out:
                raise EmbeddingFolderError(f"{folder} holds two files numbered {n}: {out[n].name} and {p.name}")
            out[n] = p
    return out


def _npy_shape(path: Path) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype of an ``.npy`` file, from a memory map (only its header is read; a truncated file fails)."""
    try:
        arr = np.load(path, mmap_mode="r")
    except (OSError, ValueError) as e:
        raise EmbeddingFolderError(f"{path} is not a readable .npy file ({e})") from None
    return tuple(arr.shape), arr.dtype


def _parquet_rows(path: Path) -> tuple[int, list[str]]:
    """Row count and column names from the footer of a parquet file."""
    import pyarrow.parquet as pq

    try:
        meta = pq.ParquetFile(path).metadata
    except Exception as e:  # pyarrow raises several types for a bad file
        raise EmbeddingFolderError(f"{path} is not a readable parquet file ({e})") from None
    return int(meta.num_rows), list(meta.schema.names)


@dataclass(frozen=True)
class EmbeddingFile:
    """One numbered file triple of a folder: ``number`` N, ``rows`` n_N, and its three paths."""

    number: int
    rows: int
    img_emb: Path
    txt_emb: Path | None
    metadata: Path | None


class EmbeddingFolder:
    """Row access to an embedding folder (layout in the module docstring).

    Opening checks the folder at once, reading only file headers and parquet footers: the three parts hold the
    same file numbers, every npy is 2-D with one width D, and img_emb, text_emb and metadata of each number have
    the same row count (else one line naming the file and both counts).

    Args:
        embedding_folder: folder with ``img_emb/`` and (unless ``text=False``) ``text_emb/``.
        metadata_folder: folder with ``metadata_{N}.parquet``; None: ``embedding_folder/metadata``. Needed for
            captions and keys; ``metadata=False`` opens a folder without one (rows are then keyed ``N_row``).
        caption_column / key_column: column names in the metadata (clip-retrieval and img2dataset: ``caption``,
            ``key``). A missing key column keys rows as ``{N}_{row}``.
        text / metadata: whether text_emb and the metadata are required.
        cache_files: metadata files kept decoded per process (captions and keys, as Arrow arrays).

    Attributes: ``files`` (list of :class:`EmbeddingFile`, by number), ``dim`` (D), ``num_rows``, ``dtype``.
    Picklable: memory maps and metadata are opened lazily in each process (each DataLoader worker).
    """

    def __init__(self, embedding_folder: str | Path, metadata_folder: str | Path | None = None,
                 caption_column: str = "caption", key_column: str = "key", text: bool = True,
                 metadata: bool = True, cache_files: int = 2):
        self.root = Path(embedding_folder)
        self.metadata_folder = Path(metadata_folder) if metadata_folder else self.root / "metadata"
        self.caption_column, self.key_column = caption_column, key_column
        self.cache_files = max(1, int(cache_files))
        img = _numbered(self.root / "img_emb", "img_emb")
        if not img:
            raise EmbeddingFolderError(f"{self.root / 'img_emb'} holds no img_emb_{{N}}.npy files")
        txt = _numbered(self.root / "text_emb", "txt_emb") if text else {}
        meta = _numbered(self.metadata_folder, "metadata") if metadata else {}
        for name, other, folder in (("text_emb", txt, self.root / "text_emb"),
                                    ("metadata", meta, self.metadata_folder)):
            if (name == "text_emb" and not text) or (name == "metadata" and not metadata):
                continue
            missing, extra = sorted(set(img) - set(other)), sorted(set(other) - set(img))
            if missing or extra:
                n = (missing or extra)[0]
                where = f"{folder} has no {name} file numbered {n}" if missing else \
                    f"{folder} has {name} file number {n} but img_emb has none"
                raise EmbeddingFolderError(f"{where} (img_emb, text_emb and metadata must hold the same numbers)")
        self.files: list[EmbeddingFile] = []
        self.dim, self.dtype = None, None
        self.columns: list[str] = []
        for n in sorted(img):
            rows = self._check_npy(img[n])
            if text:
                other = self._check_npy(txt[n])
                if other != rows:
                    raise EmbeddingFolderError(f"{txt[n]} has {other} rows but {img[n]} has {rows}: img_emb, "
                                               f"text_emb and metadata must be row-aligned")
            if metadata:
                other, self.columns = _parquet_rows(meta[n])
                if other != rows:
                    raise EmbeddingFolderError(f"{meta[n]} has {other} rows but {img[n]} has {rows}: img_emb, "
                                               f"text_emb and metadata must be row-aligned")
                if caption_column not in self.columns:
                    raise EmbeddingFolderError(f"{meta[n]} has no {caption_column!r} column (columns: "
                                               f"{', '.join(self.columns)}); set caption_column")
            self.files.append(EmbeddingFile(n, rows, img[n], txt.get(n), meta.get(n)))
        self.num_rows = sum(f.rows for f in self.files)
        self._maps: dict[tuple[str, int], np.ndarray] = {}
        self._meta: OrderedDict[int, tuple] = OrderedDict()
        self._key_index: dict[str, tuple[int, int]] | None = None

    def _check_npy(self, path: Path) -> int:
        shape, dtype = _npy_shape(path)
        if len(shape) != 2:
            raise EmbeddingFolderError(f"{path} holds an array of shape {shape}; expected (rows, D)")
        if dtype.kind != "f":
            raise EmbeddingFolderError(f"{path} holds {dtype} values; expected float16 or float32 embeddings")
        if self.dim is None:
            self.dim, self.dtype = int(shape[1]), dtype
        elif shape[1] != self.dim:
            raise EmbeddingFolderError(f"{path} holds {shape[1]}-d embeddings but the folder's first file holds "
                                       f"{self.dim}-d")
        return int(shape[0])

    def __len__(self) -> int:
        return self.num_rows

    def __repr__(self) -> str:
        return (f"EmbeddingFolder({str(self.root)!r}, files={len(self.files)}, rows={self.num_rows}, "
                f"dim={self.dim}, dtype={self.dtype})")

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_maps"], state["_meta"], state["_key_index"] = {}, OrderedDict(), None  # reopened in each process
        return state

    # -- rows ------------------------------------------------------------------------------------------------
    def array(self, kind: str, file: int) -> np.ndarray:
        """The memory map of ``kind`` (``"img_emb"`` / ``"txt_emb"``) of file index ``file`` (position in
        ``files``, not its number): (n_N, D) in the stored dtype."""
        key = (kind, file)
        if key not in self._maps:
            path = self.files[file].img_emb if kind == "img_emb" else self.files[file].txt_emb
            if path is None:
                raise EmbeddingFolderError(f"{self.root} was opened without text_emb")
            self._maps[key] = np.load(path, mmap_mode="r")
        return self._maps[key]

    def _metadata(self, file: int) -> tuple:
        """(captions, keys) of file index ``file`` as Arrow arrays (keys None without a key column)."""
        if file in self._meta:
            self._meta.move_to_end(file)
            return self._meta[file]
        import pyarrow.parquet as pq

        path = self.files[file].metadata
        if path is None:
            raise EmbeddingFolderError(f"{self.root} was opened without metadata")
        has_key = self.key_column in self.columns
        cols = [self.caption_column] + ([self.key_column] if has_key else [])
        table = pq.read_table(path, columns=cols)
        entry = (table.column(self.caption_column).combine_chunks(),
                 table.column(self.key_column).combine_chunks().cast("string") if has_key else None)
        self._meta[file] = entry
        while len(self._meta) > self.cache_files:
            self._meta.popitem(last=False)
        return entry

    def keys(self, file: int, rows: np.ndarray | None = None) -> list[str]:
        """Keys of ``rows`` (default: all) of file index ``file``; ``{N}_{row}`` without a key column."""
        rows = np.arange(self.files[file].rows) if rows is None else np.asarray(rows)
        keys = self._metadata(file)[1] if self.files[file].metadata is not None else None
        if keys is None:
            n = self.files[file].number
            return [f"{n}_{r}" for r in rows.tolist()]
        return [k if k is not None else f"{self.files[file].number}_{r}"
                for k, r in zip(keys.take(rows).to_pylist(), rows.tolist())]

    def captions(self, file: int, rows: np.ndarray) -> list[str]:
        """Captions of ``rows`` of file index ``file`` (a null caption is the empty string)."""
        return [c or "" for c in self._metadata(file)[0].take(np.asarray(rows)).to_pylist()]

    def gather(self, files: np.ndarray, rows: np.ndarray, fields: Sequence[str] = ("img_emb", "txt_emb", "txt",
                                                                                   "key")) -> dict:
        """Rows ``(files[i], rows[i])`` (file indices and row numbers, int arrays of length B), in that order.

        Returns a dict with the requested ``fields``: ``img_emb`` / ``txt_emb`` float32 (B, D), ``txt`` and ``key``
        list[str] (B). Each file is read once, its rows in increasing order (sequential pages).
        """
        files, rows = np.asarray(files, np.int64), np.asarray(rows, np.int64)
        out: dict = {}
        b = len(rows)
        emb = [f for f in ("img_emb", "txt_emb") if f in fields]
        for f in emb:
            out[f] = np.empty((b, self.dim), np.float32)
        txt: list = [None] * b if "txt" in fields else []
        key: list = [None] * b if "key" in fields else []
        for file in np.unique(files):
            where = np.flatnonzero(files == file)
            order = np.argsort(rows[where], kind="stable")
            where, sel = where[order], rows[where][order]
            for f in emb:
                out[f][where] = self.array(f, int(file))[sel]
            if txt:
                for i, c in zip(where.tolist(), self.captions(int(file), sel)):
                    txt[i] = c
            if key:
                for i, k in zip(where.tolist(), self.keys(int(file), sel)):
                    key[i] = k
        if "txt" in fields:
            out["txt"] = txt
        if "key" in fields:
            out["key"] = key
        return out

    # -- joins by key ----------------------------------------------------------------------------------------
    def key_index(self) -> dict[str, tuple[int, int]]:
        """``key -> (file index, row)`` over the whole folder (built once per process from the key columns; a key
        that appears twice raises, naming both places)."""
        if self._key_index is None:
            index: dict[str, tuple[int, int]] = {}
            for i in range(len(self.files)):
                for r, k in enumerate(self.keys(i)):
                    if k in index:
                        j, s = index[k]
                        raise EmbeddingFolderError(f"key {k!r} appears twice: {self.files[j].metadata} row {s} and "
                                                   f"{self.files[i].metadata} row {r}")
                    index[k] = (i, r)
            self._key_index = index
        return self._key_index

    def locate(self, keys: Sequence[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(file indices, rows, found mask) of ``keys``; a key not in the folder has ``found`` False (its file and
        row are 0)."""
        index = self.key_index()
        files = np.zeros(len(keys), np.int64)
        rows = np.zeros(len(keys), np.int64)
        found = np.zeros(len(keys), bool)
        for i, k in enumerate(keys):
            hit = index.get(k)
            if hit is not None:
                files[i], rows[i], found[i] = hit[0], hit[1], True
        return files, rows, found

    def lookup(self, keys: Sequence[str], fields: Sequence[str] = ("img_emb",)) -> dict:
        """The rows of ``keys`` (see :meth:`gather`); a key not in the folder raises ``KeyError`` naming it and
        how many of the keys are missing."""
        files, rows, found = self.locate(keys)
        if not found.all():
            missing = [k for k, f in zip(keys, found) if not f]
            raise KeyError(f"{len(missing)} of {len(keys)} keys are not in {self.root} (first: {missing[0]!r})")
        return self.gather(files, rows, fields)


def key_hash_fraction(key: str) -> float:
    """A key's stable position in [0, 1) (BLAKE2b of its UTF-8 bytes): the basis of the hash split."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big") / 2.0 ** 64


__all__ = ["PATTERNS", "EmbeddingFolderError", "EmbeddingFile", "EmbeddingFolder", "key_hash_fraction"]
