"""U-Net option resblock_cross_attn (DALLE2-pytorch's layout: residual blocks below the first level cross-attend to
the context tokens): off, the network is the one before the option, bit for bit (read from git history); on, the
CLIP embedding reaches the output through each path, masked tokens and dropped captions behave, no attention sits
in a resampler, and a tiny decoder with it overfits one batch."""

import pytest
import torch

from tests.helpers import module_from_git
from tests.helpers import randomize_weights as randomize
from unclip_pl.diffusion import GaussianDiffusion, get_betas
from unclip_pl.models.decoder import Decoder
from unclip_pl.nets.unet import AttentionBlock, ContextCrossAttention, Downsample, ResBlock, UNet, Upsample

#: the last commit of unclip_pl/nets/unet.py before the resblock_cross_attn option
BEFORE = "74e9eceb46ca9869a2a23a15a719457d94bbfc22"
D, W = 12, 20


@pytest.fixture(scope="module")
def old_unet_module(tmp_path_factory):
    return module_from_git(BEFORE, "unclip_pl/nets/unet.py", "old_unet_xattn", tmp_path_factory.mktemp("old"))


CASES = {
    # conf/decoder/base.yaml's kind (CLIP tokens, pooled caption, attention at two levels)
    "decoder": dict(model_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1, attention_resolutions=(8, 4),
                    image_size=16, num_head_channels=16, clip_dim=D, num_clip_tokens=4, context_dim=24,
                    pool_context=True),
    # conf/decoder/paper.yaml's kind: learned sigma
    "decoder_sigma": dict(model_channels=32, channel_mult=(1, 2), num_res_blocks=2, attention_resolutions=(16, 8),
                          image_size=16, num_head_channels=16, clip_dim=D, context_dim=24, learn_sigma=True),
    # conf/upsampler/*.yaml's kind: no attention, low-res input
    "upsampler": dict(model_channels=32, channel_mult=(1, 1, 2), num_res_blocks=1, attention_resolutions=(),
                      image_size=16, low_res_channels=3),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("explicit", [False, True])
@torch.no_grad()
def test_option_off_is_the_network_before_it_bit_for_bit(old_unet_module, case, explicit):
    kw = CASES[case]
    torch.manual_seed(3)
    old = old_unet_module.UNet(**kw).eval()
    torch.manual_seed(3)
    new = UNet(**kw, **({"resblock_cross_attn": False} if explicit else {})).eval()
    old_sd, new_sd = old.state_dict(), new.state_dict()
    assert list(new_sd) == list(old_sd)
    assert all(torch.equal(old_sd[k], new_sd[k]) for k in old_sd)
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 3, 16, 16, generator=g), torch.tensor([5, 700])
    cond = {}
    if kw.get("clip_dim"):
        cond = dict(clip_emb=torch.randn(2, D, generator=g), context=torch.randn(2, 5, 24, generator=g),
                    context_mask=torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool))
    else:
        cond = dict(low_res=torch.randn(2, 3, 8, 8, generator=g))
    torch.manual_seed(4)
    for p_old, p_new in zip(old.parameters(), new.parameters()):   # every path carries signal
        p_old.normal_(0, 0.05)
        p_new.copy_(p_old)
    assert torch.equal(old(x, t, **cond), new(x, t, **cond))


def xattn_unet(**kw):
    cfg = dict(model_channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(8,), image_size=16,
               num_head_channels=8, clip_dim=D, num_clip_tokens=4, context_dim=W, resblock_cross_attn=True)
    cfg.update(kw)
    return UNet(**cfg)


def _inputs(B=2, S=5):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(B, 3, 16, 16, generator=g)
    t = torch.tensor([10, 500])[:B]
    ctx = torch.randn(B, S, W, generator=g)
    mask = torch.ones(B, S, dtype=torch.bool)
    mask[:, 3:] = False
    return x, t, ctx, mask, torch.randn(B, D, generator=g), torch.randn(B, D, generator=g)


