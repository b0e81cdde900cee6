"""Samplers: small pure functions over a GaussianDiffusion and a `model_fn(x, t, **model_kwargs)`.

Every sampler has one signature, ``sample_fn(diffusion, model_fn, x_T, steps=None, *, eta=0.0, model_kwargs=None,
generator=None, clip_denoised=False, denoised_fn=None, progress=False, callback=None, device=None) -> x_0``, and is
looked up by name in :data:`SAMPLERS` / :func:`get_sampler` (the models and the pipeline do).

Common arguments:
    diffusion: the training GaussianDiffusion (or an already respaced one).
    model_fn: network function; receives ORIGINAL timestep indices (respacing maps them).
    x_T: starting noise (B, C, ...) or a shape tuple (then drawn with `generator` on `device`).
    steps: respacing spec for `diffusion.respaced` (int, "ddimN", list); None = the diffusion's own steps.
    eta: DDIM's noise scale (0 = deterministic); accepted and unused by ddpm and dpmpp_2m.
    model_kwargs: conditioning passed as model_fn(x, t, **model_kwargs).
    generator: torch.Generator for every random draw (must live on x's device); or, with x_T given as a tensor, a
        list of B generators, one per row, or the :class:`SeededNoise` of :func:`step_generator`, whose row i's step
        noise at step i depends only on that row's seed and the step (:func:`initial_noise` draws x_T per row from
        seeds; both derive their seeds with ``unclip_pl.diffusion.seeds.derive_seed``).
    clip_denoised: clamp the predicted x0 to [-1, 1]; denoised_fn: hook x0 -> x0 applied after it.
    progress: show a tqdm bar; callback: called as callback(i, x, x0) after each step, with i the step index
        in the respaced schedule (counting down), x the new sample and x0 the prediction used for it.
"""
import math
from collections.abc import Callable, Sequence

import torch

from .gaussian import GaussianDiffusion
from .seeds import row_seeds


def _schedule(diffusion: GaussianDiffusion, steps) -> GaussianDiffusion:
    return diffusion if steps is None else diffusion.respaced(steps)


def _initial_noise(x_T, generator, device, dtype=torch.float32) -> torch.Tensor:
    if isinstance(x_T, torch.Tensor):
        return x_T
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ValueError("per-row step noise needs x_T as a tensor: draw it with initial_noise(shape, seeds=...)")
    if device is None:
        device = generator.device if generator is not None else "cpu"
    return torch.randn(tuple(x_T), generator=generator, device=device, dtype=dtype)


def initial_noise(shape: Sequence[int], device, dtype=torch.float32, generator: torch.Generator | None = None,
                  seeds: Sequence[int] | None = None, stage: str = "decoder", per_seed: int = 1) -> torch.Tensor:
    """x_T (B, ...). With ``seeds``: row ``i * per_seed + j`` (item i, best-of-N candidate j; B = len(seeds) *
    per_seed) is drawn on the CPU from ``derive_seed(seeds[i], "<stage>/x_T/<j>")`` (``seeds.row_seeds``), so it
    depends only on seeds[i] and not on the device. Else one draw from ``generator`` (on ``generator``'s device,
    moved to ``device``), else from the global RNG."""
    if seeds is not None:
        if len(seeds) * per_seed != shape[0]:
            raise ValueError(f"got {len(seeds)} seeds x {per_seed} per seed for a batch of {shape[0]}")
        return torch.stack([torch.randn(tuple(shape[1:]), generator=torch.Generator().manual_seed(s))
                            for s in row_seeds(seeds, stage, "x_T", per_seed)]).to(device=device, dtype=dtype)
    if generator is not None:
        return torch.randn(tuple(shape), generator=generator, device=generator.device).to(device=device, dtype=dtype)
    return torch.randn(tuple(shape), device=device, dtype=dtype)


class SeededNoise:
    """Step noise of the stochastic samplers (ddpm, ddim with eta > 0) drawn per row and per step from seeds:
    row r's noise at sampler step i (its index in the respaced schedule) comes from a generator on x's device seeded
    with ``derive_seed(seed_r, "<stage>/noise/<j>", i)``. So a row's noise depends only on its own seed, never on
    the rest of the batch, the order of draws or another stream (it is never x_T again)."""

    def __init__(self, seeds: Sequence[int], stage: str = "decoder", per_seed: int = 1):
        self.seeds = [int(s) for s in seeds]
        self.stage, self.per_seed = stage, int(per_seed)
        self.rows = len(self.seeds) * self.per_seed
        self._generators: dict[torch.device, list[torch.Generator]] = {}

    def __len__(self) -> int:
        return self.rows

    def row_seeds(self, step: int) -> list[int]:
        """The rows' generator seeds at sampler step ``step``."""
        return row_seeds(self.seeds, self.stage, "noise", self.per_seed, step)

    def __call__(self, x: torch.Tensor, step: int) -> torch.Tensor:
        """Standard normal noise shaped like x (B, ...) for sampler step ``step``."""
        if x.shape[0] != self.rows:
            raise ValueError(f"seeded step noise for {self.rows} rows but a batch of {x.shape[0]}")
        gens = self._generators.setdefault(x.device, [torch.Generator(device=x.device) for _ in range(self.rows)])
        return torch.stack([torch.randn(x.shape[1:], generator=g.manual_seed(s), device=x.device, dtype=x.dtype)
                            for g, s in zip(gens, self.row_seeds(step))])


