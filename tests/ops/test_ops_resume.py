"""A run stopped by SIGTERM mid-training saves last.ckpt and stops; rerunning in the same run directory resumes
(resume: auto): the global step continues and the final weights equal an uninterrupted run's."""

from __future__ import annotations

import pytest
import torch
from ops_helpers import compose_ops, run_cli

from unclip_pl.checkpoint import verify_checkpoint
from unclip_pl.train import fit

STEPS = 6


def _weights(run_dir):
    ckpt = verify_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    return ckpt["global_step"], ckpt["state_dict"]


def test_sigterm_then_resume_matches_uninterrupted(tmp_path):
    fit(compose_ops([f"trainer.max_steps={STEPS}"], tmp_path / "ref"))
    ref_step, ref = _weights(tmp_path / "ref")
    assert ref_step == STEPS

    run = tmp_path / "run"
    fit(compose_ops([f"trainer.max_steps={STEPS}", "prior.module.signal_at_step=2"], run))
    step, _ = _weights(run)
    assert step == 3  # signal during step index 2: saved after that optimiser step, then stopped

    fit(compose_ops([f"trainer.max_steps={STEPS}"], run))  # same run directory, resume: auto
    step, got = _weights(run)
    assert step == STEPS
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-5, atol=1e-6, msg=k)


def test_resume_never_starts_afresh(tmp_path):
    run = tmp_path / "run"
    fit(compose_ops(["trainer.max_steps=2"], run))
    metrics_before = (run / "checkpoints" / "last.ckpt").stat().st_mtime_ns
    fit(compose_ops(["trainer.max_steps=2", "resume=never"], run))  # would be a no-op if it resumed at step 2
    assert (run / "checkpoints" / "last.ckpt").stat().st_mtime_ns != metrics_before
    assert _weights(run)[0] == 2


@pytest.mark.slow
def test_cli_sigterm_resume_same_run_dir(tmp_path):
    """The real entry point twice with the same run_name: killed by SIGTERM, then resumed to the end."""
    args = [f"paths.log_dir={tmp_path}", "run_name=job42", f"trainer.max_steps={STEPS}"]
    first = run_cli(args + ["prior.module.signal_at_step=2"])
    assert first.returncode == 0, first.stderr[-3000:]
    run = tmp_path / "train" / "runs" / "job42"
    assert _weights(run)[0] == 3
    second = run_cli(args)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "Resuming from" in (second.stdout + second.stderr)
    assert _weights(run)[0] == STEPS
