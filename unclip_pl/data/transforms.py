"""Per-sample image decoding and per-batch tensor conversion.

The hot path is kept out of torchvision: PIL decodes (with JPEG draft mode so big JPEGs decode at a reduced
scale), resizes the shorter side with ``reducing_gap`` (a cheap box pre-reduction for large factors), crops,
and the sample stays a ``uint8`` numpy array ``(H, W, 3)``. The conversion to float32 in [-1, 1] happens once
per batch in :func:`images_to_tensor`.
"""
from __future__ import annotations

import io
import random

import numpy as np
import torch
from PIL import Image

# Errors that mean "this image's bytes are unusable" (skipped and counted, never fatal).
DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError, EOFError, IndexError)

_RESAMPLE = Image.Resampling.BICUBIC


def flatten_alpha(img: Image.Image, background=(255, 255, 255)) -> Image.Image:
    """Return an RGB image; transparent images are composited onto ``background`` (white by default)."""
    if img.mode == "RGB":
        return img
    has_alpha = img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info)
    if not has_alpha:
        return img.convert("RGB")
    rgba = img.convert("RGBA")
    canvas = Image.new("RGBA", rgba.size, background + (255,))
    canvas.alpha_composite(rgba)
    return canvas.convert("RGB")


def resize_crop(img: Image.Image, size: int, random_crop: bool = False,
                rng: random.Random | None = None) -> Image.Image:
    """Resize so the shorter side is ``size`` then crop a ``size x size`` square (centre or random)."""
    w, h = img.size
    if min(w, h) != size:
        scale = size / min(w, h)
        nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
        img = img.resize((nw, nh), _RESAMPLE, reducing_gap=2.0 if scale < 0.5 else None)
        w, h = nw, nh
    if w == size and h == size:
        return img
    if random_crop:
        r = rng or random
        left, top = r.randint(0, w - size), r.randint(0, h - size)
    else:
        left, top = (w - size) // 2, (h - size) // 2
    return img.crop((left, top, left + size, top + size))


def decode_image(data: bytes, size: int, random_crop: bool = False, rng: random.Random | None = None) -> np.ndarray:
    """Decode image bytes to a ``uint8`` array ``(size, size, 3)`` (RGB, alpha composited onto white).

    Raises one of :data:`DECODE_ERRORS` when the bytes are not a readable image.
    """
    img = Image.open(io.BytesIO(data))
    if img.format == "JPEG":
        img.draft("RGB", (size, size))  # decode at a reduced scale that stays >= size (much faster for big JPEGs)
    img.load()
    img = flatten_alpha(img)
    img = resize_crop(img, size, random_crop, rng)
    arr = np.asarray(img)
    if arr.shape != (size, size, 3):
        raise ValueError(f"decoded image has shape {arr.shape}, expected {(size, size, 3)}")
    return arr


def images_to_tensor(images: list[np.ndarray]) -> torch.Tensor:
    """Stack ``uint8`` arrays ``(H, W, 3)`` into float32 ``(B, 3, H, W)`` in [-1, 1] (one conversion per batch).

    The channel transpose is done on the uint8 data (4x less memory traffic than on floats), and the scaling in
    numpy (no torch intra-op threads competing with DataLoader workers).
    """
    batch = np.ascontiguousarray(np.stack(images).transpose(0, 3, 1, 2))  # (B, 3, H, W) uint8
    out = np.multiply(batch, np.float32(1 / 127.5), dtype=np.float32)
    out -= np.float32(1.0)
    return torch.from_numpy(out)


def tensor_to_uint8(images: torch.Tensor) -> np.ndarray:
    """Inverse of :func:`images_to_tensor`: ``(B, 3, H, W)`` in [-1, 1] -> ``uint8 (B, H, W, 3)``."""
    x = ((images.detach().float().cpu().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).numpy()


def decode_npy(data: bytes) -> np.ndarray:
    """Decode an ``.npy`` payload (e.g. ``img_emb.npy``) to float32."""
    return np.load(io.BytesIO(data), allow_pickle=False).astype(np.float32, copy=False)


def encode_npy(array: np.ndarray) -> bytes:
    """Encode an array as ``.npy`` bytes."""
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()
