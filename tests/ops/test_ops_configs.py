"""The ops config options compose: SLURM/local launchers, the optuna sweeper (config only), DDP/FSDP trainers;
`optimized_metric` is declared in train.yaml and is what a multirun job returns."""

from __future__ import annotations

import csv
import json
import math

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate
from ops_helpers import BASE, ROOT, run_cli

from unclip_pl.utils.cli import unknown_override_errors
from unclip_pl.utils.task import metric_value


def _compose(overrides):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(config_name="train", overrides=BASE + overrides, return_hydra_config=True)


def test_slurm_and_local_launchers_compose():
    cfg = _compose(["hydra/launcher=slurm", "hydra.launcher.partition=gpu", "hydra.launcher.account=proj",
                    "hydra.launcher.nodes=2", "hydra.launcher.gpus_per_node=4"])
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert (launcher.partition, launcher.account, launcher.nodes, launcher.tasks_per_node) == ("gpu", "proj", 2, 4)
    assert launcher.timeout_min > 0 and launcher.mem_gb > 0 and launcher.cpus_per_task > 0
    assert _compose(["hydra/launcher=local"]).hydra.launcher._target_.endswith("LocalLauncher")


def test_optuna_sweeper_config_composes():
    assert _compose(["hydra/sweeper=optuna"]).hydra.sweeper._target_.endswith("OptunaSweeper")


@pytest.mark.parametrize("trainer, strategy", [("ddp", "DDPStrategy"), ("fsdp", "FSDPStrategy")])
def test_distributed_trainers_build_their_strategy(trainer, strategy):
    cfg = _compose([f"trainer={trainer}"])
    assert type(instantiate(cfg.trainer.strategy)).__name__ == strategy
    assert cfg.trainer.num_nodes == 1 and cfg.trainer.use_distributed_sampler is False


def test_optimized_metric_is_declared_for_sweeps():
    """README: `python train.py -m hydra/sweeper=optuna optimized_metric=val/loss ...` (no `+`: the key exists)."""
    assert _compose([]).optimized_metric is None
    assert _compose(["hydra/sweeper=optuna", "optimized_metric=val/loss"]).optimized_metric == "val/loss"
    assert unknown_override_errors(str(ROOT / "conf"), "train", ["prior=diffusion", "optimized_metric=val/loss"]) == []


def test_metric_value_picks_the_optimized_metric():
    metrics = {"train/loss": 0.5, "val/loss": 0.25}
    assert metric_value(metrics, "val/loss") == 0.25
    assert metric_value(metrics, None) is None
    with pytest.raises(ValueError, match=r"optimized_metric=val/nope was not logged.*train/loss, val/loss"):
        metric_value(metrics, "val/nope")


def test_multirun_job_returns_its_optimized_metric(tmp_path):
    """Job 0 returns the fit's last train/loss (recorded in its job_status.json); job 1 names a metric the fit did
    not log: that job fails (NaN) and the sweep goes on; with tolerate_failures=true the sweep still exits 0."""
    out = run_cli(["-m", f"hydra.sweep.dir={tmp_path}/sweep", "trainer.max_steps=2", "tolerate_failures=true",
                   "optimized_metric=train/loss,val/nope"], timeout=300)
    assert out.returncode == 0, out.stderr[-4000:]
    status = {d: json.loads((tmp_path / "sweep" / d / "job_status.json").read_text()) for d in ("0", "1")}
    assert status["0"]["status"] == "COMPLETED" and math.isfinite(status["0"]["metric"])
    rows = [r for r in csv.DictReader(open(tmp_path / "sweep" / "0" / "csv" / "metrics.csv")) if r.get("train/loss")]
    assert status["0"]["metric"] == pytest.approx(float(rows[-1]["train/loss"]), rel=1e-5)
    assert status["1"]["status"] == "FAILED" and "optimized_metric=val/nope was not logged" in status["1"]["error"]
