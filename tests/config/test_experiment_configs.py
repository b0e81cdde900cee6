"""The emoji cascade's experiments (conf/experiment/emoji_cascade/<stage>.yaml): each selects its stage with
`override /group: option`, names its run and, for the time-budgeted stages, holds the budget that
experiments/emoji_cascade/run.sh uses (the script passes none of its own) and its README states."""

from __future__ import annotations

import re

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from tests.helpers import CONF, ROOT

CASCADE = CONF / "experiment" / "emoji_cascade"
RUN_SH = ROOT / "experiments" / "emoji_cascade" / "run.sh"
#: stage file -> (the config block of the stage it trains, the option it selects, seed)
STAGES = {"clip": ("stage", "clip", 0), "judge": ("stage", "clip", 1), "prior": ("prior", "prior", 0),
          "decoder": ("decoder", "decoder", 0), "upsampler": ("upsampler", "upsampler", 0)}
BUDGETED = ("prior", "decoder", "upsampler")


def _compose(overrides: list[str]):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="train", overrides=overrides, return_hydra_config=True)


def _minutes(max_time: str) -> int:
    days, hours, minutes, seconds = (int(x) for x in max_time.split(":"))
    assert days == hours == seconds == 0, max_time
    return minutes


def test_every_stage_has_its_experiment():
    assert sorted(p.stem for p in CASCADE.glob("*.yaml")) == sorted(STAGES)


@pytest.mark.parametrize("name", sorted(STAGES))
def test_stage_experiment_selects_its_stage(name):
    key, value, seed = STAGES[name]
    cfg = _compose([f"experiment=emoji_cascade/{name}"])
    trained = [k for k in ("prior", "decoder", "upsampler") if cfg.get(k) is not None]
    assert trained == ([] if key == "stage" else [key])
    assert (cfg.stage == "clip") == (key == "stage")
    if key != "stage":
        assert cfg[key].name == value
    assert (cfg.task_name, cfg.run_name, cfg.seed) == ("emoji_cascade", name, seed)
    assert cfg.hydra.run.dir.endswith(f"/emoji_cascade/runs/{name}")
    assert cfg.data.batch_size == 64 and "eval_metrics" in cfg.callbacks, "the shared emoji_cascade settings"
    assert (cfg.trainer.max_time is not None) == (name in BUDGETED)
    assert cfg.clip.name == ("judge" if name == "judge" else "small")
    if name == "clip":
        assert cfg.clip.export_to == cfg.clip.loader.checkpoint, "the conditioning CLIP fills the stages' cache"


def test_command_line_still_wins_over_the_experiment():
    cfg = _compose(["experiment=emoji_cascade/prior", "trainer=gpu", "trainer.max_time=00:00:15:00"])
    assert cfg.trainer.accelerator == "gpu" and cfg.trainer.max_time == "00:00:15:00"


def test_run_sh_uses_the_experiments_and_their_budgets():
    script = RUN_SH.read_text()
    commands = re.findall(r"python train\.py (.*)", script)
    assert [c.split()[0] for c in commands] == [f"experiment=emoji_cascade/{n}" for n in STAGES]
    assert "max_time" not in "".join(commands), "run.sh passes no budget of its own: the experiment files hold them"
    readme = (RUN_SH.parent / "README.md").read_text()
    stated = re.search(r"budgets: prior (\d+), decoder (\d+), upsampler (\d+) minutes", readme)
    assert stated, "experiments/emoji_cascade/README.md states the budgets of its run"
    budgets = [_minutes(_compose([f"experiment=emoji_cascade/{n}"]).trainer.max_time) for n in BUDGETED]
    assert budgets == [int(x) for x in stated.groups()], "the README's budgets are the experiment files' budgets"


def test_cascade_decoder_samples_at_its_measured_guidance():
    """The cascade's decoder stores guidance 1.5 in its sampler settings (the value its README measured at this
    budget), and the training-time metrics callback decodes with the decoder's own setting; decoder=base keeps 3."""
    cfg = _compose(["experiment=emoji_cascade/decoder"])
    assert cfg.decoder.sample.guidance_scale == cfg.decoder.module.sample.guidance_scale == 1.5
    assert cfg.callbacks.eval_metrics.guidance_scale is None
    assert _compose(["decoder=base"]).decoder.module.sample.guidance_scale == 3.0
