"""Atomic checkpoint writes; truncated/corrupt checkpoints and checkpoints of another shape give clear errors."""

from __future__ import annotations

import pytest
import torch
from ops_helpers import compose_ops
from tiny_stage import TinyModel, TinyStage

from unclip_pl.checkpoint import AtomicCheckpointIO, CheckpointError, check_fits, mismatch_message, verify_checkpoint
from unclip_pl.train import ConfigError, fit, resolve_ckpt_path


def _ckpt(module: torch.nn.Module) -> dict:
    return {"state_dict": module.state_dict(), "global_step": 3}


def test_atomic_save_keeps_old_file_when_interrupted(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint(_ckpt(TinyStage(TinyModel())), path)
    before = path.read_bytes()

    def boom(*a, **k):
        raise KeyboardInterrupt  # killed in the middle of writing

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint(_ckpt(TinyStage(TinyModel())), path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]  # no temp file left behind


def test_truncated_and_empty_checkpoints_name_the_file(tmp_path):
    path = tmp_path / "step0000003.ckpt"
    AtomicCheckpointIO().save_checkpoint(_ckpt(TinyStage(TinyModel())), path)
    assert verify_checkpoint(path)["global_step"] == 3
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"step0000003\.ckpt: .*truncated or corrupt.*Delete it or pass"):
        verify_checkpoint(path)
    path.write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"step0000003\.ckpt: empty file"):
        verify_checkpoint(path)
    path.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="step0000003.ckpt"):
        verify_checkpoint(path)


def test_other_shape_lists_mismatched_keys(tmp_path):
    small, big = TinyStage(TinyModel(hidden=16)), TinyStage(TinyModel(hidden=32))
    mm = mismatch_message(big, small.state_dict(), "x.ckpt", "prior.module")
    assert "shape mismatch: model.net.0.weight: model (32, 12), checkpoint (16, 12)" in mm
    assert "missing" not in mm and "unexpected" not in mm
    assert mismatch_message(big, big.state_dict(), "x.ckpt", "prior.module") is None
    with pytest.raises(CheckpointError) as e:
        check_fits(big, _ckpt(small), tmp_path / "x.ckpt", "prior.module")
    msg = str(e.value)
    assert "x.ckpt does not fit prior.module" in msg and "shape mismatch" in msg and "ema.module.net.0.weight" in msg
    assert len(msg.splitlines()) <= 4  # short, not PyTorch's page-long strict-load error


def test_run_refuses_corrupt_and_mismatched_checkpoints(tmp_path):
    cfg = compose_ops(["trainer.max_steps=2", "logger=csv"], tmp_path / "a")
    fit(cfg)
    last = tmp_path / "a" / "checkpoints" / "last.ckpt"
    assert last.exists()

    # another model shape: clear message naming the keys, before training starts
    cfg2 = compose_ops(["trainer.max_steps=4", "prior.module.model.hidden=32", f"ckpt_path={last}"], tmp_path / "b")
    with pytest.raises(ConfigError, match=r"does not fit prior.module[\s\S]*model.net.0.weight"):
        fit(cfg2)

    # a truncated last.ckpt picked up by resume=auto: named, never loaded
    data = last.read_bytes()
    last.write_bytes(data[:1000])
    cfg3 = compose_ops(["trainer.max_steps=4"], tmp_path / "a")
    with pytest.raises(ConfigError, match=r"last\.ckpt: .*truncated or corrupt"):
        resolve_ckpt_path(cfg3)
