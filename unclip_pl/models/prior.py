"""The diffusion prior model: a prior network paired with Gaussian diffusion over (scaled) CLIP image embeddings.

``DiffusionPrior.loss`` trains the network to predict the unnoised z_i (x0 target, MSE) with the text conditioning
replaced by learned nulls at ``cond_drop_prob``; ``DiffusionPrior.sample`` draws z_i with a respaced sampler,
classifier-free guidance and best-of-N selection by the dot product with z_t (unCLIP section 2.2).

Unit-norm CLIP embeddings are badly scaled for diffusion (per-dimension std ~ 1/sqrt(D)), so z_i is mapped to a
space with roughly unit variance per dimension:
  - ``"scale"``: z * sqrt(D) (the paper's x17.2 for D = 1024 is sqrt(D) rounded);
  - ``"standardize"``: (z - mean) / std per dimension, with mean/std buffers fitted on training embeddings
    (:meth:`DiffusionPrior.fit_normalizer`) and saved in the checkpoint.
z_t, a conditioning input only, is fed as z_t * sqrt(D).

Karlo's prior (``unit_norm=False, uncond="empty_caption"``, converted by ``unclip_pl.convert``) differs in two
ways: it reads CLIP's raw projections (z_t fed as given, z_i standardised, and its samples only de-standardised, not
renormalised), and its classifier-free guidance steers away from the encoding of the empty caption ``""`` (caption
token states, mask and z_t) instead of learned null embeddings.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from unclip_pl.diffusion import (
    GaussianDiffusion,
    classifier_free_guidance,
    get_betas,
    get_sampler,
    initial_noise,
    step_generator,
)

NORMALIZATIONS = ("scale", "standardize")
UNCONDS = ("learned", "empty_caption")


def _pad_tokens(tokens: torch.Tensor, mask: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, L', W), (B, L') -> (B, length, W), (B, length) with masked zero positions appended (exact: padded
    positions are never attended to)."""
    extra = length - tokens.shape[1]
    if extra <= 0:
        return tokens, mask.bool()
    return F.pad(tokens, (0, 0, 0, extra)), F.pad(mask.bool(), (0, extra), value=False)


