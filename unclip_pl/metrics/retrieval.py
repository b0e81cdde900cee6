"""Cross-modal retrieval metrics (pure torch).

Captions repeat (several images can share one caption), so retrieval is scored against caption *groups*: an image
retrieves correctly when a top-k caption is its own caption text; a caption retrieves correctly when a top-k image
carries that caption.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def retrieval_topk(queries: torch.Tensor, keys: torch.Tensor, targets: torch.Tensor, k: Sequence[int] = (1, 5),
                   key_labels: torch.Tensor | None = None) -> dict[str, float]:
    """Top-k retrieval accuracy by cosine similarity.

    Args:
        queries: (N, D); keys: (M, D) (normalised here).
        targets: (N,) int: the correct key index of each query, or -- with ``key_labels`` -- the correct label.
        k: cut-offs; each is clipped to M.
        key_labels: optional (M,) int label of each key; a query is correct at k when any of its top-k keys has
            label == target (several keys may be correct).
    Returns:
        {"top{k}": fraction of queries correct at k} for each k.
    """
    if queries.shape[0] != targets.shape[0]:
        raise ValueError(f"queries {tuple(queries.shape)} and targets {tuple(targets.shape)} differ in length")
    q = F.normalize(queries.float(), dim=-1)
    kk = F.normalize(keys.float(), dim=-1)
    sims = q @ kk.T  # (N, M)
    labels = torch.arange(kk.shape[0], device=sims.device) if key_labels is None else key_labels.to(sims.device)
    targets = targets.to(sims.device)
    kmax = min(max(k), kk.shape[0])
    top = sims.topk(kmax, dim=-1).indices  # (N, kmax)
    hit = labels[top] == targets[:, None]  # (N, kmax)
    out = {}
    for kv in k:
        kv_eff = min(kv, kmax)
        out[f"top{kv}"] = hit[:, :kv_eff].any(dim=-1).float().mean().item() if q.shape[0] else float("nan")
    return out


def caption_groups(captions: Sequence[str] | torch.Tensor) -> torch.Tensor:
    """(N,) int64 group id per caption; identical captions (strings, or identical token rows of an (N, L) tensor)
    share an id. Ids are 0..U-1 in order of first appearance."""
    if isinstance(captions, torch.Tensor):
        _, inverse = torch.unique(captions, dim=0, return_inverse=True)
        keys = inverse.tolist()
    else:
        keys = list(captions)
    ids: dict = {}
    return torch.tensor([ids.setdefault(c, len(ids)) for c in keys], dtype=torch.long)


def first_of_group(groups: torch.Tensor) -> torch.Tensor:
    """(U,) index of the first sample of each group id 0..U-1 (for groups from :func:`caption_groups`)."""
    n_groups = int(groups.max().item()) + 1 if groups.numel() else 0
    first = torch.full((n_groups,), groups.numel(), dtype=torch.long)
    first.scatter_reduce_(0, groups.cpu(), torch.arange(groups.numel()), reduce="amin")
    return first


def clip_retrieval(img_emb: torch.Tensor, txt_emb: torch.Tensor, groups: torch.Tensor,
                   k: Sequence[int] = (1, 5)) -> dict[str, float]:
    """Image->text and text->image top-k over paired embeddings with de-duplicated captions.

    Args:
        img_emb: (N, D) image embeddings; txt_emb: (N, D) text embeddings of the paired captions;
        groups: (N,) caption group ids (:func:`caption_groups`).
    Returns:
        {"i2t_top1", "i2t_top5", "t2i_top1", "t2i_top5"} (one entry per k and direction):
        i2t: each image against the U distinct captions; t2i: each distinct caption against all N images.
    """
    groups = groups.long().cpu()
    first = first_of_group(groups)  # (U,)
    uniq_txt = txt_emb[first.to(txt_emb.device)]  # (U, D)
    uniq_ids = torch.arange(first.numel())
    i2t = retrieval_topk(img_emb, uniq_txt, groups, k)
    t2i = retrieval_topk(uniq_txt, img_emb, uniq_ids, k, key_labels=groups)
    out = {f"i2t_{name}": v for name, v in i2t.items()}
    out.update({f"t2i_{name}": v for name, v in t2i.items()})
    return out
