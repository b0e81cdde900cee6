"""U-Net: CLIP conditioning through both paths, context masking, no-attention upsampler net, memory formats."""
import pytest
import torch

from tests.helpers import randomize_weights as randomize
from unclip_pl.nets.unet import AttentionBlock, UNet


def tiny_decoder_unet(**kw):
    cfg = dict(model_channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(8,),
               image_size=16, num_head_channels=8, clip_dim=12, num_clip_tokens=4, context_dim=20)
    cfg.update(kw)
    return UNet(**cfg)


def _inputs(B=2, S=5):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(B, 3, 16, 16, generator=g)
    t = torch.tensor([10, 500])[:B]
    ctx = torch.randn(B, S, 20, generator=g)
    mask = torch.ones(B, S, dtype=torch.bool)
    mask[:, 3:] = False
    e1, e2 = torch.randn(B, 12, generator=g), torch.randn(B, 12, generator=g)
    return x, t, ctx, mask, e1, e2


@torch.no_grad()
def test_clip_embedding_reaches_output_through_both_paths():
    net = randomize(tiny_decoder_unet()).eval()
    x, t, ctx, mask, e1, e2 = _inputs()

    def effect():
        o1 = net(x, t, clip_emb=e1, context=ctx, context_mask=mask)
        o2 = net(x, t, clip_emb=e2, context=ctx, context_mask=mask)
        return (o1 - o2).abs().max().item()

    assert effect() > 1e-3
    time_w = [p.detach().clone() for p in net.clip_to_time.parameters()]
    tok_w = [p.detach().clone() for p in net.clip_to_tokens.parameters()]
    net.clip_to_time.weight.zero_()              # time path off: the 4 context tokens still carry it
    assert effect() > 1e-4
    for p, w in zip(net.clip_to_time.parameters(), time_w):
        p.copy_(w)
    net.clip_to_tokens.weight.zero_()            # token path off: the time embedding still carries it
    assert effect() > 1e-4
    net.clip_to_time.weight.zero_()              # both off: no effect at all
    assert effect() == 0.0
    del tok_w


@torch.no_grad()
def test_masked_context_tokens_are_ignored_and_real_ones_matter():
    net = randomize(tiny_decoder_unet()).eval()
    x, t, ctx, mask, e1, _ = _inputs()
    out = net(x, t, clip_emb=e1, context=ctx, context_mask=mask)
    ctx2 = ctx.clone()
    ctx2[:, 3:] += 5.0                            # masked positions
    assert torch.allclose(out, net(x, t, clip_emb=e1, context=ctx2, context_mask=mask), atol=1e-5)
    ctx2[:, 0] += 5.0                             # a real token
    assert not torch.allclose(out, net(x, t, clip_emb=e1, context=ctx2, context_mask=mask), atol=1e-4)
    # every caption token masked (dropped caption) still runs: only the 4 CLIP tokens remain
    out0 = net(x, t, clip_emb=e1, context=ctx, context_mask=torch.zeros_like(mask))
    assert torch.isfinite(out0).all()


def test_attention_placement_and_learn_sigma():
    net = tiny_decoder_unet(channel_mult=(1, 2, 2), attention_resolutions=(8, 4), learn_sigma=True)
    n_attn = sum(isinstance(m, AttentionBlock) for m in net.modules())
    # levels at 16, 8, 4 px with 1 res block down and 2 up each: (1 + 2) * 2 attended levels + middle
    assert n_attn == 3 * 2 + 1
    x, t, ctx, mask, e1, _ = _inputs()
    assert net(x, t, clip_emb=e1, context=ctx, context_mask=mask).shape == (2, 6, 16, 16)


