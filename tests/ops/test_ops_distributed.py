"""2-process DDP (gloo, CPU) through the real entry point and the real ShardDataModule: the fit finishes and the
two ranks train on disjoint samples. Multirun: failing jobs do not stop the others; submitit's local launcher."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from ops_helpers import run_cli
from PIL import Image

from unclip_pl.data.shards import write_shards


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


def test_multirun_failing_job_does_not_stop_others(tmp_path):
    out = run_cli(["-m", f"hydra.sweep.dir={tmp_path}/sweep", "trainer.max_steps=2", "prior.module.fail=true,false"],
                  timeout=300)
    assert out.returncode == 0, out.stderr[-4000:]
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
