"""Frozen CLIP used by every later stage, and its loaders.

``FrozenCLIP`` wraps an open_clip ``CLIP`` (or ``CustomTextCLIP`` with an open_clip text transformer):
always ``eval()`` with ``requires_grad_(False)``; images in [-1, 1] are resized and normalised inside;
the text tower is run here module by module so per-token states come out too. Embeddings are unit-norm by default;
``normalize=False`` gives CLIP's raw projections instead (what Karlo's prior and decoder read).
Captions are trimmed to the longest one in the batch, on the CPU when tokenising (exact: the causal mask means no
real token attends to padding, and the pooled token is the end token); the training step itself never reads lengths
back from the GPU.

``load_clip`` builds one from (a) an open_clip name + pretrained tag (open_clip's own download / cache, failing at
once in one line when offline and not cached), or (b) a local checkpoint file (an open_clip state dict, or a file
written by ``unclip_pl.clip.small.export_clip``), checked key by key with :func:`unclip_pl.checkpoint.load_strict`.
The text-tower helpers (tokenising, trimming, per-token states) live in :mod:`unclip_pl.clip.text`.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import open_clip
import torch
import torch.nn.functional as F
from torch import nn

from unclip_pl.clip.small import SMALL_CLIP_CONFIGS, build_from_config, describe_training, register_small_clips
from unclip_pl.clip.text import (  # noqa: F401
    TRIM_MULTIPLE,
    TrimmingTokenizer,
    UnsupportedTextTower,
    can_trim,
    device_of,
    encode_text_tokens,
    loader_tokenizer,
    text_tower,
    trim_tokens,
)

log = logging.getLogger(__name__)

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


class CLIPLoadError(RuntimeError):
    """Any failure to build/load a CLIP: message says what to do."""


@dataclass
class TextEncoding:
    """Output of :meth:`FrozenCLIP.encode_text`.

    emb:    (B, D) pooled text embedding: unit norm, or CLIP's raw projection (``FrozenCLIP(normalize=False)``).
    tokens: (B, L', W) per-token states after the final LayerNorm (L' <= context length): Hugging Face
            ``CLIPTextModel``'s ``last_hidden_state``.
    mask:   (B, L') bool, True at real tokens (start token .. end token inclusive).
    """

    emb: torch.Tensor
    tokens: torch.Tensor
    mask: torch.Tensor


# ---------------------------------------------------------------------------------------------------------------------
# Shared maths (used by FrozenCLIP and by the contrastive trainer so both see identical inputs)
# ---------------------------------------------------------------------------------------------------------------------
def preprocess_images(images: torch.Tensor, image_size: int | Sequence[int], mean: Sequence[float],
                      std: Sequence[float], interpolation: str = "bicubic") -> torch.Tensor:
    """(B, 3, H, W) in [-1, 1] -> (B, 3, S, S) resized (antialiased) and CLIP-normalised."""
    size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    x = (images.float() + 1.0) * 0.5  # [0, 1]
    if tuple(x.shape[-2:]) != size:
        mode = "bilinear" if interpolation == "bilinear" else "bicubic"
        x = F.interpolate(x, size=size, mode=mode, align_corners=False, antialias=True).clamp_(0.0, 1.0)
    mean_t = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    std_t = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x - mean_t) / std_t


def model_image_size(model: nn.Module) -> int:
    size = getattr(model.visual, "image_size", None)
    if size is None:
        size = open_clip.model.get_model_preprocess_cfg(model).get("size", 224)
    if isinstance(size, (tuple, list)):
        if size[0] != size[1]:
            raise CLIPLoadError(f"non-square CLIP image size {tuple(size)} is not supported")
        size = size[0]
    return int(size)


# ---------------------------------------------------------------------------------------------------------------------
# FrozenCLIP
# ---------------------------------------------------------------------------------------------------------------------
class FrozenCLIP(nn.Module):
    """Frozen open_clip model: ``eval()`` + ``requires_grad_(False)`` always; ``.train()`` keeps it in eval.

    Attributes: embed_dim (D), text_width (W), context_length (L), image_size, fingerprint (short weights hash),
    tokenizer (picklable open_clip tokenizer, ``tokenizer(list[str]) -> (B, L) int64``), model_name.
    ``normalize``: True (default): image and text embeddings are unit norm; False: CLIP's raw projections
    (``image_embeds`` / ``text_embeds`` of Hugging Face's CLIP models, which Karlo's pipeline feeds its stages).
    """

    def __init__(self, model: nn.Module, tokenizer: Any = None, model_name: str = "", trim: bool = True,
                 normalize: bool = True):
        super().__init__()
        self.model = model
        self.normalize = bool(normalize)
        self.model_name = model_name
        self.requires_grad_(False)
        super().train(False)
        tower = text_tower(model)
        self.context_length = int(tower.positional_embedding.shape[0])
        self.tokenizer = tokenizer if tokenizer is not None else open_clip.SimpleTokenizer(
            context_length=self.context_length)
        self.text_width = int(tower.positional_embedding.shape[1])
        self.image_size = model_image_size(model)
        pp = dict(open_clip.model.get_model_preprocess_cfg(model))
        self.mean = tuple(float(v) for v in pp.get("mean", OPENAI_MEAN))
        self.std = tuple(float(v) for v in pp.get("std", OPENAI_STD))
        self.interpolation = str(pp.get("interpolation", "bicubic"))
        self.trim = trim
        with torch.no_grad():
            probe = torch.zeros(1, self.context_length, dtype=torch.long)
            probe[0, 0], probe[0, 1] = 1, 2
            self.embed_dim = int(encode_text_tokens(model, probe.to(device_of(model)))[0].shape[-1])
        self._fingerprint: str | None = None

    # -- frozen ---------------------------------------------------------------------------------------------------
    def train(self, mode: bool = True) -> FrozenCLIP:
        """Always stays in eval mode (a parent's ``.train()`` must not switch on dropout etc.)."""
        return super().train(False)

    @property
    def device(self) -> torch.device:
        return device_of(self.model)

    @property
    def fingerprint(self) -> str:
        """12-hex-digit sha1 over weight names, shapes, values and the image preprocessing (computed once)."""
        if self._fingerprint is None:
            h = hashlib.sha1()
            h.update(repr((self.image_size, self.mean, self.std, self.context_length)).encode())
            if not self.normalize:  # raw projections are other embeddings than unit-norm ones
                h.update(b"raw projections")
            for name, t in sorted(self.model.state_dict().items()):
                t = t.detach().cpu().contiguous().reshape(-1)
                h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
                h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
            self._fingerprint = h.hexdigest()[:12]
        return self._fingerprint

    # -- encoders -------------------------------------------------------------------------------------------------
    def tokenize(self, texts: list[str] | str) -> torch.Tensor:
        """list[str] -> (B, L') int64 token ids on the CPU, trimmed after the longest caption where that is exact
        (:func:`trim_tokens`; L' <= context length)."""
        if isinstance(texts, str):
            texts = [texts]
        return self.loader_tokenizer(list(texts))

    @property
    def loader_tokenizer(self) -> Any:
        """Picklable ``list[str] -> (B, L')`` tokenizer for data loaders (trimming where exact)."""
        return loader_tokenizer(self.tokenizer, self.model, self.trim)

    @torch.no_grad()
    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, H, W) in [-1, 1] -> (B, D) unit-norm (raw with ``normalize=False``). Resizes
        (antialiased) and normalises the pixels inside."""
        x = preprocess_images(images.to(self.device), self.image_size, self.mean, self.std, self.interpolation)
        emb = self.model.encode_image(x).float()
        return F.normalize(emb, dim=-1) if self.normalize else emb

    @torch.no_grad()
    def encode_text(self, tokens: torch.Tensor | list[str]) -> TextEncoding:
        """tokens (B, L) int64 (or a list of captions) -> TextEncoding(emb (B, D), tokens (B, L', W), mask (B, L'))."""
        if not isinstance(tokens, torch.Tensor):
            tokens = self.tokenize(tokens)
        pooled, states, mask = encode_text_tokens(self.model, tokens, trim=self.trim)
        emb = F.normalize(pooled.float(), dim=-1) if self.normalize else pooled.float()
        return TextEncoding(emb=emb, tokens=states.float(), mask=mask)

    def extra_repr(self) -> str:
        return (f"model_name={self.model_name!r}, embed_dim={self.embed_dim}, text_width={self.text_width}, "
                f"context_length={self.context_length}, image_size={self.image_size}"
                + ("" if self.normalize else ", normalize=False"))


# ---------------------------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------------------------
def load_clip(model_name: str, pretrained: str | None = None, checkpoint: str | os.PathLike | None = None,
              cache_dir: str | os.PathLike | None = None, device: str | torch.device = "cpu",
              normalize: bool = True, **expect: Any) -> FrozenCLIP:
    """Build a :class:`FrozenCLIP`.

    Args:
        model_name: open_clip architecture (e.g. ``ViT-B-32``) or a small one from ``unclip_pl.clip.small``
            (``unclip-tiny``).
        pretrained: open_clip pretrained tag (e.g. ``laion2b_s34b_b79k``); downloaded/cached by open_clip.
        checkpoint: local weights file: an open_clip state dict (architecture = ``model_name``) or a file written by
            ``export_clip`` (its own config wins). Takes precedence over ``pretrained``.
        cache_dir: download cache for pretrained weights (default: open_clip / huggingface_hub default).
        normalize: unit-norm embeddings (default) or, False, CLIP's raw projections (``clip.loader.normalize=false``:
            the stages converted from Karlo read those).
        expect: optional checks ``embed_dim``, ``text_width``, ``context_length``, ``image_size``; a mismatch raises
            a ``CLIPLoadError`` naming the key. ``None`` values are ignored.
    """
    register_small_clips()
    cache_dir = str(cache_dir) if cache_dir is not None else None
    try:
        if checkpoint is not None:
            model, tokenizer, name = _load_from_checkpoint(model_name, Path(checkpoint))
        elif pretrained:
            model, tokenizer, name = _load_pretrained(model_name, pretrained, cache_dir)
        else:
            raise CLIPLoadError(
                f"load_clip({model_name!r}): give either `pretrained` (an open_clip tag, e.g. "
                f"clip.loader.pretrained=laion2b_s34b_b79k) or `checkpoint` (clip.loader.checkpoint=/path/to/weights)")
        clip = FrozenCLIP(model.to(device), tokenizer=tokenizer, model_name=name, normalize=normalize)
    except UnsupportedTextTower as e:
        raise CLIPLoadError(str(e)) from None
    check_expect(clip, **expect)
    return clip


def check_expect(clip: FrozenCLIP, **expect: Any) -> None:
    """Raise CLIPLoadError if any given dim differs from the model's."""
    known = ("embed_dim", "text_width", "context_length", "image_size")
    bad = []
    for key, want in expect.items():
        if key not in known:
            raise CLIPLoadError(f"load_clip: unknown expectation {key!r}; known: {list(known)}")
        if want is None:
            continue
        have = getattr(clip, key)
        if int(want) != int(have):
            bad.append(f"clip.{key}: config says {want} but the model {clip.model_name!r} has {have}")
    if bad:
        raise CLIPLoadError("CLIP does not match the config: " + "; ".join(bad)
                            + ". Fix the clip config (or choose the matching clip=... option).")


