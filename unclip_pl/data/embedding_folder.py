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
captions, on disjoint slices per rank and worker, and exact resume from any sample. With memory maps every worker
gathers exactly its rows with one fancy-indexing read per file and batch, and the page cache is shared by all
workers of a machine. Measured on a 2-core AMD EPYC (``experiments/bench/bench_embeddings.py``, D = 768 float16,
batches of 4,096; table in ``experiments/bench/README.md``): without tokenising, the shuffled memmap loader and
two unshuffled ``embedding-reader`` streams read in lockstep both deliver roughly 100,000-150,000 samples per
CPU-second (within the noise of a loaded machine); with the captions tokenised (ViT-L/14 tokenizer) both deliver
about 10,000, the tokenizer taking over 90% of the time. Same speed, and only the memory maps give the shuffled,
sliced, resumable order, so the loader uses them (no extra dependency).
"""
from __future__ import annotations

import hashlib
import logging
import math
import re
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .position import POSITION_KEY

log = logging.getLogger(__name__)

#: Version of :meth:`EmbeddingDataModule.state_dict`.
STATE_VERSION = 1

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
        cache_files: metadata files kept decoded per process (captions and keys, as Arrow arrays); the training
            loader raises it to the number of files one shuffle window spans.

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




# ---------------------------------------------------------------------------------------------------- split
@dataclass(frozen=True)
class Part:
    """The rows of one file in a split: file index ``file``, ``rows`` (int64 row numbers, increasing; None: all
    rows of the file) and their ``count``."""

    file: int
    rows: np.ndarray | None
    count: int


SPLITS = ("files", "hash")


def split_folder(folder: EmbeddingFolder, split: str = "files", val_files: int = 1, val_fraction: float = 0.01
                 ) -> tuple[list[Part], list[Part], str]:
    """The deterministic train/val split of ``folder``: (train parts, val parts, a one-line description).

    ``split="files"``: the last ``val_files`` files (by number) are val, the others train; nothing but the file
    list is read. ``split="hash"``: a row is val when :func:`key_hash_fraction` of its key is below
    ``val_fraction`` (the same key is on the same side in any folder; reads every key column once, about a second
    per million rows).
    """
    if split not in SPLITS:
        raise ValueError(f"data.split={split!r} is not one of {SPLITS}")
    nfiles = len(folder.files)
    if split == "files":
        val_files = int(val_files)
        if not 0 <= val_files < nfiles:
            raise ValueError(f"data.val_files={val_files} must be at least 0 and below the {nfiles} file(s) of "
                             f"{folder.root}, so that one is left to train on (or use data.split=hash)")
        parts = [Part(i, None, f.rows) for i, f in enumerate(folder.files)]
        train, val = parts[:nfiles - val_files], parts[nfiles - val_files:]
        how = (f"split=files: val = the last {val_files} file(s) "
               f"({', '.join(str(folder.files[p.file].number) for p in val) or 'none'})")
    else:
        if not 0.0 <= float(val_fraction) < 1.0:
            raise ValueError(f"data.val_fraction={val_fraction} must be in [0, 1)")
        train, val = [], []
        for i in range(nfiles):
            frac = np.array([key_hash_fraction(k) for k in folder.keys(i)])
            is_val = frac < float(val_fraction)
            for side, mask in ((val, is_val), (train, ~is_val)):
                rows = np.flatnonzero(mask)
                if len(rows):
                    side.append(Part(i, rows.astype(np.int64), len(rows)))
        how = f"split=hash: val = keys whose BLAKE2b hash falls below {val_fraction}"
    ntrain, nval = sum(p.count for p in train), sum(p.count for p in val)
    if ntrain == 0:
        raise ValueError(f"the {split} split of {folder.root} leaves no training rows")
    return train, val, f"{how}; train {ntrain} rows, val {nval} rows"


# ---------------------------------------------------------------------------------------------------- order
class PassOrder:
    """The sample sequence of one pass over ``parts``: position ``0 .. total-1`` -> (file index, row).

    With ``shuffle``: the parts (files) in a random order drawn from ``(seed, pass_index)``, their rows
    concatenated and cut into windows of ``window`` positions, the rows inside each window permuted (seeded by
    ``(seed, pass_index, window number)``). The same arguments give the same sequence in every process, so each
    rank and worker can take its own positions without any communication; memory is one window, and the reads of
    a window touch only the few files it spans. Without ``shuffle``: parts and rows in order.
    """

    def __init__(self, parts: Sequence[Part], seed: int = 0, pass_index: int = 0, window: int = 1 << 20,
                 shuffle: bool = True):
        self.parts, self.seed, self.pass_index, self.shuffle = list(parts), int(seed), int(pass_index), shuffle
        self.window = max(1, int(window))
        if shuffle and len(self.parts) > 1:
            self.order = np.random.default_rng([self.seed, self.pass_index, 0]).permutation(len(self.parts))
        else:
            self.order = np.arange(len(self.parts))
        counts = np.array([self.parts[i].count for i in self.order], np.int64)
        self.ends = np.cumsum(counts)
        self.starts = self.ends - counts
        self.total = int(self.ends[-1]) if len(counts) else 0
        self._windows: OrderedDict[int, tuple[np.ndarray, np.ndarray]] = OrderedDict()

    def _window(self, w: int) -> tuple[np.ndarray, np.ndarray]:
        if w in self._windows:
            return self._windows[w]
        a, b = w * self.window, min((w + 1) * self.window, self.total)
        pos = np.arange(a, b, dtype=np.int64)
        j = np.searchsorted(self.ends, pos, side="right")  # index into self.order
        local = pos - self.starts[j]
        files = np.empty(len(pos), np.int64)
        rows = np.empty(len(pos), np.int64)
        for jj in np.unique(j):
            part = self.parts[self.order[jj]]
            sel = j == jj
            files[sel] = part.file
            rows[sel] = local[sel] if part.rows is None else part.rows[local[sel]]
        if self.shuffle:
            perm = np.random.default_rng([self.seed, self.pass_index, 1, w]).permutation(len(pos))
            files, rows = files[perm], rows[perm]
        self._windows[w] = (files, rows)
        while len(self._windows) > 2:
            self._windows.popitem(last=False)
        return files, rows

    def files_per_window(self) -> int:
        """The most files one window spans (what a reader should keep open at once)."""
        if self.total == 0:
            return 0
        a = np.arange(0, self.total, self.window)
        b = np.minimum(a + self.window, self.total) - 1
        first, last = np.searchsorted(self.ends, a, side="right"), np.searchsorted(self.ends, b, side="right")
        return int((last - first).max()) + 1

    def take(self, a: int, b: int) -> tuple[np.ndarray, np.ndarray]:
        """(file indices, rows) of positions ``a .. b-1`` (int64 arrays)."""
        b = min(b, self.total)
        files, rows = [], []
        while a < b:
            w = a // self.window
            end = min(b, (w + 1) * self.window)
            f, r = self._window(w)
            off = w * self.window
            files.append(f[a - off:end - off])
            rows.append(r[a - off:end - off])
            a = end
        if not files:
            return np.empty(0, np.int64), np.empty(0, np.int64)
        return np.concatenate(files), np.concatenate(rows)


# ---------------------------------------------------------------------------------------------------- dataset
EMB_FIELDS = ("img_emb", "txt_emb")


class EmbeddingBatches(IterableDataset):
    """Batches of an embedding folder for one rank (an ``IterableDataset`` of dicts; use ``batch_size=None``).

    Training (``train=True``): pass ``p`` walks :class:`PassOrder` ``(seed, p)`` of ``parts``. Global step ``k``
    takes positions ``[start + k*B*R, start + (k+1)*B*R)`` (B: batch size, R: world size) and rank ``r`` the
    ``r``-th B of them, so ranks read disjoint rows; every rank takes ``(total - start) // (B*R)`` steps (the
    remainder of a pass, under one global batch, is left out of that pass). Loader worker ``w`` of ``W`` makes
    steps ``w, w+W, ...``, which the DataLoader hands out in step order. ``position`` = ``(pass, start)``: where
    the next iteration starts (global samples consumed in that pass); every batch carries the position after it
    under :data:`POSITION_KEY`.

    Evaluation (``train=False``): the parts in order, rank ``r`` the ``r``-th contiguous share, batches of
    ``batch_size`` (the last one smaller), one pass.

    Batches: ``key``, ``txt`` list[str] (B); ``img_emb``, ``txt_emb`` float32 (B, D); ``tokens`` int64 (B, L)
    (tokenised here, in the worker), as ``fields`` asks; then ``batch_transform``.
    """

    def __init__(self, folder: EmbeddingFolder, parts: Sequence[Part], batch_size: int, train: bool = True,
                 fields: Iterable[str] = ("img_emb", "txt_emb", "txt", "key", "tokens"),
                 tokenizer: Callable | None = None, seed: int = 0, window: int = 1 << 20, rank: int = 0,
                 world_size: int = 1, batch_transform: Callable[[dict], dict] | None = None):
        super().__init__()
        self.folder, self.parts, self.batch_size, self.train = folder, list(parts), int(batch_size), bool(train)
        self.fields = tuple(fields)
        if "tokens" in self.fields and tokenizer is None:
            raise ValueError("tokens are needed but no tokenizer was given (pass the CLIP's)")
        self.tokenizer, self.seed, self.window = tokenizer, int(seed), int(window)
        self.rank, self.world_size = int(rank), max(1, int(world_size))
        self.batch_transform = batch_transform
        self.total = sum(p.count for p in self.parts)
        self.position = (0, 0)

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world_size

    def steps_in_pass(self, start: int = 0) -> int:
        """Training steps every rank takes in a pass from global sample ``start``."""
        return max(0, (self.total - int(start)) // self.global_batch)

    def _rank_range(self) -> tuple[int, int]:
        return self.total * self.rank // self.world_size, self.total * (self.rank + 1) // self.world_size

    def __len__(self) -> int:
        if self.train:
            return self.steps_in_pass(0)
        lo, hi = self._rank_range()
        return math.ceil((hi - lo) / self.batch_size)

    def next_position(self, pass_index: int, consumed: int) -> tuple[int, int]:
        """The position after a training batch that ends at ``consumed``: the next pass when no full step is left."""
        return (pass_index + 1, 0) if self.steps_in_pass(consumed) == 0 else (pass_index, consumed)

    def _batch(self, files: np.ndarray, rows: np.ndarray) -> dict:
        want = [f for f in self.fields if f != "tokens"]
        if "tokens" in self.fields and "txt" not in want:
            want.append("txt")
        raw = self.folder.gather(files, rows, want)
        batch = {"key": raw.get("key") or [f"{self.folder.files[f].number}_{r}" for f, r in zip(files, rows)],
                 "txt": raw.get("txt", [])}
        for f in EMB_FIELDS:
            if f in raw:
                batch[f] = torch.from_numpy(raw[f])
        if "tokens" in self.fields:
            batch["tokens"] = torch.as_tensor(self.tokenizer(batch["txt"]), dtype=torch.long)
        if self.batch_transform is not None:
            batch = self.batch_transform(batch)
        return batch

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        b = self.batch_size
        if not self.train:
            order = PassOrder(self.parts, window=self.window, shuffle=False)
            lo, hi = self._rank_range()
            for k in range(worker, math.ceil((hi - lo) / b), workers):
                yield self._batch(*order.take(lo + k * b, min(lo + (k + 1) * b, hi)))
            return
        pass_index, start = self.position
        order = PassOrder(self.parts, self.seed, pass_index, self.window, shuffle=True)
        # the rows of a window are shuffled across its files: keep the captions of all of them decoded (memory:
        # about one window of captions), or every batch would read its files' metadata again
        self.folder.cache_files = max(self.folder.cache_files, order.files_per_window())
        gb = self.global_batch
        for k in range(worker, self.steps_in_pass(start), workers):
            a = start + k * gb + self.rank * b
            batch = self._batch(*order.take(a, a + b))
            batch[POSITION_KEY] = (pass_index, start + (k + 1) * gb)
            yield batch


class _StartingLoader(DataLoader):
    """A DataLoader calling ``before_iter()`` as each iteration starts (before its workers are started with a copy
    of the dataset); when that returns False (no trainer pops the position tags) it drops the tags itself."""

    def __init__(self, *args, before_iter: Callable[[], bool] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.before_iter = before_iter

    def __iter__(self):
        consumed = bool(self.before_iter()) if self.before_iter is not None else False
        it = super().__iter__()
        return it if consumed else (_untagged(b) for b in it)


def _untagged(batch):
    if isinstance(batch, dict):
        batch.pop(POSITION_KEY, None)
    return batch


# ---------------------------------------------------------------------------------------------------- data module
class EmbeddingDataModule(pl.LightningDataModule):
    """Train/val batches from an embedding folder (:class:`EmbeddingFolder`), for the prior: no images are read.

    Batches are those of the shard loaders for the prior: ``key``, ``txt`` list[str] (B), ``img_emb`` /
    ``txt_emb`` float32 (B, D) (float16 on disk), ``tokens`` int64 (B, L) tokenised in the loader workers.

    The split is deterministic (:func:`split_folder`) and logged with its counts. With several ranks, each rank
    reads its own rows of a shared per-pass order and all ranks take the same number of steps
    (:class:`EmbeddingBatches`); the shuffle is seeded by ``(seed, pass)``.

    Exact resume follows the protocol of :mod:`unclip_pl.data.position` (the order is a function of the seed and
    the pass; batches carry ``POSITION_KEY``, popped by ``on_before_batch_transfer`` once training consumed them;
    ``state_dict()`` / ``load_state_dict()`` in every checkpoint, with the order settings beside the position).
    Here the position is simpler than for shards: one number, the samples consumed in the pass over all ranks,
    from which every rank and worker derives its next step. A resumed run therefore continues the same sample
    sequence even with another number of workers, ranks or batch size. Loader workers are started anew each
    epoch (never persistent), with the position of that moment.

    Args:
        embedding_folder: folder with ``img_emb/`` and ``text_emb/``.
        metadata_folder: folder of ``metadata_{N}.parquet`` (None: ``embedding_folder/metadata``).
        batch_size / val_batch_size: samples per batch per device (None: 64; val defaults to ``batch_size``).
        num_workers: DataLoader workers.
        needs: batch keys to deliver, a subset of {"tokens", "txt", "img_emb", "txt_emb"} (the training entry
            passes the stage's); "image" is an error: the folder holds no images.
        tokenizer / clip: the tokenizer for ``tokens`` (None: ``clip.loader_tokenizer``). When ``clip`` is given
            its ``embed_dim`` must be the folder's D.
        split / val_files / val_fraction: see :func:`split_folder`.
        shuffle_window: positions whose rows are shuffled together (see :class:`PassOrder`).
        seed: seed of the per-pass shuffle.
        caption_column / key_column: metadata column names.
        train_batch_transform: picklable ``dict -> dict`` run on training batches in the workers.
    """

    def __init__(self, embedding_folder: str, metadata_folder: str | None = None, batch_size: int | None = None,
                 val_batch_size: int | None = None, num_workers: int = 2,
                 needs: Iterable[str] = ("tokens", "img_emb", "txt_emb"), tokenizer: Callable | None = None,
                 clip=None, split: str = "files", val_files: int = 1, val_fraction: float = 0.01,
                 shuffle_window: int = 1 << 20, seed: int = 0, caption_column: str = "caption",
                 key_column: str = "key", pin_memory: bool | None = None,
                 train_batch_transform: Callable[[dict], dict] | None = None):
        super().__init__()
        from ..utils.config import ConfigError
        from .datamodule import DEFAULT_BATCH_SIZE

        self.embedding_folder, self.metadata_folder = str(embedding_folder), metadata_folder
        self.batch_size = int(batch_size or DEFAULT_BATCH_SIZE)
        self.val_batch_size = int(val_batch_size or self.batch_size)
        self.num_workers = int(num_workers)
        self.needs = tuple(needs)
        unknown = set(self.needs) - {"tokens", "txt", "img_emb", "txt_emb"}
        if unknown:
            raise ConfigError(f"data=embeddings holds CLIP embeddings and captions, not {sorted(unknown)}: it "
                              f"trains the prior (needs tokens, img_emb, txt_emb); a stage that reads images "
                              f"trains on data=shards (or the built-in emoji data)")
        self.tokenizer, self.clip = tokenizer, clip
        self.split, self.val_files, self.val_fraction = split, int(val_files), float(val_fraction)
        self.shuffle_window, self.seed = int(shuffle_window), int(seed)
        self.caption_column, self.key_column = caption_column, key_column
        self.pin_memory = pin_memory
        self.train_batch_transform = train_batch_transform
        self.folder: EmbeddingFolder | None = None
        self.train_dataset = self.val_dataset = None
        self.position = (0, 0)  # (pass, global samples consumed in it) of the next training batch

    @property
    def data_id(self) -> str:
        """A short id of the data (the folder's path)."""
        path = str(Path(self.embedding_folder).expanduser().resolve())
        return "embeddings/" + hashlib.sha1(path.encode()).hexdigest()[:12]

    def _world(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return 0, 1
        return int(trainer.global_rank), int(trainer.world_size)

    def _fields(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(["key", "txt", *[n for n in self.needs if n != "txt"]]))

    def open_folder(self) -> EmbeddingFolder:
        """Open and check the folder (and that its D is the CLIP's); one-line errors."""
        from ..utils.config import ConfigError

        if self.folder is None:
            try:
                folder = EmbeddingFolder(self.embedding_folder, self.metadata_folder, self.caption_column,
                                         self.key_column, text="txt_emb" in self.needs)
            except EmbeddingFolderError as e:
                raise ConfigError(str(e)) from None
            clip_dim = getattr(self.clip, "embed_dim", None)
            if clip_dim is not None and int(clip_dim) != folder.dim:
                name = getattr(self.clip, "model_name", "?")
                raise ConfigError(f"{folder.root} holds {folder.dim}-d CLIP embeddings but this run's CLIP "
                                  f"({name}) is {clip_dim}-d: pass the CLIP the embeddings were made with, e.g. "
                                  f"clip=vit_l14 for LAION's ViT-L/14 embeddings")
            self.folder = folder
        return self.folder

    def setup(self, stage: str | None = None) -> None:
        from ..utils.config import ConfigError

        folder = self.open_folder()
        try:
            train, val, how = split_folder(folder, self.split, self.val_files, self.val_fraction)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        tokenizer = self.tokenizer
        if "tokens" in self.needs and tokenizer is None and self.clip is not None:
            tokenizer = getattr(self.clip, "loader_tokenizer", None) or self.clip.tokenize
        rank, world = self._world()
        common = dict(fields=self._fields(), tokenizer=tokenizer, window=self.shuffle_window, rank=rank,
                      world_size=world)
        self.train_dataset = EmbeddingBatches(folder, train, self.batch_size, train=True, seed=self.seed,
                                              batch_transform=self.train_batch_transform, **common)
        self.val_dataset = EmbeddingBatches(folder, val, self.val_batch_size, train=False, **common) if val else None
        self.train_dataset.position = self.position
        steps = self.train_dataset.steps_in_pass(0)
        if steps == 0:
            raise ConfigError(f"{folder.root}: the train split has {self.train_dataset.total} rows, fewer than one "
                              f"global batch ({self.batch_size} x {world} ranks): lower data.batch_size")
        if rank == 0:
            log.info("embedding folder %s: %d rows in %d files, D=%d; %s; %d ranks x batch %d: %d steps per pass "
                     "(%d rows left out per pass)", folder.root, folder.num_rows, len(folder.files), folder.dim, how,
                     world, self.batch_size, steps, self.train_dataset.total - steps * self.train_dataset.global_batch)

    def _loader(self, dataset, before_iter=None) -> DataLoader:
        pin = torch.cuda.is_available() if self.pin_memory is None else self.pin_memory
        workers = self.num_workers
        return _StartingLoader(dataset, batch_size=None, shuffle=False, num_workers=workers, pin_memory=pin,
                               persistent_workers=False, prefetch_factor=4 if workers > 0 else None,
                               before_iter=before_iter)

    def _before_train_iter(self) -> bool:
        """Each pass starts at the data position (the workers are started after this, with a copy of it); whether
        a trainer pops the position tags (else the loader drops them)."""
        self.train_dataset.position = self.position
        return getattr(self, "trainer", None) is not None

    def train_dataloader(self) -> DataLoader:
        if self.train_dataset is None:
            self.setup("fit")
        return self._loader(self.train_dataset, self._before_train_iter)

    def val_dataloader(self):
        if self.train_dataset is None:
            self.setup("validate")
        return [] if self.val_dataset is None else self._loader(self.val_dataset)

    # -- the data position -----------------------------------------------------------------------------------
    def on_before_batch_transfer(self, batch, dataloader_idx: int):
        """Take the position out of the batch; a training batch moves the data position past itself."""
        pos = batch.pop(POSITION_KEY, None) if isinstance(batch, dict) else None
        trainer = getattr(self, "trainer", None)
        if pos is not None and trainer is not None and trainer.training and self.train_dataset is not None:
            self.position = self.train_dataset.next_position(int(pos[0]), int(pos[1]))
            self.train_dataset.position = self.position  # read by the workers of the next epoch
        return batch

    def order_settings(self) -> dict:
        """What the training order depends on besides the position: a saved position is used only when these are
        the same (world size, batch size and workers are not among them: the order is one sequence of samples)."""
        settings = {"seed": self.seed, "split": self.split, "shuffle_window": self.shuffle_window,
                    "train_rows": self.train_dataset.total if self.train_dataset is not None else None}
        settings.update({"val_files": self.val_files} if self.split == "files" else {"val_fraction": self.val_fraction})
        return settings

    def state_dict(self) -> dict:
        """The data position (the ``version``/``settings`` frame of :mod:`unclip_pl.data.position`): ``pass``,
        ``samples`` consumed in it over all ranks, ``samples_per_rank``, ``global_batch``, ``world_size``. Every
        rank's position is the same by construction, so no gathering is needed."""
        _rank, world = self._world()
        return {"version": STATE_VERSION, "settings": self.order_settings(), "pass": int(self.position[0]),
                "samples": int(self.position[1]), "samples_per_rank": int(self.position[1]) // world,
                "global_batch": self.batch_size * world, "world_size": world}

    def load_state_dict(self, state: dict) -> None:
        """Continue from a checkpoint's data position. When the order settings differ (another seed, split or
        folder size) the saved pass restarts from its first sample, with one line saying so; another world size
        or batch size continues from the same sample."""
        if not state:
            return
        settings, saved = self.order_settings(), state.get("settings") or {}
        differ = ["version"] if state.get("version") != STATE_VERSION else sorted(
            k for k in set(settings) | set(saved) if saved.get(k) != settings.get(k) and settings.get(k) is not None)
        if differ:
            detail = ", ".join(f"{k}: {saved.get(k)!r} -> {settings.get(k)!r}" for k in differ)
            log.warning("data position in the checkpoint does not fit this run (%s): pass %s restarts from its start",
                        detail, state.get("pass", 0))
            self.position = (int(state.get("pass", 0)), 0)
        else:
            _rank, world = self._world()
            if int(state["global_batch"]) != self.batch_size * world:
                log.info("the checkpoint was written with a global batch of %s, this run's is %d: continuing from "
                         "the same sample", state["global_batch"], self.batch_size * world)
            self.position = (int(state["pass"]), int(state["samples"]))
            log.info("data position from the checkpoint: pass %d, %d samples consumed (%d per rank)",
                     self.position[0], self.position[1], int(state.get("samples_per_rank", 0)))
        if self.train_dataset is not None:
            self.train_dataset.position = self.position


__all__ = ["PATTERNS", "SPLITS", "STATE_VERSION", "EmbeddingFolderError", "EmbeddingFile", "EmbeddingFolder",
           "Part", "split_folder", "PassOrder", "EmbeddingBatches", "EmbeddingDataModule", "key_hash_fraction"]
