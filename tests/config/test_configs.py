"""Every config file composes, resolves and instantiates; configuration mistakes give one clear sentence."""

from __future__ import annotations

import subprocess
import sys

import pytest
from hydra.utils import instantiate

from tests.helpers import CONF, ROOT, compose
from unclip_pl.train import ConfigError, check_config, selected_stage, trainer_kwargs

STAGE_GROUPS = ("prior", "decoder", "upsampler")
PAPER = ("paper", "karlo")  # option names containing these are full-size: instantiated in the slow test only


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def stage_overrides() -> list[list[str]]:
    cases = [["stage=clip"]]
    for group in STAGE_GROUPS:
        cases += [[f"{group}={name}"] for name in options(group)]
    return cases


@pytest.mark.parametrize("overrides", stage_overrides(), ids=lambda o: " ".join(o))
def test_stage_configs_compose_and_resolve(overrides, tmp_path):
    cfg = compose(overrides, tmp_path)
    check_config(cfg)
    stage = selected_stage(cfg)
    assert stage in ("clip", *STAGE_GROUPS)
    kwargs = trainer_kwargs(cfg, stage)
    assert kwargs.get("max_epochs") or kwargs.get("max_steps"), "each stage recommends a run length"


@pytest.mark.parametrize("group", ["trainer", "logger", "callbacks", "debug", "data", "clip", "experiment"])
def test_every_group_option_composes(group, tmp_path):
    for name in options(group):
        overrides = [f"{group}={name}"]
        if group != "experiment":
            overrides.append("prior=diffusion")
        if (group, name) == ("data", "shards"):
            overrides += ["data.train_urls=/shards/train-000.tar", "data.val_urls=/shards/val-000.tar"]
        if (group, name) == ("data", "embeddings"):
            overrides += ["data.embedding_folder=/laion/emb"]
        cfg = compose(overrides, tmp_path)
        check_config(cfg)


def _instantiate_stage(overrides, tmp_path):
    cfg = compose(overrides, tmp_path)
    stage = selected_stage(cfg)
    block = cfg.clip.train if stage == "clip" else cfg[stage]
    return instantiate(block.module.model if "model" in block.module else block.module)


@pytest.mark.parametrize(
    "overrides",
    [o for o in stage_overrides() if not any(p in o[0] for p in PAPER)],
    ids=lambda o: " ".join(o),
)
def test_small_stage_models_instantiate(overrides, tmp_path):
    model = _instantiate_stage(overrides, tmp_path)
    assert sum(p.numel() for p in model.parameters()) > 0


@pytest.mark.slow
@pytest.mark.parametrize(
    "overrides",
    [o for o in stage_overrides() if any(p in o[0] for p in PAPER)],
    ids=lambda o: " ".join(o),
)
def test_paper_stage_models_instantiate(overrides, tmp_path):
    if overrides == ["prior=ar_paper"]:  # 319 components need a CLIP of more than the small CLIP's 128 dimensions
        overrides = [*overrides, "clip=pretrained"]
    model = _instantiate_stage(overrides, tmp_path)
    assert sum(p.numel() for p in model.parameters()) > 1e8


def test_no_stage_or_two_stages_is_one_sentence(tmp_path):
    with pytest.raises(ConfigError, match="No stage selected"):
        selected_stage(compose([], tmp_path))
    with pytest.raises(ConfigError, match="Exactly one stage trains per run"):
        selected_stage(compose(["prior=diffusion", "stage=clip"], tmp_path))
    with pytest.raises(ConfigError, match="not a stage option"):
        selected_stage(compose(["stage=decoder"], tmp_path))


def test_missing_required_value_names_the_key(tmp_path):
    cfg = compose(["prior=diffusion", "data=shards"], tmp_path)
    with pytest.raises(ConfigError, match=r"data\.train_urls"):
        check_config(cfg)


def _train_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_cli_typo_in_group_option_lists_choices():
    out = _train_cli("prior=difusion")
    assert out.returncode != 0
    assert "diffusion" in out.stderr and "Available options" in out.stderr
    assert "Traceback" not in out.stderr


def test_cli_no_stage_is_one_line_error():
    out = _train_cli("hydra.run.dir=/tmp/unclip_pl_test_nostage")
    assert out.returncode == 2
    assert "No stage selected" in out.stderr
    assert "Traceback" not in out.stderr


def test_cli_wrong_type_names_the_key():
    out = _train_cli("prior=diffusion", "data.batch_size=lots", "hydra.run.dir=/tmp/unclip_pl_test_type")
    assert out.returncode != 0
    assert "batch_size" in out.stderr
    assert "Traceback" not in out.stderr
