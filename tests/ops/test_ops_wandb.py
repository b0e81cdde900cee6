"""wandb without network: `mode=disabled` logs nothing, offline mode (no API key) writes an offline run whose id
is kept in the run directory and reused when the run resumes."""

from __future__ import annotations

import re

import pytest
from ops_helpers import compose_ops

pytest.importorskip("wandb")

from unclip_pl.train import fit, wandb_mode  # noqa: E402


def test_wandb_mode_fallback(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "none"))
    assert wandb_mode("online") == "offline"
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert wandb_mode("disabled") == "disabled"  # an explicit choice wins over the environment


def test_wandb_disabled_logs_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    fit(compose_ops(["trainer.max_steps=2", "logger=wandb", "logger.wandb.mode=disabled"], tmp_path))
    assert not (tmp_path / "wandb").exists() and not (tmp_path / "wandb_id.txt").exists()


def test_wandb_offline_same_id_after_resume(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    fit(compose_ops(["trainer.max_steps=2", "logger=wandb"], tmp_path))
    run_id = (tmp_path / "wandb_id.txt").read_text().strip()

    def run_ids() -> list[str]:  # offline-run-<date>_<time>-<id>, plus "-1" when two runs start in the same second
        return [re.fullmatch(r"offline-run-\d{8}_\d{6}-(\w+?)(-\d+)?", r.name).group(1)
                for r in sorted((tmp_path / "wandb").glob("offline-run-*"))]

    assert run_ids() == [run_id]
    fit(compose_ops(["trainer.max_steps=3", "logger=wandb"], tmp_path))  # resumes from last.ckpt
    assert (tmp_path / "wandb_id.txt").read_text().strip() == run_id
    assert run_ids() == [run_id, run_id]
