"""The autoregressive prior model: a causal Transformer over PCA codes of CLIP image embeddings (unCLIP section 2.2).

z_i is reduced with PCA and each component quantised into buckets by a codec (``unclip_pl.models.pca_codec.PCACodec``
API: ``encode``/``decode`` of codes, ``encode_dot``/``decode_dot`` of the dot product z_i.z_t). The network predicts
the quantised dot product, then the codes one by one, conditioned on the caption's CLIP token states and z_t.

``ARPrior.loss`` is the next-token cross-entropy with the text conditioning replaced by learned nulls at
``cond_drop_prob``; ``ARPrior.sample`` decodes with classifier-free guidance, temperature, top-k / top-p, the dot
token drawn from the top ``dot_fraction`` of its distribution, and best-of-N selection by the dot product with z_t.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from unclip_pl.diffusion.seeds import row_seeds
from unclip_pl.models.prior import select_best_of


def filter_logits(logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """Restrict logits (B, V) to the top-k tokens and/or the nucleus of mass top_p; the rest get -inf.

    top-k keeps the k largest logits (ties with the k-th kept too). top-p keeps, in decreasing probability, each token
    whose preceding tokens hold less than top_p of the mass (so the most likely token is always kept). Both given:
    top-k first, then top-p over what is left.
    """
    if top_k is not None:
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        if top_k < logits.shape[-1]:
            kth = logits.topk(top_k, dim=-1).values[..., -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None:
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        if top_p < 1.0:
            sorted_logits, order = logits.sort(dim=-1, descending=True)
            probs = sorted_logits.softmax(dim=-1)
            before = probs.cumsum(dim=-1) - probs                         # mass of the more likely tokens
            drop_sorted = before >= top_p
            drop = drop_sorted.scatter(-1, order, drop_sorted)
            logits = logits.masked_fill(drop, float("-inf"))
    return logits


def restrict_dot(logits: torch.Tensor, dot_values: torch.Tensor, fraction: float) -> torch.Tensor:
    """Keep the dot-product buckets of the highest dot products holding the top ``fraction`` of the mass.

    Buckets are ranked by their dot value (``dot_values`` (V,), decreasing); a bucket is kept when the buckets with
    higher dot products hold less than ``fraction`` of the probability softmax(logits), so the bucket straddling the
    boundary is kept and the highest bucket always is. fraction=1 keeps every bucket; the paper samples from the
    top half (0.5). The rest get -inf.

    Args:
        logits: (B, V) dot-token logits (after guidance and temperature).
        dot_values: (V,) the dot product each bucket decodes to.
        fraction: in (0, 1].
    Returns:
        (B, V) restricted logits.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"dot_fraction must be in (0, 1], got {fraction}")
    if fraction == 1.0:
        return logits
    order = dot_values.to(logits.device).argsort(descending=True)          # (V,) highest dot product first
    probs = logits.softmax(dim=-1)[:, order]
    before = probs.cumsum(dim=-1) - probs
    drop_sorted = before >= fraction
    drop = torch.empty_like(drop_sorted)
    drop[:, order] = drop_sorted
    return logits.masked_fill(drop, float("-inf"))


def draw(logits: torch.Tensor, greedy: bool = False, generator: torch.Generator | None = None,
         u: torch.Tensor | None = None) -> torch.Tensor:
    """One token per row of softmax(logits) (B, V) (already tempered and filtered; -inf = excluded), by inverse-CDF
    sampling in float64; ``greedy`` takes the argmax. One uniform per row is drawn from ``generator`` either way, so
    greedy and sampled runs consume the same stream; ``u`` (B, 1) in (0, 1] float64 gives the uniforms instead.
    Returns (B,) long.
    """
    if u is None:
        u = 1.0 - torch.rand(logits.shape[0], 1, device=logits.device, generator=generator, dtype=torch.float64)
    if greedy:
        return logits.argmax(dim=-1)
    probs = logits.double().softmax(dim=-1)
    cdf = probs.cumsum(dim=-1)
    idx = (cdf < u * cdf[:, -1:]).sum(dim=-1)                             # first index with cdf >= u * total
    return idx.clamp(max=logits.shape[-1] - 1)


def seeded_uniforms(seeds: Sequence[int], stream: str, per_seed: int, step: int, device) -> torch.Tensor:
    """(len(seeds) * per_seed, 1) float64 uniforms in (0, 1] for token ``step``: row ``i * per_seed + j`` from its own
    generator seeded by ``(seeds[i], "<stream>/noise/<j>", step)``, so a caption's embedding depends only on its
    seed, never on the rest of the batch (as the diffusion prior's step noise)."""
    rows = row_seeds(seeds, stream, "noise", per_seed=per_seed, step=step)
    u = [1.0 - torch.rand((), generator=torch.Generator().manual_seed(r), dtype=torch.float64) for r in rows]
    return torch.stack(u).view(-1, 1).to(device)


