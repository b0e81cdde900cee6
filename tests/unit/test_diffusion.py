"""Unit tests of the diffusion maths: schedules, forward process, posterior, conversions, losses, respacing."""
import math

import pytest
import torch

from unclip_pl.diffusion import GaussianDiffusion, get_betas, space_timesteps

TARGETS = ["eps", "x0", "v"]


def coefs(diffusion, t):
    abar = diffusion.alphas_cumprod[t]
    return abar.sqrt(), (1 - abar).sqrt()


# ---------------------------------------------------------------- schedules
def test_cosine_schedule_values():
    betas = get_betas("cosine", 1000)
    assert betas.dtype == torch.float64 and betas.shape == (1000,)
    assert betas.max() <= 0.999 and betas.min() > 0
    abar = torch.cumprod(1 - betas, 0)
    assert (abar[1:] < abar[:-1]).all() and abar[0] <= 1 and abar[-1] > 0
    # alpha_bar(t) follows the continuous cosine curve away from the clipped end
    u = torch.tensor([0.25, 0.5]) .double()
    f = torch.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2 / math.cos(0.008 / 1.008 * math.pi / 2) ** 2
    assert torch.allclose(abar[[249, 499]], f, rtol=1e-6)


def test_linear_schedule_scaled():
    b = get_betas("linear", 1000)
    assert b.dtype == torch.float64
    assert b[0].item() == pytest.approx(1e-4) and b[-1].item() == pytest.approx(2e-2)
    b = get_betas("linear", 250)
    assert b[0].item() == pytest.approx(4e-4) and b[-1].item() == pytest.approx(8e-2)


def test_unknown_schedule_names_choices():
    with pytest.raises(ValueError, match="cosine.*linear"):
        get_betas("quadratic")


def test_bad_constructor_args():
    b = get_betas("cosine", 10)
    with pytest.raises(ValueError, match="eps"):
        GaussianDiffusion(b, target="score")
    with pytest.raises(ValueError):
        GaussianDiffusion(b, loss="hybrid")             # hybrid needs learn_sigma


# ---------------------------------------------------------------- forward process and posterior
def test_q_sample_statistics():
    d = GaussianDiffusion(get_betas("cosine", 1000))
    torch.manual_seed(0)
    n = 200_000
    x0 = torch.full((n, 1), 0.7)
    for step in (0, 300, 700, 999):
        t = torch.full((n,), step, dtype=torch.int64)
        xt = d.q_sample(x0, t)
        a, s = coefs(d, step)
        assert xt.mean().item() == pytest.approx(a.item() * 0.7, abs=4 * s.item() / math.sqrt(n) + 1e-6)
        assert xt.std().item() == pytest.approx(s.item(), rel=0.01)


def test_q_sample_shapes_and_dtypes():
    d = GaussianDiffusion(get_betas("cosine", 50))
    t = torch.tensor([0, 49])
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        x0 = torch.randn(2, 3, 4, 4, dtype=dtype)
        assert d.q_sample(x0, t).dtype == dtype and d.q_sample(x0, t).shape == x0.shape
    assert d.q_sample(torch.randn(2, 8), t).shape == (2, 8)


def test_posterior_matches_bayes():
    d = GaussianDiffusion(get_betas("cosine", 100))
    torch.manual_seed(0)
    x0, xt = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)
    t = torch.tensor([1, 10, 50, 98, 99])
    mean, var, log_var = d.q_posterior_mean_variance(x0, xt, t)
    beta, abar_prev = d.betas[t][:, None], d.alphas_cumprod[t - 1][:, None]
    prec = (1 - beta) / beta + 1 / (1 - abar_prev)
    ref_mean = ((1 - beta).sqrt() * xt / beta + abar_prev.sqrt() * x0 / (1 - abar_prev)) / prec
    assert torch.allclose(mean, ref_mean, atol=1e-10)
    assert torch.allclose(var, 1 / prec, rtol=1e-10)
    assert torch.allclose(log_var, torch.log(1 / prec), rtol=1e-10)
    # at t = 0 the posterior mean is x0 itself
    mean0, _, _ = d.q_posterior_mean_variance(x0, xt, torch.zeros(5, dtype=torch.int64))
    assert torch.allclose(mean0, x0)


def oracle_for_point(diffusion, x0_point, target):
    """model_fn returning the exact target for data that is always x0_point (B, ...); t in ORIGINAL indices."""
    def model_fn(x, t, **kwargs):
        x0 = x0_point.to(x.dtype).expand_as(x)
        eps = diffusion.eps_from_x0(x, t, x0)
        return {"x0": x0, "eps": eps, "v": diffusion.v_from_x0_eps(x0, eps, t)}[target]
    return model_fn


