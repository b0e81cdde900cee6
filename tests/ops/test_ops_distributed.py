"""2-process DDP (gloo, CPU) through the real entry point and the real ShardDataModule: the fit finishes and the
two ranks train on disjoint samples. ``gather_rows`` with uneven rows on 2 gloo ranks. Multirun: failing jobs do
not stop the others; submitit's local launcher."""

from __future__ import annotations

import io
import json
import socket

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from ops_helpers import run_cli
from PIL import Image

from tests.pipeline.dist_worker import gather_rows_main
from unclip_pl.data.writer import write_shards
from unclip_pl.utils.distributed import gather_counts, gather_rows


def _png(seed: int) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 255, (8, 8, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def tiny_shards(tmp_path):
    """4 train shards x 8 samples (8x8 PNG + caption)."""
    samples = ({"__key__": f"k{i:03d}", "png": _png(i), "txt": f"caption {i}"} for i in range(32))
    return write_shards(samples, tmp_path / "shards", prefix="train", maxcount=8)


def test_ddp_two_cpu_processes_disjoint_data(tmp_path, tiny_shards):
    rec = tmp_path / "keys"
    out = run_cli([f"paths.log_dir={tmp_path}", "run_name=ddp", "trainer=ddp", "trainer.accelerator=cpu",
                   "trainer.devices=2", "trainer.precision=32-true", "trainer.max_steps=3", "data=ops_shards",
                   f"data.train_urls={tmp_path}/shards", "data.val_urls=null",
                   f"prior.module.record_dir={rec}", "prior.module.ema_decay=null"], timeout=300)
    assert out.returncode == 0, (out.stdout[-2000:], out.stderr[-4000:])
    keys = [(rec / f"keys_rank{r}.txt").read_text().split() for r in (0, 1)]
    assert len(keys[0]) == len(keys[1]) == 3 * 4  # 3 steps x batch 4 on each rank
    log = (tmp_path / "train" / "runs" / "ddp" / "train.log").read_text()
    assert "global batch 8 = 4 per device x 2 device(s)" in log
    assert not set(keys[0]) & set(keys[1]), "the two ranks trained on the same samples"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_gather_rows_without_process_group_is_identity():
    x = torch.randn(3, 2)
    assert gather_rows(x) is x and gather_rows(x, sync_grads=True) is x and gather_counts(3) == [3]
    with pytest.raises(ValueError, match="0-d"):
        gather_rows(torch.tensor(1.0))


def test_gather_rows_two_gloo_ranks_uneven(tmp_path):
    """Rank 0 holds 3 rows, rank 1 holds 5 (and 0 + 4): every rank gets all rows in rank order, dtype and trailing
    dims kept; with sync_grads each rank's rows get the gradients of both ranks' copies; bad input is a ValueError."""
    mp.spawn(gather_rows_main, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    grid = torch.arange(8 * 4, dtype=torch.float32).reshape(8, 4)
    tokens = torch.cat([torch.arange(18).reshape(3, 2, 3), torch.arange(30).reshape(5, 2, 3) + 100])
    weights = torch.arange(8, dtype=torch.float32)[:, None].expand(8, 4)
    for rank, rows in ((0, slice(0, 3)), (1, slice(3, 8))):
        out = torch.load(tmp_path / f"gather_rank{rank}.pt")
        assert out["counts"] == [3, 5]
        torch.testing.assert_close(out["rows"], grid, rtol=0, atol=0)
        torch.testing.assert_close(out["empty_one"], torch.full((4, 2), 2.0), rtol=0, atol=0)
        assert out["tokens"].dtype == torch.int64 and torch.equal(out["tokens"], tokens)
        torch.testing.assert_close(out["grad"], 2 * weights[rows])  # summed over the 2 ranks' copies
        assert out["no_grad"]
        assert "trailing dims differ" in out["bad_trailing"] and "do not match world size" in out["bad_counts"]


def test_multirun_failing_job_does_not_stop_others(tmp_path):
    out = run_cli(["-m", f"hydra.sweep.dir={tmp_path}/sweep", "trainer.max_steps=2", "prior.module.fail=true,false"],
                  timeout=300)
    assert out.returncode == 1, out.stderr[-4000:]  # the sweep's exit code says a job failed
    assert "Exiting with code 1: 1 sweep job(s) failed (tolerate_failures=true exits 0)." in out.stdout + out.stderr
    status = {d: json.loads((tmp_path / "sweep" / d / "job_status.json").read_text()) for d in ("0", "1")}
    assert status["0"]["status"] == "FAILED" and "deliberate failure" in (out.stderr + status["0"]["error"])
    assert status["1"]["status"] == "COMPLETED" and (tmp_path / "sweep" / "1" / "checkpoints" / "last.ckpt").exists()
    summary = json.loads((tmp_path / "sweep" / "summary.json").read_text())
    assert summary["failed"] == 1 and len(summary["jobs"]) == 2


@pytest.mark.slow
def test_multirun_submitit_local_two_jobs(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    out = run_cli(["-m", "hydra/launcher=local", "hydra.launcher.cpus_per_task=1", f"hydra.sweep.dir={tmp_path}/sw",
                   "trainer.max_steps=2", "seed=0,1"], timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    for job in ("0", "1"):
        assert json.loads((tmp_path / "sw" / job / "job_status.json").read_text())["status"] == "COMPLETED"
        assert (tmp_path / "sw" / job / "checkpoints" / "last.ckpt").exists()
        assert (tmp_path / "sw" / job / "csv" / "metrics.csv").exists()  # each job its own logger run
