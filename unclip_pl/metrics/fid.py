"""Frechet distances between image sets: in the frozen CLIP's image-feature space (always available, offline) and the
classic Inception FID through torchmetrics (when its weights are available locally).

Frechet distance between Gaussians fitted to two feature sets (Heusel et al. 2017):

    d^2 = |mu_1 - mu_2|^2 + tr(C_1) + tr(C_2) - 2 tr((C_1 C_2)^(1/2))

Implementation notes (own code, no scipy):
- Means and covariances are accumulated in float64 (unbiased covariance, N - 1).
- tr((C_1 C_2)^(1/2)) is computed from symmetric eigen-decompositions only: with S = C_1^(1/2) (eigh of C_1, negative
  round-off eigenvalues clamped to 0), the matrix M = S C_2 S is symmetric PSD and similar to C_1 C_2 (same spectrum),
  so tr((C_1 C_2)^(1/2)) = sum_k sqrt(lambda_k(M)). This is exact up to round-off, needs no iteration and stays
  stable for the rank-deficient covariances of small sample sets (N < D), where scipy's sqrtm returns complex noise.
- Distributed: features are GATHERED from every rank (``unclip_pl.utils.distributed.gather_rows``: uneven per-rank
  counts) before the statistics are computed, so the value equals a single process over all data.
  Averaging per-process FIDs would not (FID is not linear in the samples).
- CLIP-space FID uses the unit-norm CLIP image embeddings (D = clip.embed_dim); its values are on a much smaller
  scale than Inception FID and are only comparable between runs that use the same CLIP (see ``clip.fingerprint``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from unclip_pl.utils.distributed import gather_rows

log = logging.getLogger(__name__)

#: File name torch-fidelity (used by torchmetrics' FrechetInceptionDistance) stores the FID Inception weights under.
INCEPTION_WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"


# ----------------------------------------------------------------------------------------------------------- gather
def gather_features(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` (N_r, D) from every rank, in rank order; identity without an initialised process group.

    ``unclip_pl.utils.distributed.gather_rows`` on the detached float32 features: ranks may hold different N_r.
    The result is on x's device, float32 (N, D) with N = sum_r N_r, identical on every rank.
    """
    if x.ndim != 2:
        raise ValueError(f"gather_features expects (N, D), got {tuple(x.shape)}")
    return gather_rows(x.detach().float())


# ----------------------------------------------------------------------------------------------------------- stats
def feature_stats(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, D) features -> (mean (D,), unbiased covariance (D, D)), both float64. N >= 2."""
    x = features.detach().double().reshape(features.shape[0], -1)
    n = x.shape[0]
    if n < 2:
        raise ValueError(f"need at least 2 samples for a covariance, got {n}")
    mu = x.mean(0)
    xc = x - mu
    return mu, (xc.T @ xc) / (n - 1)


def _sqrt_psd(c: torch.Tensor) -> torch.Tensor:
    """Symmetric PSD square root via eigh (eigenvalues clamped at 0)."""
    w, v = torch.linalg.eigh((c + c.T) * 0.5)
    return (v * w.clamp(min=0).sqrt()) @ v.T


def trace_sqrt_product(c1: torch.Tensor, c2: torch.Tensor) -> torch.Tensor:
    """tr((C_1 C_2)^(1/2)) for symmetric PSD C_1, C_2 (D, D), float64 scalar (see module docstring)."""
    c1, c2 = c1.double(), c2.double()
    s = _sqrt_psd(c1)
    m = s @ c2 @ s
    lam = torch.linalg.eigvalsh((m + m.T) * 0.5)
    return lam.clamp(min=0).sqrt().sum()


def frechet_distance(mu1: torch.Tensor, cov1: torch.Tensor, mu2: torch.Tensor, cov2: torch.Tensor) -> float:
    """Frechet distance d^2 between N(mu1, cov1) and N(mu2, cov2) (mu (D,), cov (D, D)); clamped at 0."""
    mu1, mu2, cov1, cov2 = mu1.double(), mu2.double(), cov1.double(), cov2.double()
    diff = mu1 - mu2
    d2 = diff.dot(diff) + torch.trace(cov1) + torch.trace(cov2) - 2.0 * trace_sqrt_product(cov1, cov2)
    return max(float(d2), 0.0)


def frechet_distance_features(a: torch.Tensor, b: torch.Tensor) -> float:
    """Frechet distance between feature sets a (N, D) and b (M, D) (single process, no gathering)."""
    return frechet_distance(*feature_stats(a), *feature_stats(b))


class FrechetFeatureDistance:
    """Accumulates real and generated features (e.g. on each rank) and computes their Frechet distance after
    gathering across ranks.

    ``update(features (B, D), real: bool)``; ``compute() -> float`` (collective: every rank must call it);
    ``reset()``. Features are kept on the CPU in float32 (cheap for CLIP widths; 10k x 1024 is 40 MB).
    """

    def __init__(self) -> None:
        self.real: list[torch.Tensor] = []
        self.fake: list[torch.Tensor] = []

    def update(self, features: torch.Tensor, real: bool) -> None:
        (self.real if real else self.fake).append(features.detach().float().reshape(features.shape[0], -1).cpu())

    def reset(self, real: bool = True) -> None:
        """Drop the generated features (and the real ones unless ``real=False``)."""
        self.fake = []
        if real:
            self.real = []

    @staticmethod
    def _cat(parts: list[torch.Tensor]) -> torch.Tensor:
        if not parts:
            raise ValueError("no features were added")
        return torch.cat(parts)

    def gathered(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(real (N, D), fake (M, D)) over all ranks."""
        return gather_features(self._cat(self.real)), gather_features(self._cat(self.fake))

    def compute(self) -> float:
        real, fake = self.gathered()
        return frechet_distance_features(real, fake)


