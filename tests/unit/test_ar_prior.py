"""Autoregressive prior: causal network with a K/V cache, loss, sampling (guidance, filters, dot token, best-of)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from unclip_pl.models.ar_prior import ARPrior, draw, filter_logits, restrict_dot
from unclip_pl.nets.ar_prior import ARPriorTransformer

D, W, L, K, NB, ND = 16, 24, 10, 6, 12, 8


class TinyCodec(nn.Module):
    """Stand-in with the PCACodec API: a fixed orthonormal basis, uniform buckets on [-1, 1]."""

    def __init__(self, embed_dim: int = D, num_components: int = K, num_buckets: int = NB,
                 num_dot_buckets: int = ND):
        super().__init__()
        self.num_components, self.num_buckets, self.num_dot_buckets = num_components, num_buckets, num_dot_buckets
        q, _ = torch.linalg.qr(torch.randn(embed_dim, num_components, generator=torch.Generator().manual_seed(5)))
        self.register_buffer("basis", q)                                   # (D, k)
        self.is_fitted = True

    @staticmethod
    def _enc(x, n):
        return ((x.clamp(-1, 1) + 1) / 2 * n).long().clamp(0, n - 1)

    @staticmethod
    def _dec(c, n):
        return (c.float() + 0.5) / n * 2 - 1

    def encode(self, z):
        return self._enc(z.float() @ self.basis * 2, self.num_buckets)

    def decode(self, codes):
        return F.normalize(self._dec(codes, self.num_buckets) @ self.basis.T, dim=-1)

    def encode_dot(self, dot):
        return self._enc(dot, self.num_dot_buckets)

    def decode_dot(self, codes):
        return self._dec(codes, self.num_dot_buckets)


def tiny_net(**kw) -> ARPriorTransformer:
    torch.manual_seed(kw.pop("seed", 0))
    args = dict(text_width=W, embed_dim=D, num_components=K, num_buckets=NB, num_dot_buckets=ND, dim=32, depth=2,
                heads=4, max_text_len=L)
    args.update(kw)
    return ARPriorTransformer(**args)


def batch(b: int = 5, lt: int = 7, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(b, D, generator=g), dim=-1)
    txt = F.normalize(img + 0.5 * torch.randn(b, D, generator=g) / D ** 0.5, dim=-1)
    states = torch.randn(b, lt, W, generator=g)
    lengths = torch.randint(1, lt + 1, (b,), generator=g)
    mask = torch.arange(lt)[None] < lengths[:, None]
    return img, txt, states, mask


def random_tokens(b: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, ND, (b,), generator=g), torch.randint(0, NB, (b, K), generator=g)


def shaken(net: ARPriorTransformer) -> ARPriorTransformer:
    """Larger random weights, so logits differ clearly between tokens (an untrained net is nearly uniform)."""
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return net.eval()


# ---------------------------------------------------------------------------------------------------------------- net
def test_forward_shapes():
    net = tiny_net().eval()
    _, txt, states, mask = batch()
    dot, codes = random_tokens(5)
    dot_logits, code_logits = net(states, mask, txt, dot, codes, torch.zeros(5, dtype=torch.bool))
    assert dot_logits.shape == (5, ND) and code_logits.shape == (5, K, NB)
    with pytest.raises(ValueError, match="codes must be"):
        net(states, mask, txt, dot, codes[:, :-1])
    with pytest.raises(ValueError, match="max_text_len"):
        net(torch.randn(5, L + 1, W), torch.ones(5, L + 1, dtype=torch.bool), txt, dot, codes)


def test_causal_mask_later_tokens_never_change_earlier_logits():
    net = shaken(tiny_net())
    _, txt, states, mask = batch()
    dot, codes = random_tokens(5)
    ref_dot, ref_codes = net(states, mask, txt, dot, codes)
    # the dot token: dot logits unchanged, every code's logits change
    d2, c2 = net(states, mask, txt, (dot + 1) % ND, codes)
    torch.testing.assert_close(d2, ref_dot, rtol=0, atol=1e-6)
    assert (c2 - ref_codes).abs().amax(dim=(0, 2)).min() > 1e-4
    for j in range(K):  # code_{j+1} (codes[:, j]) is an input to the logits of code_{j+2} .. code_k only
        changed = codes.clone()
        changed[:, j] = (changed[:, j] + 1) % NB
        d2, c2 = net(states, mask, txt, dot, changed)
        torch.testing.assert_close(d2, ref_dot, rtol=0, atol=1e-6)
        torch.testing.assert_close(c2[:, :j + 1], ref_codes[:, :j + 1], rtol=0, atol=1e-6)
        if j < K - 1:
            assert (c2[:, j + 1:] - ref_codes[:, j + 1:]).abs().amax() > 1e-4


def test_caption_padding_is_masked():
    net = shaken(tiny_net())
    _, txt, states, mask = batch()
    dot, codes = random_tokens(5)
    ref = net(states, mask, txt, dot, codes)
    noisy = torch.where(mask[..., None], states, torch.randn_like(states) * 10)
    out = net(noisy, mask, txt, dot, codes)
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    # trimming the padding does not change anything either
    lt = int(mask.sum(1).max())
    out = net(states[:, :lt], mask[:, :lt], txt, dot, codes)
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_dropped_rows_ignore_the_text():
    net = shaken(tiny_net())
    _, txt, states, mask = batch()
    dot, codes = random_tokens(5)
    drop = torch.tensor([True, False, True, False, True])
    ref = net(states, mask, txt, dot, codes, drop)
    _, txt2, states2, mask2 = batch(seed=9)
    out = net(states2, mask2, txt2, dot, codes, drop)
    for a, b in zip(out, ref):
        torch.testing.assert_close(a[drop], b[drop], rtol=1e-5, atol=1e-5)
        assert (a[~drop] - b[~drop]).abs().amax() > 1e-4


def test_cached_steps_match_the_full_pass():
    net = shaken(tiny_net())
    _, txt, states, mask = batch()
    dot, codes = random_tokens(5)
    drop = torch.tensor([False, True, False, False, True])
    ref_dot, ref_codes = net(states, mask, txt, dot, codes, drop)
    dot_logits, cache = net.start(states, mask, txt, drop)
    torch.testing.assert_close(dot_logits, ref_dot, rtol=1e-5, atol=1e-5)
    for i in range(K):
        logits, cache = net.step(dot if i == 0 else codes[:, i - 1], i, cache)
        torch.testing.assert_close(logits, ref_codes[:, i], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="index"):
        net.step(codes[:, 0], 0, cache)


# ------------------------------------------------------------------------------------------------------------ filters
def test_filter_logits_restricts_the_support():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0, -1.0]])
    assert torch.isfinite(filter_logits(logits, top_k=2)).nonzero()[:, 1].tolist() == [1, 3]
    probs = logits.softmax(-1)[0]  # sorted: 1 (.64), 3 (.24), 2 (.09), ...
    kept = torch.isfinite(filter_logits(logits, top_p=0.7)).nonzero()[:, 1].tolist()
    assert kept == [1, 3] and probs[1] < 0.7 <= probs[1] + probs[3]
    assert torch.isfinite(filter_logits(logits, top_p=0.1)).nonzero()[:, 1].tolist() == [1]
    assert torch.isfinite(filter_logits(logits, top_k=3, top_p=1.0)).sum() == 3
    assert torch.isfinite(filter_logits(logits)).all()
    with pytest.raises(ValueError, match="top_p"):
        filter_logits(logits, top_p=0.0)
    with pytest.raises(ValueError, match="top_k"):
        filter_logits(logits, top_k=0)


def test_restrict_dot_keeps_the_highest_dot_products():
    values = torch.tensor([0.3, -0.5, 0.9, 0.1])          # order by dot product: 2, 0, 3, 1
    logits = torch.zeros(1, 4)                            # uniform: each bucket 1/4
    kept = lambda f: torch.isfinite(restrict_dot(logits, values, f)).nonzero()[:, 1].tolist()  # noqa: E731
    assert kept(0.5) == [0, 2]                             # the top half of the mass
    assert kept(0.6) == [0, 2, 3]                          # the bucket straddling the boundary is kept
    assert kept(0.01) == [2]
    assert kept(1.0) == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="dot_fraction"):
        restrict_dot(logits, values, 0.0)


def test_draw_follows_the_distribution_and_never_picks_excluded_tokens():
    g = torch.Generator().manual_seed(0)
    logits = torch.log(torch.tensor([[0.5, 0.0, 0.3, 0.2]])).expand(20000, 4)
    tokens = draw(logits, generator=g)
    freq = torch.bincount(tokens, minlength=4).float() / tokens.numel()
    assert freq[1] == 0
    torch.testing.assert_close(freq, torch.tensor([0.5, 0.0, 0.3, 0.2]), rtol=0, atol=0.02)
    assert draw(logits[:3], greedy=True, generator=g).tolist() == [0, 0, 0]


# ---------------------------------------------------------------------------------------------------------------- model
def tiny_prior(cond_drop_prob: float = 0.1, **kw) -> ARPrior:
    return ARPrior(tiny_net(**kw), TinyCodec(), cond_drop_prob=cond_drop_prob)


def test_model_checks_the_codec():
    with pytest.raises(ValueError, match="num_buckets"):
        ARPrior(tiny_net(num_buckets=NB + 1), TinyCodec())
    prior = tiny_prior()
    prior.codec.is_fitted = False
    img, txt, states, mask = batch()
    with pytest.raises(RuntimeError, match="fitted"):
        prior.loss(img, txt, states, mask)
    assert any(n.startswith("codec.") for n in prior.state_dict())


def test_loss_terms_and_gradients():
    prior = tiny_prior()
    img, txt, states, mask = batch()
    out = prior.loss(img, txt, states, mask, generator=torch.Generator().manual_seed(0))
    assert set(out) >= {"loss", "loss_codes", "loss_dot"}
    torch.testing.assert_close(out["loss"].detach(), (out["loss_dot"] + K * out["loss_codes"]) / (K + 1))
    # an untrained net is nearly uniform: cross-entropy ~ log(vocabulary)
    assert abs(out["loss_codes"].item() - torch.log(torch.tensor(float(NB))).item()) < 0.3
    out["loss"].backward()
    assert prior.net.code_head.weight.grad.abs().sum() > 0 and prior.net.null_txt_emb.grad is not None


def test_null_conditioning_used_at_its_rate():
    prior = tiny_prior(cond_drop_prob=0.2, dim=8, depth=1, heads=2)
    seen = []
    prior.net.register_forward_pre_hook(lambda mod, args: seen.append(args[5].clone()))
    img, txt, states, mask = batch(b=64)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _ in range(40):
            prior.loss(img, txt, states, mask, generator=g)
    drops = torch.cat(seen).float()
    assert drops.numel() == 40 * 64
    assert abs(drops.mean().item() - 0.2) < 0.03          # std ~ 0.008
    assert tiny_prior(cond_drop_prob=0.0).sample_drop_mask(1000).sum() == 0


def test_tiny_prior_overfits_a_fixed_batch():
    torch.manual_seed(0)
    prior = tiny_prior(cond_drop_prob=0.0)
    img, txt, states, mask = batch(b=8)
    opt = torch.optim.AdamW(prior.parameters(), lr=3e-3)
    start = prior.loss(img, txt, states, mask)["loss"].item()
    for _ in range(150):
        loss = prior.loss(img, txt, states, mask)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    end = prior.loss(img, txt, states, mask)["loss"].item()
    assert end < 0.25 * start, (start, end)
    # greedy decoding now reproduces the training codes
    prior.eval()
    dot, codes = prior.sample_codes(txt, states, mask, guidance_scale=1.0, temperature=0.0, top_k=None, top_p=None,
                                    dot_fraction=1.0)
    want_dot, want_codes = prior.targets(img, txt)
    assert (codes[:, 0] == want_codes).float().mean() > 0.9 and (dot[:, 0] == want_dot).float().mean() > 0.8


@pytest.mark.parametrize("guidance_scale,best_of,top_k,top_p", [(1.0, 1, None, None), (3.0, 2, 5, 0.9)])
def test_cached_and_uncached_sampling_agree(guidance_scale, best_of, top_k, top_p):
    prior = tiny_prior()
    shaken(prior.net)
    _, txt, states, mask = batch(b=3)
    kw = dict(guidance_scale=guidance_scale, temperature=1.0, top_k=top_k, top_p=top_p, dot_fraction=0.5,
              best_of=best_of)
    a = prior.sample_codes(txt, states, mask, use_cache=True, generator=torch.Generator().manual_seed(4), **kw)
    b = prior.sample_codes(txt, states, mask, use_cache=False, generator=torch.Generator().manual_seed(4), **kw)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert a[1].shape == (3, best_of, K) and a[0].shape == (3, best_of)
    c = prior.sample_codes(txt, states, mask, generator=torch.Generator().manual_seed(5), **kw)
    assert not torch.equal(a[1], c[1])                  # the seed matters
    za = prior.sample(txt, states, mask, use_cache=True, generator=torch.Generator().manual_seed(4), **kw)
    zb = prior.sample(txt, states, mask, use_cache=False, generator=torch.Generator().manual_seed(4), **kw)
    torch.testing.assert_close(za, zb)


def test_sample_restricts_the_support():
    prior = tiny_prior()
    shaken(prior.net)
    _, txt, states, mask = batch(b=4)
    kw = dict(guidance_scale=2.0, temperature=1.0, best_of=8, generator=torch.Generator().manual_seed(0))
    # top_k=1 is greedy (the dot token fixed by a tiny dot_fraction, so the codes see the same dot)
    _, codes = prior.sample_codes(txt, states, mask, top_k=1, top_p=None, dot_fraction=1e-6, **kw)
    _, gcodes = prior.sample_codes(txt, states, mask, top_k=None, top_p=None, dot_fraction=1e-6,
                                   **dict(kw, temperature=0.0))
    assert torch.equal(codes, gcodes) and gcodes.unique().numel() > 1
    _, free = prior.sample_codes(txt, states, mask, top_k=None, top_p=None, dot_fraction=1e-6, **kw)
    assert not torch.equal(free, gcodes)
    # a tiny top_p is greedy too
    _, codes = prior.sample_codes(txt, states, mask, top_k=None, top_p=1e-6, dot_fraction=1e-6, **kw)
    assert torch.equal(codes, gcodes)
    # a tiny dot_fraction leaves only the bucket of the highest dot product
    dot, _ = prior.sample_codes(txt, states, mask, top_k=None, top_p=None, dot_fraction=1e-6, **kw)
    assert (dot == ND - 1).all()
    # dot_fraction=0.5: only buckets in the top half of each caption's (guided) distribution by dot product
    dot, _ = prior.sample_codes(txt, states, mask, top_k=None, top_p=None, dot_fraction=0.5, **kw)
    rows = torch.cat([torch.zeros(4, dtype=torch.bool), torch.ones(4, dtype=torch.bool)])
    dl, _ = prior.net.start(torch.cat([states, states]), torch.cat([mask, mask]), torch.cat([txt, txt]), rows)
    guided = dl[4:] + 2.0 * (dl[:4] - dl[4:])
    allowed = torch.isfinite(restrict_dot(guided, prior.codec.decode_dot(torch.arange(ND)), 0.5))
    assert allowed.gather(1, dot).all() and not allowed.all()
    # the full distribution reaches buckets outside the top half
    dot_all, _ = prior.sample_codes(txt, states, mask, top_k=None, top_p=None, dot_fraction=1.0,
                                    **dict(kw, best_of=64))
    assert not allowed.gather(1, dot_all).all()


def test_sample_shapes_unit_norm_and_best_of():
    prior = tiny_prior()
    shaken(prior.net)
    _, txt, states, mask = batch(b=3)
    kw = dict(guidance_scale=1.5, temperature=0.8, top_k=None, top_p=0.95)
    z = prior.sample(txt, states, mask, generator=torch.Generator().manual_seed(0), **kw)
    assert z.shape == (3, D)
    torch.testing.assert_close(z.norm(dim=-1), torch.ones(3))
    # best_of keeps the candidate with the largest dot product with z_t
    _, codes = prior.sample_codes(txt, states, mask, best_of=4, generator=torch.Generator().manual_seed(1), **kw)
    cands = prior.codec.decode(codes.view(12, K)).view(3, 4, D)
    z = prior.sample(txt, states, mask, best_of=4, generator=torch.Generator().manual_seed(1), **kw)
    best = torch.einsum("bnd,bd->bn", cands, txt).argmax(1)
    torch.testing.assert_close(z, cands[torch.arange(3), best])
    with pytest.raises(ValueError, match="temperature"):
        prior.sample(txt, states, mask, **dict(kw, temperature=-1.0))
    with pytest.raises(ValueError, match="best_of"):
        prior.sample(txt, states, mask, best_of=0, **kw)


def test_with_the_real_codec_seeded_samples_depend_only_on_their_seed():
    """ARPrior on a fitted PCACodec: the codec travels in the state dict, and with per-caption seeds caption i's
    embedding is the same whatever else is in the batch (as the pipeline requires of a prior)."""
    from unclip_pl.models.pca_codec import PCACodec

    torch.manual_seed(0)
    d, k = 16, 4
    img = F.normalize(torch.randn(300, d), dim=-1)
    txt = F.normalize(img + 0.3 * torch.randn(300, d), dim=-1)
    codec = PCACodec(d, k, num_buckets=8, num_dot_buckets=6)
    codec.fit(img, txt)
    net = ARPriorTransformer(text_width=8, embed_dim=d, num_components=k, num_buckets=8, num_dot_buckets=6, dim=32,
                             depth=1, heads=2, max_text_len=7)
    prior = shaken_prior = ARPrior(shaken(net), codec).eval()
    fresh = ARPrior(ARPriorTransformer(text_width=8, embed_dim=d, num_components=k, num_buckets=8, num_dot_buckets=6,
                                       dim=32, depth=1, heads=2, max_text_len=7), PCACodec(d, k, 8, 6))
    fresh.load_state_dict(shaken_prior.state_dict())
    assert fresh.codec.is_fitted
    zt = txt[:3]
    states, mask = torch.randn(3, 5, 8), torch.ones(3, 5, dtype=torch.bool)
    kw = dict(guidance_scale=2.0, temperature=1.0, top_k=None, top_p=None, dot_fraction=0.5, best_of=2)
    both = prior.sample(zt, states, mask, seeds=[5, 6, 7], **kw)
    alone = fresh.eval().sample(zt[1:2], states[1:2], mask[1:2], seeds=[6], **kw)
    torch.testing.assert_close(both[1:2], alone)
    assert not torch.allclose(both[0], both[1])
    torch.testing.assert_close(both.norm(dim=-1), torch.ones(3))