@pytest.mark.parametrize("target", TARGETS)
def test_posterior_mean_of_x0_oracle(target):
    d = GaussianDiffusion(get_betas("cosine", 200), target=target)
    torch.manual_seed(0)
    x0 = torch.randn(1, 3, 4, 4, dtype=torch.float64).expand(4, -1, -1, -1)
    t = torch.tensor([0, 5, 100, 150])
    xt = d.q_sample(x0, t)
    out = d.p_mean_variance(oracle_for_point(d, x0[:1], target), xt, t)
    ref, _, _ = d.q_posterior_mean_variance(x0, xt, t)
    assert torch.allclose(out["x0"], x0, atol=1e-8)
    assert torch.allclose(out["mean"], ref, atol=1e-8)
    assert out["var"].shape == (4, 1, 1, 1)


def test_conversions_round_trip():
    d = GaussianDiffusion(get_betas("cosine", 1000))
    torch.manual_seed(0)
    x0, eps = torch.randn(6, 2, 3, dtype=torch.float64), torch.randn(6, 2, 3, dtype=torch.float64)
    t = torch.tensor([0, 1, 200, 500, 900, 998])
    xt = d.q_sample(x0, t, eps)
    v = d.v_from_x0_eps(x0, eps, t)
    assert torch.allclose(d.x0_from_eps(xt, t, eps), x0, atol=1e-8)
    assert torch.allclose(d.eps_from_x0(xt, t, x0), eps, atol=1e-8)
    assert torch.allclose(d.x0_from_v(xt, t, v), x0, atol=1e-10)
    assert torch.allclose(d.eps_from_v(xt, t, v), eps, atol=1e-10)
    for target, out in (("eps", eps), ("x0", x0), ("v", v)):
        dt = GaussianDiffusion(d.betas, target=target)
        assert torch.allclose(dt.predict_x0(out, xt, t), x0, atol=1e-8)
        assert torch.allclose(dt.predict_eps(out, xt, t), eps, atol=1e-8)
        assert torch.allclose(dt.predict_v(out, xt, t), v, atol=1e-8)
        assert torch.allclose(dt.training_target(x0, eps, t), out)


def test_learned_variance_interpolates():
    d = GaussianDiffusion(get_betas("cosine", 100), learn_sigma=True, loss="hybrid")
    xt, t = torch.randn(2, 3, 4, 4), torch.tensor([10, 60])
    for v, name in ((-1.0, "post_log_var"), (1.0, "log_betas")):
        out = d.p_mean_variance(lambda x, t, v=v: torch.cat([x, torch.full_like(x, v)], 1), xt, t)
        assert torch.allclose(out["log_var"], d.gather(name, t, xt).expand_as(xt), atol=1e-6)
        assert out["mean"].shape == xt.shape


def test_fixed_large_variance():
    d = GaussianDiffusion(get_betas("cosine", 100), fixed_var="large")
    out = d.p_mean_variance(lambda x, t: x, torch.randn(2, 3), torch.tensor([0, 50]))
    assert out["var"][1].item() == pytest.approx(d.betas[50].item(), rel=1e-6)
    assert out["var"][0].item() == pytest.approx(d.posterior_variance[1].item(), rel=1e-6)


# ---------------------------------------------------------------- losses
@pytest.mark.parametrize("target", TARGETS)
def test_training_loss_zero_for_exact_target(target):
    d = GaussianDiffusion(get_betas("cosine", 100), target=target)
    torch.manual_seed(0)
    x0, noise = torch.randn(4, 2, 4, 4), torch.randn(4, 2, 4, 4)
    t = d.sample_timesteps(4, "cpu")
    exact = d.training_target(x0, noise, t)
    losses = d.training_losses(lambda x, tt: exact, x0, t, noise=noise)
    assert losses["loss"].shape == (4,) and torch.allclose(losses["loss"], torch.zeros(4), atol=1e-10)
    wrong = d.training_losses(lambda x, tt: exact + 1, x0, t, noise=noise)
    assert torch.allclose(wrong["mse"], torch.ones(4))


def test_min_snr_weight_is_one_x0_space_weight_for_every_target():
    """Min-SNR-gamma: for the same x0 estimate, the weighted loss of every target is min(SNR_t, gamma) times the
    x0-space squared error, and the plain MSE is left unweighted."""
    gamma = 5.0
    torch.manual_seed(0)
    x0 = torch.rand(6, 3, 4, 4) * 2 - 1
    noise = torch.randn_like(x0)
    t = torch.tensor([0, 5, 100, 400, 800, 999])
    x0_hat = x0 + 0.3 * torch.randn_like(x0)
    ref = GaussianDiffusion(get_betas("cosine", 1000))
    abar = ref.alphas_cumprod[t].float()
    snr = abar / (1 - abar)
    x0_err = ((x0_hat - x0) ** 2).reshape(6, -1).mean(1)
    expected = snr.clamp(max=gamma) * x0_err
    assert (snr > gamma).any() and (snr < gamma).any()     # both sides of the cap are exercised
    for target in TARGETS:
        d = GaussianDiffusion(get_betas("cosine", 1000), target=target, loss_weight="min_snr", min_snr_gamma=gamma)
        a, s = abar.sqrt()[:, None, None, None], (1 - abar).sqrt()[:, None, None, None]
        xt = a * x0 + s * noise
        eps_hat = (xt - a * x0_hat) / s
        pred = {"eps": eps_hat, "x0": x0_hat, "v": a * eps_hat - s * x0_hat}[target]
        losses = d.training_losses(lambda x, tt, p=pred: p, x0, t, noise=noise)
        assert torch.allclose(losses["loss"], expected, rtol=1e-3, atol=1e-6), target
        plain = GaussianDiffusion(get_betas("cosine", 1000), target=target).training_losses(
            lambda x, tt, p=pred: p, x0, t, noise=noise)
        assert torch.allclose(losses["mse"], plain["mse"]) and torch.equal(plain["loss"], plain["mse"])
    assert d.respaced(10).loss_weight == "min_snr"
    with pytest.raises(ValueError, match="min_snr"):
        GaussianDiffusion(get_betas("cosine", 10), loss_weight="snr")
    with pytest.raises(ValueError, match="min_snr_gamma"):
        GaussianDiffusion(get_betas("cosine", 10), loss_weight="min_snr", min_snr_gamma=0)


