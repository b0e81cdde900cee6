"""Retrieval top-k metrics on constructed cases."""

from __future__ import annotations

import pytest
import torch

from unclip_pl.metrics.retrieval import caption_groups, clip_retrieval, first_of_group, retrieval_topk


def test_identity_is_perfect():
    x = torch.eye(6)
    out = retrieval_topk(x, x, torch.arange(6), k=(1, 5))
    assert out == {"top1": 1.0, "top5": 1.0}


def test_topk_counts():
    keys = torch.eye(4)
    # query 0 -> best key 0 (correct); query 1 -> best key 2, second key 1 (top-2 only); query 2 -> key 3 worst
    queries = torch.tensor([[1.0, 0, 0, 0], [0, 0.5, 1.0, 0], [0, 0.1, 0, 1.0]])
    targets = torch.tensor([0, 1, 2])
    out = retrieval_topk(queries, keys, targets, k=(1, 2, 10))
    assert out["top1"] == pytest.approx(1 / 3)
    assert out["top2"] == pytest.approx(2 / 3)
    assert out["top10"] == 1.0  # k clipped to the number of keys


def test_key_labels_any_match():
    keys = torch.eye(3)
    queries = torch.tensor([[0, 1.0, 0]])  # best key 1
    assert retrieval_topk(queries, keys, torch.tensor([7]), k=(1,), key_labels=torch.tensor([5, 7, 7]))["top1"] == 1
    assert retrieval_topk(queries, keys, torch.tensor([5]), k=(1,), key_labels=torch.tensor([5, 7, 7]))["top1"] == 0


def test_caption_groups_strings_and_tokens():
    g = caption_groups(["a", "b", "a", "c", "b"])
    assert g.tolist() == [0, 1, 0, 2, 1]
    tok = torch.tensor([[1, 2], [3, 4], [1, 2]])
    assert caption_groups(tok).tolist() == [0, 1, 0]
    assert first_of_group(g).tolist() == [0, 1, 3]


def test_clip_retrieval_duplicate_captions_count_as_correct():
    # 4 images; images 0 and 1 share caption "x". Text emb of sample i == image emb of sample i.
    img = torch.tensor([[1.0, 0, 0], [0.9, 0.1, 0], [0, 1.0, 0], [0, 0, 1.0]])
    txt = img.clone()
    txt[1] = txt[0]  # identical caption -> identical text embedding
    groups = caption_groups(["x", "x", "y", "z"])
    out = clip_retrieval(img, txt, groups, k=(1, 5))
    # i2t: image 1's nearest distinct caption is "x" (its own caption) -> all correct
    assert out["i2t_top1"] == 1.0 and out["i2t_top5"] == 1.0
    # t2i: 3 distinct captions, each retrieves an image carrying it
    assert out["t2i_top1"] == 1.0
    # swap the text embeddings of samples 2 and 3 -> those two pairs become wrong at top-1
    txt2 = txt.clone()
    txt2[2], txt2[3] = txt[3], txt[2]
    out2 = clip_retrieval(img, txt2, groups, k=(1,))
    assert out2["i2t_top1"] == 0.5 and out2["t2i_top1"] == pytest.approx(1 / 3)


def test_random_embeddings_near_chance():
    g = torch.Generator().manual_seed(0)
    img, txt = torch.randn(200, 16, generator=g), torch.randn(200, 16, generator=g)
    out = clip_retrieval(img, txt, torch.arange(200), k=(1, 5))
    assert out["i2t_top1"] < 0.05 and out["t2i_top5"] < 0.1