def empty_caption_inputs(uncond_text: Any, batch: int, length: int
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The empty caption's encoding ``(tokens (1|B, L_u, W), mask (1|B, L_u), txt_emb (1|B, D))`` (or an object
    with ``.tokens``/``.mask``/``.emb``) -> (tokens (B, L, W), mask (B, L), txt_emb (B, D)), L = max(L_u, length)."""
    if hasattr(uncond_text, "mask"):
        uncond_text = (uncond_text.tokens, uncond_text.mask, uncond_text.emb)
    if not isinstance(uncond_text, (tuple, list)) or len(uncond_text) != 3:
        raise ValueError("uncond_text must be (tokens, mask, txt_emb), the encoding of the empty caption \"\"")
    tok, mask, emb = uncond_text
    out = []
    for v in (tok.float(), mask.bool(), emb.float()):
        if v.shape[0] not in (1, batch):
            raise ValueError(f"uncond_text has batch {v.shape[0]}, expected 1 or {batch}")
        out.append(v.expand(batch, *v.shape[1:]))
    tok, mask = _pad_tokens(out[0], out[1], length)
    return tok, mask, out[2]


def select_best_of(candidates: torch.Tensor, txt_emb: torch.Tensor) -> torch.Tensor:
    """Keep, per caption, the candidate with the largest dot product with z_t.

    Args:
        candidates: (B, N, D) candidate image embeddings.
        txt_emb: (B, D) text embeddings.
    Returns:
        (B, D) the selected candidates.
    """
    scores = torch.einsum("bnd,bd->bn", candidates.float(), txt_emb.float())  # (B, N)
    best = scores.argmax(dim=1)  # (B,)
    return candidates[torch.arange(candidates.shape[0], device=candidates.device), best]


class DiffusionPrior(nn.Module):
    """Prior network + Gaussian diffusion over CLIP image embeddings.

    Args:
        net: ``PriorTransformer``-like module, ``net(x (B,D), t (B,), *, text_tokens, text_mask, txt_emb, drop_cond)``.
        diffusion: the training ``GaussianDiffusion`` (default: 1000-step cosine schedule, x0 target, MSE).
        cond_drop_prob: probability of replacing the text conditioning by learned nulls in training (paper: 0.1).
        normalization: "scale" or "standardize" (see module docstring).
        embed_dim: D (defaults to ``net.embed_dim``).
        clip_sample_range: when set, sampling clamps each step's predicted x0 (in the normalised space) to
            [-r, r] (Karlo's prior: 5); None (default) never clamps.
        unit_norm: True (default): z_t and z_i are unit-norm CLIP embeddings, z_t is fed x sqrt(D) and samples are
            renormalised. False (Karlo): CLIP's raw projections, z_t fed as given, samples only de-standardised
            (needs ``normalization="standardize"``; give it a CLIP with ``normalize=False``).
        uncond: the unconditional branch of classifier-free guidance (training's dropped rows and sampling):
            "learned" (default): the learned null embeddings; "empty_caption" (Karlo): the encoding of ``""``,
            passed as ``uncond_text`` to :meth:`loss` and :meth:`sample`.
    """

    def __init__(self, net: nn.Module, diffusion: GaussianDiffusion | None = None, cond_drop_prob: float = 0.1,
                 normalization: str = "scale", embed_dim: int | None = None, clip_sample_range: float | None = None,
                 unit_norm: bool = True, uncond: str = "learned"):
        super().__init__()
        if uncond not in UNCONDS:
            raise ValueError(f"unknown uncond {uncond!r}; valid choices: {', '.join(UNCONDS)}")
        if not unit_norm and normalization != "standardize":
            raise ValueError("unit_norm=False (raw CLIP projections) needs normalization='standardize'")
        self.unit_norm = bool(unit_norm)
        self.uncond = uncond
        if clip_sample_range is not None and not clip_sample_range > 0:
            raise ValueError(f"clip_sample_range must be positive or None, got {clip_sample_range}")
        self.clip_sample_range = None if clip_sample_range is None else float(clip_sample_range)
        if normalization not in NORMALIZATIONS:
            raise ValueError(f"unknown normalization {normalization!r}; valid choices: {', '.join(NORMALIZATIONS)}")
        if not 0.0 <= cond_drop_prob <= 1.0:
            raise ValueError(f"cond_drop_prob must be in [0, 1], got {cond_drop_prob}")
        self.net = net
        self.diffusion = diffusion if diffusion is not None else GaussianDiffusion(get_betas("cosine", 1000),
                                                                                   target="x0")
        if self.diffusion.learn_sigma:
            raise ValueError("the diffusion prior predicts x0 only (learn_sigma=False)")
        self.cond_drop_prob = float(cond_drop_prob)
        self.normalization = normalization
        self.embed_dim = int(embed_dim if embed_dim is not None else net.embed_dim)
        d = self.embed_dim
        self.register_buffer("norm_mean", torch.zeros(d))
        self.register_buffer("norm_std", torch.full((d,), 1.0 / math.sqrt(d)))
        self.register_buffer("norm_fitted", torch.zeros((), dtype=torch.bool))
        self._fit_checked = False

    # ------------------------------------------------------------------ normalisation
    @property
    def needs_fit(self) -> bool:
        """True when ``normalization="standardize"`` and the statistics were never fitted."""
        return self.normalization == "standardize" and not bool(self.norm_fitted)

    @torch.no_grad()
    def fit_normalizer(self, img_embs: torch.Tensor) -> None:
        """Fit the per-dimension mean/std of training image embeddings (N, D)."""
        x = img_embs.detach().double()
        self.fit_normalizer_from_stats(torch.tensor(float(x.shape[0])), x.sum(0), (x * x).sum(0))

    @torch.no_grad()
    def fit_normalizer_from_stats(self, count: torch.Tensor, total: torch.Tensor, total_sq: torch.Tensor) -> None:
        """Fit from sufficient statistics (so ranks can sum them): count (), sum (D,), sum of squares (D,)."""
        n = float(count)
        if n < 2:
            raise ValueError(f"need at least 2 embeddings to fit the normaliser, got {n:g}")
        mean = total.double() / n
        var = (total_sq.double() / n - mean * mean) * n / (n - 1)
        std = var.clamp(min=0).sqrt().clamp(min=1e-6)
        self.norm_mean.copy_(mean.to(self.norm_mean))
        self.norm_std.copy_(std.to(self.norm_std))
        self.norm_fitted.fill_(True)

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        """Image embeddings (B, D) (unit norm, or raw with ``unit_norm=False``) -> diffusion space (B, D)."""
        z = z.float()
        if self.normalization == "scale":
            return z * math.sqrt(self.embed_dim)
        return (z - self.norm_mean) / self.norm_std

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        """Diffusion space (B, D) -> unit-norm image embeddings (B, D) (with ``unit_norm=False``: de-standardised
        only, Karlo's ``post_process_latents``)."""
        x = x.float()
        if self.normalization == "standardize":
            x = x * self.norm_std + self.norm_mean
        return F.normalize(x, dim=-1) if self.unit_norm else x

    def scale_text(self, txt_emb: torch.Tensor) -> torch.Tensor:
        """z_t (B, D) unit norm -> network input z_t * sqrt(D) (with ``unit_norm=False``: as given)."""
        if not self.unit_norm:
            return txt_emb.float()
        return txt_emb.float() * math.sqrt(self.embed_dim)

    def _require_uncond_text(self, uncond_text: Any, what: str) -> None:
        if self.uncond == "empty_caption" and uncond_text is None:
            raise ValueError(f"this prior's unconditional branch is the empty caption: pass uncond_text=(tokens, "
                             f"mask, txt_emb), the CLIP encoding of \"\" ({what})")

    # ------------------------------------------------------------------ training
    def sample_drop_mask(self, batch: int, device=None, generator: torch.Generator | None = None) -> torch.Tensor:
        """(batch,) bool, True with probability ``cond_drop_prob``: rows trained with the null conditioning."""
        return torch.rand(batch, device=device, generator=generator) < self.cond_drop_prob

    def loss(self, img_emb: torch.Tensor, txt_emb: torch.Tensor, text_tokens: torch.Tensor, text_mask: torch.Tensor,
             generator: torch.Generator | None = None, uncond_text: Any = None) -> dict[str, torch.Tensor]:
        """Diffusion training loss (MSE of the predicted unnoised z_i in the normalised space).

        Args:
            img_emb: (B, D) unit-norm CLIP image embeddings (targets).
            txt_emb: (B, D) unit-norm CLIP text embeddings.
            text_tokens: (B, L', W) CLIP text token encodings; text_mask: (B, L') bool.
            generator: optional generator for timesteps, noise and the drop mask (tests).
            uncond_text: with ``uncond="empty_caption"``, the encoding of ``""`` (tokens (1, L_u, W), mask (1, L_u),
                txt_emb (1, D)) that replaces the dropped rows' conditioning; ignored otherwise.
        Returns:
            dict(loss scalar, mse scalar, cond_drop_frac scalar).
        """
        if self.normalization == "standardize" and not self._fit_checked:  # one host sync, then never again
            if self.needs_fit:
                raise RuntimeError("normalization='standardize' but fit_normalizer() was never called")
            self._fit_checked = True
        b, device = img_emb.shape[0], img_emb.device
        x0 = self.normalize(img_emb)
        t = torch.randint(0, self.diffusion.num_steps, (b,), device=device, generator=generator)
        noise = torch.randn(x0.shape, device=device, generator=generator)
        drop = self.sample_drop_mask(b, device, generator)
        kwargs = dict(text_tokens=text_tokens, text_mask=text_mask, txt_emb=self.scale_text(txt_emb), drop_cond=drop)
        if self.uncond == "empty_caption":  # dropped rows see the empty caption instead of the learned nulls
            self._require_uncond_text(uncond_text, "loss")
            u_tok, u_mask, u_emb = (v.to(device) for v in empty_caption_inputs(uncond_text, b, text_tokens.shape[1]))
            tok, mask = _pad_tokens(text_tokens.float(), text_mask, u_tok.shape[1])
            kwargs = dict(text_tokens=torch.where(drop[:, None, None], u_tok.to(tok), tok),
                          text_mask=torch.where(drop[:, None], u_mask, mask),
                          txt_emb=torch.where(drop[:, None], self.scale_text(u_emb), kwargs["txt_emb"]),
                          drop_cond=None)
        terms = self.diffusion.training_losses(self.net, x0, t, model_kwargs=kwargs, noise=noise)
        return {"loss": terms["loss"].mean(), "mse": terms["mse"].mean().detach(),
                "cond_drop_frac": drop.float().mean()}

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def sample(self, txt_emb: torch.Tensor, text_tokens: torch.Tensor, text_mask: torch.Tensor, *, steps: Any,
               sampler: str, eta: float, guidance_scale: float, best_of: int,
               generator: torch.Generator | None = None, seeds: Sequence[int] | None = None, progress: bool = False,
               use_cache: bool = True, stream: str = "prior", uncond_text: Any = None) -> torch.Tensor:
        """Sample image embeddings for captions. The sampler settings (``steps`` .. ``best_of``) are explicit, usually
        the stage's ``sample:`` block (paper: 64 DDIM steps, best of 2).

        Args:
            txt_emb: (B, D) unit-norm z_t; text_tokens: (B, L', W); text_mask: (B, L') bool.
            steps: respacing spec (int or "ddimN" or list) of the 1000 training steps.
            sampler: a name of ``unclip_pl.diffusion.SAMPLERS``: "ddim" (with ``eta``), "ddpm", "dpmpp_2m".
            guidance_scale: classifier-free guidance scale (1 = conditional only, no extra pass).
            best_of: N candidates per caption (batched as B*N); the one with the largest dot product with z_t wins.
            generator: torch.Generator on the embeddings' device for every random draw (makes sampling deterministic).
            seeds: B per-caption seeds: caption i's N candidates (starting noise and the step noise of DDPM / DDIM
                with eta > 0) depend only on seeds[i], so its embedding does not depend on the rest of the batch;
                candidate j draws from its own streams of stage ``stream`` (``unclip_pl.diffusion.seeds``).
            use_cache: encode the step-independent caption/z_t prefix once (``net.encode_prefix``) and run only the
                3 step-dependent tokens per step (``net.forward_cached``); same result, many times faster.
            uncond_text: with ``uncond="empty_caption"`` and guidance, the unconditional branch's conditioning: the
                encoding of ``""`` (tokens (1, L_u, W), mask (1, L_u), txt_emb (1, D), as ``txt_emb`` is given).
        Returns:
            (B, D) unit-norm predicted image embeddings z_i (with ``unit_norm=False``: raw, as CLIP's projections).
        """
        sample_fn = get_sampler(sampler)
        if self.needs_fit:
            raise RuntimeError("normalization='standardize' but fit_normalizer() was never called")
        b, n, device = txt_emb.shape[0], max(1, int(best_of)), txt_emb.device
        empty = None  # the empty caption's (tokens, mask, txt_emb), per caption, padded to the captions' length
        if self.uncond == "empty_caption" and guidance_scale != 1.0:
            self._require_uncond_text(uncond_text, "sample")
            empty = tuple(v.to(device) for v in empty_caption_inputs(uncond_text, b, text_tokens.shape[1]))
            text_tokens, text_mask = _pad_tokens(text_tokens, text_mask, empty[0].shape[1])
        zt = self.scale_text(txt_emb).repeat_interleave(n, dim=0)        # (B*N, D)
        tok = text_tokens.repeat_interleave(n, dim=0)                     # (B*N, L', W)
        mask = text_mask.bool().repeat_interleave(n, dim=0)               # (B*N, L')
        keep = torch.zeros(b * n, dtype=torch.bool, device=device)
        cached = use_cache and hasattr(self.net, "encode_prefix")
        if cached:  # the caption/z_t prefix is step-independent (causal mask): encode it once, reuse it every step
            net_fn = self.net.forward_cached
            keep_b = torch.zeros(b, dtype=torch.bool, device=device)
            zt_b = self.scale_text(txt_emb)

            def prefix(drop):  # encode the B captions once, then repeat for the N candidates
                cache = self.net.encode_prefix(text_tokens, text_mask.bool(), zt_b, drop)
                return {k: v.repeat_interleave(n, dim=0) for k, v in cache.items()}

            cond = prefix(keep_b)
            uncond = prefix(~keep_b) if guidance_scale != 1.0 and empty is None else None
            if empty is not None:
                cache = self.net.encode_prefix(empty[0].to(text_tokens), empty[1], self.scale_text(empty[2]), keep_b)
                uncond = {k: v.repeat_interleave(n, dim=0) for k, v in cache.items()}
        else:
            net_fn = self.net
            cond = dict(text_tokens=tok, text_mask=mask, txt_emb=zt, drop_cond=keep)
            uncond = dict(cond, drop_cond=~keep)
            if empty is not None:
                uncond = dict(text_tokens=empty[0].to(tok).repeat_interleave(n, dim=0),
                              text_mask=empty[1].repeat_interleave(n, dim=0),
                              txt_emb=self.scale_text(empty[2]).repeat_interleave(n, dim=0), drop_cond=keep)
        if guidance_scale == 1.0:
            model_fn, model_kwargs = net_fn, cond
        else:
            model_fn, model_kwargs = classifier_free_guidance(net_fn, guidance_scale, cond, uncond), None
        x_T = initial_noise((b * n, self.embed_dim), device, generator=generator, seeds=seeds, stage=stream,
                            per_seed=n)                                    # (B*N, D), row i*N + j: candidate j
        r = self.clip_sample_range
        x0 = sample_fn(self.diffusion, model_fn, x_T, steps, eta=eta, model_kwargs=model_kwargs, progress=progress,
                       generator=step_generator(seeds, generator, device, per_seed=n, stage=stream),
                       denoised_fn=None if r is None else functools.partial(torch.clamp, min=-r, max=r))
        z = self.denormalize(x0).view(b, n, self.embed_dim)             # (B, N, D) unit norm (or raw)
        best = select_best_of(z, txt_emb)
        return F.normalize(best, dim=-1) if self.unit_norm else best
