"""Sampling with converted Karlo weights computes what Karlo's pipeline computes.

A random-weight diffusers unCLIP pipeline of Karlo's structure at a tiny size (PriorTransformer, text_proj, decoder
UNet2DConditionModel with learned range, super_res_first / super_res_last, three UnCLIPSchedulers) is saved as a
pipeline folder and converted by ``unclip_pl.convert``'s ``from_diffusers``. The project's ``UnCLIPPipeline`` (the
path ``sample.py`` takes: ``from_checkpoints`` + ``text_to_image``) samples captions with the converted files. On the
diffusers side ``UnCLIPPipeline.__call__``'s loops are run as written there (prior loop with guidance ->
``prior.post_process_latents`` -> ``text_proj`` -> decoder loop with guidance -> clamp -> bicubic upscale ->
super-resolution loop with ``super_res_last`` for the last step -> ``* 0.5 + 0.5``), its text encoder replaced by one
tiny open_clip model that gives both sides their caption encodings: the raw text projection (``text_embeds``), the
final-LayerNorm token states (``last_hidden_state``) and the attention mask of captions padded to the context length,
and the same for the empty caption (the unconditional branch). Both sides get the same starting noise and step noise
(the project's per-seed streams, handed to diffusers' scheduler steps in order). The schedulers' tables are float64,
as the project's (see tests/unit/test_convert_unet.py).
"""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

diffusers = pytest.importorskip("diffusers", reason="diffusers is not installed (pip install -e '.[diffusers]')")

from diffusers.schedulers import scheduling_unclip  # noqa: E402

from unclip_pl.checkpoint import CheckpointError  # noqa: E402
from unclip_pl.clip.frozen import FrozenCLIP  # noqa: E402
from unclip_pl.clip.small import build_small_clip  # noqa: E402
from unclip_pl.clip.text import encode_text_tokens  # noqa: E402
from unclip_pl.convert.__main__ import from_diffusers  # noqa: E402
from unclip_pl.diffusion import get_betas, initial_noise  # noqa: E402
from unclip_pl.diffusion.samplers import SeededNoise  # noqa: E402
from unclip_pl.pipeline import UnCLIPPipeline  # noqa: E402

D, CTX, C, LOW, HIGH = 24, 48, 32, 16, 32  # CLIP width (embedding = text, as Karlo's 768), context, channels, sizes
CAPTIONS, SEEDS = ["a red heart", "a small blue car on a road"], [3, 8]
STEPS = {"prior": 4, "decoder": 3, "super_res": 3}
GUIDANCE = {"prior": 4.0, "decoder": 8.0}


def text_proj_class():
    try:
        from diffusers.pipelines.unclip.text_proj import UnCLIPTextProjModel
    except ImportError:          # diffusers >= 0.33 keeps unCLIP under pipelines.deprecated
        from diffusers.pipelines.deprecated.unclip.text_proj import UnCLIPTextProjModel
    return UnCLIPTextProjModel


def karlo_components(seed: int = 0) -> dict[str, torch.nn.Module]:
    """Karlo's components (no CLIP encoders), reduced: 2 levels of 32/64 channels, 1 layer, 16 px -> 32 px."""
    torch.manual_seed(seed)
    levels = dict(block_out_channels=(C, 2 * C), layers_per_block=1)
    comps = {
        "prior": diffusers.PriorTransformer(num_attention_heads=2, attention_head_dim=12, num_layers=2,
                                            embedding_dim=D, num_embeddings=77, additional_embeddings=4),
        "text_proj": text_proj_class()(clip_extra_context_tokens=4, clip_embeddings_dim=D, time_embed_dim=4 * C,
                                       cross_attention_dim=CTX),
        "decoder": diffusers.UNet2DConditionModel(
            sample_size=LOW, in_channels=3, out_channels=6, **levels, resnet_time_scale_shift="scale_shift",
            down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
            up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
            mid_block_type="UNetMidBlock2DSimpleCrossAttn", attention_head_dim=16, cross_attention_dim=CTX,
            class_embed_type="identity"),
    }
    for name in ("super_res_first", "super_res_last"):
        comps[name] = diffusers.UNet2DModel(sample_size=HIGH, in_channels=6, out_channels=3, **levels,
                                            down_block_types=("ResnetDownsampleBlock2D",) * 2,
                                            up_block_types=("ResnetUpsampleBlock2D",) * 2, add_attention=False)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for module in comps.values():  # zero-initialised layers made random, so every tensor counts
            for p in module.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=g))
        comps["prior"].clip_mean.normal_(0.0, 0.3, generator=g)
        comps["prior"].clip_std.uniform_(0.5, 1.5, generator=g)
    return {k: v.eval() for k, v in comps.items()}


