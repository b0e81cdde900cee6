"""Sampler and guidance tests with analytic denoisers (an oracle for one data point, exact Gaussian-data model)."""
import math

import pytest
import torch

from unclip_pl.diffusion import (
    GaussianDiffusion,
    classifier_free_guidance,
    ddim_invert,
    get_betas,
    sample_ddim,
    sample_ddpm,
    sample_dpmpp_2m,
    space_timesteps,
)

TARGETS = ["eps", "x0", "v"]
SHAPE = (3, 2, 4, 4)


def as_target(diffusion, x, t, x0, target):
    eps = diffusion.eps_from_x0(x, t, x0)
    return {"x0": x0, "eps": eps, "v": diffusion.v_from_x0_eps(x0, eps, t)}[target]


def point_oracle(diffusion, x0_point, target):
    """Exact denoiser for data that always equals x0_point (1, ...); t in ORIGINAL indices of `diffusion`."""
    def model_fn(x, t, **kwargs):
        return as_target(diffusion, x, t, x0_point.to(x.dtype).expand_as(x), target)
    return model_fn


def gaussian_oracle(diffusion, mu, std, target):
    """Exact denoiser for data ~ N(mu, std^2 I): E[x0 | x_t] = mu + a std^2 / (a^2 std^2 + s^2) (x_t - a mu)."""
    def model_fn(x, t, **kwargs):
        abar = diffusion.gather("abar", t, x)
        a = abar.sqrt()
        x0 = mu + a * std ** 2 / (abar * std ** 2 + 1 - abar) * (x - a * mu)
        return as_target(diffusion, x, t, x0, target)
    return model_fn


def gaussian_flow(x, abar_from, abar_to, mu, std):
    """Exact probability-flow ODE map for N(mu, std^2) data: the standardised value is constant along the flow."""
    z = (x - math.sqrt(abar_from) * mu) / math.sqrt(abar_from * std ** 2 + 1 - abar_from)
    return math.sqrt(abar_to) * mu + math.sqrt(abar_to * std ** 2 + 1 - abar_to) * z


SAMPLERS = {
    "ddpm": lambda d, f, x, **kw: sample_ddpm(d, f, x, **kw),
    "ddim0": lambda d, f, x, **kw: sample_ddim(d, f, x, eta=0.0, **kw),
    "ddim1": lambda d, f, x, **kw: sample_ddim(d, f, x, eta=1.0, **kw),
    "dpmpp_2m": lambda d, f, x, **kw: sample_dpmpp_2m(d, f, x, **kw),
}


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("sampler", list(SAMPLERS))
@pytest.mark.parametrize("steps", [None, 20])
def test_point_oracle_recovers_x0(sampler, target, steps):
    d = GaussianDiffusion(get_betas("cosine", 1000), target=target)
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(1, *SHAPE[1:], generator=g) * 2 - 1
    model = point_oracle(d, x0, target)
    xs = []
    out = SAMPLERS[sampler](d, model, SHAPE, steps=steps, generator=g, callback=lambda i, x, p: xs.append(i))
    assert out.shape == SHAPE and out.dtype == torch.float32
    assert torch.allclose(out, x0.expand(SHAPE), atol=1e-3), (out - x0).abs().max()
    assert xs == list(range(steps or 1000))[::-1]


def test_ddpm_gives_data_statistics():
    """Gaussian data + exact denoiser over 50 respaced steps: the means are right; the fixed small (posterior)
    variance under-disperses and the large (beta) variance over-disperses (Improved DDPM, section 3.1)."""
    mu, std = 0.5, 0.3
    stds = {}
    for fixed_var in ("small", "large"):
        d = GaussianDiffusion(get_betas("cosine", 1000), target="eps", fixed_var=fixed_var)
        out = sample_ddpm(d, gaussian_oracle(d, mu, std, "eps"), (2000, 4), steps=50,
                          generator=torch.Generator().manual_seed(0))
        assert out.mean().item() == pytest.approx(mu, abs=0.01)
        stds[fixed_var] = out.std().item()
    assert 0.85 * std < stds["small"] < 0.95 * std and 1.01 * std < stds["large"] < 1.07 * std, stds
    d = GaussianDiffusion(get_betas("cosine", 1000), target="x0")
    ddim = sample_ddim(d, gaussian_oracle(d, mu, std, "x0"), (2000, 4), steps=50, eta=1.0,
                       generator=torch.Generator().manual_seed(1))
    assert ddim.std().item() == pytest.approx(stds["small"], rel=0.03)       # eta = 1 is DDPM (small)