def tokenizer_for(model: nn.Module, model_name: str) -> Any:
    """The open_clip tokenizer of ``model`` (named ``model_name``), at its text tower's context length."""
    context_length = int(text_tower(model).positional_embedding.shape[0])
    if model_name in SMALL_CLIP_CONFIGS or model_name not in open_clip.list_models():
        return open_clip.SimpleTokenizer(context_length=context_length)
    return open_clip.get_tokenizer(model_name, context_length=context_length)


def _load_from_checkpoint(model_name: str, path: Path) -> tuple[nn.Module, Any, str]:
    """A local file: an ``export_clip`` file (its own config) or an open_clip state dict of ``model_name``."""
    from unclip_pl.checkpoint import CheckpointError, load_strict, read_checkpoint

    if not path.is_file():
        raise CLIPLoadError(
            f"CLIP checkpoint not found: {path}. Pass an existing file with clip.loader.checkpoint=/path/to/weights, "
            f"or train the small CLIP first with `python train.py stage=clip`.")
    try:
        obj = read_checkpoint(path)
    except CheckpointError as e:
        raise CLIPLoadError(f"CLIP checkpoint {e}") from None
    if isinstance(obj, dict) and "model_cfg" in obj and "state_dict" in obj:  # export_clip file
        name = obj.get("model_name") or model_name
        if model_name and name != model_name:
            log.warning("CLIP checkpoint %s holds %r (config asked for %r); using the checkpoint's own config",
                        path, name, model_name)
        model = build_from_config(obj["model_cfg"], obj.get("preprocess_cfg"))
        state_dict = obj["state_dict"]
        _announce_training(path, obj.get("training"))
    else:  # open_clip's own conventions for a plain state dict: maybe under "state_dict", maybe "module."-prefixed
        name = model_name
        if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
            obj = obj["state_dict"]
        if not isinstance(obj, dict) or not obj:
            raise CLIPLoadError(f"{path} holds no state dict (got {type(obj).__name__})")
        state_dict = {(k[7:] if k.startswith("module.") else k): v for k, v in obj.items()}
        model = _build_architecture(model_name)
    load_strict(model, state_dict, f"CLIP checkpoint {path}",
                f"the {name} architecture (clip.loader.model_name)", error=CLIPLoadError)
    return model, tokenizer_for(model, name), name


