"""A mistyped config key on the command line of train.py / sample.py: one ``Config error:`` line naming the keys at
that level and the closest match, exit status 2, no traceback (instead of Hydra's bare "not in struct")."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from hydra.core.global_hydra import GlobalHydra
from ops_helpers import ROOT

from unclip_pl.utils.cli import unknown_override_errors

CONF = str(ROOT / "conf")
NET_KEYS = "_target_, embed_dim, text_width, max_text_len, dim, depth, heads, ff_mult, dropout"


def _cli(script: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PROJECT_ROOT": str(ROOT)}
    return subprocess.run([sys.executable, script, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)


@pytest.fixture(autouse=True)
def _no_global_hydra():
    GlobalHydra.instance().clear()
    yield
    GlobalHydra.instance().clear()


def _assert_one_config_error(out: subprocess.CompletedProcess) -> str:
    assert out.returncode == 2, out.stderr[-3000:]
    assert "Traceback" not in out.stderr and "not in struct" not in out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Config error: "), out.stderr[-3000:]
    return lines[0]


def test_cli_typo_names_the_keys_there_and_the_closest():
    line = _assert_one_config_error(_cli("train.py", "prior=diffusion", "prior.module.model.net.dimm=3"))
    assert "no key 'dimm' at 'prior.module.model.net'" in line
    assert "Did you mean 'dim'?" in line and f"Keys there: {NET_KEYS}." in line


def test_cli_typo_in_a_multirun_sweep():
    line = _assert_one_config_error(_cli("train.py", "-m", "prior=diffusion", "prior.module.model.net.dimm=3,4"))
    assert line.startswith("Config error: prior.module.model.net.dimm=3,4: ") and "Did you mean 'dim'?" in line


def test_sample_cli_typo_names_the_keys_there():
    line = _assert_one_config_error(_cli("sample.py", "checkpoints.decodr=x.ckpt"))
    assert "no key 'decodr' at 'checkpoints'" in line and "Did you mean 'decoder'?" in line


def test_typo_in_an_intermediate_key_and_two_typos():
    errors = unknown_override_errors(CONF, "train", ["prior=diffusion", "prior.modul.warmup_steps=3", "seed=1",
                                                     "trainer.max_stepz=5"])
    assert len(errors) == 2
    assert "no key 'modul' at 'prior'" in errors[0] and "Did you mean 'module'?" in errors[0]
    assert "no key 'max_stepz' at 'trainer'" in errors[1] and "Did you mean 'max_steps'?" in errors[1]


def test_key_below_a_plain_value():
    (error,) = unknown_override_errors(CONF, "train", ["prior=diffusion", "prior.module.ema_decay.x=3"])
    assert "'prior.module.ema_decay' is a value (0.999), not a group of keys" in error


@pytest.mark.parametrize("args", [
    ["prior=diffusion", "prior.module.model.net.dim=3"],       # fine
    ["prior=diffusion", "+prior.module.model.net.dimm=3"],     # an explicit addition
    ["prior=diffusion", "prior.module.model.net.dim=3,4"],     # another error (a sweep without -m): Hydra's own
    ["--info", "prior=diffusion", "prior.module.model.net.dimm=3"],  # a flag the check does not model
])
def test_nothing_to_report_is_left_to_hydra(args):
    assert unknown_override_errors(CONF, "train", args) == []