def test_no_attention_upsampler_net_runs_at_any_multiple_size():
    net = UNet(model_channels=16, channel_mult=(1, 2, 2), num_res_blocks=1, attention_resolutions=[],
               image_size=64, low_res_channels=3)
    assert not any(isinstance(m, AttentionBlock) for m in net.modules())
    assert not any("attn" in type(m).__name__.lower() or isinstance(m, torch.nn.MultiheadAttention)
                   for m in net.modules())
    for hw in [(16, 16), (24, 40)]:
        x = torch.randn(1, 3, *hw)
        low = torch.randn(1, 3, hw[0] // 2, hw[1] // 2)
        assert net(x, torch.tensor([3]), low_res=low).shape == (1, 3, *hw)


def test_low_res_conditioning_matters():
    net = randomize(UNet(model_channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=[],
                         image_size=16, low_res_channels=3)).eval()
    x = torch.randn(1, 3, 16, 16)
    a = net(x, torch.tensor([3]), low_res=torch.zeros(1, 3, 8, 8))
    b = net(x, torch.tensor([3]), low_res=torch.ones(1, 3, 8, 8))
    assert (a - b).abs().max() > 1e-3


def test_checkpointing_channels_last_and_bf16():
    net = randomize(tiny_decoder_unet(use_checkpoint=True))
    x, t, ctx, mask, e1, _ = _inputs()
    kw = dict(clip_emb=e1, context=ctx, context_mask=mask)
    net.train()
    out = net(x, t, **kw)
    out.square().mean().backward()
    g_ckpt = net.conv_in.weight.grad.clone()
    net.zero_grad()
    for m in net.modules():
        if hasattr(m, "use_checkpoint"):
            m.use_checkpoint = False
    net(x, t, **kw).square().mean().backward()
    assert torch.allclose(g_ckpt, net.conv_in.weight.grad, atol=1e-5)
    net.eval()
    with torch.no_grad():
        ref = net(x, t, **kw)
        net_cl = net.to(memory_format=torch.channels_last)
        out_cl = net_cl(x.contiguous(memory_format=torch.channels_last), t, **kw)
        assert torch.allclose(ref, out_cl, atol=1e-4)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out_bf = net(x, t, **kw)
        assert torch.isfinite(out_bf).all() and out_bf.shape == ref.shape


def test_missing_conditioning_raises():
    net = tiny_decoder_unet()
    with pytest.raises(ValueError, match="clip_emb"):
        net(torch.randn(1, 3, 16, 16), torch.tensor([1]))


@pytest.mark.parametrize("kind", ["decoder", "upsampler"])
def test_compiles_as_one_graph(kind):
    """No graph breaks (fullgraph=True), so torch.compile on a GPU fuses the whole U-Net; same outputs as eager."""
    if kind == "decoder":
        net = randomize(tiny_decoder_unet()).eval()
        x, t, ctx, mask, e1, _ = _inputs()
        kw = dict(clip_emb=e1, context=ctx, context_mask=mask)
    else:
        net = randomize(UNet(model_channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=[],
                             image_size=16, low_res_channels=3)).eval()
        x, t = torch.randn(2, 3, 16, 16), torch.tensor([3, 700])
        kw = dict(low_res=torch.randn(2, 3, 8, 8))
    compiled = torch.compile(net, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x, t, **kw), net(x, t, **kw), atol=1e-5, rtol=1e-4)


def test_text_encoder_compiles_as_one_graph():
    from unclip_pl.nets.text import TextEncoder

    te = TextEncoder(vocab_size=100, context_length=12, width=16, layers=1, heads=2).eval()
    tokens = torch.tensor([[98, 5, 7, 99, 0, 0], [98, 99, 0, 0, 0, 0]])
    states, mask = torch.compile(te, backend="aot_eager", fullgraph=True)(tokens)
    ref_states, ref_mask = te(tokens)
    torch.testing.assert_close(states, ref_states)
    assert torch.equal(mask, ref_mask)


def test_pooled_caption_is_the_end_token_state_and_zero_when_dropped():
    from unclip_pl.nets.unet import last_real_state

    ctx = torch.randn(3, 5, 4)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]], dtype=torch.bool)
    pooled = last_real_state(ctx, mask)
    assert torch.equal(pooled[0], ctx[0, 2]) and torch.equal(pooled[1], ctx[1, 4])
    assert torch.equal(pooled[2], torch.zeros(4))                   # dropped caption: no pooled term
    # the U-Net feeds exactly that into the time embedding (before the CLIP tokens join the context)
    net = randomize(tiny_decoder_unet(pool_context=True)).eval()
    x, t, ctx, mask, e1, _ = _inputs()
    seen = []
    net.context_to_time.register_forward_hook(lambda m, args, out: seen.append(args[0]))
    with torch.no_grad():
        a = net(x, t, clip_emb=e1, context=ctx, context_mask=mask)
        torch.nn.init.zeros_(net.context_to_time.weight)
        b = net(x, t, clip_emb=e1, context=ctx, context_mask=mask)
    torch.testing.assert_close(seen[0], ctx[:, 2])                   # mask[:, 3:] is False
    assert (a - b).abs().max() > 1e-4                                # the pooled path reaches the output
    with pytest.raises(ValueError, match="pool_context"):
        UNet(model_channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=[], image_size=16,
             low_res_channels=3, pool_context=True)


def test_group_norm_in_float32_with_low_precision_weights():
    """Pure-bf16 models (weights in bf16, as the paper-size CPU check builds them) normalise in float32 too."""
    from unclip_pl.nets.unet import GroupNorm32

    norm = GroupNorm32(64)
    torch.nn.init.normal_(norm.weight)
    x = torch.randn(2, 64, 4, 4)
    ref = norm(x)
    out = norm.bfloat16()(x.bfloat16())
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, atol=0.05, rtol=0.02)
