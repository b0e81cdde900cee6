"""The PCA codec of the autoregressive prior (unCLIP, Ramesh et al. 2022, section 2.2).

The AR prior predicts a discrete code sequence instead of z_i itself:

  1. PCA: z_i (unit norm, D dims) is centred and projected onto the top k principal components, rows ordered by
     eigenvalue (paper: k = 319 of D = 1024 keep > 99% of the variance; :func:`choose_num_components` picks k for
     another CLIP);
  2. quantisation: each kept component is cut into B equal-mass buckets (paper: B = 1024) fitted from quantiles of
     the training projections (:class:`QuantileBuckets`); a code is a bucket index;
  3. decoding: each code is replaced by its bucket's center (the mean of the training values in it), the PCA is
     inverted and the result renormalised to unit norm.

The quantised dot product z_i . z_t, whose token the prior also models, has its own one-column buckets
(``PCACodec.encode_dot`` / ``decode_dot``).

Everything fitted lives in buffers, so the codec travels in the checkpoint: a trained prior's codes mean the same
thing after a reload. Refitting a fitted codec is refused for the same reason. The buffers are float32; keep the codec
in float32 (do not ``.half()`` it: half precision would merge neighbouring bucket edges).

No Lightning/Hydra imports.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

CHUNK = 8192  # rows per chunk for covariance and reconstruction passes (bounds the float64 temporaries)


class CodecError(ValueError):
    """Bad input to, or misuse of, a codec (unfitted use, refitting, wrong shapes or arguments)."""


def _check_matrix(x: Tensor, name: str, columns: int) -> None:
    """One-line error unless ``x`` is (N, columns) with N >= 1."""
    if x.ndim != 2 or x.shape[1] != columns:
        raise CodecError(f"{name} must be (N, {columns}), got {tuple(x.shape)}")
    if x.shape[0] < 1:
        raise CodecError(f"{name} is empty")


def _check_codes(codes: Tensor, name: str, columns: int, num_buckets: int) -> None:
    """One-line error unless ``codes`` is an (N, columns) integer tensor with values in [0, num_buckets)."""
    _check_matrix(codes, name, columns)
    if codes.dtype.is_floating_point or codes.is_complex() or codes.dtype == torch.bool:
        raise CodecError(f"{name} must be an integer tensor, got {codes.dtype}")
    lo, hi = int(codes.min()), int(codes.max())
    if lo < 0 or hi >= num_buckets:
        raise CodecError(f"{name} must be in [0, {num_buckets}), got values in [{lo}, {hi}]")


def _covariance(x: Tensor) -> tuple[Tensor, Tensor]:
    """Mean (D,) and unbiased covariance (D, D) of the rows of x (N, D), both float64, in chunks of ``CHUNK`` rows."""
    n, d = x.shape
    total = torch.zeros(d, dtype=torch.float64, device=x.device)
    for start in range(0, n, CHUNK):
        total += x[start:start + CHUNK].double().sum(0)
    mean = total / n
    cov = torch.zeros(d, d, dtype=torch.float64, device=x.device)
    for start in range(0, n, CHUNK):
        xc = x[start:start + CHUNK].double() - mean
        cov += xc.T @ xc
    return mean, cov / max(n - 1, 1)


def _eigen(cov: Tensor) -> tuple[Tensor, Tensor]:
    """Eigen-decomposition of a symmetric (D, D) float64 matrix: eigenvalues (D,) in descending order, clamped at 0,
    and eigenvectors as rows (D, D) in the same order, each signed so its entry of largest magnitude is positive."""
    values, vectors = torch.linalg.eigh(cov)  # ascending, vectors as columns
    values = values.flip(0).clamp(min=0.0)
    rows = vectors.flip(1).T.contiguous()  # (D, D), row i = i-th largest
    pivot = rows.gather(1, rows.abs().argmax(1, keepdim=True))  # (D, 1)
    rows = rows * torch.where(pivot < 0, -1.0, 1.0).to(rows)
    return values, rows


def choose_num_components(img_emb: Tensor, fraction: float = 0.99) -> int:
    """Smallest k whose top-k eigenvalues keep >= ``fraction`` of the total variance of ``img_emb`` (N, D).

    Used to pick k for a CLIP other than the paper's (319 of 1024 at 0.99).
    """
    if not 0.0 < fraction <= 1.0:
        raise CodecError(f"fraction must be in (0, 1], got {fraction}")
    if img_emb.ndim != 2:
        raise CodecError(f"img_emb must be (N, D), got {tuple(img_emb.shape)}")
    if img_emb.shape[0] < 2:
        raise CodecError(f"need at least 2 embeddings to choose the number of components, got {img_emb.shape[0]}")
    values, _ = _eigen(_covariance(img_emb.detach())[1])
    total = float(values.sum())
    if total <= 0.0:
        raise CodecError("img_emb has zero variance: every row is the same embedding")
    kept = values.cumsum(0) / total  # (D,)
    reached = (kept >= fraction - 1e-12).nonzero()
    return int(reached[0]) + 1 if len(reached) else int(values.numel())


class QuantileBuckets(nn.Module):
    """Per-column equal-mass buckets: C columns, B buckets each.

    Buffers: ``edges`` (C, B-1), the inner edges, strictly increasing per column (bucket b of a column is
    [edges[b-1], edges[b]), unbounded at both ends); ``centers`` (C, B), one representative value per bucket, inside
    its bucket, so ``encode(decode(codes)) == codes`` for every code. Both are NaN until :meth:`fit`.

    Args:
        num_columns: C.
        num_buckets: B >= 2.
    """

    def __init__(self, num_columns: int, num_buckets: int):
        super().__init__()
        if num_columns < 1:
            raise CodecError(f"num_columns must be >= 1, got {num_columns}")
        if num_buckets < 2:
            raise CodecError(f"num_buckets must be >= 2, got {num_buckets}")
        self.num_columns = int(num_columns)
        self.num_buckets = int(num_buckets)
        self.register_buffer("edges", torch.full((num_columns, num_buckets - 1), float("nan")))
        self.register_buffer("centers", torch.full((num_columns, num_buckets), float("nan")))
        self._fitted_host: bool | None = None  # host mirror of "edges are finite": no device sync per call

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._fitted_host = None

    def extra_repr(self) -> str:
        return f"num_columns={self.num_columns}, num_buckets={self.num_buckets}"

    @property
    def is_fitted(self) -> bool:
        """True once :meth:`fit` ran (or a fitted state dict was loaded). Read from the buffers once, then from a
        host-side mirror, so the encode/decode of every training step never waits for the device."""
        if self._fitted_host is None:
            self._fitted_host = bool(torch.isfinite(self.edges).all())
        return self._fitted_host

    def _require_fitted(self) -> None:
        if not self.is_fitted:
            raise CodecError("QuantileBuckets is not fitted: call fit(x) first (or load a fitted state dict)")

    @torch.no_grad()
    def fit(self, x: Tensor) -> None:
        """Fit the edges from the quantiles j/B (j = 1 .. B-1) of each column of x (N, C), and the centers as the mean
        of the values in each bucket.

        Degenerate data (repeated values, N < B) gives tied quantiles; tied edges are pushed up to the next float32
        so they stay strictly increasing, which leaves some buckets empty. An empty bucket's center is its midpoint
        (or, for an end bucket, half a mean bucket width outside its edge); every center is clamped into its bucket.
        """
        _check_matrix(x, "x", self.num_columns)
        if not torch.isfinite(x).all():
            raise CodecError("x has non-finite values")
        x = x.detach().float()
        n, b = x.shape[0], self.num_buckets
        ordered = x.sort(dim=0).values.double()  # (N, C)
        pos = torch.arange(1, b, dtype=torch.float64, device=x.device) * (n - 1) / b  # (B-1,)
        lo = pos.floor().long().clamp(max=n - 1)
        hi = (lo + 1).clamp(max=n - 1)
        frac = (pos - lo.double())[:, None]  # (B-1, 1)
        edges = (ordered[lo] + frac * (ordered[hi] - ordered[lo])).T.float().contiguous()  # (C, B-1)
        if b > 2 and not bool((edges[:, 1:] > edges[:, :-1]).all()):
            inf = torch.tensor(float("inf"), device=edges.device)
            for j in range(1, b - 1):  # push tied edges up one float32 step at a time
                edges[:, j] = torch.maximum(edges[:, j], torch.nextafter(edges[:, j - 1], inf))

        codes = self._bucketize(x, edges)  # (N, C)
        sums = torch.zeros(self.num_columns, b, dtype=torch.float64, device=x.device)
        counts = torch.zeros_like(sums)
        sums.scatter_add_(1, codes.T, x.T.double())
        counts.scatter_add_(1, codes.T, torch.ones_like(sums[:, :1]).expand(-1, n))
        width = (edges[:, -1:] - edges[:, :1]).double() / max(b - 2, 1)  # (C, 1) mean inner bucket width
        e64 = edges.double()
        empty = torch.cat([e64[:, :1] - width / 2, (e64[:, :-1] + e64[:, 1:]) / 2, e64[:, -1:] + width / 2], dim=1)
        centers = torch.where(counts > 0, sums / counts.clamp(min=1), empty).float()  # (C, B)
        self.edges.copy_(edges.to(self.edges))
        self.centers.copy_(self._clamp_into_buckets(centers, edges).to(self.centers))
        self._fitted_host = None

    @staticmethod
    def _bucketize(x: Tensor, edges: Tensor) -> Tensor:
        """x (N, C) float, edges (C, B-1) -> (N, C) long: the number of a column's edges <= the value."""
        return torch.searchsorted(edges, x.T.contiguous().to(edges), right=True).T

    @staticmethod
    def _clamp_into_buckets(centers: Tensor, edges: Tensor) -> Tensor:
        """Clamp centers (C, B) into [edges[b-1], edges[b]) (float32 steps), so each one encodes to its own bucket."""
        inf = torch.full_like(edges[:, :1], float("inf"))
        lower = torch.cat([-inf, edges], dim=1)  # (C, B)
        upper = torch.cat([torch.nextafter(edges, -inf), inf], dim=1)  # (C, B), largest value still inside
        return torch.maximum(torch.minimum(centers, upper), lower)

    def encode(self, x: Tensor) -> Tensor:
        """x (N, C) float -> (N, C) long codes in [0, B)."""
        self._require_fitted()
        _check_matrix(x, "x", self.num_columns)
        return self._bucketize(x.float(), self.edges.float())

    def decode(self, codes: Tensor) -> Tensor:
        """codes (N, C) long -> (N, C) float32, each code's bucket center."""
        self._require_fitted()
        _check_codes(codes, "codes", self.num_columns, self.num_buckets)
        return self.centers.float().gather(1, codes.T.long().to(self.centers.device)).T


