"""Low-res corruptions keep shape, dtype and the [-1, 1] range; BSR is random per image and seedable."""
import functools

import torch

from unclip_pl.data.degrade import bsr_degrade, gaussian_blur


def images(B=4, size=32):
    g = torch.Generator().manual_seed(0)
    return torch.rand(B, 3, size, size, generator=g) * 2 - 1


def test_gaussian_blur_shape_range_and_smoothing():
    x = images()
    y = gaussian_blur(x, kernel=3, sigma=0.6)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert y.min() >= -1 and y.max() <= 1
    assert y.var() < x.var()                          # it smooths
    const = torch.full((1, 3, 8, 8), 0.5)
    assert torch.allclose(gaussian_blur(const), const, atol=1e-6)   # normalised kernel, reflect padding


def test_bsr_shape_range_randomness_and_seed():
    x = images()
    y = bsr_degrade(x, torch.Generator().manual_seed(0))
    assert y.shape == x.shape and y.dtype == x.dtype
    assert y.min() >= -1 and y.max() <= 1
    y2 = bsr_degrade(x, torch.Generator().manual_seed(0))
    assert torch.equal(y, y2)
    y3 = bsr_degrade(x, torch.Generator().manual_seed(1))
    assert not torch.equal(y, y3)
    # every stage forced on, including JPEG, still keeps shape and range; odd sizes too
    full = functools.partial(bsr_degrade, p_iso_blur=1.0, p_aniso_blur=1.0, p_resize=1.0, p_noise=1.0, p_jpeg=1.0)
    z = full(images(2, 24)[:, :, :, :20], torch.Generator().manual_seed(2))
    assert z.shape == (2, 3, 24, 20) and z.min() >= -1 and z.max() <= 1
    assert (z - images(2, 24)[:, :, :, :20]).abs().mean() > 0.01
    assert bsr_degrade(x.bfloat16()).dtype == torch.bfloat16
