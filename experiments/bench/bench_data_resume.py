"""What a resume costs the loader: time to the first batch after a stop at sample k, against reading (decoding)
those k samples again, which a resume without a data position replays.

    python experiments/bench/bench_data_resume.py            # 4,000 samples of 80x80 JPEG in 40 shards, k = 3,000
    python experiments/bench/bench_data_resume.py --quick    # 1,000 samples, k = 750

Synthetic shards in a temporary folder; the training pipeline at 64x64 (batch 64, one process, no workers). Rows:
replaying k samples with decoding; fast-forward with a shuffle buffer of 1,000 (the k samples are read from the
tars and skipped before decoding); fast-forward without a buffer (the shards read before the stop are skipped
unopened). Prints the device beside the numbers.
"""
from __future__ import annotations

import argparse
import io
import itertools
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from unclip_pl.data.pipeline import TrainOrder, build_pipeline  # noqa: E402
from unclip_pl.data.position import POSITION_KEY, DataPosition, PositionTracker  # noqa: E402
from unclip_pl.data.writer import write_shards  # noqa: E402


def _jpeg(seed: int, side: int = 80) -> bytes:
    small = np.random.default_rng(seed).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(small).resize((side, side), Image.BICUBIC).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _device() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({platform.machine()})"
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    n, per_shard, batch = (1000, 100, 64) if args.quick else (4000, 100, 64)
    k_batches = (3 * n // 4) // batch
    with tempfile.TemporaryDirectory() as tmp:
        samples = ({"__key__": f"s{i:06d}", "jpg": _jpeg(i), "txt": f"caption {i}"} for i in range(n))
        write_shards(samples, Path(tmp), prefix="bench", maxcount=per_shard)
        print(f"{n} samples in {n // per_shard} shards, stop after {k_batches} batches of {batch} "
              f"({k_batches * batch} samples); device: {_device()}")
        for buffer in (1000, 0):
            order = TrainOrder("pass", shuffle_buffer=buffer, seed=0)
            tracker = PositionTracker(DataPosition(0, shard_skip=buffer <= 1), {})
            tracker.begin()
            t0 = time.perf_counter()
            stream = iter(build_pipeline(tmp, needs=("image", "txt"), image_size=64, batch_size=batch, order=order,
                                         position=tracker.position))
            for b in itertools.islice(stream, k_batches):
                tracker.observe(b.pop(POSITION_KEY))
            replay = time.perf_counter() - t0
            resumed = PositionTracker(DataPosition(0, shard_skip=buffer <= 1), {})
            resumed.load_state_dict(tracker.state_dict(), {})
            resumed.begin()
            t0 = time.perf_counter()
            next(iter(build_pipeline(tmp, needs=("image", "txt"), image_size=64, batch_size=batch, order=order,
                                     position=resumed.position)))
            ff = time.perf_counter() - t0
            kind = "skip before decoding" if buffer > 1 else "skip whole shards"
            print(f"shuffle_buffer={buffer:>4}: replaying {k_batches * batch} samples (decoded) {replay:6.2f} s; "
                  f"resume to the next batch ({kind}) {ff:6.3f} s; {replay / ff:5.1f}x")


if __name__ == "__main__":
    main()
