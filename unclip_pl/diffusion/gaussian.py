"""Gaussian diffusion maths (DDPM, Ho et al. 2020; Improved DDPM, Nichol & Dhariwal 2021).

No learnable parameters. Schedules are float64 tensors on the CPU; per-timestep coefficients are gathered from
per-device float32 (or float64) copies and cast to the dtype of x. Every model call goes through
`model_fn(x, t, **model_kwargs)` with `t` int64 (B,) in the ORIGINAL 0..T-1 indexing, even after respacing.

Notation: abar_t = prod_{s<=t} (1 - beta_s), a_t = sqrt(abar_t), s_t = sqrt(1 - abar_t),
x_t = a_t x0 + s_t eps, v = a_t eps - s_t x0 (Salimans & Ho 2022).
"""
import math

import torch

from .respace import space_timesteps

TARGETS = ("eps", "x0", "v")
LOSSES = ("mse", "hybrid")
FIXED_VARS = ("small", "large")
LOSS_WEIGHTS = ("none", "min_snr")


def mean_flat(x: torch.Tensor) -> torch.Tensor:
    """Mean over all but the batch dimension: (B, ...) -> (B,)."""
    return x.reshape(x.shape[0], -1).mean(dim=1)


def normal_kl(mean1, logvar1, mean2, logvar2) -> torch.Tensor:
    """Elementwise KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))) in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def discretized_gaussian_log_likelihood(x, mean, log_var, bin_width: float = 2.0 / 255) -> torch.Tensor:
    """Elementwise log-probability (nats) of 8-bit data x in [-1, 1] under a Gaussian discretised into bins.

    The edge bins (x = -1 and x = 1) extend to -inf and +inf (DDPM, section 3.3).
    """
    inv_std = torch.exp(-0.5 * log_var)
    z_plus = (x - mean + bin_width / 2) * inv_std
    z_minus = (x - mean - bin_width / 2) * inv_std
    log_cdf_plus = torch.special.log_ndtr(z_plus)
    log_sf_minus = torch.special.log_ndtr(-z_minus)
    log_delta = torch.log((torch.special.ndtr(z_plus) - torch.special.ndtr(z_minus)).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_sf_minus, log_delta))


class GaussianDiffusion:
    """Forward process, posterior, parameterisation conversions, reverse-step means/variances and training losses.

    Args:
        betas: (T,) noise schedule (any float dtype; stored as float64).
        target: what the network predicts: "eps" (noise), "x0" (clean data) or "v" (a_t eps - s_t x0).
        learn_sigma: the network outputs 2C channels on dim 1: the target, then v in [-1, 1] interpolating the
            log-variance between the posterior variance and beta_t (Improved DDPM eq. 15).
        loss: "mse" (on the target) or "hybrid" (mse + VLB term for the variance, needs learn_sigma).
        timestep_map: (T,) original timestep index of each step (set by `respaced`); None = identity.
        fixed_var: variance used when not learn_sigma: "small" = posterior variance beta~_t, "large" = beta_t.
        loss_weight: per-sample weight of the target MSE. "none": 1 (the plain DDPM objective). "min_snr":
            Min-SNR-gamma (Hang et al. 2023), the x0-space weight min(SNR_t, gamma) expressed for the target:
            min(SNR, gamma) / SNR for eps, min(SNR, gamma) / (SNR + 1) for v, min(SNR, gamma) for x0, with
            SNR_t = abar_t / (1 - abar_t). It caps the weight of the nearly clean steps, which dominate x0-space
            error but teach little, so training spends more of its signal on the noisy steps that set the layout.
        min_snr_gamma: gamma of "min_snr" (the paper's 5).
    """

    def __init__(self, betas, target: str = "eps", learn_sigma: bool = False, loss: str = "mse",
                 timestep_map=None, fixed_var: str = "small", loss_weight: str = "none",
                 min_snr_gamma: float = 5.0):
        if target not in TARGETS:
            raise ValueError(f"unknown target {target!r}; valid choices: {', '.join(TARGETS)}")
        if loss not in LOSSES:
            raise ValueError(f"unknown loss {loss!r}; valid choices: {', '.join(LOSSES)}")
        if fixed_var not in FIXED_VARS:
            raise ValueError(f"unknown fixed_var {fixed_var!r}; valid choices: {', '.join(FIXED_VARS)}")
        if loss_weight not in LOSS_WEIGHTS:
            raise ValueError(f"unknown loss_weight {loss_weight!r}; valid choices: {', '.join(LOSS_WEIGHTS)}")
        if loss_weight != "none" and float(min_snr_gamma) <= 0:
            raise ValueError(f"min_snr_gamma must be > 0, got {min_snr_gamma}")
        if (loss == "hybrid") != bool(learn_sigma):
            raise ValueError("loss='hybrid' and learn_sigma=True go together: the learned variance is trained "
                             "only by the VLB term of the hybrid loss")
        betas = torch.as_tensor(betas, dtype=torch.float64).flatten().cpu()
        if betas.numel() < 1 or not bool(((betas > 0) & (betas <= 1)).all()):
            raise ValueError("betas must be a non-empty 1-d tensor with values in (0, 1]")
        self.target, self.learn_sigma, self.loss_type, self.fixed_var = target, bool(learn_sigma), loss, fixed_var
        self.loss_weight, self.min_snr_gamma = loss_weight, float(min_snr_gamma)
        self.num_steps = T = betas.numel()
        if timestep_map is None:
            self.timestep_map = None
        else:
            self.timestep_map = torch.as_tensor(timestep_map, dtype=torch.int64).flatten().cpu()
            if self.timestep_map.numel() != T:
                raise ValueError(f"timestep_map has {self.timestep_map.numel()} entries for {T} steps")
        self._setup(betas, torch.cumprod(1 - betas, dim=0))
        self._respaced_cache: dict = {}

    def _setup(self, betas: torch.Tensor, abar: torch.Tensor):
        """Fill the float64 coefficient tables from betas (T,) and alphas_cumprod (T,)."""
        T = betas.numel()
        abar_prev = torch.cat([abar.new_ones(1), abar[:-1]])
        post_var = betas * (1 - abar_prev) / (1 - abar)                    # beta~_t; 0 at t=0
        post_var_floor = post_var[1] if T > 1 else betas[0]                # log(0) is -inf: use beta~_1 at t=0
        log_post_var = torch.log(torch.cat([post_var_floor.reshape(1), post_var[1:]]))
        large_var = torch.cat([post_var_floor.reshape(1), betas[1:]])
        self.betas, self.alphas_cumprod, self.alphas_cumprod_prev = betas, abar, abar_prev
        self.posterior_variance = post_var
        self._buffers = {
            "betas": betas,
            "log_betas": torch.log(betas),
            "abar": abar,
            "abar_prev": abar_prev,
            "sqrt_abar": abar.sqrt(),
            "sqrt_1m_abar": (1 - abar).sqrt(),
            "sqrt_recip_abar": abar.rsqrt(),
            "sqrt_recipm1_abar": (1 / abar - 1).sqrt(),
            "post_var": post_var,
            "post_log_var": log_post_var,
            "post_coef_x0": betas * abar_prev.sqrt() / (1 - abar),
            "post_coef_xt": (1 - abar_prev) * (1 - betas).sqrt() / (1 - abar),
            "large_var": large_var,
            "large_log_var": torch.log(large_var),
            "snr": abar / (1 - abar),
        }
        self._device_cache: dict = {}

    def __repr__(self):
        return (f"GaussianDiffusion(num_steps={self.num_steps}, target={self.target!r}, "
                f"learn_sigma={self.learn_sigma}, loss={self.loss_type!r}, fixed_var={self.fixed_var!r}, "
                f"loss_weight={self.loss_weight!r}, respaced={self.timestep_map is not None})")

    # ------------------------------------------------------------------ coefficient lookup
    def _table(self, name: str, device, dtype) -> torch.Tensor:
        key = (torch.device(device), dtype)
        tables = self._device_cache.get(key)
        if tables is None:
            tables = {k: v.to(device=device, dtype=dtype) for k, v in self._buffers.items()}
            if self.timestep_map is not None:
                tables["timestep_map"] = self.timestep_map.to(device)
            self._device_cache[key] = tables
        return tables[name]

    def gather(self, name: str, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Coefficient `name` at timesteps t (B,), shaped (B, 1, ..., 1) to broadcast against x, in x's dtype."""
        table_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        table = self._table(name, x.device, table_dtype)
        out = table[t.to(x.device)].to(x.dtype)
        return out.reshape(t.shape[0], *([1] * (x.ndim - 1)))

    def model_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        """Map step indices (B,) of this schedule to the ORIGINAL timestep indices the network was trained on."""
        if self.timestep_map is None:
            return t
        return self._table("timestep_map", t.device, torch.float32)[t]

    # ------------------------------------------------------------------ forward process
    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """Draw x_t ~ q(x_t | x0) = N(a_t x0, s_t^2 I).  x0, noise: (B, ...), t: int64 (B,) -> (B, ...)."""
        if noise is None:
            noise = torch.randn_like(x0)
        return self.gather("sqrt_abar", t, x0) * x0 + self.gather("sqrt_1m_abar", t, x0) * noise

    def q_mean_variance(self, x0: torch.Tensor, t: torch.Tensor):
        """Mean, variance and log-variance of q(x_t | x0); each broadcastable to x0's shape."""
        mean = self.gather("sqrt_abar", t, x0) * x0
        var = 1 - self.gather("abar", t, x0)
        return mean, var, torch.log(var)

    def q_posterior_mean_variance(self, x0: torch.Tensor, xt: torch.Tensor, t: torch.Tensor):
        """Mean (B, ...), variance and clipped log-variance (B, 1, ...) of q(x_{t-1} | x_t, x0) (DDPM eq. 7)."""
        mean = self.gather("post_coef_x0", t, xt) * x0 + self.gather("post_coef_xt", t, xt) * xt
        return mean, self.gather("post_var", t, xt), self.gather("post_log_var", t, xt)

    # ------------------------------------------------------------------ parameterisation conversions
    def x0_from_eps(self, xt, t, eps):
        """x0 = (x_t - s_t eps) / a_t."""
        return self.gather("sqrt_recip_abar", t, xt) * xt - self.gather("sqrt_recipm1_abar", t, xt) * eps

    def eps_from_x0(self, xt, t, x0):
        """eps = (x_t - a_t x0) / s_t."""
        return (self.gather("sqrt_recip_abar", t, xt) * xt - x0) / self.gather("sqrt_recipm1_abar", t, xt)

    def x0_from_v(self, xt, t, v):
        """x0 = a_t x_t - s_t v."""
        return self.gather("sqrt_abar", t, xt) * xt - self.gather("sqrt_1m_abar", t, xt) * v

    def eps_from_v(self, xt, t, v):
        """eps = s_t x_t + a_t v."""
        return self.gather("sqrt_1m_abar", t, xt) * xt + self.gather("sqrt_abar", t, xt) * v

    def v_from_x0_eps(self, x0, eps, t):
        """v = a_t eps - s_t x0."""
        return self.gather("sqrt_abar", t, x0) * eps - self.gather("sqrt_1m_abar", t, x0) * x0

    def predict_x0(self, model_out, xt, t):
        """x0 from the network's target-part output (B, C, ...) (no variance channels)."""
        if self.target == "x0":
            return model_out
        if self.target == "eps":
            return self.x0_from_eps(xt, t, model_out)
        return self.x0_from_v(xt, t, model_out)

    def predict_eps(self, model_out, xt, t):
        """eps from the network's target-part output (B, C, ...)."""
        if self.target == "eps":
            return model_out
        if self.target == "x0":
            return self.eps_from_x0(xt, t, model_out)
        return self.eps_from_v(xt, t, model_out)

    def predict_v(self, model_out, xt, t):
        """v from the network's target-part output (B, C, ...)."""
        if self.target == "v":
            return model_out
        x0, eps = self.predict_x0(model_out, xt, t), self.predict_eps(model_out, xt, t)
        return self.v_from_x0_eps(x0, eps, t)

    def training_target(self, x0, eps, t):
        """What the network should output for (x0, eps) at t: eps, x0 or v.  (B, C, ...)."""
        if self.target == "eps":
            return eps
        if self.target == "x0":
            return x0
        return self.v_from_x0_eps(x0, eps, t)

    # ------------------------------------------------------------------ reverse process
    def split_output(self, model_out: torch.Tensor):
        """(B, 2C, ...) -> target part (B, C, ...), variance part (B, C, ...) or None when not learn_sigma."""
        if not self.learn_sigma:
            return model_out, None
        if model_out.shape[1] % 2:
            raise ValueError(f"learn_sigma expects an even number of channels on dim 1, got {model_out.shape}")
        return model_out.chunk(2, dim=1)

    def model_predictions(self, model_fn, xt, t, clip_denoised: bool | None = None,
                          model_kwargs: dict | None = None, denoised_fn=None) -> dict:
        """Run the network once at (x_t, t) and return dict(model_out, var_out, x0, eps).

        x0 is clamped to [-1, 1] if clip_denoised and then passed through denoised_fn(x0) -> x0 if given;
        eps is recomputed from the final x0 whenever x0 was changed. var_out is None unless learn_sigma.
        """
        model_out = model_fn(xt, self.model_timesteps(t), **(model_kwargs or {}))
        model_out = model_out.to(xt.dtype)
        out, var_out = self.split_output(model_out)
        x0 = self.predict_x0(out, xt, t)
        if clip_denoised or denoised_fn is not None:
            if clip_denoised:
                x0 = x0.clamp(-1, 1)
            if denoised_fn is not None:
                x0 = denoised_fn(x0)
            eps = self.eps_from_x0(xt, t, x0)
        else:
            eps = self.predict_eps(out, xt, t)
        return {"model_out": model_out, "var_out": var_out, "x0": x0, "eps": eps}

    def p_variance(self, xt, t, var_out: torch.Tensor | None = None):
        """Variance and log-variance of p(x_{t-1} | x_t): fixed, or interpolated by var_out in [-1, 1]."""
        if var_out is None:
            name = "post" if self.fixed_var == "small" else "large"
            log_var = self.gather(f"{name}_log_var", t, xt)
            return torch.exp(log_var), log_var
        frac = (var_out + 1) / 2
        log_var = frac * self.gather("log_betas", t, xt) + (1 - frac) * self.gather("post_log_var", t, xt)
        return torch.exp(log_var), log_var

    def p_mean_variance(self, model_fn, xt, t, clip_denoised: bool | None = None,
                        model_kwargs: dict | None = None, denoised_fn=None) -> dict:
        """Mean/variance of the reverse step p(x_{t-1} | x_t) from one network call.

        Args:
            xt: (B, C, ...) noisy input, t: int64 (B,) step indices of THIS schedule.
        Returns:
            dict(mean (B, C, ...), var, log_var (B, 1, ...) or (B, C, ...) when learned, x0, eps (B, C, ...),
            model_out (raw network output)).
        """
        pred = self.model_predictions(model_fn, xt, t, clip_denoised, model_kwargs, denoised_fn)
        mean, _, _ = self.q_posterior_mean_variance(pred["x0"], xt, t)
        var, log_var = self.p_variance(xt, t, pred["var_out"])
        return {"mean": mean, "var": var, "log_var": log_var, "x0": pred["x0"], "eps": pred["eps"],
                "model_out": pred["model_out"]}

    # ------------------------------------------------------------------ training
    def sample_timesteps(self, batch: int, device=None, generator: torch.Generator | None = None) -> torch.Tensor:
        """Uniform timesteps, int64 (batch,)."""
        return torch.randint(0, self.num_steps, (batch,), device=device, generator=generator)

    def vb_terms_bpd(self, x0, xt, t, mean, log_var) -> torch.Tensor:
        """One VLB term per sample, in bits/dim (B,): KL(q(x_{t-1}|x_t,x0) || p) for t > 0, and the
        discretised-Gaussian decoder NLL of x0 (8-bit data in [-1, 1]) for t == 0."""
        true_mean, _, true_log_var = self.q_posterior_mean_variance(x0, xt, t)
        kl = mean_flat(normal_kl(true_mean, true_log_var, mean, log_var)) / math.log(2.0)
        nll = -mean_flat(discretized_gaussian_log_likelihood(x0, mean, log_var)) / math.log(2.0)
        return torch.where(t == 0, nll, kl)

    def training_losses(self, model_fn, x0: torch.Tensor, t: torch.Tensor, model_kwargs: dict | None = None,
                        noise: torch.Tensor | None = None) -> dict:
        """Per-sample losses for one batch.

        Args:
            x0: (B, C, ...) clean data, t: int64 (B,) step indices, noise: optional (B, C, ...) eps.
        Returns:
            dict(loss (B,), mse (B,)) and vb (B,) (bits/dim, already weighted by T/1000 inside loss) for "hybrid".
            The MSE is on the chosen target; the VB term sees the predicted mean through a stop-gradient so it
            trains only the variance (Improved DDPM L_hybrid with lambda = 1e-3 as L_vlb = T * E_t[L_t]).
            Losses are computed in float32, also under autocast.
        """
        if noise is None:
            noise = torch.randn_like(x0)
        xt = self.q_sample(x0, t, noise)
        model_out = model_fn(xt, self.model_timesteps(t), **(model_kwargs or {}))
        out, var_out = self.split_output(model_out)
        with torch.autocast(device_type=x0.device.type, enabled=False):
            target = self.training_target(x0.float(), noise.float(), t)
            mse = mean_flat((out.float() - target) ** 2)
            terms = {"mse": mse, "loss": mse * self.mse_weight(t) if self.loss_weight != "none" else mse}
            if self.loss_type == "hybrid":
                x0f, xtf = x0.float(), xt.float()
                pred_x0 = self.predict_x0(out.detach().float(), xtf, t)        # stop-gradient on the mean
                mean, _, _ = self.q_posterior_mean_variance(pred_x0, xtf, t)
                _, log_var = self.p_variance(xtf, t, var_out.float())
                vb = self.vb_terms_bpd(x0f, xtf, t, mean, log_var)
                terms["vb"] = vb
                terms["loss"] = terms["loss"] + vb * (self.num_steps / 1000.0)
        return terms

    def mse_weight(self, t: torch.Tensor) -> torch.Tensor:
        """Per-sample weight (B,) float32 of the target MSE at step indices t (B,) (see ``loss_weight``)."""
        snr = self._table("snr", t.device, torch.float32)[t]
        if self.loss_weight == "none":
            return torch.ones_like(snr)
        capped = snr.clamp(max=self.min_snr_gamma)
        if self.target == "eps":
            return capped / snr
        if self.target == "v":
            return capped / (snr + 1)
        return capped

    # ------------------------------------------------------------------ respacing
    def respaced(self, steps) -> "GaussianDiffusion":
        """A diffusion over a subset of this schedule's steps (see `space_timesteps` for `steps`).

        Its alphas_cumprod equal this one's at the kept steps; its model calls receive the ORIGINAL timestep
        indices via timestep_map. Results are cached per spec.
        """
        key = tuple(steps) if isinstance(steps, (list, tuple)) else steps
        cached = self._respaced_cache.get(key)
        if cached is not None:
            return cached
        keep = space_timesteps(self.num_steps, steps)
        abar = self.alphas_cumprod[keep]
        prev = torch.cat([abar.new_ones(1), abar[:-1]])
        betas = 1 - abar / prev
        base_map = self.timestep_map if self.timestep_map is not None else torch.arange(self.num_steps)
        new = GaussianDiffusion(betas, target=self.target, learn_sigma=self.learn_sigma, loss=self.loss_type,
                                timestep_map=base_map[keep], fixed_var=self.fixed_var,
                                loss_weight=self.loss_weight, min_snr_gamma=self.min_snr_gamma)
        new._setup(betas, abar)          # exact original alphas_cumprod (no round-off from re-multiplying)
        self._respaced_cache[key] = new
        return new
