"""Sample diversity: mean pairwise CLIP-feature distance among the samples generated for one caption.

The paper's human evaluation finds unCLIP samples more diverse than GLIDE's at the same guidance; this is a cheap
automatic proxy. Distance = 1 - cosine between unit-norm CLIP image embeddings (0 for identical samples, up to 2).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def mean_pairwise_distance(features: torch.Tensor) -> float:
    """Mean of 1 - cos over the n (n - 1) / 2 distinct pairs of (n, D) features; nan for n < 2."""
    n = features.shape[0]
    if n < 2:
        return float("nan")
    f = F.normalize(features.double(), dim=-1)
    sims = f @ f.T
    iu = torch.triu_indices(n, n, offset=1)
    return float((1.0 - sims[iu[0], iu[1]]).mean())


def diversity_by_group(features: torch.Tensor, groups: Sequence[int] | torch.Tensor) -> dict[str, float]:
    """Per-caption diversity, averaged over captions with at least 2 samples.

    Args:
        features: (N, D) CLIP image embeddings of generated samples; groups: (N,) caption id of each sample.
    Returns:
        {"diversity": mean over groups, "groups": number of groups used}.
    """
    groups = torch.as_tensor(groups, dtype=torch.long)
    values = []
    for g in torch.unique(groups):
        sel = features[groups == g]
        if sel.shape[0] >= 2:
            values.append(mean_pairwise_distance(sel))
    return {"diversity": float(sum(values) / len(values)) if values else float("nan"), "groups": len(values)}
