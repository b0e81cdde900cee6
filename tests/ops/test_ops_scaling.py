"""Global batch and the lr scaling rule; the git commit in the hyperparameters."""

from __future__ import annotations

import math

import pytest
from omegaconf import OmegaConf
from ops_helpers import compose_ops

from unclip_pl.train import fit
from unclip_pl.utils.gitinfo import git_commit
from unclip_pl.utils.scaling import apply_lr_scaling, count_devices, global_batch


def test_count_devices():
    assert count_devices("gpu", 4) == 4 and count_devices("gpu", [0, 2]) == 2 and count_devices("gpu", "0,1,3") == 3
    assert count_devices("cpu", -1) == 1 and count_devices("cpu", "auto") == 1 and count_devices("cpu", "2") == 2


@pytest.mark.parametrize("rule, factor", [("none", 1.0), ("linear", 2.0), ("sqrt", math.sqrt(2.0))])
def test_apply_lr_scaling(rule, factor):
    cfg = OmegaConf.create({
        "trainer": {"accelerator": "gpu", "devices": 4, "num_nodes": 2, "accumulate_grad_batches": 2},
        "lr_scaling": {"rule": rule, "reference_batch": 256},
        "prior": {"module": {"optimizer": {"lr": 1e-4}}}})
    assert global_batch(32, cfg.trainer)[0] == 32 * 4 * 2 * 2
    info = apply_lr_scaling(cfg, cfg.prior, 32)  # global 512 = 2 x reference
    assert info["global_batch"] == 512
    assert cfg.prior.module.optimizer.lr == pytest.approx(1e-4 * factor)
    assert cfg.lr_scaling.effective_lr == pytest.approx(1e-4 * factor)


def test_effective_lr_and_git_commit_logged(tmp_path):
    cfg = compose_ops(["trainer.max_steps=1", "lr_scaling.rule=linear", "lr_scaling.reference_batch=4"], tmp_path)
    fit(cfg)  # batch 8 on one device: lr x 2
    hparams = OmegaConf.load(tmp_path / "csv" / "hparams.yaml")
    assert hparams.prior.module.optimizer.lr == pytest.approx(2e-2)
    assert hparams.lr_scaling.effective_lr == pytest.approx(2e-2) and hparams.lr_scaling.global_batch == 8
    assert hparams.git_commit == git_commit() and hparams.git_commit != ""
    metrics = (tmp_path / "csv" / "metrics.csv").read_text()
    assert "perf/global_batch" in metrics
