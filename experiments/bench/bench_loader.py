"""Data loader throughput: samples/s per worker at 64x64 and 256x256.

    python experiments/bench/bench_loader.py            # writes the "## Data loader" section of README.md
    python experiments/bench/bench_loader.py --quick    # fewer samples, prints only

Synthetic shards are generated locally (smooth random JPEGs: 80x80 for the 64px output, 320x320 for 256px;
and 72x72 RGBA PNG emoji-like images); the built-in emoji shards are measured too when ``data/emoji`` is
prepared. Each row reads with the training pipeline (shard + sample shuffle, decode, resize, crop, normalise,
batch of 64) through a DataLoader with 0, 1 and 2 workers. The first batch (worker start-up) is not timed.
"""
from __future__ import annotations

import argparse
import io
import os
import platform
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from benchlib import loader_rates, write_section  # noqa: E402  (this folder: scripts run as files)

from unclip_pl.data.pipeline import TrainOrder, build_pipeline  # noqa: E402
from unclip_pl.data.writer import write_shards  # noqa: E402

README = Path(__file__).with_name("README.md")
SECTION = "## Data loader"
NOTE = (
    "At 256x256 most of the time is the antialiased bicubic resize (320 -> 256 px) and the float32 batch "
    "(50 MB per batch of 64) that workers hand to the main process through shared memory; JPEG draft "
    "decoding only helps when the source is at least twice the output size."
)


def synthetic_image(rng: np.random.Generator, size: int, alpha: bool = False) -> Image.Image:
    """A smooth random image (upsampled 8x8 noise plus a disc), like a photo's frequency content, not noise."""
    small = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    img = Image.fromarray(small).resize((size, size), Image.Resampling.BICUBIC)
    if alpha:
        a = np.zeros((size, size), np.uint8)
        yy, xx = np.mgrid[:size, :size]
        a[(yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (size * 0.45) ** 2] = 255
        img = img.convert("RGBA")
        img.putalpha(Image.fromarray(a))
    return img


def make_synthetic(out: Path, n: int, size: int, fmt: str, shards: int = 8) -> list[str]:
    rng = np.random.default_rng(size)
    samples = []
    for i in range(n):
        buf = io.BytesIO()
        if fmt == "png":
            synthetic_image(rng, size, alpha=True).save(buf, format="PNG")
        else:
            synthetic_image(rng, size).save(buf, format="JPEG", quality=90)
        samples.append({"__key__": f"{i:07d}", fmt: buf.getvalue(), "txt": f"synthetic image number {i}"})
    return write_shards(samples, out, maxcount=-(-n // shards))


def measure(urls, image_size: int, workers: int, batch_size: int = 64, min_samples: int = 2000):
    """Returns (wall samples/s, samples per CPU-second per worker) over whole passes (>= ``min_samples``),
    excluding the first batch (start-up).

    CPU time is what the loading processes used (the main process when ``workers == 0``, else the workers),
    so the second number is what one worker delivers with a core of its own, whatever else runs on the machine.
    """
    ds = build_pipeline(urls, needs=("image", "txt"), image_size=image_size, batch_size=batch_size,
                        order=TrainOrder(shuffle_buffer=1000))
    loader = DataLoader(ds, batch_size=None, num_workers=workers, persistent_workers=workers > 0,
                        prefetch_factor=4 if workers else None)
    return loader_rates(loader, min_samples, "image")


def _cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small run, print only")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    args = p.parse_args()
    torch.set_num_threads(1)
    n_small, n_big = (800, 200) if args.quick else (3000, 600)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        sets = [
            ("synthetic JPEG 80px", make_synthetic(tmp / "j80", n_small, 80, "jpg"), 64, n_small),
            ("synthetic RGBA PNG 72px", make_synthetic(tmp / "p72", n_small, 72, "png"), 64, n_small),
            ("synthetic JPEG 320px", make_synthetic(tmp / "j320", n_big, 320, "jpg"), 256, n_big),
        ]
        emoji_root = ROOT / "data" / "emoji"
        if (emoji_root / "manifest.json").exists():
            from unclip_pl.data.emoji import prepare_emoji

            urls = prepare_emoji(emoji_root)["train"]
            sets.insert(2, ("emoji (72px PNG)", urls, 64, n_small))
        for name, urls, size, n in sets:
            for w in args.workers:
                sps, per_cpu = measure(urls, size, w, min_samples=n if w == 0 else 2 * n)
                per = sps / max(1, w)
                rows.append((name, size, w, sps, per, per_cpu))
                print(f"{name:26s} {size:4d}px  workers={w}  {sps:8.0f} samples/s  {per:8.0f} per worker  "
                      f"{per_cpu:8.0f} per worker-CPU-second", flush=True)
    cpu = f"{os.cpu_count()}-core CPU ({_cpu_model()})"
    load = os.getloadavg()
    lines = [
        f"`python experiments/bench/bench_loader.py` on a {cpu}, torch {torch.__version__.split('+')[0]}, "
        f"batch 64, the training pipeline of `unclip_pl.data.pipeline.build_pipeline` (shard + sample shuffle, "
        f"tar parsing, decode, shorter-side resize, crop, normalise to [-1, 1] float32). Workers = DataLoader "
        f"workers (0 = in the main process). The first batch (start-up) is not timed. Target: >= 1,000 "
        f"samples/s per worker at 64x64.",
        "",
        "- **samples/s**: wall-clock throughput of the whole loader; **per worker** = samples/s / max(1, workers).",
        "- **per worker-CPU-second**: samples divided by the CPU seconds the loading processes used, i.e. what "
        "one worker delivers with a core to itself. It does not depend on what else runs on the machine.",
        f"- Load average during this run: {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} (1/5/15 min) on "
        f"{os.cpu_count()} cores: other jobs were running, so the wall-clock columns understate an idle "
        "machine" + (" a lot." if load[0] > 2.5 else "." ),
        "",
        "| source | output | workers | samples/s | per worker | per worker-CPU-second |",
        "|---|---|---|---|---|---|",
    ]
    lines += [f"| {n} | {s}x{s} | {w} | {sps:,.0f} | {per:,.0f} | {pc:,.0f} |" for n, s, w, sps, per, pc in rows]
    lines += ["", NOTE, ""]
    text = "\n".join(lines) + "\n"
    if args.quick:
        print(f"{SECTION}\n\n{text}")
    else:
        write_section(README, SECTION, text)
        print(f"wrote {README}")


if __name__ == "__main__":
    main()
