"""``init_from``: weights only from a project checkpoint or a weights file into a stage's model before the fit; strict
by default, ``init_strict=false`` lists what does not match and loads the rest; the EMA restarts from the loaded
weights; shape mismatches and other stages are one-line errors."""

from __future__ import annotations

import logging

import pytest
import torch

from unclip_pl.checkpoint import FORMAT, CheckpointError, init_weights
from unclip_pl.diffusion import GaussianDiffusion, get_betas
from unclip_pl.lit.prior import PriorModule
from unclip_pl.models.prior import DiffusionPrior
from unclip_pl.nets.prior import PriorTransformer

SAMPLE = {"steps": 2, "sampler": "ddim", "eta": 0.0, "guidance_scale": 1.0, "best_of": 1}


def _module(dim: int = 32, depth: int = 1, seed: int = 0) -> PriorModule:
    torch.manual_seed(seed)
    net = PriorTransformer(embed_dim=16, text_width=24, dim=dim, depth=depth, heads=2, max_text_len=8)
    model = DiffusionPrior(net, GaussianDiffusion(get_betas("cosine", 100), target="x0"), embed_dim=16)
    return PriorModule(model, ema_decay=0.99, sample=SAMPLE)


def _entry(stage: str = "prior") -> dict:
    return {"format": FORMAT, "stage": stage, "cfg": {}, "model": None, "sample": SAMPLE, "clip": None}


def _lightning_ckpt(path, module: PriorModule, ema_shift: float = 0.5) -> dict:
    """A StageModule checkpoint: trained weights, an EMA copy that differs from them, optimiser state and a step."""
    sd = {f"model.{k}": v.clone() for k, v in module.model.state_dict().items()}
    sd.update({f"ema.module.{k}": (v + ema_shift if v.is_floating_point() else v).clone()
               for k, v in module.model.state_dict().items()})
    sd["ema.num_updates"] = torch.tensor(123)
    torch.save({"state_dict": sd, "global_step": 123, "optimizer_states": [{"state": {}}],
                "unclip_pl": _entry()}, path)
    return sd


def _export(path, state_dict: dict, stage: str = "prior") -> None:
    torch.save({"unclip_pl": {**_entry(stage), "weights": "model"}, "state_dict": state_dict}, path)


def test_loads_ema_weights_of_a_checkpoint_and_restarts_the_ema(tmp_path):
    source = _module(seed=1)
    sd = _lightning_ckpt(tmp_path / "a.ckpt", source)
    target = _module(seed=2)
    target.ema.update(target.model)  # a count before init_from must not survive it
    out = init_weights(target, tmp_path / "a.ckpt", "prior")
    assert out == {"missing": [], "unexpected": []}
    for k, v in target.model.state_dict().items():
        torch.testing.assert_close(v, sd[f"ema.module.{k}"], rtol=0, atol=0, msg=k)
        torch.testing.assert_close(target.ema.module.state_dict()[k], v, rtol=0, atol=0, msg=k)
    assert int(target.ema.num_updates) == 0
    target.ema.update(target.model)  # first update after init uses the warm-up decay of update 1
    assert int(target.ema.num_updates) == 1


def test_loads_an_exported_weights_file(tmp_path):
    source = _module(seed=3)
    _export(tmp_path / "w.pt", source.model.state_dict())
    target = _module(seed=4)
    init_weights(target, tmp_path / "w.pt", "prior")
    for k, v in source.model.state_dict().items():
        assert torch.equal(target.model.state_dict()[k], v), k


def test_strict_refuses_missing_and_unexpected_keys(tmp_path):
    sd = _module(seed=5).model.state_dict()
    sd.pop("net.query")
    sd["net.extra"] = torch.zeros(3)
    _export(tmp_path / "w.pt", sd)
    target = _module(seed=6)
    before = {k: v.clone() for k, v in target.model.state_dict().items()}
    with pytest.raises(CheckpointError) as e:
        init_weights(target, tmp_path / "w.pt", "prior")
    msg = str(e.value)
    assert "\n" not in msg and "net.query" in msg and "net.extra" in msg and "init_strict=false" in msg
    assert all(torch.equal(before[k], v) for k, v in target.model.state_dict().items())  # nothing loaded


