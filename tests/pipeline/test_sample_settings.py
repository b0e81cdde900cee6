"""One source of sampler settings: a stage's ``sample:`` block, stored in its checkpoint, overridden only explicitly."""

import copy

import pytest
import torch

from unclip_pl.pipeline import UnCLIPPipeline
from unclip_pl.sample_settings import DecoderSettings, PipelineSettings, resolve_settings

from .conftest import (
    PRIOR_MODEL,
    UPSAMPLER_MODEL,
    build,
    compose,
    decoder_model,
    perturb_,
    run_cfg,
    stage_cfg,
    write_lightning_ckpt,
)

DEC_SAMPLE = {"steps": 7, "sampler": "ddim", "eta": 0.0, "guidance_scale": 2.0}
UP_SAMPLE = {"steps": 5, "sampler": "ddim", "eta": 0.0}
PRIOR_SAMPLE = {"steps": 4, "sampler": "ddim", "eta": 0.0, "guidance_scale": 1.0, "best_of": 3}


@pytest.fixture(scope="module")
def trained_with_7_steps(tiny, tmp_path_factory):
    """Checkpoints whose stored sample: blocks say decoder 7 steps, upsampler 5 steps, prior 4 steps / best of 3."""
    root = tmp_path_factory.mktemp("sample_settings")
    paths = {}
    for key, (stage, model_cfg, block) in {"decoder": ("decoder", decoder_model("own"), DEC_SAMPLE),
                                           "upsampler": ("upsampler", UPSAMPLER_MODEL, UP_SAMPLE),
                                           "prior": ("prior", PRIOR_MODEL, PRIOR_SAMPLE)}.items():
        model = perturb_(build(model_cfg), seed=3)
        cfg = run_cfg(tiny["clip_path"], stage, stage_cfg(stage, copy.deepcopy(model_cfg), block))
        paths[key] = write_lightning_ckpt(root / f"{key}.ckpt", cfg, model)
    return paths


def count_forwards(module: torch.nn.Module) -> list[int]:
    calls: list[int] = []
    module.register_forward_hook(lambda m, i, o: calls.append(1))
    return calls


def load(tiny, paths, settings=None) -> UnCLIPPipeline:
    return UnCLIPPipeline.from_checkpoints(clip=tiny["clip"], prior=str(paths["prior"]), decoder=str(paths["decoder"]),
                                           upsamplers=[str(paths["upsampler"])], settings=settings, device="cpu")


def test_a_checkpoint_samples_with_its_stored_steps(tiny, trained_with_7_steps):
    pipe = load(tiny, trained_with_7_steps)
    assert (pipe.settings.decoder.steps, pipe.settings.upsampler(0).steps) == (7, 5)
    assert (pipe.settings.prior.steps, pipe.settings.prior.best_of) == (4, 3)
    dec_calls, up_calls = count_forwards(pipe.decoder.unet), count_forwards(pipe.upsamplers[0].unet)
    pipe.decode(torch.nn.functional.normalize(torch.randn(2, 16), dim=-1), ["a", "b"], [0, 1])
    assert (len(dec_calls), len(up_calls)) == (7, 5)       # one (guided, batched) U-Net forward per step


def test_explicit_overrides_win_key_by_key_and_null_keeps_the_stored_value(tiny, trained_with_7_steps):
    """The sample.py / eval.py shape: settings.<stage>.<key>=..., with the yaml's nulls left as they are."""
    over = {"decoder": {"steps": 2, "sampler": None, "eta": None, "guidance_scale": None},
            "upsamplers": [{"steps": 3}], "prior": {"best_of": None, "steps": 6}, "batch_size": None}
    pipe = load(tiny, trained_with_7_steps, over)
    assert pipe.settings.decoder == DecoderSettings(**{**DEC_SAMPLE, "steps": 2})
    assert pipe.settings.upsampler(0).steps == 3 and pipe.settings.prior.steps == 6
    assert pipe.settings.prior.best_of == 3 and pipe.settings.batch_size == 16
    dec_calls = count_forwards(pipe.decoder.unet)
    pipe.decode(torch.nn.functional.normalize(torch.randn(1, 16), dim=-1), ["a"], [0], upsample=False)
    assert len(dec_calls) == 2


def test_the_sample_yaml_overrides_are_all_null(tmp_path):
    """conf/sample.yaml and conf/eval.yaml hold no sampler values of their own: only nulls (= stored block)."""
    for name in ("sample", "eval"):
        cfg = compose(["checkpoints.decoder=unused"], tmp_path, config_name=name)
        for stage in ("prior", "decoder"):
            assert all(v is None for v in cfg.settings[stage].values()), (name, stage)
        assert list(cfg.settings.upsamplers) == []


def test_the_lit_modules_take_the_stage_block(tmp_path):
    """train.py wiring: module.sample is ${<stage>.sample}, so decoder.sample.steps=7 is what validation uses."""
    from hydra.utils import instantiate

    cfg = compose(["decoder=base", "decoder.sample.steps=7", "decoder.sample.sampler=dpmpp_2m"], tmp_path)
    module = instantiate(cfg.decoder.module)
    assert module.sample_settings.sampler_kwargs() == {"steps": 7, "sampler": "dpmpp_2m", "eta": 0.0,
                                                       "guidance_scale": 3.0}


def test_missing_and_unknown_settings_are_one_line_errors():
    with pytest.raises(ValueError, match=r"^decoder sampler setting\(s\) \['eta'\] not given") as err:
        resolve_settings(None, None, {"steps": 3, "sampler": "ddim", "guidance_scale": 1.0}, [])
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match=r"unknown upsampler sampler setting\(s\) \['guidance_scale'\]"):
        resolve_settings({"upsamplers": [{"guidance_scale": 2.0}]}, None, DEC_SAMPLE, [UP_SAMPLE])
    with pytest.raises(ValueError, match="unknown sampler 'euler'; valid choices: ddpm, ddim, dpmpp_2m"):
        PipelineSettings.from_dict({"decoder": {**DEC_SAMPLE, "sampler": "euler"}})