def test_ddim_eta0_is_deterministic():
    d = GaussianDiffusion(get_betas("cosine", 1000), target="v")
    model = gaussian_oracle(d, 0.2, 0.5, "v")
    x_T = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    a = sample_ddim(d, model, x_T, steps=25, generator=torch.Generator().manual_seed(2))
    b = sample_ddim(d, model, x_T.clone(), steps=25, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    c = sample_ddim(d, model, x_T.clone(), steps=25, generator=torch.Generator().manual_seed(3), eta=1.0)
    assert not torch.allclose(a, c)


@pytest.mark.parametrize("target", TARGETS)
def test_ddim_invert_then_sample_recovers_x0(target):
    mu, std = 0.3, 0.5
    d = GaussianDiffusion(get_betas("cosine", 1000), target=target)
    model = gaussian_oracle(d, mu, std, target)
    x0 = mu + std * torch.randn(SHAPE, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    exact_T = gaussian_flow(x0, 1.0, d.alphas_cumprod[-1].item(), mu, std)
    errors = []
    for steps in (50, 250):
        x_T = ddim_invert(d, model, x0, steps=steps)
        back = sample_ddim(d, model, x_T, steps=steps)
        errors.append(((x_T - exact_T).abs().max().item(), (back - x0).abs().max().item()))
    assert errors[1][0] < 0.03 and errors[1][1] < 0.03, errors      # x0 spans about +-1.5
    assert errors[1][0] < errors[0][0] / 4 and errors[1][1] < errors[0][1] / 4, errors   # first-order convergence


def test_dpmpp_2m_solves_the_ode_better_than_ddim():
    mu, std = 0.3, 0.5
    d = GaussianDiffusion(get_betas("cosine", 1000), target="eps")
    model = gaussian_oracle(d, mu, std, "eps")
    x_T = torch.randn(64, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    exact = gaussian_flow(x_T, d.alphas_cumprod[-1].item(), 1.0, mu, std)
    err_dpm = (sample_dpmpp_2m(d, model, x_T, steps=20) - exact).abs().max().item()
    err_ddim = (sample_ddim(d, model, x_T, steps=20) - exact).abs().max().item()
    assert err_dpm < 0.02 and err_dpm < err_ddim / 5, (err_dpm, err_ddim)


def test_sampler_model_calls_use_original_timesteps():
    d = GaussianDiffusion(get_betas("cosine", 1000), target="x0")
    seen = []

    def model_fn(x, t, emb=None):
        assert emb == "cond"
        seen.append(int(t[0]))
        return torch.zeros_like(x)

    sample_dpmpp_2m(d, model_fn, (2, 3), steps=12, model_kwargs={"emb": "cond"})
    assert seen == space_timesteps(1000, 12)[::-1]


def test_denoised_fn_and_clip_applied():
    d = GaussianDiffusion(get_betas("cosine", 1000), target="x0")

    def model(x, t):
        return torch.full_like(x, 3.0)

    out = sample_ddim(d, model, (2, 3), steps=5, clip_denoised=True)
    assert torch.allclose(out, torch.ones(2, 3))
    out = sample_dpmpp_2m(d, model, (2, 3), steps=5, denoised_fn=lambda x0: x0 * 0 - 0.5)
    assert torch.allclose(out, torch.full((2, 3), -0.5))


# ---------------------------------------------------------------- guidance
class CountingModel:
    def __init__(self):
        self.calls = 0

    def __call__(self, x, t, emb, scale_by=1.0):
        self.calls += 1
        out = x * scale_by + emb[:, :, None] + t[:, None, None].float()
        return torch.cat([out, -out], dim=1)            # "variance" channels = second half


@pytest.mark.parametrize("scale", [0.0, 1.0, 3.5])
def test_classifier_free_guidance(scale):
    torch.manual_seed(0)
    x, t = torch.randn(4, 2, 5), torch.randint(0, 1000, (4,))
    c, u = torch.randn(4, 2), torch.zeros(4, 2)
    model = CountingModel()
    out_c, out_u = model(x, t, c, 2.0), model(x, t, u, 2.0)
    model.calls = 0
    guided = classifier_free_guidance(model, scale, {"emb": c}, {"emb": u}, split_channels=2)
    out = guided(x, t, scale_by=2.0)
    assert model.calls == 1
    expect = out_u + scale * (out_c - out_u)
    assert torch.allclose(out[:, :2], expect[:, :2], atol=1e-5)
    assert torch.allclose(out[:, 2:], out_c[:, 2:])                 # variance from the cond branch
    if scale == 1:
        assert torch.equal(out, out_c)
    if scale == 0:
        assert torch.allclose(out[:, :2], out_u[:, :2])


def test_guidance_rejects_mismatched_kwargs():
    model = CountingModel()
    x, t = torch.randn(2, 2, 3), torch.zeros(2, dtype=torch.int64)
    e = torch.zeros(2, 2)
    with pytest.raises(ValueError):
        classifier_free_guidance(model, 2.0, {"emb": e, "scale_by": 1.0}, {"emb": e, "scale_by": 2.0})(x, t)
    with pytest.raises(ValueError):
        classifier_free_guidance(model, 2.0, {"emb": e}, {"emb": e, "scale_by": 2.0})


def test_guided_sampling_runs_with_sampler():
    d = GaussianDiffusion(get_betas("cosine", 1000), target="eps")
    model = CountingModel()
    guided = classifier_free_guidance(lambda x, t, emb: model(x, t, emb)[:, :2], 4.0,
                                      {"emb": torch.ones(2, 2)}, {"emb": torch.zeros(2, 2)})
    out = sample_ddim(d, guided, (2, 2, 3), steps=7, generator=torch.Generator().manual_seed(0))
    assert out.shape == (2, 2, 3) and torch.isfinite(out).all() and model.calls == 7


def test_guidance_concatenates_branch_kwargs_once():
    """The [cond; uncond] kwargs (e.g. a prior's K/V cache) are built once, not at every sampling step."""
    seen = []

    def model(x, t, emb, shift):
        seen.append((emb, shift))
        return x + emb[:, :, None] + shift

    c, u = torch.ones(2, 2), torch.zeros(2, 2)
    guided = classifier_free_guidance(model, 2.0, {"emb": c}, {"emb": u})
    x, t = torch.zeros(2, 2, 3), torch.zeros(2, dtype=torch.int64)
    a = guided(x, t, shift=torch.full((2, 1, 1), 0.5))   # call-time kwargs are shared by both halves
    guided(x, t, shift=torch.full((2, 1, 1), 0.5))
    assert seen[0][0] is seen[1][0] and seen[0][0].shape == (4, 2)
    assert seen[0][1].shape == (4, 1, 1)
    torch.testing.assert_close(a, torch.full((2, 2, 3), 2.5))  # 0.5 + (0 + 2 * (1 - 0))


def test_per_row_generators_make_rows_independent_of_the_batch():
    """step_generator(seeds) gives one stream per row: DDPM row i depends only on seeds[i]."""
    from unclip_pl.diffusion import step_generator

    d = GaussianDiffusion(get_betas("cosine", 1000), target="eps")
    model = lambda x, t: 0.1 * x  # noqa: E731
    x_T = torch.randn(3, 2, 4, generator=torch.Generator().manual_seed(0))
    full = sample_ddpm(d, model, x_T, steps=5, generator=step_generator([7, 8, 9], None, "cpu"))
    alone = sample_ddpm(d, model, x_T[1:2], steps=5, generator=step_generator([8], None, "cpu"))
    torch.testing.assert_close(alone, full[1:2])
    other = sample_ddpm(d, model, x_T[1:2], steps=5, generator=step_generator([5], None, "cpu"))
    assert not torch.allclose(other, full[1:2], atol=1e-3)
    gens = step_generator([1, 2], None, "cpu", per_seed=3)      # best-of-N: N streams per seed
    assert len(gens) == 6 and len(set(gens.row_seeds(4))) == 6
    with pytest.raises(ValueError, match="rows but a batch"):
        sample_ddpm(d, model, x_T, steps=5, generator=step_generator([1], None, "cpu"))


# ------------------------------------------------------------------ the registry
@pytest.mark.parametrize("name", ["ddpm", "ddim", "dpmpp_2m"])
def test_every_registered_sampler_runs_through_the_one_signature(name):
    """get_sampler(name)(diffusion, model_fn, x_T, steps, *, eta, model_kwargs, generator, clip_denoised,
    denoised_fn, progress, callback, device): the same call for every name, the point oracle recovered."""
    from unclip_pl.diffusion import SAMPLERS, get_sampler

    assert list(SAMPLERS) == ["ddpm", "ddim", "dpmpp_2m"] and get_sampler(name) is SAMPLERS[name]
    d = GaussianDiffusion(get_betas("cosine", 1000), target="eps")
    x0 = torch.rand(1, *SHAPE[1:], generator=torch.Generator().manual_seed(0)) * 2 - 1
    oracle = point_oracle(d, x0, "eps")
    kwargs_seen, steps_seen = [], []

    def model_fn(x, t, **kw):
        kwargs_seen.append(kw)
        return oracle(x, t)

    out = get_sampler(name)(d, model_fn, SHAPE, 10, eta=0.5, model_kwargs={"cond": 1},
                            generator=torch.Generator().manual_seed(1), clip_denoised=True, denoised_fn=None,
                            progress=False, callback=lambda i, x, x0: steps_seen.append(i), device="cpu")
    assert out.shape == SHAPE and torch.allclose(out, x0.expand(SHAPE), atol=1e-3)
    assert steps_seen == list(range(10))[::-1] and all(kw == {"cond": 1} for kw in kwargs_seen)


@pytest.mark.parametrize("name", ["euler", "DDIM", None])
def test_unknown_sampler_is_one_line_naming_the_valid_ones(name):
    from unclip_pl.diffusion import get_sampler

    with pytest.raises(ValueError, match=r"^unknown sampler .*; valid choices: ddpm, ddim, dpmpp_2m$") as err:
        get_sampler(name)
    assert "\n" not in str(err.value)


def test_models_look_samplers_up_in_the_registry(monkeypatch):
    """The prior, decoder and upsampler have no sampler copies: they call what the registry holds."""
    from unclip_pl.diffusion import samplers

    called = []
    real = samplers.SAMPLERS["ddim"]
    monkeypatch.setitem(samplers.SAMPLERS, "ddim", lambda *a, **kw: called.append(1) or real(*a, **kw))
    from unclip_pl.models.upsampler import Upsampler
    from unclip_pl.nets.unet import UNet

    unet = UNet(model_channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=[], image_size=16,
                low_res_channels=3)
    up = Upsampler(unet, GaussianDiffusion(get_betas("cosine", 1000)), low_res_size=8).eval()
    up.sample(torch.zeros(1, 3, 8, 8), steps=2, sampler="ddim", eta=0.0, seeds=[0])
    assert called == [1]
    with pytest.raises(ValueError, match="unknown sampler 'euler'"):
        up.sample(torch.zeros(1, 3, 8, 8), steps=2, sampler="euler", eta=0.0)


def test_a_generator_on_another_device_falls_back_to_the_global_rng():
    """step_generator(..., device): a generator that cannot draw on x's device is dropped (None), others kept."""
    from unclip_pl.diffusion import step_generator

    g = torch.Generator()
    assert step_generator(None, g, "cpu") is g and step_generator(None, [g, g], "cpu") == [g, g]
    assert step_generator(None, g, "meta") is None and step_generator(None, [g], "meta") is None
    assert step_generator(None, g) is g
