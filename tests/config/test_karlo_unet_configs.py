"""decoder=karlo and upsampler=karlo_256 are the networks the U-Net bridge builds for Karlo's published diffusers
configs (kakaobrain/karlo-v1-alpha: decoder, text_proj, super_res_first/last), with the pipeline's sampler defaults;
they compose with clip=vit_l14 and instantiate (at a tiny size here; full size in the slow tests)."""
from __future__ import annotations

import inspect

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from tests.helpers import compose
from unclip_pl.convert.unet import DECODER_SAMPLE, SUPERRES_SAMPLE, decoder_net_config, superres_net_config
from unclip_pl.nets.unet import UNet

# Karlo's configs as diffusers' conversion of the original checkpoints builds them (the rest are class defaults).
KARLO_DECODER = dict(
    sample_size=64, in_channels=3, out_channels=6, layers_per_block=3, block_out_channels=(320, 640, 960, 1280),
    down_block_types=("ResnetDownsampleBlock2D",) + ("SimpleCrossAttnDownBlock2D",) * 3,
    up_block_types=("SimpleCrossAttnUpBlock2D",) * 3 + ("ResnetUpsampleBlock2D",),
    mid_block_type="UNetMidBlock2DSimpleCrossAttn", cross_attention_dim=1536, class_embed_type="identity",
    attention_head_dim=64, resnet_time_scale_shift="scale_shift")
KARLO_TEXT_PROJ = dict(clip_extra_context_tokens=4, clip_embeddings_dim=768, time_embed_dim=1280,
                       cross_attention_dim=1536)
KARLO_SUPERRES = dict(
    sample_size=256, in_channels=6, out_channels=3, layers_per_block=3, block_out_channels=(320, 640, 960, 1280),
    down_block_types=("ResnetDownsampleBlock2D",) * 4, up_block_types=("ResnetUpsampleBlock2D",) * 4,
    add_attention=False)

# what the stage configs add for training (memory, data corruption), not part of the network's function
TRAINING_ONLY = {"use_checkpoint", "degradation"}


def _plain(block) -> dict:
    return OmegaConf.to_container(block, resolve=True)


_UNET_DEFAULTS = {k: p.default for k, p in inspect.signature(UNet).parameters.items()
                  if p.default is not inspect.Parameter.empty}


def _without(d, keys=TRAINING_ONLY):
    """d without the training-only keys, and U-Net blocks without the keys left at the U-Net's defaults."""
    if isinstance(d, dict):
        unet = d.get("_target_") == "unclip_pl.nets.unet.UNet"
        return {k: _without(v) for k, v in d.items() if k not in keys
                and not (unet and k in _UNET_DEFAULTS and _same(v, _UNET_DEFAULTS[k]))}
    return d


def _same(a, b) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return list(a) == list(b)
    return a == b


def test_decoder_karlo_is_the_converted_network(tmp_path):
    cfg = compose(["decoder=karlo", "clip=vit_l14"], tmp_path)
    model = _plain(cfg.decoder.module.model)
    want = decoder_net_config(KARLO_DECODER, KARLO_TEXT_PROJ)
    assert _without(model) == _without(want)
    assert _plain(cfg.decoder.sample) == DECODER_SAMPLE
    assert cfg.decoder.text_source == "clip"


def test_upsampler_karlo_256_is_the_converted_pair(tmp_path):
    cfg = compose(["upsampler=karlo_256"], tmp_path)
    model = _plain(cfg.upsampler.module.model)
    want = superres_net_config(KARLO_SUPERRES, KARLO_SUPERRES, low_res_size=64)
    assert _without(model) == _without(want)
    assert model["unet"] == model["last_unet"]
    assert _plain(cfg.upsampler.sample) == SUPERRES_SAMPLE


TINY_UNET = ["model_channels=32", "channel_mult=[1,2]", "num_res_blocks=1", "use_checkpoint=false"]


