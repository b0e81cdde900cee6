"""`debug=fast | limit | overfit` start from conf/debug/default.yaml: task_name debug (runs in logs/debug/runs, never in
logs/train/runs), no logger, a fresh time-stamped run directory that never resumes; each keeps its own trainer
settings. Also a real `python train.py prior=diffusion debug=fast` on a fresh PROJECT_ROOT."""

from __future__ import annotations

import re

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from tests.cli.conftest import Command, script
from tests.helpers import CONF, emoji_overrides, tiny_clip_overrides, tiny_stage_overrides

TIME_STAMP = re.compile(r"\d{4}-\d{2}-\d{2}_\d{2}-\d{2}-\d{2}")
#: What each debug config does beyond the shared defaults (trainer keys).
OWN_SETTINGS = {
    "fast": {"fast_dev_run": True, "max_epochs": 1},
    "limit": {"max_epochs": 2, "limit_train_batches": 5, "limit_val_batches": 2},
    "overfit": {"overfit_batches": 4, "max_epochs": 100, "check_val_every_n_epoch": 25},
}


def _compose(overrides: list[str]):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="train", overrides=overrides, return_hydra_config=True)


@pytest.mark.parametrize("name", sorted(OWN_SETTINGS))
def test_debug_runs_are_kept_apart_from_training_runs(name, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "4242")  # a training run here would be logs/train/runs/4242 (and resume it)
    train = _compose(["prior=diffusion"])
    assert (train.task_name, train.run_name, train.resume) == ("train", "4242", "auto")
    assert train.logger is not None and train.hydra.run.dir.endswith("/train/runs/4242")

    cfg = _compose(["prior=diffusion", f"debug={name}"])
    assert cfg.task_name == "debug" and cfg.logger is None
    assert cfg.resume == "never" and TIME_STAMP.fullmatch(cfg.run_name), "a debug run never resumes"
    run_dir = cfg.hydra.run.dir
    assert f"/debug/runs/{cfg.run_name}" in run_dir and "/train/" not in run_dir
    assert cfg.hydra.sweep.dir.split("/")[-3] == "debug"
    for key, value in OWN_SETTINGS[name].items():
        assert cfg.trainer[key] == value, f"debug={name} no longer sets trainer.{key}={value}"
    assert cfg.data.num_workers == (0 if name == "fast" else train.data.num_workers)
    assert cfg.callbacks.lr_monitor is None, "Lightning's LearningRateMonitor refuses a trainer without a logger"
    assert (cfg.callbacks.checkpoint is None) == (name == "fast"), "limit and overfit keep their checkpoints"


def test_debug_wins_over_an_experiment():
    """An experiment's own task_name and run_name (logs/emoji_cascade/runs/prior) give way to debug's."""
    cfg = _compose(["experiment=emoji_cascade/prior", "debug=fast"])
    assert cfg.task_name == "debug" and TIME_STAMP.fullmatch(cfg.run_name) and cfg.resume == "never"


def test_debug_fast_trains_under_logs_debug_only(emoji_root, tmp_path):
    """`python train.py prior=diffusion debug=fast` on a fresh root: its run (and the short CLIP autotrain it needs)
    lands in logs/debug/runs/<date>_<time>, nothing in logs/train, no logger output, the shared CLIP cache empty."""
    root = tmp_path / "root"
    root.mkdir()
    done = Command([script("train.py"), "prior=diffusion", "debug=fast", *emoji_overrides(emoji_root),
                    *tiny_clip_overrides(), *tiny_stage_overrides("prior")], root).wait().check()
    assert not (root / "logs" / "train").exists(), sorted(p.name for p in (root / "logs").iterdir())
    runs = list((root / "logs" / "debug" / "runs").iterdir())
    assert len(runs) == 1 and TIME_STAMP.fullmatch(runs[0].name), runs
    run_dir = runs[0]
    assert (run_dir / "config_resolved.yaml").is_file() and (run_dir / "debug.log").is_file()
    assert (run_dir / "clip_autotrain").is_dir(), "the CLIP autotrain ran inside the debug run"
    assert not (run_dir / "csv").exists() and not (run_dir / "checkpoints").exists()
    assert not (root / "data" / "cache" / "clip").exists(), "a debug run's short CLIP never fills the cache"
    assert "Resuming" not in done.stdout + done.stderr