def step_generator(seeds: Sequence[int] | None, generator: torch.Generator | None, device=None,
                   per_seed: int = 1, stage: str = "decoder") -> "SeededNoise | torch.Generator | None":
    """The step-noise source of the stochastic samplers (ddpm, ddim with eta > 0), passed as their ``generator``.

    With ``seeds``: a :class:`SeededNoise` of ``len(seeds) * per_seed`` rows, row ``i * per_seed + j`` from
    (seeds[i], stage, candidate j, step), drawn on x's device. Else ``generator`` (one stream for the batch, or a
    list of one per row), else None (the global RNG). With ``device`` given (x's device), a ``generator`` on another
    device gives None: the samplers draw step noise on x's device, and a CPU generator cannot draw on CUDA."""
    if seeds is not None:
        return SeededNoise(seeds, stage, per_seed)
    first = generator[0] if isinstance(generator, (list, tuple)) and generator else generator
    if device is not None and isinstance(first, torch.Generator) and first.device != torch.device(device):
        return None
    return generator


def _step_noise(x: torch.Tensor, generator, step: int) -> torch.Tensor:
    """Standard normal noise shaped like x for sampler step ``step``: from a :class:`SeededNoise`, from one
    generator per row, or from one generator (or the global RNG) for the batch."""
    if isinstance(generator, SeededNoise):
        return generator(x, step)
    if isinstance(generator, (list, tuple)):
        if len(generator) != x.shape[0]:
            raise ValueError(f"{len(generator)} per-row generators for a batch of {x.shape[0]}")
        return torch.stack([torch.randn(x.shape[1:], generator=g, device=x.device, dtype=x.dtype) for g in generator])
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


def _indices(n: int, progress: bool, reverse: bool = True):
    indices = list(range(n))[::-1] if reverse else list(range(n))
    if progress:
        from tqdm.auto import tqdm
        return tqdm(indices)
    return indices


def _t(i: int, x: torch.Tensor) -> torch.Tensor:
    return torch.full((x.shape[0],), i, dtype=torch.int64, device=x.device)


@torch.no_grad()
def sample_ddpm(diffusion: GaussianDiffusion, model_fn, x_T, steps=None, *, eta: float = 0.0, model_kwargs=None,
                generator=None, clip_denoised=False, denoised_fn=None, progress=False, callback=None,
                device=None) -> torch.Tensor:
    """Ancestral sampling x_{t-1} ~ p(x_{t-1} | x_t) (DDPM, Ho et al. 2020, Algorithm 2), over a respaced schedule
    as in Improved DDPM (Nichol & Dhariwal 2021, section 4). Variance: fixed small/large or learned. ``eta`` is
    unused (the step noise is the model's variance). Returns x_0 (B, C, ...)."""
    diff = _schedule(diffusion, steps)
    x = _initial_noise(x_T, generator, device)
    for i in _indices(diff.num_steps, progress):
        out = diff.p_mean_variance(model_fn, x, _t(i, x), clip_denoised, model_kwargs, denoised_fn)
        if i > 0:
            x = out["mean"] + torch.exp(0.5 * out["log_var"]) * _step_noise(x, generator, i)
        else:
            x = out["mean"]
        if callback is not None:
            callback(i, x, out["x0"])
    return x


@torch.no_grad()
def sample_ddim(diffusion: GaussianDiffusion, model_fn, x_T, steps=None, *, eta: float = 0.0, model_kwargs=None,
                generator=None, clip_denoised=False, denoised_fn=None, progress=False, callback=None,
                device=None) -> torch.Tensor:
    """DDIM (Song et al. 2021, eq. 12 with sigma_t(eta) of eq. 16):
    x_prev = sqrt(abar_prev) x0 + sqrt(1 - abar_prev - sigma^2) eps + sigma z,
    sigma = eta sqrt((1 - abar_prev) / (1 - abar)) sqrt(1 - abar / abar_prev).
    eta = 0 is deterministic (probability-flow ODE), eta = 1 matches DDPM ancestral sampling.
    Returns x_0 (B, C, ...)."""
    diff = _schedule(diffusion, steps)
    x = _initial_noise(x_T, generator, device)
    for i in _indices(diff.num_steps, progress):
        t = _t(i, x)
        pred = diff.model_predictions(model_fn, x, t, clip_denoised, model_kwargs, denoised_fn)
        abar, abar_prev = diff.gather("abar", t, x), diff.gather("abar_prev", t, x)
        x = abar_prev.sqrt() * pred["x0"]
        if eta > 0 and i > 0:
            sigma = eta * ((1 - abar_prev) / (1 - abar) * (1 - abar / abar_prev)).sqrt()
            x = (x + (1 - abar_prev - sigma ** 2).clamp(min=0).sqrt() * pred["eps"]
                 + sigma * _step_noise(x, generator, i))
        else:
            x = x + (1 - abar_prev).sqrt() * pred["eps"]
        if callback is not None:
            callback(i, x, pred["x0"])
    return x


