"""The autoregressive prior as the other stages train it: bf16 autocast, ``compile=true`` (``compile_networks``), and
the paper's shape (``prior=ar_paper``): its config on the meta device (fast) and one real AdamW step (slow)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate

from tests.helpers import compose
from unclip_pl.models.ar_prior import ARPrior
from unclip_pl.models.pca_codec import PCACodec
from unclip_pl.nets.ar_prior import ARPriorTransformer

D, W, L, K, NB, ND = 16, 24, 9, 5, 8, 6
GREEDY = dict(guidance_scale=1.0, temperature=0.0, top_k=None, top_p=None, dot_fraction=1.0, best_of=1)


def fitted_codec(d: int = D, k: int = K, nb: int = NB, nd: int = ND, n: int = 400) -> PCACodec:
    g = torch.Generator().manual_seed(3)
    img = F.normalize(torch.randn(n, d, generator=g), dim=-1)
    txt = F.normalize(img + 0.5 * torch.randn(n, d, generator=g), dim=-1)
    codec = PCACodec(d, k, num_buckets=nb, num_dot_buckets=nd)
    codec.fit(img, txt)
    return codec


def tiny_prior(seed: int = 0, scale: float = 0.0) -> ARPrior:
    """A tiny AR prior on a fitted real codec; ``scale`` adds random weight noise so logits differ clearly."""
    torch.manual_seed(seed)
    net = ARPriorTransformer(text_width=W, embed_dim=D, num_components=K, num_buckets=NB, num_dot_buckets=ND, dim=32,
                             depth=2, heads=4, max_text_len=L)
    if scale:
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn_like(p) * scale)
    return ARPrior(net, fitted_codec(), cond_drop_prob=0.0)


def batch(b: int = 6, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(b, D, generator=g), dim=-1)
    txt = F.normalize(img + 0.5 * torch.randn(b, D, generator=g), dim=-1)
    states = torch.randn(b, L, W, generator=g)
    mask = torch.arange(L)[None] < torch.randint(2, L + 1, (b,), generator=g)[:, None]
    return img, txt, states, mask


# ------------------------------------------------------------------------------------------------------------- bf16
def test_bf16_autocast_loss_gradients_and_sampling():
    """Under bf16 autocast (trainer.precision=bf16-mixed) the loss matches float32 closely, every parameter gets a
    float32 gradient, and sampling (cached and uncached alike) returns unit-norm float32 embeddings."""
    prior = tiny_prior(scale=0.3)
    img, txt, states, mask = batch()
    ref = prior.loss(img, txt, states, mask)["loss"]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = prior.loss(img, txt, states, mask)
        assert prior.net(states, mask, txt, *prior.targets(img, txt))[1].dtype == torch.bfloat16  # autocast is on
    assert out["loss"].dtype == torch.float32 and torch.isfinite(out["loss"])
    torch.testing.assert_close(out["loss"], ref, rtol=0.03, atol=0.03)
    out["loss"].backward()
    for name, p in prior.named_parameters():
        assert p.grad is not None and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all(), name
    assert prior.net.code_head.weight.grad.abs().sum() > 0
    prior.eval()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z = prior.sample(txt, states, mask, **GREEDY)
        z_uncached = prior.sample(txt, states, mask, use_cache=False, **GREEDY)
    for x in (z, z_uncached):
        assert x.shape == (6, D) and x.dtype == torch.float32
        torch.testing.assert_close(x.norm(dim=-1), torch.ones(6))


# ---------------------------------------------------------------------------------------------------------- compile
def test_compile_networks_keeps_keys_matches_eager_and_samples():
    """compile=true compiles the AR prior's network in place: the checkpoint keys stay, loss and gradients match
    eager, and the sampler (the K/V-cached path, uncompiled ``start``/``step``) still draws eager's codes."""
    from unclip_pl.train import compile_networks

    eager, compiled = tiny_prior(scale=0.3), tiny_prior(scale=0.3)
    compiled.load_state_dict(eager.state_dict())
    keys = list(compiled.state_dict())
    assert compile_networks(compiled, backend="aot_eager", fullgraph=True) == ["net"]
    assert list(compiled.state_dict()) == keys and not any("_orig_mod" in k for k in keys)
    img, txt, states, mask = batch()
    losses = []
    for model in (eager, compiled):
        out = model.loss(img, txt, states, mask)["loss"]
        out.backward()
        losses.append(out.detach())
    torch.testing.assert_close(losses[0], losses[1], atol=1e-5, rtol=1e-5)
    for (n, a), b in zip(eager.named_parameters(), compiled.parameters()):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-4, msg=n)
    eager.eval(), compiled.eval()
    _, ref = eager.sample_codes(txt, states, mask, **GREEDY)
    _, codes = compiled.sample_codes(txt, states, mask, **GREEDY)
    assert torch.equal(codes, ref)


