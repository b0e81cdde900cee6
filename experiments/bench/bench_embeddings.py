"""Embedding-folder loader throughput: samples/s per worker of CLIP embeddings + tokenised captions (data=embeddings).

    python experiments/bench/bench_embeddings.py            # writes the "## Embedding folders" section of README.md
    python experiments/bench/bench_embeddings.py --quick    # fewer rows, prints only
    (the embedding-reader rows need `pip install embedding-reader`; without it they are left out)

A synthetic folder in the clip-retrieval / LAION layout is written to a temporary folder: D = 768 float16
``img_emb_{N}.npy`` / ``text_emb_{N}.npy`` and ``metadata_{N}.parquet`` with ``caption``, ``url``, ``key``
(captions of 6 to 24 words drawn from a Zipf law over 30,000 made-up words, so the tokenizer's word cache behaves as
on real captions). The files were just written, so they are in the page cache: this measures the loader, not
the disk. Each row reads batches of 4,096 with the CLIP ViT-L/14 tokenizer (open_clip's, context 77) through a
DataLoader with 0, 1 and 2 workers; the first batch (worker start-up) is not timed.

- **memmap**: the training loader of ``data=embeddings`` (``EmbeddingBatches``: seeded per-pass shuffle, each batch
  gathered from the memory maps of img_emb and text_emb, captions from the Arrow columns, tokenised in the worker).
- **embedding-reader**: ``embedding_reader.EmbeddingReader`` streams, img_emb with its metadata
  (``parquet_npy``) and text_emb (``npy``) read in lockstep over each worker's contiguous range, then the same
  tokenizer: the library's own mode (sequential, no shuffle).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

os.environ.setdefault("TQDM_DISABLE", "1")  # embedding-reader's progress bars
HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

from bench_loader import _cpu_model  # noqa: E402
from benchlib import loader_rates, write_section  # noqa: E402

from unclip_pl.data.embedding_folder import EmbeddingBatches, EmbeddingFolder, split_folder  # noqa: E402

README = HERE / "README.md"
SECTION = "## Embedding folders"
D = 768
BATCH = 4096
TARGET = 5000


def write_folder(root: Path, files: int, rows: int, seed: int = 0) -> Path:
    """The synthetic folder (see the module docstring)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    vocab = ["".join(rng.choice(letters, rng.integers(2, 10))) for _ in range(30000)]
    for d in ("img_emb", "text_emb", "metadata"):
        (root / d).mkdir(parents=True, exist_ok=True)
    for n in range(files):
        for part, name in (("img_emb", "img_emb"), ("text_emb", "text_emb")):
            x = rng.standard_normal((rows, D), dtype=np.float32)
            x /= np.linalg.norm(x, axis=1, keepdims=True)
            np.save(root / part / f"{name}_{n:04d}.npy", x.astype(np.float16))
        lengths = rng.integers(6, 25, rows)
        words = np.minimum(rng.zipf(1.2, lengths.sum()), len(vocab)) - 1
        caps, i = [], 0
        for length in lengths:
            caps.append(" ".join(vocab[w] for w in words[i:i + length]))
            i += length
        pq.write_table(pa.table({"caption": caps, "url": [f"https://example.invalid/{n}/{r}.jpg" for r in range(rows)],
                                 "key": [f"{n:05d}{r:04d}" for r in range(rows)]}),
                       root / "metadata" / f"metadata_{n:04d}.parquet")
    return root


class ReaderStreams(IterableDataset):
    """embedding-reader: per worker, its contiguous share of the rows, img_emb + captions (``parquet_npy``) and
    text_emb (``npy``) in lockstep, tokenised; batches like the memmap loader's."""

    def __init__(self, root: Path, batch_size: int, tokenizer, tokens: bool = True):
        self.root, self.batch_size, self.tokenizer, self.tokens = root, batch_size, tokenizer, tokens

    def __iter__(self):
        from embedding_reader import EmbeddingReader

        info = get_worker_info()
        w, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        img = EmbeddingReader(str(self.root / "img_emb"), file_format="parquet_npy",
                              metadata_folder=str(self.root / "metadata"), meta_columns=["caption", "key"])
        txt = EmbeddingReader(str(self.root / "text_emb"), file_format="npy")
        lo, hi = img.count * w // nw, img.count * (w + 1) // nw
        for (ie, meta), (te, _) in zip(img(self.batch_size, lo, hi, show_progress=False),
                                       txt(self.batch_size, lo, hi, show_progress=False)):
            batch = {"key": meta["key"].tolist(), "txt": meta["caption"].tolist(), "img_emb": torch.from_numpy(ie),
                     "txt_emb": torch.from_numpy(te)}
            if self.tokens:
                batch["tokens"] = torch.as_tensor(self.tokenizer(batch["txt"]), dtype=torch.long)
            yield batch


def memmap_dataset(root: Path, batch_size: int, tokenizer, tokens: bool = True) -> EmbeddingBatches:
    folder = EmbeddingFolder(root)
    parts = split_folder(folder, "files", val_files=0)[0]
    fields = ("img_emb", "txt_emb", "txt", "key") + (("tokens",) if tokens else ())
    return EmbeddingBatches(folder, parts, batch_size, train=True, fields=fields, tokenizer=tokenizer, seed=0)


