"""Bad training data through the real entry point: ``train.py`` stops with one ``Data error:`` line (exit status 2)
naming the shard, also when a DataLoader worker raised the error, never with a traceback."""

from __future__ import annotations

import io

import numpy as np
import pytest
from ops_helpers import run_cli
from PIL import Image

from unclip_pl.data.tar_reader import ShardError
from unclip_pl.data.writer import write_shards
from unclip_pl.train import data_error_line


def _png(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def truncated(tmp_path_factory):
    """Two shards of 6 samples; the second cut in the middle of a member."""
    out = tmp_path_factory.mktemp("shards")
    write_shards(({"__key__": f"k{i:03d}", "png": _png(i), "txt": f"caption {i}"} for i in range(12)), out,
                 prefix="train", maxcount=6)
    bad = sorted(out.glob("*.tar"))[-1]
    bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2 + 100])
    return out, bad


def test_truncated_shard_read_by_a_worker_is_one_data_error_line(truncated, tmp_path):
    shards, bad = truncated
    out = run_cli(["data=ops_shards", f"data.train_urls={shards}", "data.val_urls=null", "data.on_error=raise",
                   "data.num_workers=1", "trainer.max_steps=20", f"hydra.run.dir={tmp_path / 'run'}"])
    assert out.returncode == 2, out.stderr[-3000:]
    lines = [line for line in out.stderr.splitlines() if line.startswith("Data error:")]
    assert len(lines) == 1 and bad.name in lines[0], out.stderr[-3000:]
    assert "Traceback" not in out.stderr and "DataLoader worker" not in lines[0]


def test_error_line_unwraps_a_worker_error():
    """PyTorch re-raises a worker's exception as the same type around the original traceback text."""
    wrapped = ShardError("Caught ShardError in DataLoader worker process 0.\nOriginal Traceback (most recent call "
                         "last):\n  File \"x.py\", line 1, in f\nunclip_pl.data.tar_reader.ShardError: shard a.tar is "
                         "truncated\n")
    assert data_error_line(wrapped) == "shard a.tar is truncated"
    assert data_error_line(ShardError("shard b.tar:\n  unreadable")) == "shard b.tar: unreadable"
