"""PCA codec of the autoregressive prior: quantile buckets, PCA fit, codes round trip, dot buckets, state dict."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from unclip_pl.models.pca_codec import CodecError, PCACodec, QuantileBuckets, choose_num_components

D, RANK, N = 32, 6, 4000
SCALES = torch.tensor([3.0, 2.0, 1.5, 1.0, 0.7, 0.5])  # distinct, so the component order is well defined


def low_rank(n: int = N, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit-norm image embeddings (n, D) spanning a RANK-dim subspace through 0, and paired text embeddings."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(D, RANK, generator=g))[0]  # (D, RANK) orthonormal columns
    coeffs = torch.randn(n, RANK, generator=g) * SCALES + torch.tensor([4.0, 0, 0, 0, 0, 0])
    img = F.normalize(coeffs @ basis.T, dim=-1)  # normalising keeps rows in the span: still rank RANK
    txt = F.normalize(img + 0.3 * torch.randn(n, D, generator=g), dim=-1)
    return img, txt


@pytest.fixture(scope="module")
def data() -> tuple[torch.Tensor, torch.Tensor]:
    return low_rank()


@pytest.fixture(scope="module")
def fitted(data) -> tuple[PCACodec, dict[str, float]]:
    codec = PCACodec(D, RANK, num_buckets=256, num_dot_buckets=64)
    return codec, codec.fit(*data)


# ------------------------------------------------------------------------------------------------------- buckets
def degenerate_columns() -> torch.Tensor:
    """(50, 5): a constant column, two values, a few repeated integers, a column with one outlier, a normal one."""
    g = torch.Generator().manual_seed(1)
    n = 50
    return torch.stack([
        torch.full((n,), 0.5),
        (torch.arange(n) % 2).float(),
        torch.randint(0, 4, (n,), generator=g).float() * 3.0,
        torch.cat([torch.zeros(n - 1), torch.tensor([1e3])]),
        torch.randn(n, generator=g),
    ], dim=1)


@pytest.mark.parametrize("kind", ["normal", "degenerate"])
@pytest.mark.parametrize("num_buckets", [2, 3, 256])
def test_buckets_edges_increasing_and_idempotent(kind, num_buckets):
    x = torch.randn(3000, 4, generator=torch.Generator().manual_seed(0)) if kind == "normal" else degenerate_columns()
    qb = QuantileBuckets(x.shape[1], num_buckets)
    qb.fit(x)
    assert qb.edges.shape == (x.shape[1], num_buckets - 1) and qb.centers.shape == (x.shape[1], num_buckets)
    assert torch.isfinite(qb.edges).all() and torch.isfinite(qb.centers).all()
    assert (qb.edges[:, 1:] > qb.edges[:, :-1]).all()
    every = torch.arange(num_buckets)[:, None].expand(-1, x.shape[1])  # (B, C): every code of every column
    assert torch.equal(qb.encode(qb.decode(every)), every)
    codes = qb.encode(x)
    assert codes.dtype == torch.long and codes.min() >= 0 and codes.max() < num_buckets
    assert torch.equal(qb.encode(qb.decode(codes)), codes)


def test_buckets_equal_mass_and_centers_are_bucket_means():
    x = torch.randn(25_600, 3, generator=torch.Generator().manual_seed(0))
    qb = QuantileBuckets(3, 256)
    qb.fit(x)
    codes = qb.encode(x)
    for c in range(3):
        counts = torch.bincount(codes[:, c], minlength=256)
        assert counts.min() >= 95 and counts.max() <= 105  # 100 per bucket, +-1 sample at each tied boundary
        sums = torch.zeros(256).index_add_(0, codes[:, c], x[:, c])
        torch.testing.assert_close(qb.centers[c], sums / counts, atol=1e-5, rtol=0)


def test_buckets_degenerate_constant_column_decodes_to_the_value():
    qb = QuantileBuckets(5, 16)
    x = degenerate_columns()
    qb.fit(x)
    assert torch.equal(qb.decode(qb.encode(x))[:, 0], x[:, 0])  # one occupied bucket whose mean is the value
    assert torch.equal(qb.decode(qb.encode(x))[:, 1], x[:, 1])


def test_buckets_errors():
    with pytest.raises(CodecError, match="num_buckets"):
        QuantileBuckets(3, 1)
    qb = QuantileBuckets(3, 8)
    with pytest.raises(CodecError, match="not fitted"):
        qb.encode(torch.zeros(2, 3))
    with pytest.raises(CodecError, match="not fitted"):
        qb.decode(torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(CodecError, match=r"\(N, 3\)"):
        qb.fit(torch.zeros(4, 2))
    with pytest.raises(CodecError, match="non-finite"):
        qb.fit(torch.tensor([[0.0, float("nan"), 1.0]]))
    qb.fit(torch.randn(40, 3))
    with pytest.raises(CodecError, match=r"\[0, 8\)"):
        qb.decode(torch.full((2, 3), 8))
    with pytest.raises(CodecError, match="integer"):
        qb.decode(torch.zeros(2, 3))


# --------------------------------------------------------------------------------------------------------- codec
def test_round_trip_low_rank(fitted, data):
    codec, metrics = fitted
    img, _ = data
    assert set(metrics) == {"explained_variance", "mse", "cosine"}
    assert metrics["explained_variance"] == pytest.approx(1.0, abs=1e-6)
    assert float(codec.explained_variance) == pytest.approx(1.0, abs=1e-6)
    codes = codec.encode(img)
    assert codes.shape == (N, RANK) and codes.dtype == torch.long
    assert codes.min() >= 0 and codes.max() < 256
    rec = codec.decode(codes)
    assert rec.shape == (N, D)
    torch.testing.assert_close(rec.norm(dim=-1), torch.ones(N))
    cos = F.cosine_similarity(rec, img, dim=-1)
    assert cos.mean() > 0.99 and metrics["cosine"] > 0.99
    # MSE bound: z and decode(encode(z)) are unit vectors, so per row ||rec - z||^2 = 2 (1 - cos), i.e. the mean over
    # rows and dims is 2 (1 - mean cos) / D; cosine > 0.99 therefore bounds it by 2 * 0.01 / D = 6.25e-4.
    assert metrics["mse"] < 2 * (1 - 0.99) / D
    assert metrics["mse"] == pytest.approx(2 * (1 - metrics["cosine"]) / D, rel=1e-3)
    assert codec.reconstruction(img) == pytest.approx({k: metrics[k] for k in ("mse", "cosine")}, rel=1e-6)
    # Per component, distribution-free: a value in an inner bucket and that bucket's center both lie in
    # [edges[b-1], edges[b]), so its quantisation error is at most the bucket's width (a 1/B slice of the mass).
    proj = codec.project(img)
    err = (codec.buckets.decode(codes) - proj).abs()  # (N, k)
    edges = codec.buckets.edges  # (k, B-1)
    for j in range(RANK):
        c = codes[:, j]
        inner = (c > 0) & (c < 255)
        assert inner.float().mean() > 0.99  # the two end buckets hold 2/256 of the fitting rows
        width = edges[j, c[inner]] - edges[j, c[inner] - 1]
        assert (err[inner, j] <= width).all()


def test_choose_num_components(data):
    img, _ = data
    assert choose_num_components(img) == RANK
    assert choose_num_components(img, fraction=1.0) == RANK
    assert 1 <= choose_num_components(img, fraction=0.5) < RANK
    full = F.normalize(torch.randn(500, 8, generator=torch.Generator().manual_seed(0)), dim=-1)
    assert choose_num_components(full, fraction=0.999) == 8
    with pytest.raises(CodecError, match="fraction"):
        choose_num_components(img, fraction=0.0)


def test_components_ordered_by_eigenvalue_and_orthonormal(fitted, data):
    codec, _ = fitted
    img, _ = data
    ev = codec.eigenvalues
    assert (ev[:-1] > ev[1:]).all()
    torch.testing.assert_close(codec.components @ codec.components.T, torch.eye(RANK), atol=1e-5, rtol=0)
    torch.testing.assert_close(codec.mean, img.mean(0), atol=1e-6, rtol=0)
    # eigenvalues are the variances of the projections, and match an SVD of the centred data
    proj = codec.project(img).double()
    torch.testing.assert_close(proj.var(0), ev.double(), rtol=1e-4, atol=1e-7)
    s = torch.linalg.svdvals(img.double() - img.double().mean(0))[:RANK]
    torch.testing.assert_close(ev.double(), s.pow(2) / (N - 1), rtol=1e-5, atol=1e-8)
    # codes of the first component follow that component's projection (monotone)
    order = proj[:, 0].argsort()
    assert (codec.encode(img)[order, 0].diff() >= 0).all()


def test_codes_idempotent(fitted):
    codec, _ = fitted
    every = torch.arange(256)[:, None].expand(-1, RANK).contiguous()
    assert torch.equal(codec.buckets.encode(codec.buckets.decode(every)), every)
    rand = torch.randint(0, 256, (64, RANK), generator=torch.Generator().manual_seed(0))
    assert torch.equal(codec.buckets.encode(codec.buckets.decode(rand)), rand)


def test_degenerate_embeddings_codes_idempotent():
    """Few distinct embeddings (many repeated rows, N < B): empty and tied buckets still round trip."""
    img, _ = low_rank(n=5, seed=3)
    img = img.repeat(7, 1)  # 35 rows, 5 distinct
    codec = PCACodec(D, 3, num_buckets=64, num_dot_buckets=8)
    codec.fit(img, img)  # dot products all 1
    every = torch.arange(64)[:, None].expand(-1, 3).contiguous()
    assert torch.equal(codec.buckets.encode(codec.buckets.decode(every)), every)
    assert (codec.buckets.edges[:, 1:] > codec.buckets.edges[:, :-1]).all()
    dots = torch.arange(8)
    assert torch.equal(codec.encode_dot(codec.decode_dot(dots)), dots)
    torch.testing.assert_close(codec.decode_dot(codec.encode_dot(torch.ones(3))), torch.ones(3))


def test_refit_raises(data):
    codec = PCACodec(D, RANK, num_buckets=16, num_dot_buckets=8)
    codec.fit(data[0][:200])
    before = {k: v.clone() for k, v in codec.state_dict().items()}
    with pytest.raises(CodecError, match="already fitted"):
        codec.fit(data[0][200:400])
    torch.testing.assert_close(codec.state_dict(), before, rtol=0, atol=0, equal_nan=True)  # dot buckets stay NaN


def test_state_dict_round_trip(fitted, data):
    codec, _ = fitted
    img, txt = data
    state = codec.state_dict()
    assert {"mean", "components", "eigenvalues", "explained_variance", "fitted", "buckets.edges", "buckets.centers",
            "dot_buckets.edges", "dot_buckets.centers"} <= set(state)
    fresh = PCACodec(D, RANK, num_buckets=256, num_dot_buckets=64)
    assert not fresh.is_fitted
    fresh.load_state_dict(state)
    assert fresh.is_fitted
    codes = codec.encode(img)
    assert torch.equal(fresh.encode(img), codes)
    assert torch.equal(fresh.decode(codes), codec.decode(codes))
    dot = (img * txt).sum(-1)
    assert torch.equal(fresh.encode_dot(dot), codec.encode_dot(dot))
    with pytest.raises(CodecError, match="already fitted"):
        fresh.fit(img)


def test_subset_is_seeded(data):
    img, txt = data
    a, b, c = (PCACodec(D, RANK, num_buckets=32, num_dot_buckets=8) for _ in range(3))
    a.fit(img, txt, max_samples=500, seed=1)
    b.fit(img, txt, max_samples=500, seed=1)
    c.fit(img, txt, max_samples=500, seed=2)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["buckets.edges"], sc["buckets.edges"])


def test_dot_buckets(fitted, data):
    codec, _ = fitted
    img, txt = data
    dot = (img * txt).sum(-1)
    codes = codec.encode_dot(dot)
    assert codes.shape == (N,) and codes.dtype == torch.long and codes.min() >= 0 and codes.max() < 64
    counts = torch.bincount(codes, minlength=64)
    assert counts.min() >= N // 64 - 2 and counts.max() <= N // 64 + 2  # equal mass
    order = dot.argsort()
    assert (codes[order].diff() >= 0).all()  # monotone in the dot product
    every = torch.arange(64)
    assert torch.equal(codec.encode_dot(codec.decode_dot(every)), every)
    back = codec.decode_dot(codes)
    edges = codec.dot_buckets.edges[0]
    inner = (codes > 0) & (codes < 63)  # within an inner bucket the error is at most its width
    width = edges[codes[inner]] - edges[codes[inner] - 1]
    assert ((back[inner] - dot[inner]).abs() <= width).all()
    with pytest.raises(CodecError, match=r"\(N,\)"):
        codec.encode_dot(dot[:, None])


def test_dot_buckets_need_txt_emb(data):
    codec = PCACodec(D, RANK, num_buckets=16, num_dot_buckets=8)
    codec.fit(data[0][:300])
    codec.encode(data[0][:4])  # the codes work without z_t
    with pytest.raises(CodecError, match="txt_emb"):
        codec.encode_dot(torch.zeros(4))
    with pytest.raises(CodecError, match="txt_emb"):
        codec.decode_dot(torch.zeros(4, dtype=torch.long))


def test_unfitted_use_raises():
    codec = PCACodec(D, RANK, num_buckets=16, num_dot_buckets=8)
    assert not codec.is_fitted
    z = F.normalize(torch.randn(3, D), dim=-1)
    for call in (lambda: codec.encode(z), lambda: codec.decode(torch.zeros(3, RANK, dtype=torch.long)),
                 lambda: codec.encode_dot(torch.zeros(3)), lambda: codec.decode_dot(torch.zeros(3, dtype=torch.long)),
                 lambda: codec.reconstruction(z)):
        with pytest.raises(CodecError, match="not fitted"):
            call()


def test_argument_and_shape_errors(data):
    with pytest.raises(CodecError, match="num_components"):
        PCACodec(8, 9)
    with pytest.raises(CodecError, match="num_components"):
        PCACodec(8, 0)
    with pytest.raises(CodecError, match="num_buckets"):
        PCACodec(8, 4, num_buckets=1)
    with pytest.raises(CodecError, match="num_dot_buckets"):
        PCACodec(8, 4, num_dot_buckets=1)
    assert issubclass(CodecError, ValueError)
    img, txt = data
    codec = PCACodec(D, RANK, num_buckets=16, num_dot_buckets=8)
    with pytest.raises(CodecError, match=r"\(N, 32\)"):
        codec.fit(img[:, :16])
    with pytest.raises(CodecError, match="txt_emb"):
        codec.fit(img, txt[:10])
    with pytest.raises(CodecError, match="at least 2"):
        codec.fit(img[:1])
    with pytest.raises(CodecError, match="zero variance"):
        codec.fit(img[:1].repeat(5, 1))
    assert not codec.is_fitted  # failed fits leave it unfitted
    codec.fit(img[:300])
    with pytest.raises(CodecError, match=r"\(N, 32\)"):
        codec.encode(img[:, :16])
    with pytest.raises(CodecError, match=r"\(N, 6\)"):
        codec.decode(torch.zeros(3, 5, dtype=torch.long))
    with pytest.raises(CodecError, match=r"\[0, 16\)"):
        codec.decode(torch.full((3, RANK), 16))


def test_fitted_state_follows_loaded_state_dicts():
    """is_fitted is mirrored on the host (no device sync per training step); loading a state dict refreshes it,
    both ways, for the codec and its buckets."""
    torch.manual_seed(0)
    img = F.normalize(torch.randn(200, 8), dim=-1)
    fitted, blank = PCACodec(8, 3, num_buckets=4, num_dot_buckets=4), PCACodec(8, 3, num_buckets=4, num_dot_buckets=4)
    fitted.fit(img, img)
    assert fitted.is_fitted and not blank.is_fitted and not blank.buckets.is_fitted
    blank.load_state_dict(fitted.state_dict())
    assert blank.is_fitted and blank.buckets.is_fitted and blank.dot_buckets.is_fitted
    fitted.load_state_dict(PCACodec(8, 3, num_buckets=4, num_dot_buckets=4).state_dict())
    assert not fitted.is_fitted and not fitted.buckets.is_fitted
    with pytest.raises(CodecError, match="not fitted"):
        fitted.encode(img)