def test_placement_below_the_first_level_and_none_in_resamplers():
    net = xattn_unet(channel_mult=(1, 2, 2), attention_resolutions=(8, 4))
    placed = {name for name, m in net.named_modules() if isinstance(m, ContextCrossAttention)}
    # levels 1 and 2: 1 block down + 2 up each, and both middle blocks; nothing at level 0 (16 px)
    assert len(placed) == 2 * (1 + 2) + 2
    for block in [*net.down, *net.middle, *net.up]:
        layer = block.layer
        if isinstance(layer, (Upsample, Downsample)) or (isinstance(layer, ResBlock) and layer.updown != "none"):
            assert not any(isinstance(m, (ContextCrossAttention, AttentionBlock)) for m in block.modules())
    assert net.down[0].layer.cross_attn is None and net.up[-1].layer.cross_attn is None   # the first level's blocks
    updown = xattn_unet(resblock_updown=True)
    assert all(b.layer.cross_attn is None for b in [*updown.down, *updown.up]
               if isinstance(b.layer, ResBlock) and b.layer.updown != "none")
    with pytest.raises(ValueError, match="resblock_cross_attn needs context tokens"):   # an upsampler's shape
        UNet(model_channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(), image_size=16,
             low_res_channels=3, resblock_cross_attn=True)


@torch.no_grad()
def test_clip_embedding_reaches_output_through_each_path():
    net = randomize(xattn_unet()).eval()
    x, t, ctx, mask, e1, e2 = _inputs()

    def effect():
        o1 = net(x, t, clip_emb=e1, context=ctx, context_mask=mask)
        o2 = net(x, t, clip_emb=e2, context=ctx, context_mask=mask)
        return (o1 - o2).abs().max().item()

    assert effect() > 1e-3
    attn_kv = [m.encoder_kv for m in net.modules() if isinstance(m, AttentionBlock)]
    res_kv = [m.kv for m in net.modules() if isinstance(m, ContextCrossAttention)]
    saved = {id(p): p.detach().clone() for m in [net.clip_to_time, *attn_kv, *res_kv] for p in m.parameters()}

    def zero(mods):
        for m in mods:
            m.weight.zero_()

    def restore():
        for m in [net.clip_to_time, *attn_kv, *res_kv]:
            for p in m.parameters():
                p.copy_(saved[id(p)])

    zero([net.clip_to_time, *attn_kv])           # only the residual blocks' cross-attention carries the CLIP tokens
    assert effect() > 1e-4
    restore()
    zero([net.clip_to_time, *res_kv])            # only the attention layers carry them
    assert effect() > 1e-4
    restore()
    zero([*attn_kv, *res_kv])                    # only the time embedding carries it
    assert effect() > 1e-4
    zero([net.clip_to_time])                     # every path off: no effect at all
    assert effect() == 0.0


@torch.no_grad()
def test_masked_tokens_ignored_and_dropped_captions_run():
    net = randomize(xattn_unet()).eval()
    x, t, ctx, mask, e1, _ = _inputs()
    out = net(x, t, clip_emb=e1, context=ctx, context_mask=mask)
    ctx2 = ctx.clone()
    ctx2[:, 3:] += 5.0                           # masked positions
    assert torch.allclose(out, net(x, t, clip_emb=e1, context=ctx2, context_mask=mask), atol=1e-5)
    ctx2[:, 0] += 5.0                            # a real token
    assert not torch.allclose(out, net(x, t, clip_emb=e1, context=ctx2, context_mask=mask), atol=1e-4)
    assert torch.isfinite(net(x, t, clip_emb=e1, context=ctx, context_mask=torch.zeros_like(mask))).all()
    # a block whose row has no token to attend to leaves it unchanged (no NaN from an empty softmax)
    xa = randomize(ContextCrossAttention(16, W, 8, 32))
    h = torch.randn(2, 16, 4, 4)
    m = torch.tensor([[True, False, False], [False, False, False]])
    y = xa(h, torch.randn(2, 3, W), m)
    assert torch.isfinite(y).all() and torch.equal(y[1], h[1]) and not torch.allclose(y[0], h[0])