class CLIPFrechetDistance(FrechetFeatureDistance):
    """Frechet distance in the frozen CLIP's image-embedding space: ``update(images (B, 3, H, W) in [-1, 1], real)``.

    Always available offline (uses the project's CLIP). Not comparable with published (Inception) FID.
    """

    def __init__(self, clip: Any) -> None:
        super().__init__()
        self.clip = clip

    @torch.no_grad()
    def update(self, images: torch.Tensor, real: bool) -> None:  # type: ignore[override]
        super().update(self.clip.encode_image(images), real)

    def update_features(self, features: torch.Tensor, real: bool) -> None:
        """Add precomputed CLIP image embeddings (B, D) (e.g. the shards' ``img_emb``)."""
        super().update(features, real)


# ----------------------------------------------------------------------------------------------------------- Inception
#: The config key that passes the weights file to ``python eval.py`` (top level of conf/eval.yaml).
INCEPTION_WEIGHTS_KEY = "inception_weights"


def inception_weights_status(weights_path: str | os.PathLike | None = None,
                             key: str = INCEPTION_WEIGHTS_KEY) -> tuple[str | None, str]:
    """Find the FID Inception weights without touching the network.

    Returns (path or None, reason). ``weights_path`` (a local file) wins; otherwise the torch hub cache that
    torch-fidelity downloads into (``$TORCH_HOME/hub/checkpoints/weights-inception-2015-12-05-6726825d.pth``).
    ``key`` is the override named in the reason (``inception_weights=`` of eval.py).
    """
    try:
        import torch_fidelity  # noqa: F401
    except ImportError:
        return None, ("torch-fidelity is not installed (torchmetrics' FrechetInceptionDistance needs it: "
                      "pip install -e \".[fid]\"); Inception FID is skipped, CLIP-space FID is still reported")
    if weights_path:
        p = Path(weights_path).expanduser()
        if p.is_file():
            return str(p), f"Inception weights from {p}"
        return None, f"inception weights file {p} ({key}=) does not exist; Inception FID is skipped"
    cached = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS_FILE
    if cached.is_file():
        return str(cached), f"Inception weights from the torch hub cache {cached}"
    return None, (f"no FID Inception weights in the torch hub cache ({cached}) and no local file given "
                  f"({key}=/path/to/{INCEPTION_WEIGHTS_FILE}); offline, so Inception FID is "
                  f"skipped and CLIP-space FID is reported")


class InceptionFID:
    """torchmetrics ``FrechetInceptionDistance`` (2048 features) on images in [-1, 1].

    Build with :meth:`create`, which returns ``(metric or None, reason)`` and never downloads. torchmetrics syncs
    its (sum, covariance-sum, count) states across ranks itself, which equals gathering the features.
    """

    def __init__(self, metric: Any) -> None:
        self.metric = metric

    @classmethod
    def create(cls, weights_path: str | os.PathLike | None = None, feature: int = 2048,
               device: str | torch.device = "cpu") -> tuple[InceptionFID | None, str]:
        path, reason = inception_weights_status(weights_path)
        if path is None:
            return None, reason
        try:
            from torchmetrics.image.fid import FrechetInceptionDistance

            metric = FrechetInceptionDistance(feature=feature, normalize=True, feature_extractor_weights_path=path)
        except Exception as e:  # noqa: BLE001 -- a bad weights file or an incompatible torch-fidelity
            return None, f"could not build FrechetInceptionDistance from {path}: {e}"
        return cls(metric.to(device)), reason

    @torch.no_grad()
    def update(self, images: torch.Tensor, real: bool) -> None:
        x = ((images.float() + 1.0) * 0.5).clamp(0, 1).to(self.metric.device)
        self.metric.update(x, real=real)

    def compute(self) -> float:
        return float(self.metric.compute())

    def reset(self) -> None:
        self.metric.reset()


def clip_fid_of_batches(clip: Any, real_batches: Iterable[torch.Tensor], fake_batches: Iterable[torch.Tensor]) -> float:
    """Convenience: CLIP-space FID of two iterables of image batches (B, 3, H, W) in [-1, 1]."""
    metric = CLIPFrechetDistance(clip)
    for x in real_batches:
        metric.update(x, real=True)
    for x in fake_batches:
        metric.update(x, real=False)
    return metric.compute()