class ARPrior(nn.Module):
    """Autoregressive prior: ``ARPriorTransformer``-like network + PCA codec.

    Args:
        net: ``net(text_states, text_mask, txt_emb, dot, codes, drop_cond) -> (dot_logits, code_logits)`` with
            ``start``/``step`` for cached decoding (``unclip_pl.nets.ar_prior.ARPriorTransformer``).
        codec: a fitted ``PCACodec``-like module (a submodule, so its statistics are saved in the checkpoint).
        cond_drop_prob: probability of replacing the text conditioning by learned nulls in training (paper: 0.1).
    """

    def __init__(self, net: nn.Module, codec: nn.Module, cond_drop_prob: float = 0.1):
        super().__init__()
        if not 0.0 <= cond_drop_prob <= 1.0:
            raise ValueError(f"cond_drop_prob must be in [0, 1], got {cond_drop_prob}")
        for name in ("num_components", "num_buckets", "num_dot_buckets"):
            if int(getattr(net, name)) != int(getattr(codec, name)):
                raise ValueError(f"net and codec disagree on {name}: {getattr(net, name)} vs {getattr(codec, name)}")
        self.net = net
        self.codec = codec
        self.cond_drop_prob = float(cond_drop_prob)

    def _check_fitted(self) -> None:
        if not bool(self.codec.is_fitted):
            raise RuntimeError("the codec was never fitted (fit the PCA codec on training image embeddings first)")

    # ------------------------------------------------------------------ training
    def sample_drop_mask(self, batch: int, device=None, generator: torch.Generator | None = None) -> torch.Tensor:
        """(batch,) bool, True with probability ``cond_drop_prob``: rows trained with the null conditioning."""
        return torch.rand(batch, device=device, generator=generator) < self.cond_drop_prob

    def targets(self, img_emb: torch.Tensor, txt_emb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The tokens of z_i given z_t: dot (B,) long (quantised z_i.z_t) and codes (B, k) long."""
        dot = (img_emb.float() * txt_emb.float()).sum(dim=-1)
        return self.codec.encode_dot(dot).long(), self.codec.encode(img_emb).long()

    def loss(self, img_emb: torch.Tensor, txt_emb: torch.Tensor, text_tokens: torch.Tensor, text_mask: torch.Tensor,
             generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Next-token cross-entropy over the dot token and the k codes (teacher forcing).

        Args:
            img_emb: (B, D) unit-norm CLIP image embeddings (targets).
            txt_emb: (B, D) unit-norm CLIP text embeddings.
            text_tokens: (B, L, W) CLIP per-token text states; text_mask: (B, L) bool.
            generator: optional generator for the drop mask (tests).
        Returns:
            dict(loss: mean cross-entropy over the k + 1 tokens, loss_codes: mean over the codes, loss_dot, and
            cond_drop_frac), scalars.
        """
        self._check_fitted()
        b, device = img_emb.shape[0], img_emb.device
        dot, codes = self.targets(img_emb, txt_emb)
        drop = self.sample_drop_mask(b, device, generator)
        dot_logits, code_logits = self.net(text_tokens, text_mask, txt_emb, dot, codes, drop)
        k = codes.shape[1]
        loss_dot = F.cross_entropy(dot_logits.float(), dot)
        loss_codes = F.cross_entropy(code_logits.float().reshape(b * k, -1), codes.reshape(-1))
        loss = (loss_dot + k * loss_codes) / (k + 1)
        return {"loss": loss, "loss_codes": loss_codes.detach(), "loss_dot": loss_dot.detach(),
                "cond_drop_frac": drop.float().mean()}

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def sample_codes(self, txt_emb: torch.Tensor, text_tokens: torch.Tensor, text_mask: torch.Tensor, *,
                     guidance_scale: float, temperature: float, top_k: int | None, top_p: float | None,
                     dot_fraction: float = 0.5, best_of: int = 1, use_cache: bool = True,
                     generator: torch.Generator | None = None, seeds: Sequence[int] | None = None,
                     stream: str = "prior") -> tuple[torch.Tensor, torch.Tensor]:
        """Draw the tokens of B * best_of candidates (arguments as in :meth:`sample`).

        Returns:
            dot (B, N) long and codes (B, N, k) long, N = best_of; candidate j of caption i is row [i, j].
        """
        self._check_fitted()
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        if best_of < 1:
            raise ValueError(f"best_of must be >= 1, got {best_of}")
        if not 0.0 < dot_fraction <= 1.0:
            raise ValueError(f"dot_fraction must be in (0, 1], got {dot_fraction}")
        b, n, device = txt_emb.shape[0], int(best_of), txt_emb.device
        k = int(self.net.num_components)
        zt = txt_emb.repeat_interleave(n, dim=0)                          # (B*N, D)
        tok = text_tokens.repeat_interleave(n, dim=0)                      # (B*N, L, W)
        mask = text_mask.bool().repeat_interleave(n, dim=0)                # (B*N, L)
        rows = b * n
        guided, greedy = guidance_scale != 1.0, temperature == 0
        drop = torch.zeros(rows, dtype=torch.bool, device=device)
        if guided:  # one batch: rows [cond; uncond]
            zt, tok, mask = torch.cat([zt, zt]), torch.cat([tok, tok]), torch.cat([mask, mask])
            drop = torch.cat([drop, ~drop])

        def guide(logits: torch.Tensor) -> torch.Tensor:
            logits = logits.float()
            if not guided:
                return logits
            cond, uncond = logits[:rows], logits[rows:]
            return uncond + guidance_scale * (cond - uncond)

        def temper(logits: torch.Tensor) -> torch.Tensor:
            return logits / temperature if temperature > 0 else logits

        dot_values = self.codec.decode_dot(torch.arange(int(self.net.num_dot_buckets), device=device)).float()
        dot = torch.zeros(zt.shape[0], dtype=torch.long, device=device)
        codes = torch.zeros(zt.shape[0], k, dtype=torch.long, device=device)

        def both(x: torch.Tensor) -> torch.Tensor:  # the drawn tokens feed both branches
            return torch.cat([x, x]) if guided else x

        if use_cache:
            dot_logits, cache = self.net.start(tok, mask, zt, drop)
        else:
            dot_logits, _ = self.net(tok, mask, zt, dot, codes, drop)
        logits = restrict_dot(temper(guide(dot_logits)), dot_values, dot_fraction)
        def uniforms(step: int) -> torch.Tensor | None:
            return None if seeds is None else seeded_uniforms(seeds, stream, n, step, device)

        if seeds is not None and len(seeds) != b:
            raise ValueError(f"seeds: one per caption ({b}), got {len(seeds)}")
        dot_drawn = draw(logits, greedy, generator, uniforms(0))
        dot = both(dot_drawn)
        for i in range(k):  # step i feeds token i (0: dot, i >= 1: code_i) and draws code_{i+1}
            if use_cache:
                logits, cache = self.net.step(dot if i == 0 else codes[:, i - 1], i, cache)
            else:
                logits = self.net(tok, mask, zt, dot, codes, drop)[1][:, i]
            logits = filter_logits(temper(guide(logits)), top_k, top_p)
            codes[:, i] = both(draw(logits, greedy, generator, uniforms(i + 1)))
        return dot_drawn.view(b, n), codes[:rows].view(b, n, k)

    @torch.no_grad()
    def sample(self, txt_emb: torch.Tensor, text_tokens: torch.Tensor, text_mask: torch.Tensor, *,
               guidance_scale: float, temperature: float, top_k: int | None, top_p: float | None,
               dot_fraction: float = 0.5, best_of: int = 1, use_cache: bool = True,
               generator: torch.Generator | None = None, seeds: Sequence[int] | None = None,
               stream: str = "prior") -> torch.Tensor:
        """Sample image embeddings for captions.

        Each step's logits are guided (uncond + s * (cond - uncond), both branches in one batch), divided by the
        temperature, then restricted: the dot token to the top ``dot_fraction`` of its distribution
        (:func:`restrict_dot`), the codes by ``top_k`` / ``top_p`` (:func:`filter_logits`).

        Args:
            txt_emb: (B, D) unit-norm z_t; text_tokens: (B, L, W) CLIP per-token states; text_mask: (B, L) bool.
            guidance_scale: classifier-free guidance scale (1 = conditional only, no extra branch).
            temperature: softmax temperature (0 = greedy).
            top_k / top_p: the code tokens' top-k and nucleus filters (None = off).
            dot_fraction: the dot token's top fraction of mass, ranked by dot product (paper: 0.5).
            best_of: N candidates per caption (batched as B*N); the one with the largest dot product with z_t wins.
            use_cache: decode with the network's K/V cache (``start``/``step``); False recomputes the whole sequence
                every step (same codes, for checking).
            generator: torch.Generator on the embeddings' device for every random draw.
            seeds: B per-caption seeds instead (:func:`seeded_uniforms`): caption i's candidates depend only on
                seeds[i]; ``stream`` names the stage's streams (the pipeline's "prior").
        Returns:
            (B, D) unit-norm z_i = codec.decode(codes).
        """
        _, codes = self.sample_codes(txt_emb, text_tokens, text_mask, guidance_scale=guidance_scale,
                                     temperature=temperature, top_k=top_k, top_p=top_p, dot_fraction=dot_fraction,
                                     best_of=best_of, use_cache=use_cache, generator=generator, seeds=seeds,
                                     stream=stream)
        b, n, k = codes.shape
        z = F.normalize(self.codec.decode(codes.view(b * n, k)).float(), dim=-1).view(b, n, -1)
        return F.normalize(select_best_of(z, txt_emb), dim=-1)