class PCACodec(nn.Module):
    """PCA to the top k components, then per-component quantile buckets: the AR prior's code space for z_i, plus
    the buckets of the z_i . z_t token.

    Buffers (all in the state dict): ``mean`` (D,), ``components`` (k, D) orthonormal rows ordered by eigenvalue,
    ``eigenvalues`` (k,) descending, ``explained_variance`` () the fraction of the total variance kept, ``fitted``
    () bool. ``buckets`` = QuantileBuckets(k, B) over the projections, ``dot_buckets`` = QuantileBuckets(1, B_dot)
    over the dot products.

    Args:
        embed_dim: D, the CLIP embedding width.
        num_components: k <= D (paper: 319 of 1024).
        num_buckets: B >= 2 buckets per component (paper: 1024).
        num_dot_buckets: B_dot >= 2 buckets of the dot product z_i . z_t.
    """

    def __init__(self, embed_dim: int, num_components: int, num_buckets: int = 1024, num_dot_buckets: int = 1024):
        super().__init__()
        if embed_dim < 1:
            raise CodecError(f"embed_dim must be >= 1, got {embed_dim}")
        if not 1 <= num_components <= embed_dim:
            raise CodecError(f"num_components must be in [1, embed_dim={embed_dim}], got {num_components}")
        if num_buckets < 2:
            raise CodecError(f"num_buckets must be >= 2, got {num_buckets}")
        if num_dot_buckets < 2:
            raise CodecError(f"num_dot_buckets must be >= 2, got {num_dot_buckets}")
        self.embed_dim = int(embed_dim)
        self.num_components = int(num_components)
        self.num_buckets = int(num_buckets)
        self.num_dot_buckets = int(num_dot_buckets)
        self.register_buffer("mean", torch.zeros(embed_dim))
        self.register_buffer("components", torch.zeros(num_components, embed_dim))
        self.register_buffer("eigenvalues", torch.zeros(num_components))
        self.register_buffer("explained_variance", torch.zeros(()))
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool))
        self._fitted_host: bool | None = None  # host mirror of ``fitted``: no device sync per call
        self.buckets = QuantileBuckets(num_components, num_buckets)
        self.dot_buckets = QuantileBuckets(1, num_dot_buckets)

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, num_components={self.num_components}, num_buckets={self.num_buckets}, "
                f"num_dot_buckets={self.num_dot_buckets}")

    @property
    def is_fitted(self) -> bool:
        """True once :meth:`fit` ran (or a fitted state dict was loaded); read from the buffer once, then from a
        host-side mirror (refreshed when a state dict is loaded)."""
        if self._fitted_host is None:
            self._fitted_host = bool(self.fitted)
        return self._fitted_host

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._fitted_host = None

    def _require_fitted(self) -> None:
        if not self.is_fitted:
            raise CodecError("PCACodec is not fitted: call fit(img_emb) first (or load a fitted state dict)")

    # ------------------------------------------------------------------ fitting
    @torch.no_grad()
    def fit(self, img_emb: Tensor, txt_emb: Tensor | None = None, *, max_samples: int | None = 100_000,
            seed: int = 0) -> dict[str, float]:
        """Fit the PCA and the code buckets on training image embeddings, and the dot buckets when z_t is given.

        Args:
            img_emb: (N, D) unit-norm CLIP image embeddings.
            txt_emb: optional (N, D) paired text embeddings; fits ``dot_buckets`` on (img_emb * txt_emb).sum(-1).
            max_samples: fit on a random subset of this many rows (None: all rows).
            seed: seed of that subset (the same rows of img_emb and txt_emb).
        Returns:
            {"explained_variance", "mse", "cosine"} of the fitted codec, measured on the fitting rows.
        """
        if self.is_fitted:
            raise CodecError("PCACodec is already fitted: refitting would silently change what a trained model's "
                             "codes mean; build a new codec instead")
        _check_matrix(img_emb, "img_emb", self.embed_dim)
        n = img_emb.shape[0]
        if n < 2:
            raise CodecError(f"need at least 2 embeddings to fit the codec, got {n}")
        if txt_emb is not None and tuple(txt_emb.shape) != tuple(img_emb.shape):
            raise CodecError(f"txt_emb must match img_emb's shape {tuple(img_emb.shape)}, got {tuple(txt_emb.shape)}")
        if max_samples is not None and max_samples < 2:
            raise CodecError(f"max_samples must be >= 2 or None, got {max_samples}")
        if not torch.isfinite(img_emb).all():
            raise CodecError("img_emb has non-finite values")
        img_emb = img_emb.detach()
        if max_samples is not None and n > max_samples:
            rows = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:max_samples]
            img_emb = img_emb[rows.to(img_emb.device)]
            txt_emb = txt_emb[rows.to(txt_emb.device)] if txt_emb is not None else None

        mean, cov = _covariance(img_emb)
        values, rows = _eigen(cov)
        total = float(values.sum())
        if total <= 0.0:
            raise CodecError("img_emb has zero variance: every row is the same embedding")
        k = self.num_components
        components = rows[:k]  # (k, D)
        proj = torch.cat([(img_emb[s:s + CHUNK].double() - mean) @ components.T
                          for s in range(0, img_emb.shape[0], CHUNK)]).float()  # (N, k)
        dot = (img_emb.float() * txt_emb.to(img_emb.device).float()).sum(-1) if txt_emb is not None else None
        if dot is not None and not torch.isfinite(dot).all():
            raise CodecError("txt_emb has non-finite values")

        self.buckets.fit(proj)
        if dot is not None:
            self.dot_buckets.fit(dot[:, None])
        self.mean.copy_(mean.to(self.mean))
        self.components.copy_(components.to(self.components))
        self.eigenvalues.copy_(values[:k].to(self.eigenvalues))
        self.explained_variance.fill_(float(values[:k].sum()) / total)
        self.fitted.fill_(True)
        self._fitted_host = True
        return {"explained_variance": float(self.explained_variance), **self.reconstruction(img_emb)}

    # ------------------------------------------------------------------ codes
    def project(self, z: Tensor) -> Tensor:
        """z (N, D) -> (N, k) float32 PCA coordinates (z - mean) @ components^T, before quantisation."""
        self._require_fitted()
        _check_matrix(z, "z", self.embed_dim)
        return (z.to(self.mean.device).float() - self.mean.float()) @ self.components.float().T

    def unproject(self, coords: Tensor) -> Tensor:
        """coords (N, k) PCA coordinates -> (N, D) unit-norm embeddings: inverse PCA, then renormalise."""
        self._require_fitted()
        _check_matrix(coords, "coords", self.num_components)
        return F.normalize(coords.float() @ self.components.float() + self.mean.float(), dim=-1)

    def encode(self, z: Tensor) -> Tensor:
        """z (N, D) image embeddings -> (N, k) long codes in [0, B), component 0 (largest eigenvalue) first."""
        return self.buckets.encode(self.project(z))

    def decode(self, codes: Tensor) -> Tensor:
        """codes (N, k) long -> (N, D) unit-norm embeddings: dequantise (bucket centers), inverse PCA, normalise."""
        self._require_fitted()
        return self.unproject(self.buckets.decode(codes))

    def _require_dot_fitted(self) -> None:
        self._require_fitted()
        if not self.dot_buckets.is_fitted:
            raise CodecError("the dot buckets are not fitted: fit the codec with txt_emb")

    def encode_dot(self, dot: Tensor) -> Tensor:
        """dot (N,) float, z_i . z_t -> (N,) long codes in [0, B_dot)."""
        self._require_dot_fitted()
        if dot.ndim != 1:
            raise CodecError(f"dot must be (N,), got {tuple(dot.shape)}")
        return self.dot_buckets.encode(dot[:, None])[:, 0]

    def decode_dot(self, codes: Tensor) -> Tensor:
        """codes (N,) long -> (N,) float32 dot products (the bucket centers)."""
        self._require_dot_fitted()
        if codes.ndim != 1:
            raise CodecError(f"codes must be (N,), got {tuple(codes.shape)}")
        return self.dot_buckets.decode(codes[:, None])[:, 0]

    @torch.no_grad()
    def reconstruction(self, z: Tensor) -> dict[str, float]:
        """How well the codes keep z (N, D): {"mse": mean over rows and dims of (decode(encode(z)) - z)^2,
        "cosine": mean cosine of decode(encode(z)) with z}. For unit-norm z, mse = 2 (1 - cosine) / D."""
        self._require_fitted()
        _check_matrix(z, "z", self.embed_dim)
        sq, cos = 0.0, 0.0
        for start in range(0, z.shape[0], CHUNK):
            zc = z[start:start + CHUNK].to(self.mean.device).float()
            rec = self.decode(self.encode(zc))
            sq += float((rec - zc).double().pow(2).sum())
            cos += float(F.cosine_similarity(rec, zc, dim=-1).double().sum())
        return {"mse": sq / z.numel(), "cosine": cos / z.shape[0]}