@torch.no_grad()
def test_karlo_stages_instantiate_and_run_at_a_tiny_size(tmp_path):
    dec_over = [f"decoder.module.model.unet.{o}" for o in TINY_UNET] + [
        "decoder.module.model.unet.attention_resolutions=[32]", "decoder.module.model.unet.context_dim=64",
        "decoder.module.model.unet.num_head_channels=16"]
    cfg = compose(["decoder=karlo", "clip=vit_l14", *dec_over], tmp_path / "d")
    dec = instantiate(cfg.decoder.module.model).eval()
    assert dec.takes_text_emb and dec.clip_scale == 1.0 and dec.diffusion.learn_sigma
    B, S = 2, 5
    out = dec.unet(torch.randn(B, 3, 64, 64), torch.tensor([0, 999]), clip_emb=torch.randn(B, 768),
                   context=torch.randn(B, S, 768), context_mask=torch.ones(B, S, dtype=torch.bool),
                   text_emb=torch.randn(B, 768))
    assert out.shape == (B, 6, 64, 64)

    up_over = [f"upsampler.module.model.{net}.{o}" for net in ("unet", "last_unet") for o in TINY_UNET]
    cfg = compose(["upsampler=karlo_256", *up_over, "upsampler.image_size=64", "upsampler.low_res_size=16"],
                  tmp_path / "u")
    up = instantiate(cfg.upsampler.module.model).eval()
    assert up.last_unet is not None and not any(p.requires_grad for p in up.last_unet.parameters())
    assert all(p.requires_grad for p in up.unet.parameters())
    x = up.sample(torch.rand(1, 3, 16, 16) * 2 - 1, steps=2, sampler="ddpm", eta=0.0,
                  generator=torch.Generator().manual_seed(0))
    assert x.shape == (1, 3, 64, 64) and x.abs().max() <= 1


def test_decoder_karlo_trains_and_samples_through_its_module(tmp_path):
    """DecoderModule gives a Karlo-layout decoder CLIP's text embedding and the empty caption's encoding (as the
    dropped caption in training, and as the unconditional branch of the validation grid's guidance)."""
    import pytorch_lightning as pl
    from torch.utils.data import DataLoader

    from unclip_pl.clip.frozen import FrozenCLIP
    from unclip_pl.clip.small import build_small_clip

    width = 32
    clip = FrozenCLIP(build_small_clip(embed_dim=width, vision_cfg={"width": 32, "layers": 1, "head_width": 16},
                                       text_cfg={"width": width, "layers": 1, "heads": 2, "context_length": 16}))
    over = [f"decoder.module.model.unet.{o}" for o in TINY_UNET] + [
        "decoder.module.model.unet.attention_resolutions=[32]", "decoder.module.model.unet.context_dim=64",
        "decoder.module.model.unet.num_head_channels=16", "decoder.image_size=32", f"clip.embed_dim={width}",
        f"clip.text_width={width}", "clip.context_length=16", "decoder.module.num_grid_items=2",
        "decoder.module.channels_last=false", "decoder.sample.steps=2"]
    cfg = compose(["decoder=karlo", *over], tmp_path)
    module = instantiate(cfg.decoder.module, clip=clip)
    g = torch.Generator().manual_seed(0)
    tokens = torch.zeros(4, 16, dtype=torch.long)
    tokens[:, 0], tokens[:, 1:4], tokens[:, 4] = 49406, torch.randint(1, 49000, (4, 3), generator=g), 49407
    data = [{"image": torch.rand(3, 32, 32, generator=g) * 2 - 1, "img_emb": torch.randn(width, generator=g),
             "tokens": tokens[i]} for i in range(4)]
    trainer = pl.Trainer(accelerator="cpu", max_steps=2, limit_val_batches=1, val_check_interval=2,
                         num_sanity_val_steps=0, logger=False, default_root_dir=tmp_path, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    loader = DataLoader(data, batch_size=2)
    trainer.fit(module, loader, loader)
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    text = module._text(tokens[:2])
    assert set(text) == {"text", "text_emb", "uncond_text"} and text["uncond_text"][1].sum() == 2  # start, end
    assert module.sample_grid_items().shape == (2, 3, 32, 32)