def test_not_strict_lists_keys_one_line_each_and_loads_the_rest(tmp_path, caplog):
    source = _module(seed=7)
    sd = source.model.state_dict()
    sd.pop("net.query")
    sd["net.extra"] = torch.zeros(3)
    _export(tmp_path / "w.pt", sd)
    target = _module(seed=8)
    query_before = target.model.net.query.detach().clone()
    with caplog.at_level(logging.WARNING, logger="unclip_pl.checkpoint"):
        out = init_weights(target, tmp_path / "w.pt", "prior", strict=False)
    assert out == {"missing": ["net.query"], "unexpected": ["net.extra"]}
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(lines) == 2 and "missing" in lines[0] and "net.query" in lines[0] and "net.extra" in lines[1]
    assert torch.equal(target.model.net.query, query_before)
    assert torch.equal(target.model.net.out.weight, source.model.net.out.weight)
    assert torch.equal(target.ema.module.net.out.weight, source.model.net.out.weight)


def test_shape_mismatch_is_one_line_naming_the_keys(tmp_path):
    _export(tmp_path / "w.pt", _module(dim=32).model.state_dict())
    with pytest.raises(CheckpointError) as e:
        init_weights(_module(dim=48), tmp_path / "w.pt", "prior", strict=False)
    msg = str(e.value)
    assert "\n" not in msg and "shape mismatch" in msg and "net.query: model (48,), file (32,)" in msg


def test_weights_of_another_stage_are_refused(tmp_path):
    _export(tmp_path / "w.pt", _module().model.state_dict(), stage="decoder")
    with pytest.raises(CheckpointError, match="weights of the decoder stage, but this run trains the prior"):
        init_weights(_module(), tmp_path / "w.pt", "prior")


def test_not_a_checkpoint_is_one_line(tmp_path):
    (tmp_path / "x.pt").write_text("not a checkpoint")
    with pytest.raises(CheckpointError) as e:
        init_weights(_module(), tmp_path / "x.pt", "prior")
    assert "\n" not in str(e.value) and str(e.value).startswith("init_from: ")


@pytest.mark.parametrize("ckpt_path", ["/runs/a/checkpoints/step10.ckpt", None])
def test_init_from_with_a_checkpoint_to_resume_says_which_is_for_what(ckpt_path, tmp_path):
    """Explicit ckpt_path, or (None) a run directory whose last.ckpt resume=auto would continue."""
    from omegaconf import OmegaConf

    from unclip_pl.train import ConfigError, init_from_weights

    _export(tmp_path / "w.pt", _module().model.state_dict())
    cfg = OmegaConf.create({"init_from": str(tmp_path / "w.pt"), "init_strict": True, "ckpt_path": ckpt_path})
    found = ckpt_path or "/runs/a/checkpoints/last.ckpt"
    with pytest.raises(ConfigError) as e:
        init_from_weights(cfg, _module(), "prior", found)
    msg = str(e.value)
    assert "\n" not in msg and "resumes a run" in msg and "starts a new run from weights only" in msg
    assert (f"ckpt_path={ckpt_path}" in msg) if ckpt_path else ("last.ckpt (resume=auto)" in msg and
                                                                "resume=never" in msg)


def test_init_from_missing_file_is_one_line(tmp_path):
    from omegaconf import OmegaConf

    from unclip_pl.train import ConfigError, init_from_weights

    cfg = OmegaConf.create({"init_from": str(tmp_path / "nope.pt"), "init_strict": True, "ckpt_path": None})
    with pytest.raises(ConfigError, match="nope.pt does not exist"):
        init_from_weights(cfg, _module(), "prior", None)


def test_a_restarted_init_from_run_resumes_its_own_last_checkpoint(tmp_path):
    """resume=auto found last.ckpt of the run this init_from started (a requeued job): resume, load nothing; a
    last.ckpt of a run started otherwise, or an explicit ckpt_path, stays an error."""
    from omegaconf import OmegaConf

    from unclip_pl.train import ConfigError, init_from_weights

    _export(tmp_path / "w.pt", _module(seed=1).model.state_dict())
    cfg = OmegaConf.create({"init_from": str(tmp_path / "w.pt"), "init_strict": True, "ckpt_path": None})
    last = tmp_path / "last.ckpt"
    for started_with in (str(tmp_path / "w.pt"), None, str(tmp_path / "other.pt")):
        torch.save({"state_dict": {}, "cfg": {"init_from": started_with}}, last)
        target = _module(seed=2)
        before = target.model.net.out.weight.detach().clone()
        if started_with == cfg.init_from:
            init_from_weights(cfg, target, "prior", str(last))
            assert torch.equal(target.model.net.out.weight, before)  # the fit's resume restores the weights
        else:
            with pytest.raises(ConfigError, match="resume=auto"):
                init_from_weights(cfg, target, "prior", str(last))
    explicit = OmegaConf.merge(cfg, {"ckpt_path": str(last)})
    torch.save({"state_dict": {}, "cfg": {"init_from": cfg.init_from}}, last)
    with pytest.raises(ConfigError, match="ckpt_path="):
        init_from_weights(explicit, _module(), "prior", str(last))