def _announce_training(path: Path, record: dict[str, Any] | None) -> None:
    """One line saying how an exported CLIP was trained; a warning when it is a smoke test."""
    if isinstance(record, dict) and record.get("smoke_test"):
        log.warning("CLIP %s is a smoke test: %s. Embeddings from it mean little; train it fully "
                    "(`python train.py stage=clip clip.export_to=%s`) or pass another clip.loader.checkpoint.",
                    path, describe_training(record), path)
    else:
        log.info("CLIP %s: %s", path, describe_training(record if isinstance(record, dict) else None))


def _build_architecture(model_name: str) -> nn.Module:
    if model_name in SMALL_CLIP_CONFIGS:  # with its own preprocessing (open_clip would attach OpenAI's)
        return build_from_config(SMALL_CLIP_CONFIGS[model_name])
    if model_name not in open_clip.list_models():
        raise CLIPLoadError(f"unknown open_clip architecture {model_name!r}; e.g. ViT-B-32, ViT-B-16, "
                            f"{', '.join(SMALL_CLIP_CONFIGS)} (see open_clip.list_models())")
    return open_clip.create_model(model_name, pretrained=None, pretrained_text=False, pretrained_image=False)


# -- pretrained (open_clip tag) ---------------------------------------------------------------------------------------
# open_clip finds, downloads and loads a tag's weights itself; kept here only the fast offline failure: with no
# network, huggingface_hub and urllib retry and time out for a minute or more instead of failing in one line.
def _offline_hint(model_name: str, pretrained: str) -> str:
    return (f"Cannot get pretrained CLIP weights {model_name}/{pretrained}: not in the local cache and no network "
            f"(HF_HUB_OFFLINE or no connection). Pass a local file instead: "
            f"clip.loader.checkpoint=/path/to/weights (an open_clip state dict such as open_clip_pytorch_model.bin "
            f"for {model_name}), or use the small CLIP trained here: clip=small.")