def test_hybrid_loss_finite_and_vb_stops_mean_gradient():
    d = GaussianDiffusion(get_betas("cosine", 1000), learn_sigma=True, loss="hybrid")
    torch.manual_seed(0)
    x0 = torch.rand(8, 3, 8, 8) * 2 - 1
    t = torch.tensor([0, 1, 2, 10, 300, 600, 998, 999])
    raw = torch.randn(8, 6, 8, 8).mul(0.5).requires_grad_()
    losses = d.training_losses(lambda x, tt: raw, x0, t)
    assert set(losses) == {"loss", "mse", "vb"}
    assert torch.isfinite(losses["loss"]).all() and (losses["vb"] >= 0).all()
    (g_vb,) = torch.autograd.grad(losses["vb"].sum(), raw, retain_graph=True)
    assert g_vb[:, :3].abs().max() == 0 and g_vb[:, 3:].abs().max() > 0
    (g_mse,) = torch.autograd.grad(losses["mse"].sum(), raw)
    assert g_mse[:, 3:].abs().max() == 0 and g_mse[:, :3].abs().max() > 0


def test_hybrid_loss_float32_under_autocast():
    d = GaussianDiffusion(get_betas("cosine", 1000), learn_sigma=True, loss="hybrid")
    x0 = torch.rand(4, 3, 8, 8) * 2 - 1
    net = torch.nn.Conv2d(3, 6, 1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = d.training_losses(lambda x, t: net(x), x0, torch.tensor([0, 5, 500, 999]))
    assert losses["loss"].dtype == torch.float32 and torch.isfinite(losses["loss"]).all()
    losses["loss"].mean().backward()
    assert torch.isfinite(net.weight.grad).all()


def test_sample_timesteps():
    d = GaussianDiffusion(get_betas("linear", 100))
    t = d.sample_timesteps(5000, "cpu", generator=torch.Generator().manual_seed(0))
    assert t.dtype == torch.int64 and t.shape == (5000,) and t.min() == 0 and t.max() == 99


# ---------------------------------------------------------------- respacing
def test_space_timesteps():
    s = space_timesteps(1000, 64)
    assert len(s) == 64 and s[0] == 0 and s[-1] == 999 and s == sorted(set(s))
    assert space_timesteps(1000, "25") == space_timesteps(1000, 25)
    assert space_timesteps(1000, 1000) == list(range(1000))
    assert space_timesteps(1000, "ddim50") == list(range(0, 1000, 20))
    assert space_timesteps(10, [9, 0, 4]) == [0, 4, 9]
    for bad in (0, 1001, "ddim999", "fast", [10]):
        with pytest.raises(ValueError):
            space_timesteps(10 if bad == [10] else 1000, bad)


@pytest.mark.parametrize("spec", [10, "ddim25", [0, 3, 500, 999]])
def test_respaced_alphas_match(spec):
    d = GaussianDiffusion(get_betas("cosine", 1000), target="v")
    r = d.respaced(spec)
    keep = space_timesteps(1000, spec)
    assert r.num_steps == len(keep) and r.target == "v"
    assert torch.allclose(r.alphas_cumprod, d.alphas_cumprod[keep], rtol=0, atol=0)
    assert r.timestep_map.tolist() == keep
    assert d.respaced(spec) is r                        # cached
    # respacing a respaced schedule composes the maps
    rr = r.respaced([0, len(keep) - 1])
    assert rr.timestep_map.tolist() == [keep[0], keep[-1]]
    assert torch.allclose(rr.alphas_cumprod, d.alphas_cumprod[[keep[0], keep[-1]]], rtol=1e-12)


def test_respaced_model_gets_original_timesteps():
    d = GaussianDiffusion(get_betas("cosine", 1000), target="x0")
    r = d.respaced(8)
    seen = []

    def model_fn(x, t):
        seen.append(t.tolist())
        return torch.zeros_like(x)

    r.p_mean_variance(model_fn, torch.randn(2, 3), torch.tensor([0, 7]))
    r.training_losses(model_fn, torch.randn(2, 3), torch.tensor([3, 5]))
    keep = space_timesteps(1000, 8)
    assert seen == [[0, 999], [keep[3], keep[5]]]
