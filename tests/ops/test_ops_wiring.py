"""The training entry builds every object with what it depends on, and saves the config that ran."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf
from ops_helpers import compose_ops

from unclip_pl.train import clip_is_stale, clip_run_config, data_image_size, fit
from unclip_pl.utils.config import ConfigError, build_accepting

ROOT = Path(__file__).resolve().parents[2]


def test_config_and_checkpoint_record_the_scaled_lr(tmp_path):
    """With lr_scaling on, config_resolved.yaml, the checkpoint's cfg and the optimiser agree on the lr."""
    cfg = compose_ops(["trainer.max_steps=1", "lr_scaling.rule=linear", "lr_scaling.reference_batch=4"], tmp_path)
    fit(cfg)  # batch 8 on one device: lr 1e-2 x 2
    saved = OmegaConf.load(tmp_path / "config_resolved.yaml")
    assert saved.prior.module.optimizer.lr == pytest.approx(2e-2)
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["cfg"]["prior"]["module"]["optimizer"]["lr"] == pytest.approx(2e-2)
    assert ckpt["optimizer_states"][0]["param_groups"][0]["initial_lr"] == pytest.approx(2e-2)


def test_data_module_and_module_get_everything_through_their_constructors(tmp_path, monkeypatch):
    """The stage's needs and image size, the batch size and the run config reach the objects at construction."""
    seen = {}

    def fake_fit(trainer, model, datamodule=None, ckpt_path=None):
        seen.update(module=model, datamodule=datamodule)

    monkeypatch.setattr(pl.Trainer, "fit", fake_fit)
    monkeypatch.setattr("unclip_pl.data.datamodule.ShardDataModule.__setattr__", _frozen_after_init, raising=False)
    cfg = compose_ops(["data=ops_shards", "data.train_urls=/nowhere/train.tar", "data.val_urls=/nowhere/val.tar",
                       "data.batch_size=3"], tmp_path)
    fit(cfg)
    dm, module = seen["datamodule"], seen["module"]
    assert dm.needs == ("image", "txt") and dm.image_size == 8 and dm.batch_size == 3
    assert module.run_config == OmegaConf.to_container(OmegaConf.load(tmp_path / "config_resolved.yaml"))


def _frozen_after_init(self, name, value):
    """Fails a test when the training entry sets an attribute on a built data module (its own code may)."""
    if sys._getframe(1).f_code.co_filename.endswith("unclip_pl/train.py"):
        raise AssertionError(f"unclip_pl/train.py set {name} on a built data module")
    object.__setattr__(self, name, value)


def test_data_image_size_that_disagrees_with_the_stage_is_an_error():
    cfg = OmegaConf.create({"data": {"image_size": 16}, "decoder": {"image_size": 32}})
    with pytest.raises(ConfigError, match=r"data.image_size=16 disagrees with decoder.image_size=32"):
        data_image_size(cfg, "decoder")
    cfg.data.image_size = None
    assert data_image_size(cfg, "decoder") == 32
    cfg.decoder.image_size = None
    assert data_image_size(cfg, "decoder") is None  # the data module's own default (64)


class _Takes:
    def __init__(self, a: int = 0, clip=None):
        self.a, self.clip = a, clip


class _TakesAnything:
    def __init__(self, **kwargs):
        self.kwargs = kwargs


def test_build_accepting_passes_what_the_constructor_declares():
    node = OmegaConf.create({"_target_": f"{__name__}._Takes", "a": 1})
    built = build_accepting(node, "x", clip="C", tokenizer="T")
    assert (built.a, built.clip) == (1, "C")
    anything = build_accepting(OmegaConf.create({"_target_": f"{__name__}._TakesAnything"}), "y", tokenizer="T")
    assert anything.kwargs == {"tokenizer": "T"}
    with pytest.raises(ConfigError, match="Could not build x"):  # required arguments are always passed
        build_accepting(node, "x", {"run_config": {}})
    with pytest.raises(ConfigError, match="cannot import _target_ 'no.such.Thing'"):
        build_accepting(OmegaConf.create({"_target_": "no.such.Thing"}), "z")


def test_clip_step_has_its_own_run_and_run_directory(tmp_path):
    cfg = compose_ops(["trainer.max_steps=7", "trainer.max_time=00:00:01:00"], tmp_path)
    clip_cfg = clip_run_config(cfg)
    assert clip_cfg.stage == "clip" and clip_cfg.prior is None and clip_cfg.ckpt_path is None
    assert clip_cfg.trainer.max_steps is None and clip_cfg.trainer.max_time is None  # the CLIP's own length
    assert clip_cfg.paths.output_dir == str(tmp_path / "clip_autotrain")
    assert cfg.prior is not None and cfg.trainer.max_steps == 7, "the stage's config is left as it was"


def test_no_hydra_internals_in_the_package():
    users = [p for p in (ROOT / "unclip_pl").rglob("*.py") if "hydra._internal" in p.read_text()]
    assert not users, f"private Hydra APIs used in {users}"


def test_only_an_older_emoji_split_makes_the_cached_clip_stale():
    """An older emoji split (or no record) is retrained for an emoji run; a CLIP of other data is kept as it is,
    since the user's shards may have been embedded with it."""
    today = "emoji/format2/val0.07/limitNone"
    assert clip_is_stale("emoji/format1/val0.05/limitNone", today) and clip_is_stale(None, today)
    assert not clip_is_stale(today, today)
    assert not clip_is_stale("emoji/format2/val0.07/limitNone", "shards/0123456789ab")
    assert not clip_is_stale(None, "shards/0123456789ab") and not clip_is_stale("shards/0123456789ab", today)