# --------------------------------------------------------------------------------------------------- paper shape
def _paper_cfg(tmp_path: Path, *extra: str):
    return compose(["prior=ar_paper", "clip=pretrained", *extra], tmp_path)


def test_ar_paper_config_builds_and_runs_on_the_meta_device(tmp_path):
    """`prior=ar_paper clip=pretrained` has Table 3's shape; its network, built on the meta device (no memory),
    has about 1.2B parameters and runs a forward and backward pass at the CLIP's widths."""
    cfg = _paper_cfg(tmp_path)
    net_cfg = cfg.prior.module.model.net
    assert (net_cfg.dim, net_cfg.depth, net_cfg.heads) == (2048, 24, 32)
    assert (cfg.prior.num_components, cfg.prior.num_buckets, cfg.prior.num_dot_buckets) == (319, 1024, 1024)
    assert cfg.prior.module.optimizer.lr == pytest.approx(1.6e-4) and cfg.prior.module.warmup_steps == 10000
    assert cfg.prior.module.ema_decay == 0.999
    with torch.device("meta"):
        model = instantiate(cfg.prior.module.model)
    net = model.net
    assert isinstance(model, ARPrior) and (net.text_width, net.embed_dim) == (cfg.clip.text_width, cfg.clip.embed_dim)
    n = sum(p.numel() for p in net.parameters())
    assert 1.1e9 < n < 1.4e9, n
    b, lt = 2, cfg.clip.context_length
    with torch.device("meta"):
        states, txt = torch.randn(b, lt, net.text_width), torch.randn(b, net.embed_dim)
        mask = torch.ones(b, lt, dtype=torch.bool)
        dot, codes = torch.zeros(b, dtype=torch.long), torch.zeros(b, 319, dtype=torch.long)
        dot_logits, code_logits = net(states, mask, txt, dot, codes, torch.zeros(b, dtype=torch.bool))
        assert dot_logits.shape == (b, 1024) and code_logits.shape == (b, 319, 1024)
        (dot_logits.sum() + code_logits.sum()).backward()
    assert net.code_head.weight.grad is not None and net.code_head.weight.grad.shape == (1024, 2048)


def _available_gib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 2 ** 20
    return 0.0


@pytest.mark.slow
def test_ar_paper_config_instantiates_and_steps(tmp_path):
    """One AdamW step of the 1.2B-parameter `prior=ar_paper` module on the CPU, with a locally built CLIP of the
    paper's width (1024; no download), its codec fitted on random embeddings. Without the EMA copy and with the
    per-tensor AdamW (no foreach temporaries) it needs about 20 GB; skipped on a machine with less free memory."""
    from unclip_pl.clip.frozen import FrozenCLIP
    from unclip_pl.clip.small import build_small_clip

    if _available_gib() < 21:
        pytest.skip(f"needs about 21 GiB of free memory, {_available_gib():.1f} GiB available")
    width, ctx = 1024, 16
    cfg = _paper_cfg(tmp_path, f"clip.embed_dim={width}", f"clip.text_width={width}", f"clip.context_length={ctx}")
    cfg.prior.module.ema_decay = None
    cfg.prior.module.optimizer.foreach = False
    clip = FrozenCLIP(build_small_clip(embed_dim=width, vision_cfg={"width": 32, "layers": 1, "head_width": 16},
                                       text_cfg={"width": width, "layers": 1, "heads": 8, "context_length": ctx}))
    module = instantiate(cfg.prior.module, clip=clip)
    assert 1.1e9 < sum(p.numel() for p in module.model.net.parameters()) < 1.4e9
    g = torch.Generator().manual_seed(0)
    img = F.normalize(torch.randn(2048, width, generator=g), dim=-1)
    module.model.codec.fit(img, F.normalize(img + torch.randn(2048, width, generator=g), dim=-1))
    tokens = torch.zeros(2, ctx, dtype=torch.long)
    tokens[:, 0], tokens[:, 1:4], tokens[:, 4] = 49406, torch.randint(1, 49000, (2, 3), generator=g), 49407
    bt = {"tokens": tokens, "img_emb": img[:2], "txt_emb": clip.encode_text(tokens).emb}
    opt = module.configure_optimizers()
    opt = opt["optimizer"] if isinstance(opt, dict) else opt
    loss = module.compute_loss(bt)["loss"]
    assert abs(float(loss) - math.log(1024)) < 1.0  # an untrained net is close to uniform over 1024 buckets
    head = module.model.net.code_head.weight.detach().clone()
    loss.backward()
    opt.step()
    assert not torch.equal(module.model.net.code_head.weight, head)
