"""The prior's and the frozen CLIP's options for Karlo's conditioning: ``DiffusionPrior(unit_norm=False)`` (CLIP's raw
projections in and out), ``DiffusionPrior(uncond="empty_caption")`` (guidance and caption dropout against the
encoding of ``""``), ``FrozenCLIP(normalize=False)``; and the defaults, bit for bit the prior as it was before them
(read from git history)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.helpers import module_from_git
from unclip_pl.clip.frozen import FrozenCLIP
from unclip_pl.clip.small import build_small_clip
from unclip_pl.diffusion import GaussianDiffusion, get_betas
from unclip_pl.models.prior import DiffusionPrior
from unclip_pl.nets.prior import PriorTransformer

#: the last commit of unclip_pl/models/prior.py before the unit_norm / uncond options
BEFORE = "f8d2c4eef96e7cbcffa66e441e91f46f01b423c7"
D, W = 16, 16


@pytest.fixture(scope="module")
def old_prior_module(tmp_path_factory):
    return module_from_git(BEFORE, "unclip_pl/models/prior.py", "old_prior", tmp_path_factory.mktemp("old"))


def make_net(seed: int = 0) -> PriorTransformer:
    torch.manual_seed(seed)
    net = PriorTransformer(embed_dim=D, text_width=W, dim=32, depth=2, heads=2, max_text_len=77)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return net.eval()


def make_prior(cls=DiffusionPrior, net=None, **kw) -> DiffusionPrior:
    diffusion = GaussianDiffusion(get_betas("cosine", 1000), target="x0")
    prior = cls(net if net is not None else make_net(), diffusion, **kw).eval()
    if prior.normalization == "standardize":
        g = torch.Generator().manual_seed(5)
        prior.fit_normalizer(torch.randn(64, D, generator=g) * 0.7 + 0.2)
    return prior


def captions(b: int = 3, length: int = 8, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    tok = torch.randn(b, length, W, generator=g)
    mask = torch.zeros(b, length, dtype=torch.bool)
    for i in range(b):
        mask[i, : 2 + 2 * i] = True
    return F.normalize(torch.randn(b, D, generator=g), dim=-1), tok, mask


def empty_caption(seed: int = 2):
    """The encoding of "" (start and end token), trimmed to 8 positions like the project's CLIP serves it."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(1, 8, dtype=torch.bool)
    mask[:, :2] = True
    return torch.randn(1, 8, W, generator=g), mask, torch.randn(1, D, generator=g)


SAMPLE = dict(steps=4, sampler="ddpm", eta=0.0, guidance_scale=3.0)


@pytest.mark.parametrize("normalization", ["scale", "standardize"])
@torch.no_grad()
def test_defaults_are_the_earlier_prior_bit_for_bit(old_prior_module, normalization):
    new = make_prior(normalization=normalization)
    old = make_prior(old_prior_module.DiffusionPrior, net=new.net, normalization=normalization)
    old.load_state_dict(new.state_dict())
    txt, tok, mask = captions()
    img = F.normalize(torch.randn(3, D, generator=torch.Generator().manual_seed(4)), dim=-1)
    for a, b in zip(new.loss(img, txt, tok, mask, generator=torch.Generator().manual_seed(6)).values(),
                    old.loss(img, txt, tok, mask, generator=torch.Generator().manual_seed(6)).values()):
        assert torch.equal(a, b)
    for kw in (dict(best_of=2, use_cache=True), dict(best_of=1, use_cache=False), dict(best_of=2, guidance_scale=1.0)):
        args = {**SAMPLE, **kw}
        assert torch.equal(new.sample(txt, tok, mask, seeds=[0, 1, 2], **args),
                           old.sample(txt, tok, mask, seeds=[0, 1, 2], **args))


@torch.no_grad()
def test_empty_caption_guidance_is_guidance_against_its_encoding():
    """Guided sampling with uncond="empty_caption" is cond + s * (cond - uncond), uncond the network on the empty
    caption's encoding (padded to the captions' length, masked), with the cached prefix and without; raw
    projections (unit_norm=False) go in and come out unscaled and unnormalised."""
    from unclip_pl.diffusion import classifier_free_guidance, sample_ddpm

    prior = make_prior(normalization="standardize", unit_norm=False, uncond="empty_caption", clip_sample_range=5.0)
    txt, tok, mask = captions()
    txt = txt * 3.0                                               # raw projections: not unit norm
    e_tok, e_mask, e_emb = empty_caption()
    got = {c: prior.sample(txt, tok, mask, seeds=[0, 1, 2], uncond_text=(e_tok, e_mask, e_emb), best_of=1,
                           use_cache=c, **SAMPLE) for c in (True, False)}
    net, b = prior.net, txt.shape[0]
    cond = dict(text_tokens=tok, text_mask=mask, txt_emb=txt)      # fed as given: no sqrt(D) scaling
    uncond = dict(text_tokens=e_tok.expand(b, -1, -1), text_mask=e_mask.expand(b, -1), txt_emb=e_emb.expand(b, -1))
    from unclip_pl.diffusion import initial_noise, step_generator

    x_T = initial_noise((b, D), "cpu", seeds=[0, 1, 2], stage="prior")
    x0 = sample_ddpm(prior.diffusion, classifier_free_guidance(net, 3.0, cond, uncond), x_T, 4,
                     generator=step_generator([0, 1, 2], None, stage="prior"),
                     denoised_fn=lambda x: x.clamp(-5.0, 5.0))
    ref = x0 * prior.norm_std + prior.norm_mean                     # de-standardised only (post_process_latents)
    for out in got.values():
        assert (out - ref).abs().max() <= 1e-5
    assert (ref.norm(dim=-1) - 1).abs().max() > 0.1                  # not renormalised
    learned = make_prior(net=prior.net, normalization="standardize", unit_norm=False)
    learned.load_state_dict(prior.state_dict())
    assert (learned.sample(txt, tok, mask, seeds=[0, 1, 2], best_of=1, **SAMPLE) - ref).abs().max() > 1e-2
    # without guidance the empty caption is not needed; with it, its absence is one line
    prior.sample(txt, tok, mask, seeds=[0, 1, 2], best_of=1, **{**SAMPLE, "guidance_scale": 1.0})
    with pytest.raises(ValueError, match="empty caption") as e:
        prior.sample(txt, tok, mask, best_of=1, **SAMPLE)
    assert "\n" not in str(e.value)


