"""The prior bridge: diffusers' ``PriorTransformer`` (Karlo's structure, reduced size, random weights) and the
converted project prior are the same function (forward, cached forward, sampling with matched schedulers and seeds),
the round trip reproduces every tensor, and the project prior's defaults are untouched by the new options."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate

from unclip_pl.nets.prior import PriorTransformer

diffusers = pytest.importorskip("diffusers", reason="diffusers not installed (pip install -e '.[diffusers]')")

from unclip_pl.convert.prior import check_supported, prior_from_diffusers, prior_to_diffusers  # noqa: E402

#: Karlo's prior structure (kakaobrain/karlo-v1-alpha prior/config.json) at a reduced width and depth.
SMALL = {"num_attention_heads": 4, "attention_head_dim": 8, "num_layers": 2, "embedding_dim": 24,
         "num_embeddings": 12, "additional_embeddings": 4, "dropout": 0.0}
KARLO = {"num_attention_heads": 32, "attention_head_dim": 64, "num_layers": 20, "embedding_dim": 768,
         "num_embeddings": 77, "additional_embeddings": 4, "dropout": 0.0}


def random_prior(config: dict = SMALL, seed: int = 0, std: float = 0.2):
    """A diffusers PriorTransformer with every tensor random (clip_std positive)."""
    torch.manual_seed(seed)
    prior = diffusers.PriorTransformer(**config).eval()
    with torch.no_grad():
        for p in prior.parameters():
            p.normal_(0.0, std)
        prior.clip_std.uniform_(0.5, 1.5)
    return prior


def converted(prior):
    cfg, sd = prior_from_diffusers(prior)
    model = instantiate(cfg, _convert_="partial").eval()
    model.load_state_dict(sd, strict=True)
    return cfg, model


def inputs(config: dict = SMALL, batch: int = 3, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    d, n = config["embedding_dim"], config["num_embeddings"]
    mask = torch.ones(batch, n, dtype=torch.bool)
    for i in range(batch):
        mask[i, 2 + (3 * i) % (n - 2):] = False  # captions of different lengths, padded to n
    return {"x": torch.randn(batch, d, generator=g), "t": torch.randint(0, 1000, (batch,), generator=g),
            "emb": torch.randn(batch, d, generator=g), "hid": torch.randn(batch, n, d, generator=g), "mask": mask}


def test_forward_matches_diffusers():
    prior = random_prior()
    _, model = converted(prior)
    i = inputs()
    with torch.no_grad():
        ref = prior(i["x"], i["t"], proj_embedding=i["emb"], encoder_hidden_states=i["hid"],
                    attention_mask=i["mask"]).predicted_image_embedding
        full = model.net(i["x"], i["t"], text_tokens=i["hid"], text_mask=i["mask"], txt_emb=i["emb"])
        cached = model.net.forward_cached(i["x"], i["t"], **model.net.encode_prefix(i["hid"], i["mask"], i["emb"]))
        lt = int(i["mask"].sum(1).max())  # captions trimmed to the longest one, as the project's CLIP serves them
        trimmed = model.net(i["x"], i["t"], text_tokens=i["hid"][:, :lt], text_mask=i["mask"][:, :lt],
                            txt_emb=i["emb"])
    assert ref.abs().max() > 0.1
    for got in (full, cached, trimmed):
        assert (got - ref).abs().max() <= 1e-4


def test_round_trip_reproduces_every_tensor():
    prior = random_prior(seed=2)
    cfg, model = converted(prior)
    back = prior_to_diffusers(cfg, model.state_dict())
    want, got = prior.state_dict(), back.state_dict()
    assert set(want) == set(got)
    for k in want:
        assert torch.equal(want[k], got[k]), k
    assert dict(back.config)["num_layers"] == SMALL["num_layers"]


def test_clip_stats_become_the_standardisation():
    prior = random_prior(seed=3)
    _, model = converted(prior)
    assert model.normalization == "standardize" and not model.needs_fit
    z = torch.randn(2, SMALL["embedding_dim"])
    torch.testing.assert_close(model.normalize(z) * model.norm_std + model.norm_mean, z)
    torch.testing.assert_close(F.normalize(prior.post_process_latents(model.normalize(z)), dim=-1),
                               model.denormalize(model.normalize(z)))


def test_unsupported_structure_is_one_line():
    with pytest.raises(ValueError) as e:
        check_supported({**SMALL, "norm_in_type": "layer"})
    assert "\n" not in str(e.value) and "norm_in_type" in str(e.value)
    with pytest.raises(ValueError, match="time_embed_dim"):
        check_supported({**SMALL, "time_embed_dim": 7})


def _diffusers_prior_loop(prior, scheduler, steps, guidance, emb, hid, mask, generator):
    """The prior loop of diffusers' ``UnCLIPPipeline.__call__`` (classifier-free guidance with the
    unconditional branch given as an all-zero caption token and z_t, which the converted prior's nulls are)."""
    b, d = emb.shape
    scheduler.set_timesteps(steps)
    latents = torch.randn((b, d), generator=generator) * scheduler.init_noise_sigma
    un_hid, un_mask = torch.zeros_like(hid), torch.zeros_like(mask)
    un_mask[:, 0] = True
    timesteps = scheduler.timesteps
    for i, t in enumerate(timesteps):
        out = prior(torch.cat([latents] * 2), timestep=t, proj_embedding=torch.cat([torch.zeros_like(emb), emb]),
                    encoder_hidden_states=torch.cat([un_hid, hid]),
                    attention_mask=torch.cat([un_mask, mask])).predicted_image_embedding
        uncond, cond = out.chunk(2)
        out = uncond + guidance * (cond - uncond)
        prev = None if i + 1 == len(timesteps) else timesteps[i + 1]
        latents = scheduler.step(out, timestep=t, sample=latents, generator=generator,
                                 prev_timestep=prev).prev_sample
    return prior.post_process_latents(latents)