def tiny_decoder(**kw) -> Decoder:
    torch.manual_seed(0)
    unet = UNet(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(8,), image_size=16,
                num_head_channels=16, clip_dim=D, context_dim=W, pool_context=True, resblock_cross_attn=True)
    return Decoder(unet, GaussianDiffusion(get_betas("cosine", 1000)), None, **kw)


def test_decoder_nulls_at_their_rates_with_the_option():
    dec = tiny_decoder(clip_drop_prob=0.05, text_drop_prob=0.5)
    with torch.no_grad():
        dec.clip_null.fill_(7.0)
    B = 40000
    emb, mask = torch.randn(B, D), torch.ones(B, 6, dtype=torch.bool)
    out, m, cd, td = dec.drop_conditions(emb, mask, torch.Generator().manual_seed(0))
    assert abs(cd.float().mean().item() - 0.05) < 0.005 and abs(td.float().mean().item() - 0.5) < 0.01
    assert torch.all(out[cd] == 7.0) and not m[td].any() and m[~td].all()
    # the unconditional branch (null embedding, every caption token masked) runs through the new blocks
    g = torch.Generator().manual_seed(0)
    states = torch.randn(2, 6, W, generator=g)
    x = dec.sample(torch.nn.functional.normalize(torch.randn(2, D, generator=g), dim=-1),
                   text=(states, torch.ones(2, 6, dtype=torch.bool)), steps=2, sampler="ddim", eta=0.0,
                   guidance_scale=3.0, seeds=[0, 1])
    assert x.shape == (2, 3, 16, 16) and torch.isfinite(x).all()


def test_tiny_decoder_with_the_option_overfits_one_batch():
    """Loss on a fixed (t, noise) evaluation of one batch falls at least 3x after 30 Adam steps on it."""
    dec = tiny_decoder(clip_drop_prob=0.0, text_drop_prob=0.0)
    g = torch.Generator().manual_seed(0)
    images = torch.rand(4, 3, 16, 16, generator=g) * 2 - 1
    emb = torch.nn.functional.normalize(torch.randn(4, D, generator=g), dim=-1)
    text = (torch.randn(4, 7, W, generator=g), torch.ones(4, 7, dtype=torch.bool))

    def eval_loss():
        with torch.no_grad():
            return dec.loss(images, emb, text=text, generator=torch.Generator().manual_seed(123))["loss"].item()

    before = eval_loss()
    opt = torch.optim.Adam(dec.parameters(), lr=2e-3)
    for _ in range(30):
        opt.zero_grad()
        dec.loss(images, emb, text=text)["loss"].backward()
        opt.step()
    after = eval_loss()
    assert after < before / 3, (before, after)
    assert all(m.kv.weight.grad is not None for m in dec.unet.modules() if isinstance(m, ContextCrossAttention))


def test_checkpointed_blocks_match_and_the_config_key_builds_it(tmp_path):
    net = randomize(xattn_unet(use_checkpoint=True)).train()
    x, t, ctx, mask, e1, _ = _inputs()
    a = net(x, t, clip_emb=e1, context=ctx, context_mask=mask)
    for b in net.modules():
        if isinstance(b, ResBlock):
            b.use_checkpoint = False
    assert torch.allclose(a, net(x, t, clip_emb=e1, context=ctx, context_mask=mask), atol=1e-6)
    from hydra.utils import instantiate

    from tests.helpers import compose

    unet = "decoder.module.model.unet"
    for value, expect in (("", False), ("true", True)):
        over = ["decoder=base_cliptext", f"{unet}.model_channels=16", f"{unet}.num_head_channels=16"]
        cfg = compose(over + ([f"{unet}.resblock_cross_attn={value}"] if value else []), tmp_path)
        built = instantiate(cfg.decoder.module.model.unet)
        assert built.resblock_cross_attn is expect
        assert any(isinstance(m, ContextCrossAttention) for m in built.modules()) is expect