def measure(make, workers: int, min_samples: int) -> tuple[float, float]:
    """(wall samples/s, samples per CPU-second of the loading processes) over whole passes of >= min_samples,
    excluding the first batch."""
    # persistent workers: still alive after the pass, so their CPU time can be read
    loader = DataLoader(make(), batch_size=None, num_workers=workers, persistent_workers=workers > 0,
                        prefetch_factor=2 if workers else None)

    def check(b: dict) -> None:
        assert b["img_emb"].dtype == torch.float32 and b["img_emb"].shape[1] == D

    return loader_rates(loader, min_samples, "img_emb", check)


def main() -> None:
    import open_clip

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small run, print only")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    args = p.parse_args()
    torch.set_num_threads(1)
    files, rows = (2, 12288) if args.quick else (4, 24576)
    try:
        import embedding_reader  # noqa: F401

        have_reader = True
    except ImportError:
        have_reader = False
        print("embedding-reader is not installed: its rows are left out", flush=True)
    tokenizer = open_clip.get_tokenizer("ViT-L-14")
    results = []
    t_start = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        root = write_folder(Path(tmp), files, rows)
        total = files * rows
        runs = [("memmap", "embeddings + tokens", lambda: memmap_dataset(root, BATCH, tokenizer))]
        if have_reader:
            runs.append(("embedding-reader", "embeddings + tokens", lambda: ReaderStreams(root, BATCH, tokenizer)))
        runs.append(("memmap", "embeddings + captions, no tokens",
                     lambda: memmap_dataset(root, BATCH, tokenizer, tokens=False)))
        if have_reader:
            runs.append(("embedding-reader", "embeddings + captions, no tokens",
                         lambda: ReaderStreams(root, BATCH, tokenizer, tokens=False)))
        for reader, what, make in runs:
            for w in args.workers if "tokens" in what and "no tokens" not in what else [0]:
                sps, per_cpu = measure(make, w, min_samples=total)
                per = sps / max(1, w)
                results.append((reader, what, w, sps, per, per_cpu))
                print(f"{reader:17s} {what:34s} workers={w}  {sps:8.0f} samples/s  {per:8.0f} per worker  "
                      f"{per_cpu:8.0f} per worker-CPU-second", flush=True)
    load = os.getloadavg()
    lines = [
        SECTION, "",
        f"`python experiments/bench/bench_embeddings.py` on a {os.cpu_count()}-core CPU ({_cpu_model()}), torch "
        f"{torch.__version__.split('+')[0]}: the `data=embeddings` loader on a synthetic folder in the LAION layout "
        f"({files} files x {rows:,} rows, D = {D} float16, parquet captions of 6-24 words), batches of {BATCH:,}, "
        f"captions tokenised with the CLIP ViT-L/14 tokenizer (open_clip, context 77) in the workers. Files in the "
        f"page cache (just written): this is the loader, not the disk. The first batch is not timed. Target: >= "
        f"{TARGET:,} samples/s per worker (8 workers feed a GPU prior at batch 4,096).",
        "",
        "- **memmap**: `EmbeddingBatches` (what training uses): seeded per-pass shuffle, rows gathered from the memory "
        "maps. **embedding-reader**: two `EmbeddingReader` streams (img_emb + metadata, text_emb) in lockstep over "
        "each worker's contiguous range, unshuffled.",
        "- **per worker-CPU-second**: samples per CPU second of the loading processes: what one worker delivers with "
        "a core to itself, whatever else runs on the machine. **per worker** = samples/s / max(1, workers).",
        f"- Load average at the end: {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} (1/5/15 min) on "
        f"{os.cpu_count()} cores" + (": other jobs were running, so the wall-clock columns understate an idle "
                                     "machine." if load[0] > 1.5 else "."),
        "",
        "| reader | batch holds | workers | samples/s | per worker | per worker-CPU-second |",
        "|---|---|---|---|---|---|",
    ]
    lines += [f"| {r} | {what} | {w} | {sps:,.0f} | {per:,.0f} | {pc:,.0f} |"
              for r, what, w, sps, per, pc in results]
    lines.append("")
    per_cpu = {(r, "no tokens" not in what, w): pc for r, what, w, _sps, _per, pc in results}
    if ("memmap", False, 0) in per_cpu and ("memmap", True, 0) in per_cpu:
        share = 1 - per_cpu[("memmap", True, 0)] / per_cpu[("memmap", False, 0)]
        lines.append(f"Tokenising takes {share:.0%} of the memmap loader's CPU time (samples per CPU-second with "
                     "and without tokens, 0 workers): open_clip's tokenizer (ftfy clean-up, regex split, BPE with a "
                     "word cache, in Python), not the reading, bounds the loader.")
    if ("embedding-reader", False, 0) in per_cpu and ("memmap", False, 0) in per_cpu:
        ratio = per_cpu[("memmap", False, 0)] / per_cpu[("embedding-reader", False, 0)]
        lines.append(f"Without tokens the memmap loader reads {ratio:.1f}x the samples per CPU-second of the "
                     "embedding-reader streams, while shuffling (embedding-reader reads in order).")
    lines.append("")
    lines.append(f"Run took {time.time() - t_start:.0f} s.")
    text = "\n".join(lines) + "\n"
    if args.quick:
        print(text)
    else:
        write_section(README, SECTION, text.split("\n", 2)[2])
        print(f"wrote {README}")


if __name__ == "__main__":
    main()
