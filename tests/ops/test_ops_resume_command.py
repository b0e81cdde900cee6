"""A run stopped by a signal (and not requeued) prints the exact command that resumes it: the original command line
with ``run_name=<this run>`` added or replaced, because the default run name is a time stamp and the same command
alone would start a new run directory."""

from __future__ import annotations

import logging
import os
import shlex
import subprocess
import sys

import pytest
from ops_helpers import BASE, OPS, ROOT, compose_ops, run_cli

from unclip_pl.callbacks import preemption
from unclip_pl.callbacks.preemption import resume_command
from unclip_pl.train import fit


def test_resume_command_adds_run_name():
    cmd = resume_command(["train.py", "prior=diffusion", "data.batch_size=8"], "2025-01-02_03-04-05")
    assert cmd == "python train.py prior=diffusion data.batch_size=8 run_name=2025-01-02_03-04-05"


@pytest.mark.parametrize("given", ["run_name=old", "++run_name=old"])
def test_resume_command_replaces_an_existing_run_name_in_place(given):
    cmd = resume_command(["train.py", "prior=diffusion", given, "seed=1", "run_name=again"], "job7")
    assert cmd == "python train.py prior=diffusion run_name=job7 seed=1"
    assert shlex.split(cmd).count("run_name=job7") == 1 and "old" not in cmd and "again" not in cmd


def test_resume_command_quotes_for_the_shell():
    argv = ["/my dir/train.py", "tags=[a,b]", "~callbacks.progress", "logger.wandb.name=it's $HOME"]
    cmd = resume_command(argv, "r 1", python="/opt/py/bin/python")
    assert shlex.split(cmd) == ["/opt/py/bin/python", *argv, "run_name=r 1"]


def test_sigterm_message_prints_the_resume_command(tmp_path, monkeypatch, caplog):
    """A default run (time-stamped run_name) stopped by SIGTERM: the message names this run's run_name."""
    argv = ["train.py", "prior=ops_tiny", "run_name=typed", "trainer.max_steps=6"]
    monkeypatch.setattr(sys, "argv", argv)
    cfg = compose_ops(["trainer.max_steps=6", "prior.module.signal_at_step=1"], tmp_path / "run")
    caplog.set_level(logging.INFO)
    fit(cfg)
    expected = resume_command(argv, cfg.run_name, python=preemption._python())
    assert f"and stopping; to resume, run:\n  {expected}" in caplog.text
    assert f"run_name={cfg.run_name} trainer.max_steps=6" in expected and "typed" not in expected


@pytest.mark.slow
def test_cli_printed_command_resumes_a_default_run(tmp_path):
    """The real entry point without run_name: stop it with SIGTERM, run the printed command, it resumes."""
    first = run_cli([f"paths.log_dir={tmp_path}", "trainer.max_steps=6", "prior.module.signal_at_step=2"])
    out = first.stdout + first.stderr
    assert first.returncode == 0, out[-3000:]
    runs = list((tmp_path / "train" / "runs").iterdir())
    assert len(runs) == 1
    line = out.split("to resume, run:\n", 1)[1].splitlines()[0].strip()
    args = shlex.split(line)
    assert args[-1] == f"run_name={runs[0].name}"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": f"{OPS}{os.pathsep}{ROOT}", "PROJECT_ROOT": str(ROOT)}
    second = subprocess.run([sys.executable, *args[1:]], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=240)
    assert second.returncode == 0, (second.stdout + second.stderr)[-3000:]
    assert "Resuming from" in second.stdout + second.stderr
    assert [p.name for p in (tmp_path / "train" / "runs").iterdir()] == [runs[0].name]
    assert args[2:2 + len(BASE)] == BASE  # the original overrides, unchanged and in order