@torch.no_grad()
def test_empty_caption_replaces_the_dropped_rows_in_training():
    """With every row dropped, the loss is the loss of the empty caption given as every row's caption."""
    net = make_net()
    dropped = make_prior(net=net, normalization="standardize", unit_norm=False, uncond="empty_caption",
                         cond_drop_prob=1.0)
    plain = make_prior(net=net, normalization="standardize", unit_norm=False, cond_drop_prob=0.0)
    plain.load_state_dict(dropped.state_dict())
    txt, tok, mask = captions(length=16)
    img = torch.randn(3, D, generator=torch.Generator().manual_seed(4))
    e_tok, e_mask, e_emb = empty_caption()
    got = dropped.loss(img, txt, tok, mask, generator=torch.Generator().manual_seed(6),
                       uncond_text=(e_tok, e_mask, e_emb))
    want = plain.loss(img, e_emb.expand(3, -1), e_tok.expand(3, -1, -1), e_mask.expand(3, -1),
                      generator=torch.Generator().manual_seed(6))
    assert got["cond_drop_frac"] == 1.0
    torch.testing.assert_close(got["loss"], want["loss"], rtol=1e-5, atol=1e-6)
    kept = dropped.loss(img, txt, tok, mask, generator=torch.Generator().manual_seed(6),
                        uncond_text=(torch.zeros_like(e_tok), e_mask, e_emb))
    assert (kept["loss"] - got["loss"]).abs() > 1e-4                     # the empty caption's states are used
    with pytest.raises(ValueError, match="empty caption"):
        dropped.loss(img, txt, tok, mask)


def test_bad_options_are_one_line_errors():
    with pytest.raises(ValueError, match="standardize"):
        make_prior(normalization="scale", unit_norm=False)
    with pytest.raises(ValueError, match="empty_caption"):
        make_prior(uncond="zeros")


@torch.no_grad()
def test_frozen_clip_normalize_false_gives_the_raw_projections():
    from unclip_pl.clip.text import encode_text_tokens

    torch.manual_seed(0)
    model = build_small_clip("unclip-tiny", embed_dim=D)
    unit, raw = FrozenCLIP(model), FrozenCLIP(model, normalize=False)
    texts = ["a red heart", "", "a small blue car"]
    pooled, states, _ = encode_text_tokens(model, unit.tokenize(texts))
    a, b = unit.encode_text(texts), raw.encode_text(texts)
    assert torch.equal(b.emb, pooled.float()) and (b.emb.norm(dim=-1) - 1).abs().max() > 1e-3
    assert torch.equal(a.emb, F.normalize(b.emb, dim=-1))
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.tokens, states.float()) and torch.equal(a.mask, b.mask)
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    torch.testing.assert_close(unit.encode_image(images), F.normalize(raw.encode_image(images), dim=-1))
    assert (raw.encode_image(images).norm(dim=-1) - 1).abs().max() > 1e-3
    assert unit.fingerprint != raw.fingerprint                      # embedding folders of one are not the other's
    assert unit.fingerprint == FrozenCLIP(model).fingerprint


@torch.no_grad()
def test_prior_module_gives_the_empty_caption_to_the_loss():
    """lit/prior.py: training and validation of an uncond="empty_caption" prior see the CLIP's encoding of ""."""
    from unclip_pl.lit.prior import PriorModule

    torch.manual_seed(0)
    clip = FrozenCLIP(build_small_clip("unclip-tiny", embed_dim=D, text_cfg={"width": W}), normalize=False)
    prior = make_prior(normalization="standardize", unit_norm=False, uncond="empty_caption", cond_drop_prob=1.0)
    module = PriorModule(prior, clip=clip, ema_decay=None, sample={**SAMPLE, "best_of": 1})
    tokens = clip.tokenize(["a red heart", "a blue car"])
    img = torch.randn(2, D, generator=torch.Generator().manual_seed(3))
    batch = {"tokens": tokens, "img_emb": img, "txt_emb": clip.encode_text(tokens).emb}
    torch.manual_seed(7)
    got = module.compute_loss(batch)["loss"]
    e = clip.encode_text([""])
    torch.manual_seed(7)
    enc = clip.encode_text(tokens)
    want = prior.loss(img, batch["txt_emb"], enc.tokens, enc.mask, uncond_text=(e.tokens, e.mask, e.emb))["loss"]
    assert torch.equal(got, want)
