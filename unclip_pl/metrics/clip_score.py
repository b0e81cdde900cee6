"""CLIP score and caption retrieval of generated images, with the project's frozen CLIP.

- CLIP score: cosine between a generated image's CLIP embedding and its caption's CLIP text embedding (per image; the
  mean is reported). Unlike the common "CLIPScore" it is not multiplied by 100 nor clipped at 0.
- Retrieval accuracy: each generated image queries the pool of DISTINCT val captions (identical captions are merged,
  so an image is correct when a top-k caption has the same text as its own); top-1 / top-5.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from unclip_pl.metrics.retrieval import retrieval_topk


@torch.no_grad()
def encode_captions(clip: Any, captions: Sequence[str], batch_size: int = 256) -> torch.Tensor:
    """list[str] (N) -> (N, D) unit-norm CLIP text embeddings (on the CPU)."""
    out = []
    for i in range(0, len(captions), batch_size):
        out.append(clip.encode_text(clip.tokenize(list(captions[i:i + batch_size]))).emb.float().cpu())
    return torch.cat(out) if out else torch.zeros(0, clip.embed_dim)


@torch.no_grad()
def encode_images(clip: Any, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """(N, 3, H, W) in [-1, 1] -> (N, D) unit-norm CLIP image embeddings (on the CPU)."""
    out = [clip.encode_image(images[i:i + batch_size]).float().cpu() for i in range(0, images.shape[0], batch_size)]
    return torch.cat(out) if out else torch.zeros(0, clip.embed_dim)


def cosine_scores(img_emb: torch.Tensor, txt_emb: torch.Tensor) -> torch.Tensor:
    """Row-wise cosine of paired (N, D) embeddings -> (N,)."""
    return (F.normalize(img_emb.float(), dim=-1) * F.normalize(txt_emb.float(), dim=-1)).sum(-1)


def clip_score(clip: Any, images: torch.Tensor, captions: Sequence[str]) -> torch.Tensor:
    """Per-image CLIP score (N,): cosine(CLIP(image_n), CLIP(caption_n)); images (N, 3, H, W) in [-1, 1]."""
    if images.shape[0] != len(captions):
        raise ValueError(f"{images.shape[0]} images but {len(captions)} captions")
    return cosine_scores(encode_images(clip, images), encode_captions(clip, captions))


def unique_captions(captions: Sequence[str]) -> list[str]:
    """Distinct captions in order of first appearance."""
    return list(dict.fromkeys(captions))


def caption_retrieval(img_emb: torch.Tensor, captions: Sequence[str], pool: Sequence[str],
                      pool_emb: torch.Tensor, k: Sequence[int] = (1, 5)) -> dict[str, float]:
    """Does each image retrieve its own caption among the distinct ``pool`` captions?

    Args:
        img_emb: (N, D) CLIP embeddings of the (generated) images; captions: the N captions they were made from.
        pool: candidate captions (duplicates are merged); pool_emb: (len(pool), D) their CLIP text embeddings.
        k: cut-offs.
    Returns:
        {"top1": .., "top5": .., "pool_size": U} with U the number of distinct pool captions.
    """
    if pool_emb.shape[0] != len(pool):
        raise ValueError(f"pool has {len(pool)} captions but {pool_emb.shape[0]} embeddings")
    first: dict[str, int] = {}
    for i, c in enumerate(pool):
        first.setdefault(c, i)
    missing = [c for c in captions if c not in first]
    if missing:
        raise ValueError(f"{len(missing)} caption(s) are not in the retrieval pool, e.g. {missing[0]!r}")
    names = list(first)
    index = {c: j for j, c in enumerate(names)}
    keys = pool_emb[torch.tensor([first[c] for c in names], dtype=torch.long)]  # (U, D)
    targets = torch.tensor([index[c] for c in captions], dtype=torch.long)
    out: dict[str, float] = retrieval_topk(img_emb, keys, targets, k)
    out["pool_size"] = len(names)
    return out