def _hf_offline() -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return True
    try:
        import huggingface_hub.constants as hc

        return bool(getattr(hc, "HF_HUB_OFFLINE", False))
    except ImportError:  # pragma: no cover
        return False


def _reachable(url: str, timeout: float = 3.0) -> bool:
    """Can we open a TCP connection to ``url``'s host within ``timeout`` s? (In a daemon thread: DNS itself can
    hang far longer than any socket timeout.)"""
    import socket

    parts = urllib.parse.urlparse(url)
    host, port = parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)
    ok: list[bool] = []

    def probe() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                ok.append(True)
        except OSError:
            pass

    if host:
        t = threading.Thread(target=probe, daemon=True)
        t.start()
        t.join(timeout + 0.5)
    return bool(ok)


def _cached_pretrained_file(pcfg: dict[str, Any], cache_dir: str | None) -> tuple[str | None, str]:
    """(the local file open_clip would load for this tag, or None; the remote it would download from), asking
    the caches open_clip's ``download_pretrained`` uses without touching the network."""
    from open_clip import pretrained as ocp

    if pcfg.get("file"):
        return (pcfg["file"] if os.path.isfile(pcfg["file"]) else None), ""
    if pcfg.get("hf_hub") and ocp.has_hf_hub():
        import huggingface_hub

        repo_id, filename = os.path.split(pcfg["hf_hub"])
        filename = filename or ocp.HF_WEIGHTS_NAME
        for name in [*ocp._get_safe_alternatives(filename), filename]:
            found = huggingface_hub.try_to_load_from_cache(repo_id, name, cache_dir=cache_dir)
            if isinstance(found, str) and os.path.isfile(found):
                return found, huggingface_hub.constants.ENDPOINT
        return None, huggingface_hub.constants.ENDPOINT
    url = pcfg.get("url", "")
    target = os.path.join(cache_dir or os.path.expanduser("~/.cache/clip"), os.path.basename(url)) if url else ""
    return (target if target and os.path.isfile(target) else None), url


