"""FID (CLIP space) maths, distributed gathering with 2 gloo ranks, CLIP score / retrieval, diversity."""

import socket
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from unclip_pl.metrics.clip_score import caption_retrieval, cosine_scores
from unclip_pl.metrics.diversity import diversity_by_group, mean_pairwise_distance
from unclip_pl.metrics.fid import (
    frechet_distance,
    frechet_distance_features,
    inception_weights_status,
    trace_sqrt_product,
)

from .dist_worker import rank_main as _rank_main


def _feats(n, d, seed, shift=0.0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g) * scale + shift


def test_fid_self_is_zero_and_different_sets_larger():
    a = _feats(200, 16, 0)
    assert frechet_distance_features(a, a) < 1e-8
    b = _feats(200, 16, 1)           # same distribution, other samples
    c = _feats(200, 16, 2, shift=1.0)  # shifted mean
    d = _feats(200, 16, 3, scale=2.0)  # wider
    same, shifted, wider = (frechet_distance_features(a, x) for x in (b, c, d))
    assert 0 < same < shifted and same < wider
    assert abs(shifted - 16.0) < 3.0  # |mu diff|^2 = 16 * 1^2 dominates


def test_fid_rank_deficient_and_closed_form():
    a = _feats(5, 32, 4)  # N < D: singular covariance, still finite and ~0 against itself
    assert frechet_distance_features(a, a) < 1e-6
    # diagonal Gaussians: d^2 = |mu|^2 + sum (s1 - s2)^2 for standard deviations s1, s2
    s1, s2 = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([2.0, 2.0, 1.0])
    mu = torch.tensor([1.0, 0.0, -1.0])
    got = frechet_distance(mu, torch.diag(s1 ** 2), torch.zeros(3), torch.diag(s2 ** 2))
    assert abs(got - (2.0 + ((s1 - s2) ** 2).sum().item())) < 1e-9


def test_trace_sqrt_matches_eigenvalues_of_product():
    a, b = _feats(50, 8, 5), _feats(50, 8, 6)
    c1, c2 = a.T.double() @ a.double() / 49, b.T.double() @ b.double() / 49
    ev = torch.linalg.eigvals(c1 @ c2).real.clamp(min=0)
    assert abs(float(trace_sqrt_product(c1, c2)) - float(ev.sqrt().sum())) < 1e-8


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_distributed_gather_equals_single_process(tmp_path):
    real, fake = _feats(60, 8, 7), _feats(50, 8, 8, shift=0.3)
    single = frechet_distance_features(real, fake)
    per_rank_avg = 0.5 * (frechet_distance_features(real[:37], fake[:11])
                          + frechet_distance_features(real[37:], fake[11:]))
    tests_dir = str(Path(__file__).resolve().parents[1])  # the children import this module as pipeline.test_metrics
    if tests_dir not in sys.path:
        sys.path.insert(0, tests_dir)
    mp.spawn(_rank_main, args=(2, _free_port(), real, fake, str(tmp_path)), nprocs=2, join=True)
    for r in range(2):
        res = torch.load(tmp_path / f"rank{r}.pt")
        assert res["n_real"] == 60 and res["same_order"]
        assert abs(res["fid"] - single) < 1e-6 * max(1.0, single)
    assert abs(per_rank_avg - single) > 1e-3  # averaging per-rank FIDs would be wrong


def test_inception_status_is_fast_and_explains(tmp_path):
    t = time.time()
    path, reason = inception_weights_status(tmp_path / "missing.pth")
    assert path is None and reason
    path, reason = inception_weights_status(None)
    assert time.time() - t < 2.0
    if path is None:
        assert "Inception" in reason or "torch-fidelity" in reason


def test_inception_message_names_the_key_eval_reads(tmp_path, monkeypatch):
    """The hint says how to pass the weights file; the key it names must be one eval.py's config accepts and
    eval.py hands to the Inception metric."""
    import re
    import types

    from .conftest import compose

    monkeypatch.setitem(sys.modules, "torch_fidelity", types.ModuleType("torch_fidelity"))  # "installed"
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "empty_hub"))  # nothing cached
    path, reason = inception_weights_status(None)
    assert path is None
    found = re.search(r"\(([\w.]+)=/path/to/", reason)
    assert found, reason
    key = found.group(1)
    weights = tmp_path / "weights.pth"
    weights.write_bytes(b"x")
    cfg = compose(["checkpoints.decoder=unused", f"{key}={weights}"], tmp_path, config_name="eval")
    assert inception_weights_status(cfg.get("inception_weights"))[0] == str(weights)  # what eval.py passes on
    assert "inception_weights=" in inception_weights_status(tmp_path / "gone.pth")[1]

    monkeypatch.setitem(sys.modules, "torch_fidelity", None)  # not installed: the hint names the extra
    path, reason = inception_weights_status(weights)
    assert path is None and '".[fid]"' in reason


def test_caption_retrieval_deduplicates_pool():
    d = 8
    e = torch.eye(d)
    pool = ["a", "b", "a", "c", "b"]  # duplicates merge: 3 distinct captions
    pool_emb = torch.stack([e[0], e[1], e[0], e[2], e[1]])
    imgs = torch.stack([e[0], e[2] + 0.1 * e[1], e[1]])  # retrieve a, c, b
    res = caption_retrieval(imgs, ["a", "c", "a"], pool, pool_emb, k=(1, 5))
    assert res["pool_size"] == 3
    assert res["top1"] == pytest.approx(2 / 3) and res["top5"] == 1.0
    with pytest.raises(ValueError, match="not in the retrieval pool"):
        caption_retrieval(imgs, ["a", "c", "zzz"], pool, pool_emb)
    assert torch.allclose(cosine_scores(imgs[:1], e[:1]), torch.ones(1))


def test_diversity():
    same = torch.ones(4, 8)
    assert mean_pairwise_distance(same) == pytest.approx(0.0, abs=1e-9)
    e = torch.eye(4)
    assert mean_pairwise_distance(e) == pytest.approx(1.0)  # orthogonal: 1 - cos = 1
    feats = torch.cat([torch.ones(4, 4), e])
    res = diversity_by_group(feats, [0] * 4 + [1] * 4)
    assert res["groups"] == 2 and res["diversity"] == pytest.approx(0.5)
