"""Evaluation metrics (retrieval, FID, CLIP score, prior metrics)."""

from unclip_pl.metrics.retrieval import caption_groups, clip_retrieval, first_of_group, retrieval_topk

__all__ = ["caption_groups", "clip_retrieval", "first_of_group", "retrieval_topk"]
