"""The pretrained CLIP presets (``clip=vit_b32|vit_l14|vit_h14``, and ``clip=pretrained``): each composes with a stage,
sets the dimensions open_clip reports for its model, names a pretrained tag open_clip knows, and offline without
cached weights fails at once with the message that says how to pass a local file."""

from __future__ import annotations

import open_clip
import pytest
from omegaconf import OmegaConf

from tests.helpers import compose
from unclip_pl.clip.frozen import CLIPLoadError, FrozenCLIP, check_expect, load_clip

PRESETS = ("vit_b32", "vit_l14", "vit_h14", "pretrained")
DIMS = ("embed_dim", "text_width", "context_length", "image_size")


def _clip_block(preset: str, tmp_path) -> dict:
    cfg = compose(["prior=diffusion", f"clip={preset}"], tmp_path)
    net = OmegaConf.to_container(cfg.prior.module.model.net, resolve=True)
    block = OmegaConf.to_container(cfg.clip, resolve=True)
    assert (net["embed_dim"], net["text_width"], net["max_text_len"]) == (
        block["embed_dim"], block["text_width"], block["context_length"])
    return block


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_dims_are_open_clips(preset, tmp_path):
    block = _clip_block(preset, tmp_path)
    name, tag = block["loader"]["model_name"], block["loader"]["pretrained"]
    model_cfg = open_clip.get_model_config(name)
    assert (block["embed_dim"], block["text_width"], block["context_length"], block["image_size"]) == (
        model_cfg["embed_dim"], model_cfg["text_cfg"]["width"], model_cfg["text_cfg"]["context_length"],
        model_cfg["vision_cfg"]["image_size"])
    pcfg = open_clip.get_pretrained_cfg(name, tag)
    assert pcfg, f"{tag} is not an open_clip tag of {name}"
    # weights trained with QuickGELU need an architecture with it (what a local file of them is built as)
    assert bool(pcfg.get("quick_gelu", False)) == bool(model_cfg.get("quick_gelu", False))
    assert block["autotrain"] is False and block["train"] is None


def test_vit_b32_built_by_open_clip_has_the_preset_dims(tmp_path):
    block = _clip_block("vit_b32", tmp_path)
    model = open_clip.create_model(block["loader"]["model_name"], pretrained=None)  # random weights
    check_expect(FrozenCLIP(model, model_name="ViT-B-32"), **{k: block[k] for k in DIMS})


def test_pretrained_is_the_vit_b32_preset(tmp_path):
    a, b = _clip_block("pretrained", tmp_path), _clip_block("vit_b32", tmp_path)
    assert a["loader"] == b["loader"] and all(a[k] == b[k] for k in DIMS)


@pytest.mark.parametrize("preset", PRESETS)
def test_offline_fails_at_once_naming_a_local_file(preset, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    loader = _clip_block(preset, tmp_path)["loader"]
    with pytest.raises(CLIPLoadError) as e:
        load_clip(loader["model_name"], pretrained=loader["pretrained"], cache_dir=str(tmp_path / "empty_cache"))
    msg = str(e.value)
    assert "\n" not in msg and "clip.loader.checkpoint=/path/to/weights" in msg and loader["model_name"] in msg
