"""Seeded sampling noise: every stream (stage x purpose x candidate x step) gets its own seed, from one rule."""
import itertools

import pytest
import torch

from unclip_pl.diffusion import GaussianDiffusion, get_betas, initial_noise, sample_ddim, sample_ddpm, step_generator

SHAPE = (3, 8, 8)
STEPS = 5


def first_step_noise(sampler: str, seeds, shape=SHAPE):
    """(x_T, z): the seeded starting noise of ``seeds`` and the step noise z the sampler drew at its first step,
    recovered from the step's output (model eps = 0, so the step is mean + std * z with known mean and std)."""
    d = GaussianDiffusion(get_betas("cosine", 1000), target="eps")
    model = lambda x, t: torch.zeros_like(x)  # noqa: E731
    x_T = initial_noise((len(seeds), *shape), "cpu", seeds=seeds)
    seen = []
    callback = lambda i, x, x0: seen.append(x.clone())  # noqa: E731
    gen = step_generator(list(seeds), None, "cpu")
    r = d.respaced(STEPS)
    t = torch.full((len(seeds),), STEPS - 1, dtype=torch.int64)
    if sampler == "ddpm":
        sample_ddpm(d, model, x_T, steps=STEPS, generator=gen, callback=callback)
        out = r.p_mean_variance(model, x_T, t)
        mean, std = out["mean"], torch.exp(0.5 * out["log_var"])
    else:
        eta = 1.0
        sample_ddim(d, model, x_T, steps=STEPS, generator=gen, callback=callback, eta=eta)
        abar, abar_prev = r.gather("abar", t, x_T), r.gather("abar_prev", t, x_T)
        std = eta * ((1 - abar_prev) / (1 - abar) * (1 - abar / abar_prev)).sqrt()
        mean = abar_prev.sqrt() * x_T / abar.sqrt()               # eps = 0: x0 = x_T / a, no eps term
    return x_T, (seen[0] - mean) / std


@pytest.mark.parametrize("sampler", ["ddpm", "ddim_eta1"])
def test_first_step_noise_is_not_the_starting_noise_for_seed_0(sampler):
    x_T, z = first_step_noise(sampler, [0])
    assert z.std() > 0.5                                  # it is noise (recovered correctly), ...
    assert not torch.allclose(z, x_T, atol=1e-3)          # ... but not x_T again
    assert abs(torch.corrcoef(torch.stack([z.flatten(), x_T.flatten()]))[0, 1]) < 0.3


def test_no_seeds_starting_noise_reappears_as_any_seeds_step_noise():
    seeds = list(range(16))
    x_T, z = first_step_noise("ddpm", seeds)
    x, z = x_T.flatten(1), z.flatten(1)
    corr = (x - x.mean(1, keepdim=True)) @ (z - z.mean(1, keepdim=True)).T / (x.std(1)[:, None] * z.std(1)[None])
    corr = corr / (x.shape[1] - 1)                        # (16, 16) correlations of x_T rows with step-noise rows
    assert corr.abs().max() < 0.5, corr.abs().max()


def test_derived_seeds_are_distinct_over_stages_purposes_candidates_seeds_and_steps():
    from unclip_pl.diffusion import derive_seed, stream_name

    stages, purposes = ["prior", "decoder", "upsampler0", "upsampler1"], ["x_T", "noise"]
    keys = list(itertools.product(range(16), stages, purposes, range(2), range(6)))
    seeds = [derive_seed(s, stream_name(stage, p, j), step) for s, stage, p, j, step in keys]
    assert len(set(seeds)) == len(keys)
    assert all(0 <= s < 2 ** 63 for s in seeds)
    # the rule is a pure function of (seed, stream, step): the same key gives the same seed
    assert derive_seed(3, "decoder/noise/0", 2) == derive_seed(3, "decoder/noise/0", 2)
    # the seeds the old arithmetic made equal are distinct: seed 0's x_T and its first step noise, and
    # seed s of one stage and seed s + 2**32 of the stage "below" it
    assert derive_seed(0, stream_name("decoder", "x_T"), 0) != derive_seed(0, stream_name("decoder", "noise"), 0)
    assert derive_seed(2 ** 32, stream_name("decoder", "x_T")) != derive_seed(0, stream_name("prior", "x_T"))
    with pytest.raises(ValueError, match="purpose"):
        stream_name("decoder", "steps")


def test_seeded_noise_depends_on_seed_stage_candidate_and_step_only():
    from unclip_pl.diffusion import SeededNoise

    x = torch.zeros(4, *SHAPE)
    a = SeededNoise([5, 6], "prior", per_seed=2)
    n3 = a(x, 3)
    assert torch.equal(a(x, 3), n3)                                   # no hidden generator state between calls
    assert torch.equal(SeededNoise([6], "prior", per_seed=2)(x[:2], 3), n3[2:])   # not the batch
    assert not torch.allclose(a(x, 2), n3, atol=1e-3)                 # another step, other noise
    assert not torch.allclose(n3[0], n3[1], atol=1e-3)                # the two candidates of one seed differ
    assert not torch.allclose(SeededNoise([5, 6], "decoder", per_seed=2)(x, 3), n3, atol=1e-3)
    with pytest.raises(ValueError, match="rows"):
        a(torch.zeros(3, *SHAPE), 0)


def test_initial_noise_per_seed_candidates():
    x = initial_noise((4, 2, 3), "cpu", seeds=[1, 2], stage="prior", per_seed=2)
    assert torch.equal(initial_noise((2, 2, 3), "cpu", seeds=[2], stage="prior", per_seed=2), x[2:])
    assert not torch.allclose(x[0], x[1], atol=1e-3)
    assert not torch.allclose(initial_noise((4, 2, 3), "cpu", seeds=[1, 2], stage="decoder", per_seed=2), x,
                              atol=1e-3)
    with pytest.raises(ValueError, match="seeds"):
        initial_noise((3, 2, 3), "cpu", seeds=[1, 2], per_seed=2)