def _load_pretrained(model_name: str, pretrained: str, cache_dir: str | None) -> tuple[nn.Module, Any, str]:
    if os.path.isfile(pretrained):  # open_clip also accepts a file path as `pretrained`
        return _load_from_checkpoint(model_name, Path(pretrained))
    if model_name not in open_clip.list_models():
        raise CLIPLoadError(f"unknown open_clip architecture {model_name!r} (see open_clip.list_models())")
    pcfg = open_clip.get_pretrained_cfg(model_name, pretrained)
    if not pcfg:
        tags = open_clip.list_pretrained_tags_by_model(model_name)
        raise CLIPLoadError(f"{pretrained!r} is not an open_clip pretrained tag of {model_name} nor a file; "
                            f"valid tags: {tags}")
    local, remote = _cached_pretrained_file(pcfg, cache_dir)
    if local is None and (_hf_offline() or not remote or not _reachable(remote)):
        raise CLIPLoadError(_offline_hint(model_name, pretrained))
    log.info("loading pretrained CLIP %s/%s from %s", model_name, pretrained, local or "the network")
    try:  # a cached file by path (no network at all), with the tag's image normalisation and activation
        model = open_clip.create_model(model_name, pretrained=local or pretrained, cache_dir=cache_dir,
                                       force_quick_gelu=bool(pcfg.get("quick_gelu", False)),
                                       force_preprocess_cfg=dict(pcfg), weights_only=True)
    except Exception as e:  # noqa: BLE001 -- a failed download, whatever the library raised
        raise CLIPLoadError(f"{_offline_hint(model_name, pretrained)} (download failed: {e})") from e
    return model, tokenizer_for(model, model_name), model_name
