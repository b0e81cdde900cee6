"""An upsampler with a last_unet (Karlo's super_res_last) calls it at the final sampler step only, with every
sampler and step count; training leaves it untouched."""
import pytest
import torch

from unclip_pl.diffusion import GaussianDiffusion, get_betas
from unclip_pl.models.upsampler import Upsampler
from unclip_pl.nets.unet import UNet


class Recording(torch.nn.Module):
    """A U-Net that records the timesteps it is called at (the calls are the test's subject)."""

    def __init__(self, net: UNet, calls: list):
        super().__init__()
        self.net, self.calls = net, calls
        self.low_res_channels, self.learn_sigma, self.in_channels = net.low_res_channels, net.learn_sigma, 3
        self.image_size, self.num_levels, self.low_res_mode = net.image_size, net.num_levels, net.low_res_mode

    def forward(self, x, t, **kw):
        self.calls.append(int(t[0]))
        return self.net(x, t, **kw)


def tiny_unet(seed: int) -> UNet:
    torch.manual_seed(seed)
    return UNet(model_channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(), image_size=16,
                low_res_channels=3, resblock_updown=True, low_res_mode="bicubic")


@pytest.mark.parametrize("sampler,steps", [("ddpm", 4), ("ddim", 3), ("dpmpp_2m", 5), ("ddim", 1)])
@torch.no_grad()
def test_last_unet_runs_the_final_step_only(sampler, steps):
    first_calls, last_calls = [], []
    up = Upsampler(Recording(tiny_unet(0), first_calls), GaussianDiffusion(get_betas("cosine", 1000)), low_res_size=8,
                   last_unet=Recording(tiny_unet(1), last_calls))
    up.sample(torch.zeros(1, 3, 8, 8), steps=steps, sampler=sampler, eta=0.0, generator=torch.Generator())
    assert len(first_calls) == steps - 1 and len(last_calls) == 1
    assert last_calls[0] < min(first_calls, default=1000)       # the lowest noise level: the final step
    first_calls.clear()
    up.sample(torch.zeros(1, 3, 8, 8), steps=steps, sampler=sampler, eta=0.0, generator=torch.Generator())
    assert len(first_calls) == steps - 1 and len(last_calls) == 2  # a second call starts over


def test_training_trains_unet_only():
    up = Upsampler(tiny_unet(0), GaussianDiffusion(get_betas("cosine", 1000)), low_res_size=8,
                   last_unet=tiny_unet(1))
    assert not any(p.requires_grad for p in up.last_unet.parameters())
    up.loss(torch.rand(2, 3, 16, 16) * 2 - 1, generator=torch.Generator().manual_seed(0))["loss"].backward()
    assert all(p.grad is None for p in up.last_unet.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in up.unet.parameters())
    with pytest.raises(ValueError, match="same inputs"):
        Upsampler(tiny_unet(0), GaussianDiffusion(get_betas("cosine", 1000)), low_res_size=8,
                  last_unet=UNet(model_channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(),
                                 image_size=16))