SCHEDULERS = {"prior_scheduler": dict(variance_type="fixed_small_log", prediction_type="sample", clip_sample=True,
                                      clip_sample_range=5.0),
              "decoder_scheduler": dict(variance_type="learned_range", prediction_type="epsilon"),
              "super_res_scheduler": dict(variance_type="fixed_small_log", prediction_type="epsilon")}


def save_pipeline(folder, comps) -> None:
    for name, module in comps.items():
        module.save_pretrained(folder / name)
    for name, kw in SCHEDULERS.items():
        diffusers.UnCLIPScheduler(**kw).save_pretrained(folder / name)
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "UnCLIPPipeline"}))


def float64_scheduler(folder, name: str, steps: int):
    """The folder's scheduler with its tables recomputed in float64 (the project's cosine schedule, 1000 steps)."""
    scheduler = diffusers.UnCLIPScheduler.from_pretrained(str(folder / name))
    betas = get_betas("cosine", 1000)
    scheduler.betas, scheduler.alphas = betas, 1.0 - betas
    scheduler.alphas_cumprod, scheduler.one = torch.cumprod(1.0 - betas, 0), torch.tensor(1.0, dtype=torch.float64)
    scheduler.set_timesteps(steps)
    return scheduler


@pytest.fixture(scope="module")
def tiny_clip() -> FrozenCLIP:
    """One tiny random open_clip model with Karlo's proportions, giving CLIP's raw projections."""
    torch.manual_seed(0)
    model = build_small_clip("unclip-tiny", embed_dim=D, vision_cfg={"image_size": 32, "width": 32, "layers": 1,
                                                                     "head_width": 16, "patch_size": 8},
                             text_cfg={"width": D, "heads": 2, "layers": 2, "context_length": 77})
    return FrozenCLIP(model, model_name="unclip-tiny", normalize=False)


@pytest.fixture(scope="module")
def karlo(tmp_path_factory, tiny_clip):
    """{"comps", "folder", "files"}: the diffusers components, their pipeline folder and the converted files."""
    root = tmp_path_factory.mktemp("karlo_sampling")
    comps = karlo_components()
    save_pipeline(root / "pipe", comps)
    files = from_diffusers(root / "pipe", root / "out")
    return {"comps": comps, "folder": root / "pipe", "files": files}


def text_model_output(clip: FrozenCLIP, captions: list[str]):
    """What Karlo's pipeline reads from its text encoder: (text_embeds (B, D) raw, last_hidden_state (B, 77, D),
    attention mask (B, 77) bool) of the captions padded to the context length (no trimming)."""
    tokens = torch.as_tensor(clip.tokenizer(captions), dtype=torch.long)
    assert tokens.shape[1] == 77
    pooled, states, mask = encode_text_tokens(clip.model, tokens, trim=False)
    return pooled.float(), states.float(), mask


class InjectedNoise:
    """diffusers' ``randn_tensor`` inside ``UnCLIPScheduler.step``, replaced by the given draws in order."""

    def __init__(self):
        self.queue: list[torch.Tensor] = []

    def __call__(self, shape, generator=None, device=None, dtype=None, **_):
        draw = self.queue.pop(0)
        assert tuple(draw.shape) == tuple(shape)
        return draw.to(dtype=dtype)


def step_noise(seeds, stage: str, shape, steps: int) -> list[torch.Tensor]:
    """The project's ddpm step noise of ``stage`` in the order diffusers draws it: step k (k = 0 the noisiest) is
    respaced index steps - 1 - k; the last step (t = 0) draws none."""
    source = SeededNoise(seeds, stage)
    probe = torch.empty(len(seeds), *shape)
    return [source(probe, steps - 1 - k) for k in range(steps - 1)]


