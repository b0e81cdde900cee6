"""Helpers for the data tests: tiny synthetic samples and a fake CLIP (imported by tests/data/*)."""
from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image


def png_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def random_image(seed: int, h: int = 40, w: int = 48) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def make_samples(n: int, start: int = 0, size=(40, 48), emb_dim: int | None = None) -> list[dict]:
    out = []
    for i in range(start, start + n):
        s = {"__key__": f"s{i:05d}", "png": png_bytes(random_image(i, *size)), "txt": f"caption number {i}"}
        if emb_dim:
            s["img_emb.npy"] = np.full(emb_dim, i, np.float16)
            s["txt_emb.npy"] = np.full(emb_dim, -i, np.float16)
        out.append(s)
    return out


@dataclass
class FakeEncoding:
    emb: torch.Tensor


class FakeCLIP:
    """Deterministic CLIP stand-in: image embedding from mean colours, text embedding from character codes."""

    embed_dim = 8
    text_width = 8
    context_length = 16
    image_size = 32
    fingerprint = "fake0001"

    def __init__(self):
        self.image_calls = 0

    def tokenize(self, texts):
        out = torch.zeros(len(texts), self.context_length, dtype=torch.long)
        for i, t in enumerate(texts):
            ids = [ord(c) % 1000 + 1 for c in t[: self.context_length]]
            out[i, : len(ids)] = torch.tensor(ids)
        return out

    def encode_image(self, images):
        assert images.shape[1:] == (3, self.image_size, self.image_size), images.shape
        assert images.min() >= -1 and images.max() <= 1
        self.image_calls += 1
        m = images.mean(dim=(2, 3))  # (B, 3)
        e = torch.cat([m, m**2, m[:, :1] * m[:, 1:2], torch.ones_like(m[:, :1])], dim=1)  # (B, 8)
        return torch.nn.functional.normalize(e, dim=-1)

    def encode_text(self, tokens):
        t = tokens.float()
        e = torch.stack([t[:, i::8].sum(1) for i in range(8)], dim=1) + 1.0
        return FakeEncoding(emb=torch.nn.functional.normalize(e, dim=-1))
