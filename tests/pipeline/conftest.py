"""Tiny random-weight stage models and checkpoints for the pipeline tests (built once per session, CPU, seconds).

Shapes: CLIP embed D=16 (text width 32, 16 px images), decoder 16x16, upsampler 16 -> 32. Checkpoints are written in
the exact layout of ``unclip_pl.train`` (``cfg`` = resolved run config, ``state_dict`` with ``model.`` and
``ema.module.`` prefixes, no CLIP weights).
"""

from __future__ import annotations

import copy
import os
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import compose  # noqa: F401  (re-exported for the tests of this folder)

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[2]
CONF = ROOT / "conf"
os.environ.setdefault("PROJECT_ROOT", str(ROOT))
if str(ROOT) not in sys.path:  # sample.py / eval.py live at the repository root
    sys.path.insert(0, str(ROOT))

D, W, IMG, UP = 16, 32, 16, 32
SAMPLE_STEPS = 3

GAUSS = lambda target: {"_target_": "unclip_pl.diffusion.GaussianDiffusion",  # noqa: E731
                        "betas": {"_target_": "unclip_pl.diffusion.get_betas", "name": "cosine", "num_steps": 1000},
                        "target": target}

PRIOR_MODEL = {
    "_target_": "unclip_pl.models.prior.DiffusionPrior",
    "net": {"_target_": "unclip_pl.nets.prior.PriorTransformer", "embed_dim": D, "text_width": W, "dim": 32,
            "depth": 1, "heads": 2, "max_text_len": 77},
    "diffusion": GAUSS("x0"),
    "embed_dim": D,
}


def decoder_model(text: str = "own") -> dict:
    return {
        "_target_": "unclip_pl.models.decoder.Decoder",
        "unet": {"_target_": "unclip_pl.nets.unet.UNet", "model_channels": 16, "channel_mult": [1, 2],
                 "num_res_blocks": 1, "attention_resolutions": [8], "image_size": IMG, "num_head_channels": 16,
                 "clip_dim": D, "num_clip_tokens": 4, "context_dim": W},
        "diffusion": GAUSS("eps"),
        "text_encoder": ({"_target_": "unclip_pl.nets.text.TextEncoder", "vocab_size": 49408, "context_length": 77,
                          "width": W, "layers": 1, "heads": 2} if text == "own" else None),
    }


UPSAMPLER_MODEL = {
    "_target_": "unclip_pl.models.upsampler.Upsampler",
    "unet": {"_target_": "unclip_pl.nets.unet.UNet", "model_channels": 16, "channel_mult": [1, 2],
             "num_res_blocks": 1, "attention_resolutions": [], "image_size": UP, "low_res_channels": 3},
    "diffusion": GAUSS("eps"),
    "low_res_size": IMG,
    "image_size": UP,
}


def stage_cfg(name: str, model: dict, sample: dict) -> dict:
    return {"name": name, "needs": [], "sample": sample, "module": {"_target_": "unused", "model": model}}


def run_cfg(clip_path: Path, stage: str, block: dict) -> dict:
    cfg = {"stage": None, "prior": None, "decoder": None, "upsampler": None, "seed": 0,
           "clip": {"name": "tiny",
                    "loader": {"_target_": "unclip_pl.clip.frozen.load_clip", "model_name": "unclip-tiny",
                               "pretrained": None, "checkpoint": str(clip_path)},
                    "embed_dim": D, "text_width": W, "context_length": 77, "image_size": IMG}}
    cfg[stage] = block
    return cfg


