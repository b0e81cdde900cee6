"""The U-Net's options for other checkpoints' layouts leave the existing configs the same function: against the
network as it was before they were added (read from git history), the same seed gives the same initial weights,
state-dict keys and outputs, bit for bit, for the decoder, caption-pooling and upsampler shapes of the configs."""

import pytest
import torch

from tests.helpers import module_from_git
from unclip_pl.nets.unet import UNet

#: the last commit of unclip_pl/nets/unet.py before the resblock_updown / context_proj / text_emb options
BEFORE = "0a73ee449950a03ef570f3a803abe3ce409c7504"


@pytest.fixture(scope="module")
def old_unet_module(tmp_path_factory):
    return module_from_git(BEFORE, "unclip_pl/nets/unet.py", "old_unet", tmp_path_factory.mktemp("old"))


CASES = {
    # conf/decoder/base.yaml's shape at a tiny size (CLIP tokens, pooled caption, attention)
    "decoder": dict(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(8,),
                    image_size=16, num_head_channels=16, clip_dim=12, num_clip_tokens=4, context_dim=24,
                    pool_context=True),
    # conf/decoder/paper.yaml's kind: learned sigma, no pooled caption
    "decoder_sigma": dict(model_channels=32, channel_mult=(1, 2), num_res_blocks=2, attention_resolutions=(16, 8),
                          image_size=16, num_head_channels=16, clip_dim=12, context_dim=24, learn_sigma=True),
    # conf/upsampler/*.yaml's kind: no attention, low-res input
    "upsampler": dict(model_channels=32, channel_mult=(1, 1, 2), num_res_blocks=1, attention_resolutions=(),
                      image_size=16, low_res_channels=3),
}


@pytest.mark.parametrize("case", sorted(CASES))
@torch.no_grad()
def test_existing_configs_unchanged_bit_for_bit(old_unet_module, case):
    kw = CASES[case]
    torch.manual_seed(3)
    old = old_unet_module.UNet(**kw).eval()
    torch.manual_seed(3)
    new = UNet(**kw).eval()
    old_sd, new_sd = old.state_dict(), new.state_dict()
    assert list(new_sd) == list(old_sd)
    for k in old_sd:
        assert torch.equal(new_sd[k], old_sd[k]), k
    g = torch.Generator().manual_seed(0)
    for p in old.parameters():                  # non-zero everywhere, so every path carries signal
        p.add_(0.05 * torch.randn(p.shape, generator=g))
    new.load_state_dict(old.state_dict())
    x = torch.randn(2, 3, 16, 16, generator=g)
    t = torch.tensor([3, 700])
    cond = {}
    if kw.get("clip_dim"):
        mask = torch.ones(2, 5, dtype=torch.bool)
        mask[1, 2:] = False
        cond = dict(clip_emb=torch.randn(2, 12, generator=g), context=torch.randn(2, 5, 24, generator=g),
                    context_mask=mask)
    if kw.get("low_res_channels"):
        cond = dict(low_res=torch.randn(2, 3, 8, 8, generator=g))
    out_old, out_new = old(x, t, **cond), new(x, t, **cond)
    assert out_new.abs().max() > 0
    assert torch.equal(out_new, out_old)