def _karlo_prior_scheduler(float64: bool = True):
    """Karlo's prior_scheduler. ``float64``: its tables (float32 in diffusers) recomputed in float64 from the same
    schedule: in float32, 1 - alphas_cumprod[0] (about 4e-5) keeps 3 significant digits, which scales the last
    step's x0 by 0.9995 (the project's tables are float64)."""
    scheduler = diffusers.UnCLIPScheduler(variance_type="fixed_small_log", prediction_type="sample",
                                          num_train_timesteps=1000, clip_sample=True, clip_sample_range=5.0)
    if float64:
        from unclip_pl.diffusion import get_betas

        betas = get_betas("cosine", 1000)
        scheduler.betas, scheduler.alphas = betas, 1 - betas
        scheduler.alphas_cumprod, scheduler.one = torch.cumprod(1 - betas, 0), torch.tensor(1.0, dtype=torch.float64)
    return scheduler


def test_sampler_matches_unclip_scheduler_step_by_step():
    """Karlo's prior sampler (UnCLIPScheduler: fixed_small_log, x0 prediction, x0 clipped to [-5, 5], 25 steps) and
    the project's ddpm over 25 respaced steps of its cosine schedule, on a model whose x0 depends strongly on x_t
    (so the start noise, every step's noise and the clipping all show in the result), with the same generator."""
    from unclip_pl.diffusion import GaussianDiffusion, get_betas, sample_ddpm

    def x0_fn(x, t):  # t: original timesteps; values beyond +-5 get clipped
        return 6.0 * torch.tanh(1.5 * x) + t.float()[:, None] / 1000.0

    def diffusers_loop(scheduler):
        scheduler.set_timesteps(25)
        gen = torch.Generator().manual_seed(11)
        x = torch.randn((4, 8), generator=gen)
        steps = scheduler.timesteps
        for i, t in enumerate(steps):
            prev = None if i + 1 == len(steps) else steps[i + 1]
            x = scheduler.step(x0_fn(x, t.expand(4)), timestep=t, sample=x, generator=gen,
                               prev_timestep=prev).prev_sample
        return x

    x, stock = diffusers_loop(_karlo_prior_scheduler()), diffusers_loop(_karlo_prior_scheduler(float64=False))
    diffusion = GaussianDiffusion(get_betas("cosine", 1000), target="x0")
    clip = lambda x0: x0.clamp(-5.0, 5.0)  # noqa: E731
    got = {seed: sample_ddpm(diffusion, x0_fn, (4, 8), 25, generator=torch.Generator().manual_seed(seed),
                             denoised_fn=clip) for seed in (11, 12)}
    assert (got[11] - x).abs().max() <= 1e-4
    assert ((got[11] - stock).abs() / stock.abs().clamp(min=1)).max() <= 1e-3  # the stock float32 scheduler
    assert (got[12] - got[11]).abs().max() > 0.5  # the seed matters here: the comparison is not vacuous


def test_prior_sampling_matches_diffusers_pipeline_loop():
    """The converted prior sampled by the project (ddpm, 25 steps, guidance 4, clip range 5, cached prefix,
    standardisation by clip_mean/clip_std) and diffusers' prior loop with the same seed."""
    prior = random_prior(seed=4, std=0.1)
    _, model = converted(prior)
    i = inputs(batch=2)
    unit = F.normalize(i["emb"], dim=-1)  # the project's z_t is unit norm, fed to the network x sqrt(D)
    d = SMALL["embedding_dim"]
    kwargs = dict(steps=25, sampler="ddpm", eta=0.0, best_of=1)
    with torch.no_grad():
        ref = _diffusers_prior_loop(prior, _karlo_prior_scheduler(), 25, 4.0, unit * math.sqrt(d), i["hid"],
                                    i["mask"], torch.Generator().manual_seed(7))
        got = model.sample(unit, i["hid"], i["mask"], guidance_scale=4.0, generator=torch.Generator().manual_seed(7),
                           **kwargs)
        unguided = model.sample(unit, i["hid"], i["mask"], guidance_scale=1.0,
                                generator=torch.Generator().manual_seed(7), **kwargs)
    assert (got - F.normalize(ref, dim=-1)).abs().max() <= 1e-4
    assert (unguided - got).abs().max() > 1e-2  # guidance (with the nulls) is part of what matched