@torch.no_grad()
def diffusers_unclip(folder, comps, clip: FrozenCLIP, captions, seeds, noise: InjectedNoise):
    """``UnCLIPPipeline.__call__`` (prior -> text_proj -> decoder -> super-resolution), its text encoder given by
    ``clip``. Returns (image embeddings (B, D), images (B, 3, HIGH, HIGH) in [0, 1])."""
    b = len(captions)
    emb, hid, mask = text_model_output(clip, captions)
    u_emb, u_hid, u_mask = text_model_output(clip, [""] * b)
    prompt_embeds, hidden, text_mask = torch.cat([u_emb, emb]), torch.cat([u_hid, hid]), torch.cat([u_mask, mask])

    prior, scheduler = comps["prior"], float64_scheduler(folder, "prior_scheduler", STEPS["prior"])
    latents = initial_noise((b, D), "cpu", seeds=seeds, stage="prior") * scheduler.init_noise_sigma
    noise.queue = step_noise(seeds, "prior", (D,), STEPS["prior"])
    timesteps = scheduler.timesteps
    for i, t in enumerate(timesteps):
        pred = prior(torch.cat([latents] * 2), timestep=t, proj_embedding=prompt_embeds,
                     encoder_hidden_states=hidden, attention_mask=text_mask).predicted_image_embedding
        uncond, cond = pred.chunk(2)
        pred = uncond + GUIDANCE["prior"] * (cond - uncond)
        prev = None if i + 1 == len(timesteps) else timesteps[i + 1]
        latents = scheduler.step(pred, timestep=t, sample=latents, generator=None, prev_timestep=prev).prev_sample
    image_embeddings = prior.post_process_latents(latents.float())

    text_proj = comps["text_proj"]
    dec_hidden, additive = text_proj(image_embeddings=image_embeddings, prompt_embeds=prompt_embeds,
                                     text_encoder_hidden_states=hidden, do_classifier_free_guidance=True)
    dec_mask = F.pad(text_mask, (text_proj.clip_extra_context_tokens, 0), value=True)
    scheduler = float64_scheduler(folder, "decoder_scheduler", STEPS["decoder"])
    x = initial_noise((b, 3, LOW, LOW), "cpu", seeds=seeds, stage="decoder")
    noise.queue = step_noise(seeds, "decoder", (3, LOW, LOW), STEPS["decoder"])
    timesteps = scheduler.timesteps
    for i, t in enumerate(timesteps):
        out = comps["decoder"](sample=torch.cat([x.float()] * 2), timestep=t, encoder_hidden_states=dec_hidden,
                               class_labels=additive, attention_mask=dec_mask).sample
        out_u, out_c = out.chunk(2)
        eps_u, (eps_c, var) = out_u[:, :3], out_c.split(3, dim=1)
        guided = torch.cat([eps_u + GUIDANCE["decoder"] * (eps_c - eps_u), var], dim=1)
        prev = None if i + 1 == len(timesteps) else timesteps[i + 1]
        x = scheduler.step(guided, t, x, prev_timestep=prev, generator=None).prev_sample
    small = x.float().clamp(-1, 1)

    scheduler = float64_scheduler(folder, "super_res_scheduler", STEPS["super_res"])
    x = initial_noise((b, 3, HIGH, HIGH), "cpu", seeds=seeds, stage="upsampler0")
    noise.queue = step_noise(seeds, "upsampler0", (3, HIGH, HIGH), STEPS["super_res"])
    up = F.interpolate(small, size=[HIGH, HIGH], mode="bicubic", align_corners=False, antialias=True)
    timesteps = scheduler.timesteps
    for i, t in enumerate(timesteps):
        unet = comps["super_res_last"] if i == len(timesteps) - 1 else comps["super_res_first"]
        pred = unet(sample=torch.cat([x.float(), up], dim=1), timestep=t).sample
        prev = None if i + 1 == len(timesteps) else timesteps[i + 1]
        x = scheduler.step(pred, t, x, prev_timestep=prev, generator=None).prev_sample
    assert not noise.queue            # every injected draw was used, in order
    return image_embeddings, (x.float() * 0.5 + 0.5).clamp(0, 1)