def perturb_(model: torch.nn.Module, seed: int, std: float = 0.05) -> torch.nn.Module:
    """Random weights everywhere (zero-initialised output layers would make every sample identical)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)
    return model


def write_lightning_ckpt(path: Path, cfg: dict, model: torch.nn.Module, ema_model: torch.nn.Module | None = None,
                         entry: bool = True):
    """The layout StageModule checkpoints have (plus a few Lightning entries); ``entry=False``: a file from before
    the ``unclip_pl`` format entry (format version 1, the run config ``cfg`` only)."""
    from unclip_pl.checkpoint import stage_entry

    ema_model = ema_model if ema_model is not None else model
    sd = {f"model.{k}": v.clone() for k, v in model.state_dict().items()}
    sd.update({f"ema.module.{k}": v.clone() for k, v in ema_model.state_dict().items()})
    sd["ema.num_updates"] = torch.tensor(7)
    ckpt = {"epoch": 0, "global_step": 7, "pytorch-lightning_version": "2.x", "state_dict": sd,
            "loops": {}, "callbacks": {}, "optimizer_states": [], "lr_schedulers": [], "cfg": cfg}
    if entry:
        ckpt["unclip_pl"] = stage_entry(cfg)
    torch.save(ckpt, path)
    return path


def build(model_cfg: dict):
    from hydra.utils import instantiate

    return instantiate(copy.deepcopy(model_cfg), _convert_="partial")


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """Paths and objects: clip (FrozenCLIP), clip_path, prior/decoder/decoder_clip/upsampler checkpoint paths."""
    from unclip_pl.clip import build_small_clip, export_clip, load_clip
    from unclip_pl.clip.small import small_clip_config

    root = tmp_path_factory.mktemp("tiny_stages")
    torch.manual_seed(0)
    overrides = dict(embed_dim=D, vision_cfg={"image_size": IMG, "width": 32, "layers": 1, "head_width": 16,
                                              "patch_size": 8},
                     text_cfg={"width": W, "heads": 2, "layers": 1, "context_length": 77})
    clip_model = build_small_clip("unclip-tiny", **overrides)
    clip_path = export_clip(clip_model, "unclip-tiny", small_clip_config("unclip-tiny", **overrides),
                            root / "clip.pt")
    clip = load_clip("unclip-tiny", checkpoint=clip_path)

    out = {"root": root, "clip": clip, "clip_path": clip_path}
    specs = {
        "prior": ("prior", PRIOR_MODEL, {"steps": SAMPLE_STEPS, "sampler": "ddim", "eta": 0.0, "best_of": 2,
                                         "guidance_scale": 1.0}),
        "decoder": ("decoder", decoder_model("own"), {"steps": SAMPLE_STEPS, "sampler": "ddim", "eta": 0.0,
                                                      "guidance_scale": 2.0, "variation_eta": 0.5}),
        "decoder_clip": ("decoder", decoder_model("clip"), {"steps": SAMPLE_STEPS, "sampler": "ddim", "eta": 0.0,
                                                            "guidance_scale": 2.0}),
        "upsampler": ("upsampler", UPSAMPLER_MODEL, {"steps": SAMPLE_STEPS, "sampler": "ddim", "eta": 0.0}),
    }
    for i, (key, (stage, model_cfg, sample)) in enumerate(specs.items()):
        block = stage_cfg(stage, model_cfg, sample)
        model = perturb_(build(model_cfg), seed=i)
        ema = perturb_(copy.deepcopy(model), seed=100 + i, std=0.01)
        out[key] = write_lightning_ckpt(root / f"{key}.ckpt", run_cfg(clip_path, stage, block), model, ema)
        out[f"{key}_cfg"] = block
    return out


@pytest.fixture(scope="session")
def tiny_pipeline(tiny):
    from unclip_pl.pipeline import UnCLIPPipeline

    return UnCLIPPipeline.from_checkpoints(clip=tiny["clip"], prior=str(tiny["prior"]), decoder=str(tiny["decoder"]),
                                           upsamplers=[str(tiny["upsampler"])], device="cpu",
                                           settings={"decoder": {"invert_steps": SAMPLE_STEPS}})


@pytest.fixture(scope="package", autouse=True)
def _one_thread():
    """Tiny convolutions are many times slower with 2 threads on a busy 2-core machine (thread contention)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
