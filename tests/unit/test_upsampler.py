"""Upsamplers: no attention, quarter-size training crops, full-size sampling at other sizes, configs."""
import pytest
import torch
from hydra.utils import instantiate

from unclip_pl.data.degrade import gaussian_blur
from unclip_pl.diffusion import GaussianDiffusion, get_betas
from unclip_pl.models.upsampler import Upsampler, random_crop_pair
from unclip_pl.nets.unet import AttentionBlock, UNet

#: an upsampler stage's sample: block (3 steps)
SAMPLE = {"steps": 3, "sampler": "ddim", "eta": 0.0}


def compose(overrides: list[str], output_dir=None):
    """The real config composed from conf/train.yaml as train.py does (only the stage subtree is instantiated)."""
    from pathlib import Path

    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    conf = Path(__file__).resolve().parents[2] / "conf"
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        return hydra_compose(config_name="train", overrides=overrides)



def tiny_upsampler(**kw) -> Upsampler:
    torch.manual_seed(0)
    unet = UNet(model_channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=[], image_size=32,
                low_res_channels=3)
    return Upsampler(unet, GaussianDiffusion(get_betas("cosine", 1000)), low_res_size=16, degradation=gaussian_blur,
                     **kw)


def test_training_crop_is_a_quarter_and_matches_low_res_window():
    up = tiny_upsampler()
    assert up.crop_size == 8 and up.scale == 2
    seen = []
    hook = up.unet.register_forward_hook(lambda m, args, kwargs, out: seen.append((args[0].shape,
                                                                                   kwargs["low_res"].shape)),
                                         with_kwargs=True)
    out = up.loss(torch.rand(3, 3, 32, 32) * 2 - 1)
    hook.remove()
    assert torch.isfinite(out["loss"])
    assert seen == [(torch.Size([3, 3, 8, 8]), torch.Size([3, 3, 8, 8]))]
    # the same window is cut from both tensors, different windows per sample
    a = torch.arange(2 * 32 * 32, dtype=torch.float32).view(2, 1, 32, 32)
    ca, cb = random_crop_pair(a, a * 2, 8, torch.Generator().manual_seed(0))
    assert ca.shape == (2, 1, 8, 8) and torch.equal(cb, ca * 2)
    assert torch.equal(ca[:, :, 1:, :] - ca[:, :, :-1, :], torch.full((2, 1, 7, 8), 32.0))  # contiguous window


def test_upsampler_has_no_attention_and_samples_at_other_sizes():
    up = tiny_upsampler().eval()
    assert not any(isinstance(m, AttentionBlock) for m in up.modules())
    for h, w in [(16, 16), (12, 20)]:                 # training crop is 8x8 at 32x32 output
        out = up.sample(torch.rand(2, 3, h, w) * 2 - 1, **SAMPLE, seeds=[0, 1])
        assert out.shape == (2, 3, 2 * h, 2 * w) and out.min() >= -1 and out.max() <= 1
    a = up.sample(torch.zeros(1, 3, 16, 16), **SAMPLE, seeds=[5])
    assert torch.equal(a, up.sample(torch.zeros(1, 3, 16, 16), **SAMPLE, seeds=[5]))


def test_low_res_is_downsampled_and_degraded():
    up = tiny_upsampler()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    low = up.make_low_res(x)
    assert low.shape == (2, 3, 16, 16) and low.min() >= -1 and low.max() <= 1
    up.degradation = None
    assert not torch.allclose(low, up.make_low_res(x))


def test_emoji_upsampler_config_instantiates_and_trains_a_step(tmp_path):
    cfg = compose(["upsampler=emoji"], tmp_path)
    model = instantiate(cfg.upsampler.module.model)
    assert isinstance(model, Upsampler)
    assert (model.image_size, model.low_res_size, model.crop_size) == (64, 32, 16)
    assert not any(isinstance(m, AttentionBlock) for m in model.modules())
    loss = model.loss(torch.rand(2, 3, 64, 64) * 2 - 1)["loss"]
    loss.backward()
    assert torch.isfinite(loss)


@pytest.mark.parametrize("name,size,low,steps,params", [("paper_256", 256, 64, 27, (6e8, 7.5e8)),
                                                         ("paper_1024", 1024, 256, 15, (2.0e8, 3.0e8))])
def test_paper_upsampler_configs(name, size, low, steps, params, tmp_path):
    cfg = compose([f"upsampler={name}"], tmp_path)
    node = cfg.upsampler.module.model
    diffusion = instantiate(node.diffusion)
    with torch.device("meta"):
        model = instantiate(node, diffusion=diffusion)
    n = sum(p.numel() for p in model.parameters())
    assert params[0] < n < params[1], n
    assert (model.image_size, model.low_res_size, model.crop_size, cfg.upsampler.sample.steps) == (size, low, size // 4,
                                                                                               steps)
    assert not any(isinstance(m, AttentionBlock) for m in model.modules())
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    y = model.degradation(x)
    assert y.shape == x.shape and y.min() >= -1 and y.max() <= 1


def test_low_res_made_in_loader_workers_equals_the_training_step():
    """degrade_in_loader: the picklable LowRes runs in a DataLoader worker and the loss is the same as when the step
    makes the low-res input itself."""
    import pickle
    from functools import partial

    from torch.utils.data import DataLoader

    from unclip_pl.data.pipeline import AddKey
    from unclip_pl.models.upsampler import LowRes

    up = tiny_upsampler()
    maker = pickle.loads(pickle.dumps(up.low_res_maker))
    assert isinstance(maker, LowRes) and maker.size == 16
    images = torch.rand(4, 3, 32, 32) * 2 - 1
    torch.testing.assert_close(maker(images), up.make_low_res(images))

    class Batches(torch.utils.data.IterableDataset):
        def __iter__(self):
            yield AddKey("image", "low_res", maker)({"image": images})

    batch = next(iter(DataLoader(Batches(), batch_size=None, num_workers=1)))
    assert batch["low_res"].shape == (4, 3, 16, 16)
    a = up.loss(images, generator=torch.Generator().manual_seed(3))["loss"]
    b = up.loss(images, low_res=batch["low_res"], generator=torch.Generator().manual_seed(3))["loss"]
    torch.testing.assert_close(a, b)
    # a BSR LowRes (random per call) pickles too: the paper's second stage degrades in the workers
    from unclip_pl.data.degrade import bsr_degrade

    bsr = pickle.loads(pickle.dumps(LowRes(16, "bicubic", partial(bsr_degrade, p_jpeg=1.0))))
    out = bsr(images)
    assert out.shape == (4, 3, 16, 16) and out.min() >= -1 and out.max() <= 1


def test_upsampler_module_wires_the_loader_transform():
    from unclip_pl.lit.upsampler import UpsamplerModule

    in_step = UpsamplerModule(tiny_upsampler(), sample=SAMPLE)
    assert in_step.loader_batch_transform is None
    assert torch.isfinite(in_step.compute_loss({"image": torch.rand(2, 3, 32, 32) * 2 - 1})["loss"])
    module = UpsamplerModule(tiny_upsampler(), degrade_in_loader=True, sample=SAMPLE)
    transform = module.loader_batch_transform
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    batch = transform({"image": images})
    assert batch["low_res"].shape == (2, 3, 16, 16)
    assert torch.isfinite(module.compute_loss(batch)["loss"])
    with pytest.raises(KeyError, match="low_res"):
        module.compute_loss({"image": images})
    cfg = compose(["upsampler=paper_1024"])
    assert cfg.upsampler.module.degrade_in_loader is True
