"""Evaluation of a prior's predicted image embeddings (pure torch).

The prior is useful when cos(pred, true) clearly exceeds cos(pred, other caption's true z_i) and retrieving the true
image among the validation images with the predicted z_i beats retrieving it with z_t itself.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

try:  # shared implementation written with the CLIP stage
    from unclip_pl.metrics.retrieval import retrieval_topk
except ImportError:  # pragma: no cover
    retrieval_topk = None


def _topk(queries: torch.Tensor, keys: torch.Tensor, k: Sequence[int]) -> dict[str, float]:
    """Top-k accuracy of retrieving key i with query i by cosine similarity. queries, keys: (N, D).

    Identical keys (the same image appearing twice) share a label, so retrieving either copy counts as correct.
    """
    _, labels = torch.unique(keys.float(), dim=0, return_inverse=True)  # (N,)
    if retrieval_topk is not None:
        return retrieval_topk(queries, keys, labels, k, key_labels=labels)
    sims = F.normalize(queries.float(), dim=-1) @ F.normalize(keys.float(), dim=-1).T  # (N, N)
    top = sims.topk(min(max(k), keys.shape[0]), dim=-1).indices
    hit = labels[top] == labels[:, None]
    return {f"top{kv}": hit[:, :kv].any(-1).float().mean().item() for kv in k}


def prior_metrics(pred: torch.Tensor, img_emb: torch.Tensor, txt_emb: torch.Tensor,
                  k: Sequence[int] = (1, 5)) -> dict[str, float]:
    """Cosine and retrieval metrics of predicted image embeddings.

    Args:
        pred: (N, D) predicted z_i; img_emb: (N, D) true z_i; txt_emb: (N, D) z_t of the same captions.
        k: retrieval cut-offs.
    Returns:
        dict with cos_pred_true, cos_text_true (baseline), cos_pred_text, cos_pred_other (true z_i of the next
        caption, rolled by one), retrieval_top{k} (pred as query among the N true images) and
        text_retrieval_top{k} (z_t as query).
    """
    pred, img, txt = (F.normalize(x.float(), dim=-1) for x in (pred, img_emb, txt_emb))
    other = img.roll(1, dims=0)
    out = {
        "cos_pred_true": (pred * img).sum(-1).mean().item(),
        "cos_text_true": (txt * img).sum(-1).mean().item(),
        "cos_pred_text": (pred * txt).sum(-1).mean().item(),
        "cos_pred_other": (pred * other).sum(-1).mean().item(),
    }
    out.update({f"retrieval_{name}": v for name, v in _topk(pred, img, k).items()})
    out.update({f"text_retrieval_{name}": v for name, v in _topk(txt, img, k).items()})
    return out