def _reference_default_forward(net: PriorTransformer, x, t, tok, mask, zt):
    """The project prior's forward as it was before the diffusers options, written out with plain ops (no biases
    in the blocks, tanh GELU, 256 timestep frequencies)."""
    dim, heads = net.dim, net.blocks[0].attn.heads
    half = 128
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half) / half)
    args = t.float()[:, None] * freqs[None]
    temb = net.time_embed.mlp(torch.cat([torch.cos(args), torch.sin(args)], -1))
    lt = tok.shape[1]
    tail = torch.stack([temb, net.x_proj(x), net.query.expand(x.shape[0], -1)], 1) + net.pos_embedding_tail[1:]
    h = torch.cat([net.text_proj(tok) + net.pos_embedding_text[:lt],
                   (net.txt_emb_proj(zt) + net.pos_embedding_tail[0])[:, None], tail], 1)
    s = h.shape[1]
    keys = torch.cat([mask, torch.ones(x.shape[0], 4, dtype=torch.bool)], 1)
    allowed = torch.ones(s, s, dtype=torch.bool).tril()[None] & (keys[:, None, :] | torch.eye(s, dtype=torch.bool))
    for blk in net.blocks:
        y = F.layer_norm(h, (dim,), blk.norm1.weight, blk.norm1.bias)
        q, k, v = (y @ blk.attn.qkv.weight.T).view(*y.shape[:2], 3, heads, dim // heads).permute(2, 0, 3, 1, 4)
        att = (q @ k.transpose(-1, -2)) / math.sqrt(dim // heads)
        att = att.masked_fill(~allowed[:, None], float("-inf")).softmax(-1)
        h = h + ((att @ v).transpose(1, 2).reshape(*y.shape) @ blk.attn.proj.weight.T)
        y = F.layer_norm(h, (dim,), blk.norm2.weight, blk.norm2.bias)
        h = h + F.gelu(y @ blk.mlp[0].weight.T, approximate="tanh") @ blk.mlp[2].weight.T
    return net.out(net.norm_out(h[:, -1]))


def test_project_defaults_unchanged_by_the_new_options():
    torch.manual_seed(0)
    net = PriorTransformer(embed_dim=16, text_width=24, dim=32, depth=2, heads=4, max_text_len=8).eval()
    assert not any(k.endswith(".bias") and ".blocks." in k and "norm" not in k for k in net.state_dict())
    with torch.no_grad():
        for p in net.parameters():  # zero-initialised tensors made random, so every path counts
            p.normal_(0.0, 0.2)
        g = torch.Generator().manual_seed(3)
        x, zt = torch.randn(2, 16, generator=g), torch.randn(2, 16, generator=g)
        tok = torch.randn(2, 8, 24, generator=g)
        t, mask = torch.tensor([3, 900]), torch.tensor([[1] * 8, [1] * 3 + [0] * 5], dtype=torch.bool)
        torch.testing.assert_close(net(x, t, text_tokens=tok, text_mask=mask, txt_emb=zt),
                                   _reference_default_forward(net, x, t, tok, mask, zt), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_full_size_karlo_prior_converts_and_runs():
    """Karlo's full prior (~1 B parameters, about 4 GB in float32 per copy): converted and run once, with the
    diffusers model freed before the project's is built, so at most two copies live at once."""
    prior = diffusers.PriorTransformer(**KARLO).eval()
    with torch.no_grad():
        prior.clip_std.fill_(1.0)
    i = inputs(KARLO, batch=1)
    with torch.no_grad():
        ref = prior(i["x"], i["t"], proj_embedding=i["emb"], encoder_hidden_states=i["hid"],
                    attention_mask=i["mask"]).predicted_image_embedding
    cfg, sd = prior_from_diffusers(prior)
    del prior
    model = instantiate(cfg, _convert_="partial").eval()
    model.load_state_dict(sd, strict=True)
    del sd
    assert sum(p.numel() for p in model.parameters()) > 9e8
    with torch.no_grad():
        got = model.net(i["x"], i["t"], text_tokens=i["hid"], text_mask=i["mask"], txt_emb=i["emb"])
    assert (got - ref).abs().max() <= 1e-4


def test_prior_karlo_config_is_the_converters_shape(tmp_path):
    """`prior=karlo clip=vit_l14` builds the network the converter makes of Karlo's prior config, with its sampler."""
    from omegaconf import OmegaConf

    from tests.helpers import compose
    from unclip_pl.convert.prior import net_kwargs

    cfg = compose(["prior=karlo", "clip=vit_l14"], tmp_path)
    model = OmegaConf.to_container(cfg.prior.module.model, resolve=True)
    net = {k: v for k, v in model.pop("net").items() if k != "_target_"}
    assert net == net_kwargs(KARLO)
    assert model["normalization"] == "standardize" and model["clip_sample_range"] == 5.0
    assert OmegaConf.to_container(cfg.prior.sample) == {"steps": 25, "sampler": "ddpm", "eta": 0.0, "best_of": 1,
                                                        "guidance_scale": 4.0}