def project_pipeline(karlo, clip: FrozenCLIP) -> UnCLIPPipeline:
    """sample.py's path: the converted files, each stage's stored settings with the steps made small."""
    files = karlo["files"]
    settings = {"prior": {"steps": STEPS["prior"]}, "decoder": {"steps": STEPS["decoder"]},
                "upsamplers": [{"steps": STEPS["super_res"]}]}
    return UnCLIPPipeline.from_checkpoints(clip=clip, prior=str(files["prior.pt"]), decoder=str(files["decoder.pt"]),
                                           upsamplers=[str(files[f"upsampler_{HIGH}.pt"])], settings=settings)


@torch.no_grad()
def test_converted_karlo_samples_what_the_unclip_pipeline_samples(karlo, tiny_clip, monkeypatch):
    noise = InjectedNoise()
    monkeypatch.setattr(scheduling_unclip, "randn_tensor", noise)
    ref_emb, ref = diffusers_unclip(karlo["folder"], karlo["comps"], tiny_clip, CAPTIONS, SEEDS, noise)

    pipe = project_pipeline(karlo, tiny_clip)
    assert pipe.prior.uncond == "empty_caption" and not pipe.prior.unit_norm
    assert pipe.settings.prior.guidance_scale == GUIDANCE["prior"]
    assert pipe.settings.decoder.guidance_scale == GUIDANCE["decoder"]
    images, z_i = pipe.text_to_image(CAPTIONS, 1, SEEDS, return_embeddings=True)
    ours = images * 0.5 + 0.5
    assert ours.shape == ref.shape == (2, 3, HIGH, HIGH)
    assert ref.std() > 0.05 and (ref[0] - ref[1]).abs().max() > 0.05   # the images carry signal
    # measured: 3e-6 (embeddings, of magnitude ~2) and 8e-6 (images), float32 rounding
    assert (z_i - ref_emb).abs().max() <= 1e-4, (z_i - ref_emb).abs().max()
    assert (ours - ref).abs().max() <= 1e-4, (ours - ref).abs().max()
    other = pipe.text_to_image([CAPTIONS[0], "a green tree"], 1, SEEDS) * 0.5 + 0.5
    assert (other[0] - ref[0]).abs().max() <= 1e-4 and (other[1] - ref[1]).abs().max() > 0.05  # captions count

    # the matched pieces matter: unit-norm embeddings or the learned nulls would give other embeddings
    pipe.prior.uncond = "learned"
    learned = pipe.prior_embeddings(CAPTIONS, SEEDS)
    pipe.prior.uncond = "empty_caption"
    assert (learned - ref_emb).abs().max() > 1e-2
    unit = FrozenCLIP(tiny_clip.model, model_name="unclip-tiny")
    with pytest.raises(CheckpointError, match="normalize: false"):
        project_pipeline(karlo, unit)
    with pytest.raises(CheckpointError, match="decoder checkpoint .* raw CLIP projections"):
        UnCLIPPipeline.from_checkpoints(clip=unit, decoder=str(karlo["files"]["decoder.pt"]))
    with pytest.raises(ValueError, match="clip.loader.normalize=false"):
        UnCLIPPipeline(unit, pipe.prior, pipe.decoder, settings={"decoder": {"steps": 1, "sampler": "ddpm",
                                                                             "eta": 0.0, "guidance_scale": 1.0}})


def test_the_converted_files_store_karlos_conditioning(karlo):
    from unclip_pl.checkpoint import load_stage

    prior = load_stage(str(karlo["files"]["prior.pt"]), which="ema", stage="prior")
    assert prior.model.uncond == "empty_caption" and prior.model.unit_norm is False
    for name in ("prior.pt", "decoder.pt", f"upsampler_{HIGH}.pt"):
        stage = load_stage(str(karlo["files"][name]), which="ema")
        assert stage.clip["loader"]["normalize"] is False and stage.clip["loader"]["model_name"] == "ViT-L-14-quickgelu"