@torch.no_grad()
def ddim_invert(diffusion: GaussianDiffusion, model_fn, x0: torch.Tensor, steps=None, *, model_kwargs=None,
                clip_denoised=False, denoised_fn=None, progress=False, callback=None) -> torch.Tensor:
    """Deterministic DDIM run backwards, data -> noise (Song et al. 2021, section 4.3; Dhariwal & Nichol 2021,
    appendix): the Euler step of the probability-flow ODE in (x / a, s / a) coordinates,
    x_next / a_next = x / a + eps(x) (s_next / a_next - s / a), from clean data up to the last step T'-1,
    evaluating the network at the current level (step i-1 for the move to step i; step 0 for the first move).
    `sample_ddim(eta=0)` with the same `steps` maps the result back to x0 up to discretisation error.
    Returns x_T (B, C, ...)."""
    diff = _schedule(diffusion, steps)
    x = x0
    for i in _indices(diff.num_steps, progress, reverse=False):
        pred = diff.model_predictions(model_fn, x, _t(max(i - 1, 0), x), clip_denoised, model_kwargs, denoised_fn)
        # for i > 0 the network sees x at its own level, so (x0, eps) satisfy x = a x0 + s eps exactly;
        # for i == 0 x is clean data (a = 1, s = 0), so x0 = x and only eps comes from the network at step 0
        x0_hat = x if i == 0 else pred["x0"]
        abar_next = diff.gather("abar", _t(i, x), x)
        x = abar_next.sqrt() * x0_hat + (1 - abar_next).sqrt() * pred["eps"]
        if callback is not None:
            callback(i, x, x0_hat)
    return x


@torch.no_grad()
def sample_dpmpp_2m(diffusion: GaussianDiffusion, model_fn, x_T, steps=None, *, eta: float = 0.0,
                    model_kwargs=None, generator=None, clip_denoised=False, denoised_fn=None, progress=False,
                    callback=None, device=None) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++", Algorithm 2), multistep second order, data (x0) prediction,
    in the discrete-time VP form: alpha_i = sqrt(abar_i), sigma_i = sqrt(1 - abar_i), lambda_i = log(alpha_i/sigma_i).
    Each step from level i to the next lower one (h = lambda_next - lambda_i):
        x_next = (sigma_next / sigma_i) x - alpha_next expm1(-h) D,
        D = x0_i (first step) or (1 + 1/(2r)) x0_i - 1/(2r) x0_prev with r = h_prev / h.
    The first step and the last two (into the lowest kept step, then to clean data, sigma = 0, which returns that
    step's x0) are first order ("lower_order_final" of the DPM-Solver code): with an evenly strided cosine schedule
    the last lambda gaps are several times the previous ones, and extrapolating x0 over them overshoots.
    Deterministic (``eta`` and ``generator`` are unused); good samples in 15-25 steps. Returns x_0 (B, C, ...)."""
    diff = _schedule(diffusion, steps)
    x = _initial_noise(x_T, generator, device)
    abar = diff.alphas_cumprod.tolist()
    alpha = [math.sqrt(a) for a in abar]
    sigma = [math.sqrt(1 - a) for a in abar]
    lam = [math.log(a) - math.log(s) for a, s in zip(alpha, sigma)]
    x0_prev, h_prev = None, None
    for i in _indices(diff.num_steps, progress):
        pred = diff.model_predictions(model_fn, x, _t(i, x), clip_denoised, model_kwargs, denoised_fn)
        x0 = pred["x0"]
        if i == 0:                                   # to sigma = 0: x_next = x0 exactly
            x = x0
        else:
            h = lam[i - 1] - lam[i]
            if x0_prev is None or i == 1:
                d = x0
            else:
                r = h_prev / h
                d = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * x0_prev
            x = (sigma[i - 1] / sigma[i]) * x - alpha[i - 1] * math.expm1(-h) * d
            x0_prev, h_prev = x0, h
        if callback is not None:
            callback(i, x, x0)
    return x


Sampler = Callable[..., torch.Tensor]

#: The samplers by name, all with the signature of the module docstring.
SAMPLERS: dict[str, Sampler] = {"ddpm": sample_ddpm, "ddim": sample_ddim, "dpmpp_2m": sample_dpmpp_2m}


def get_sampler(name: str) -> Sampler:
    """The sampler called ``name`` (a key of :data:`SAMPLERS`); an unknown name is a one-line ValueError."""
    if not isinstance(name, str) or name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; valid choices: {', '.join(SAMPLERS)}")
    return SAMPLERS[name]
