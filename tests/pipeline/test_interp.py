"""slerp / text diffs: endpoints, unit norm, the parallel fallback, shapes."""

import math

import torch
import torch.nn.functional as F

from unclip_pl.interp import PARALLEL_EPS, slerp, slerp_path, text_diff_embedding, text_diff_path


def _unit(*shape, seed=0):
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


def test_slerp_endpoints_and_unit_norm():
    a, b = _unit(5, 16, seed=0), _unit(5, 16, seed=1)
    assert torch.allclose(slerp(a, b, 0.0), a, atol=1e-6)
    assert torch.allclose(slerp(a, b, 1.0), b, atol=1e-6)
    for t in (0.1, 0.5, 0.9):
        assert torch.allclose(slerp(a, b, t).norm(dim=-1), torch.ones(5), atol=1e-6)


def test_slerp_constant_angular_speed():
    a, b = _unit(16, seed=2), _unit(16, seed=3)
    omega = torch.arccos((a * b).sum())
    mid = slerp(a, b, 0.25)
    assert math.isclose(float(torch.arccos((a * mid).sum().clamp(-1, 1))), float(omega) * 0.25, rel_tol=1e-4)


def test_slerp_parallel_falls_back_to_linear():
    a = _unit(8, seed=4)
    b = F.normalize(a + 1e-7 * _unit(8, seed=5), dim=-1)  # angle far below PARALLEL_EPS
    assert float(torch.arccos((a.double() * b.double()).sum().clamp(-1, 1))) < PARALLEL_EPS
    out = slerp(a, b, 0.5)
    assert torch.isfinite(out).all()
    assert torch.allclose(out, F.normalize(0.5 * a + 0.5 * b, dim=-1), atol=1e-6)
    same = slerp(a, a, 0.3)  # identical vectors: sin(Omega) = 0 would divide by zero
    assert torch.allclose(same, a, atol=1e-6)


def test_slerp_per_row_t_and_path():
    a, b = _unit(3, 8, seed=6), _unit(3, 8, seed=7)
    out = slerp(a, b, torch.tensor([0.0, 0.5, 1.0]))
    assert torch.allclose(out[0], a[0], atol=1e-6) and torch.allclose(out[2], b[2], atol=1e-6)
    path = slerp_path(a[0], b[0], 5)
    assert path.shape == (5, 8)
    assert torch.allclose(path[0], a[0], atol=1e-6) and torch.allclose(path[-1], b[0], atol=1e-6)


def test_text_diff():
    z_i, old, new = _unit(16, seed=8), _unit(16, seed=9), _unit(16, seed=10)
    assert torch.allclose(text_diff_embedding(z_i, old, new, 0.0), z_i, atol=1e-6)
    z_d = F.normalize(new - old, dim=-1)
    assert torch.allclose(text_diff_embedding(z_i, old, new, 1.0), z_d, atol=1e-5)
    path = text_diff_path(z_i, old, new, [0.0, 0.25, 0.5])
    assert path.shape == (3, 16)
    # moving along theta moves towards the diff direction
    sims = path @ z_d
    assert sims[0] < sims[1] < sims[2]
