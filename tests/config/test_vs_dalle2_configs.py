"""The decoder ablation's experiments (conf/experiment/vs_dalle2/<name>.yaml, run by experiments/vs_dalle2/ablation.sh
as one Hydra multirun): each is the comparison's decoder (conf/experiment/vs_dalle2.yaml) with exactly the one change
its file names, under its own run name, and the budget is wall-clock time only."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from tests.helpers import CONF, compose

ABLATIONS = CONF / "experiment" / "vs_dalle2"
D = "decoder.module"
#: ablation -> the decoder keys it changes (relative to the baseline), beyond run_name
CHANGES = {
    "baseline": set(),
    "resblock_cross_attn": {f"{D}.model.unet.resblock_cross_attn"},
    "attn_32": {f"{D}.model.unet.attention_resolutions"},
    "v_target": {f"{D}.model.diffusion.target"},
    "min_snr": {f"{D}.model.diffusion.loss_weight", f"{D}.model.diffusion.min_snr_gamma"},
    "lr_1e3": {f"{D}.optimizer.lr"},
    "warmup_20": {f"{D}.warmup_steps"},
    "clip_scale_1": {f"{D}.model.clip_scale"},
    # decoder=base: its own caption encoder (of the CLIP text tower's width here, so the U-Net is the same)
    "own_text": {"decoder.text_source", f"{D}.text_source", f"{D}.model.text_encoder"},
}


def _flat(cfg, prefix: str = "") -> dict:
    out = {}
    for k, v in cfg.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v and key != f"{D}.model.text_encoder":
            out.update(_flat(v, key + "."))
        else:
            out[key] = v
    return out


def _compose(name: str) -> dict:
    return OmegaConf.to_container(compose([f"experiment=vs_dalle2/{name}"], "/tmp/unused"), resolve=True)


def test_every_ablation_file_is_listed():
    assert sorted(p.stem for p in ABLATIONS.glob("*.yaml")) == sorted(CHANGES)


@pytest.mark.parametrize("name", sorted(set(CHANGES) - {"baseline"}))
def test_each_ablation_changes_exactly_its_one_thing(name):
    base, cfg = _compose("baseline"), _compose(name)
    assert cfg["run_name"] == name and base["run_name"] == "baseline"
    a, b = _flat(base), _flat(cfg)
    changed = {k for k in set(a) | set(b) if a.get(k) != b.get(k)}
    changed = {k for k in changed if (a.get(k), b.get(k)) != ("baseline", name)}   # run_name and what names the run
    assert changed == CHANGES[name]


def test_the_budget_is_wall_clock_time_and_no_validation_runs_inside_it():
    cfg = _compose("baseline")
    assert cfg["trainer"]["max_time"] and cfg["trainer"]["max_steps"] >= 10**8
    assert cfg["trainer"]["limit_val_batches"] == 0 and cfg["data"]["batch_size"] == 64
    assert cfg["decoder"]["text_source"] == "clip" and cfg["clip"]["autotrain"] is False
