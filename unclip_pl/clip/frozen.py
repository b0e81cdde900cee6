"""Frozen CLIP used by every later stage, and its loaders.

``FrozenCLIP`` wraps an open_clip ``CLIP`` (or ``CustomTextCLIP`` with an open_clip text transformer):
always ``eval()`` with ``requires_grad_(False)``; images in [-1, 1] are resized and normalised inside;
the text tower is run here module by module so per-token states come out too. Captions are trimmed to the longest one
in the batch, on the CPU when tokenising (exact: the causal mask means no real token attends to padding, and the pooled
token is the end token); the training step itself never reads lengths back from the GPU.

``load_clip`` builds one from (a) an open_clip name + pretrained tag (real open_clip download / cache, failing at once
when offline and not cached), or (b) a local checkpoint file (an open_clip state dict, or a file written by
``unclip_pl.clip.small.export_clip``).
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import open_clip
import torch
import torch.nn.functional as F
from torch import nn

from unclip_pl.clip.small import SMALL_CLIP_CONFIGS, build_from_config, describe_training, register_small_clips

log = logging.getLogger(__name__)

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


class CLIPLoadError(RuntimeError):
    """Any failure to build/load a CLIP: message says what to do."""


@dataclass
class TextEncoding:
    """Output of :meth:`FrozenCLIP.encode_text`.

    emb:    (B, D) unit-norm pooled text embedding.
    tokens: (B, L', W) per-token states after the final LayerNorm (L' <= context length).
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


def text_tower(model: nn.Module) -> nn.Module:
    """The module holding token_embedding/positional_embedding/transformer/ln_final/text_projection/attn_mask:
    the CLIP itself (open_clip ``CLIP``) or its ``.text`` (``CustomTextCLIP`` with an open_clip TextTransformer)."""
    tower = model if hasattr(model, "token_embedding") else getattr(model, "text", None)
    if tower is None or not hasattr(tower, "token_embedding") or not hasattr(tower, "transformer"):
        raise CLIPLoadError(f"{type(model).__name__}: only open_clip text transformers are supported "
                            "(not Hugging Face text towers)")
    return tower


def can_trim(model: nn.Module) -> bool:
    """True when trimming padding is exact: causal mask and end-token (argmax) pooling, no class token."""
    tower = text_tower(model)
    pool = getattr(tower, "text_pool_type", getattr(tower, "pool_type", "argmax"))
    causal = getattr(tower, "attn_mask", None) is not None
    return causal and pool == "argmax" and getattr(tower, "cls_emb", None) is None


TRIM_MULTIPLE = 8  # trimmed caption lengths are rounded up to this: few distinct shapes (torch.compile), aligned


def trim_tokens(tokens: torch.Tensor, multiple: int = TRIM_MULTIPLE) -> torch.Tensor:
    """(B, L) token ids -> (B, L') with the padding after the longest caption cut, L' = its length (start .. end
    token) rounded up to ``multiple`` and capped at L. Reads the lengths back to the host: call it on CPU tensors
    (in the loader, when tokenising), never on device tensors inside a training step."""
    if tokens.numel() == 0:
        return tokens
    need = int(tokens.argmax(dim=-1).max()) + 1
    length = min(tokens.shape[1], -(-need // multiple) * multiple)
    return tokens[:, :length]


class TrimmingTokenizer:
    """Picklable ``list[str] -> (B, L')`` tokenizer for loader workers: the wrapped tokenizer, then
    :func:`trim_tokens` on the CPU. Use it only for text towers where :func:`can_trim` holds (see
    :func:`loader_tokenizer`)."""

    def __init__(self, tokenizer: Any, multiple: int = TRIM_MULTIPLE):
        self.tokenizer = tokenizer
        self.multiple = int(multiple)

    def __call__(self, texts: Sequence[str]) -> torch.Tensor:
        return trim_tokens(torch.as_tensor(self.tokenizer(list(texts)), dtype=torch.long), self.multiple)


def loader_tokenizer(tokenizer: Any, model: nn.Module, trim: bool = True) -> Any:
    """The picklable tokenizer to give data loaders for ``model``'s text tower: ``tokenizer`` wrapped in a
    :class:`TrimmingTokenizer` when ``trim`` and trimming is exact for the tower, else ``tokenizer`` itself."""
    return TrimmingTokenizer(tokenizer) if trim and can_trim(model) else tokenizer


def encode_text_tokens(model: nn.Module, tokens: torch.Tensor, trim: bool = True
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run an open_clip text tower keeping per-token states.

    tokens: (B, L) int64, open_clip SimpleTokenizer ids (start .. end token, 0-padded; id 0 is also a real BPE token,
    so real tokens are found by position: up to the end token = argmax id). L may be shorter than the context length.
    trim: when ``tokens`` is on the CPU and trimming is exact for this tower, cut the padding first
    (:func:`trim_tokens`), then move them to the model's device.
    Device tensors are used at the length given, with no host sync: trim them on the CPU beforehand (the loaders do,
    with :class:`TrimmingTokenizer`).
    Returns (pooled (B, D) NOT normalised, states (B, L', W) after ln_final, mask (B, L') bool).
    """
    tower = text_tower(model)
    if trim and tokens.device.type == "cpu" and can_trim(model):
        tokens = trim_tokens(tokens)
    tokens = tokens.to(_device_of(model))
    length = tokens.shape[1]
    eot = tokens.argmax(dim=-1)  # (B,) end-token position
    transformer = tower.transformer
    cast_dtype = transformer.get_cast_dtype() if hasattr(transformer, "get_cast_dtype") else torch.float32
    x = tower.token_embedding(tokens).to(cast_dtype)  # (B, L', W)
    x = x + tower.positional_embedding[:length].to(cast_dtype)
    attn_mask = getattr(tower, "attn_mask", None)
    if attn_mask is not None:
        attn_mask = attn_mask[:length, :length]
    # open_clip >= 2.24: Transformer has `batch_first` and takes (B, L, W) (transposing itself when False);
    # older versions have no attribute and expect (L, B, W).
    if hasattr(transformer, "batch_first"):
        x = transformer(x, attn_mask=attn_mask)
    else:
        x = transformer(x.permute(1, 0, 2), attn_mask=attn_mask).permute(1, 0, 2)
    x = tower.ln_final(x)  # (B, L', W)
    pooled = x[torch.arange(x.shape[0], device=x.device), eot]  # (B, W)
    proj = tower.text_projection
    if proj is not None:
        pooled = proj(pooled) if isinstance(proj, nn.Module) else pooled @ proj
    mask = torch.arange(length, device=tokens.device)[None, :] <= eot[:, None]
    return pooled, x, mask


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
    """

    def __init__(self, model: nn.Module, tokenizer: Any = None, model_name: str = "", trim: bool = True):
        super().__init__()
        self.model = model
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
            self.embed_dim = int(encode_text_tokens(model, probe.to(_device_of(model)))[0].shape[-1])
        self._fingerprint: str | None = None

    # -- frozen ---------------------------------------------------------------------------------------------------
    def train(self, mode: bool = True) -> "FrozenCLIP":
        """Always stays in eval mode (a parent's ``.train()`` must not switch on dropout etc.)."""
        return super().train(False)

    @property
    def device(self) -> torch.device:
        return _device_of(self.model)

    @property
    def fingerprint(self) -> str:
        """12-hex-digit sha1 over weight names, shapes, values and the image preprocessing (computed once)."""
        if self._fingerprint is None:
            h = hashlib.sha1()
            h.update(repr((self.image_size, self.mean, self.std, self.context_length)).encode())
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
        """images (B, 3, H, W) in [-1, 1] -> (B, D) unit-norm. Resizes (antialiased) and normalises inside."""
        x = preprocess_images(images.to(self.device), self.image_size, self.mean, self.std, self.interpolation)
        return F.normalize(self.model.encode_image(x).float(), dim=-1)

    @torch.no_grad()
    def encode_text(self, tokens: torch.Tensor | list[str]) -> TextEncoding:
        """tokens (B, L) int64 (or a list of captions) -> TextEncoding(emb (B, D), tokens (B, L', W), mask (B, L'))."""
        if not isinstance(tokens, torch.Tensor):
            tokens = self.tokenize(tokens)
        pooled, states, mask = encode_text_tokens(self.model, tokens, trim=self.trim)
        return TextEncoding(emb=F.normalize(pooled.float(), dim=-1), tokens=states.float(), mask=mask)

    def extra_repr(self) -> str:
        return (f"model_name={self.model_name!r}, embed_dim={self.embed_dim}, text_width={self.text_width}, "
                f"context_length={self.context_length}, image_size={self.image_size}")


def _device_of(module: nn.Module) -> torch.device:
    for p in module.parameters():
        return p.device
    return torch.device("cpu")


# ---------------------------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------------------------
def load_clip(model_name: str, pretrained: str | None = None, checkpoint: str | os.PathLike | None = None,
              cache_dir: str | os.PathLike | None = None, device: str | torch.device = "cpu",
              **expect: Any) -> FrozenCLIP:
    """Build a :class:`FrozenCLIP`.

    Args:
        model_name: open_clip architecture (e.g. ``ViT-B-32``) or a small one from ``unclip_pl.clip.small``
            (``unclip-tiny``).
        pretrained: open_clip pretrained tag (e.g. ``laion2b_s34b_b79k``); downloaded/cached by open_clip.
        checkpoint: local weights file: an open_clip state dict (architecture = ``model_name``) or a file written by
            ``export_clip`` (its own config wins). Takes precedence over ``pretrained``.
        cache_dir: download cache for pretrained weights (default: open_clip / huggingface_hub default).
        expect: optional checks ``embed_dim``, ``text_width``, ``context_length``, ``image_size``; a mismatch raises
            a ``CLIPLoadError`` naming the key. ``None`` values are ignored.
    """
    register_small_clips()
    cache_dir = str(cache_dir) if cache_dir is not None else None
    if checkpoint is not None:
        model, tokenizer, name = _load_from_checkpoint(model_name, Path(checkpoint))
    elif pretrained:
        model, tokenizer, name = _load_pretrained(model_name, pretrained, cache_dir)
    else:
        raise CLIPLoadError(
            f"load_clip({model_name!r}): give either `pretrained` (an open_clip tag, e.g. "
            f"clip.loader.pretrained=laion2b_s34b_b79k) or `checkpoint` (clip.loader.checkpoint=/path/to/weights)")
    clip = FrozenCLIP(model.to(device), tokenizer=tokenizer, model_name=name)
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
    if not path.is_file():
        raise CLIPLoadError(
            f"CLIP checkpoint not found: {path}. Pass an existing file with clip.loader.checkpoint=/path/to/weights, "
            f"or train the small CLIP first with `python train.py stage=clip`.")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 -- corrupt / pickled-object files
        raise CLIPLoadError(f"could not read CLIP checkpoint {path} with torch.load(weights_only=True): {e}") from e
    if isinstance(obj, dict) and "model_cfg" in obj and "state_dict" in obj:  # export_clip file
        name = obj.get("model_name") or model_name
        if model_name and name != model_name:
            log.warning("CLIP checkpoint %s holds %r (config asked for %r); using the checkpoint's own config",
                        path, name, model_name)
        model = build_from_config(obj["model_cfg"], obj.get("preprocess_cfg"))
        state_dict = obj["state_dict"]
        _announce_training(path, obj.get("training"))
    else:
        name = model_name
        if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
            obj = obj["state_dict"]
        if not isinstance(obj, dict) or not obj:
            raise CLIPLoadError(f"{path} holds no state dict (got {type(obj).__name__})")
        state_dict = {(k[7:] if k.startswith("module.") else k): v for k, v in obj.items()}
        model = _build_architecture(model_name)
    _load_state_dict_strict(model, state_dict, path)
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
    if model_name in SMALL_CLIP_CONFIGS:
        return build_from_config(SMALL_CLIP_CONFIGS[model_name])
    if model_name not in open_clip.list_models():
        raise CLIPLoadError(f"unknown open_clip architecture {model_name!r}; e.g. ViT-B-32, ViT-B-16, "
                            f"{', '.join(SMALL_CLIP_CONFIGS)} (see open_clip.list_models())")
    return open_clip.create_model(model_name, pretrained=None, pretrained_text=False, pretrained_image=False)


def _load_state_dict_strict(model: nn.Module, state_dict: dict[str, torch.Tensor], path: Path) -> None:
    own = model.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    shapes = sorted(f"{k} {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
                    for k in set(own) & set(state_dict) if tuple(own[k].shape) != tuple(state_dict[k].shape))
    if missing or unexpected or shapes:
        def fmt(items: list[str]) -> str:
            return ", ".join(items[:20]) + (f", ... ({len(items)} in all)" if len(items) > 20 else "")

        parts = [f"CLIP checkpoint {path} does not match the architecture"]
        if missing:
            parts.append(f"missing keys: {fmt(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {fmt(unexpected)}")
        if shapes:
            parts.append(f"shape mismatches: {fmt(shapes)}")
        raise CLIPLoadError("; ".join(parts) + ". Check clip.loader.model_name matches the file.")
    model.load_state_dict(state_dict, strict=True)


# -- pretrained (open_clip tag) ---------------------------------------------------------------------------------------
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
    """Can we open a TCP connection to ``url``'s host within ``timeout`` s (DNS included, in a daemon thread)?"""
    import socket

    parts = urllib.parse.urlparse(url)
    host, port = parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)
    if not host:
        return False
    ok: list[bool] = []

    def probe() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                ok.append(True)
        except OSError:
            pass

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout + 0.5)
    return bool(ok)


def _cached_pretrained_file(pcfg: dict[str, Any], cache_dir: str | None) -> tuple[str | None, str]:
    """(local path if cached else None, remote URL used for the reachability probe)."""
    if pcfg.get("file"):
        return (pcfg["file"] if os.path.isfile(pcfg["file"]) else None), ""
    hf_hub = pcfg.get("hf_hub", "")
    if hf_hub:
        try:
            import huggingface_hub
            from huggingface_hub import constants as hc
        except ImportError:
            hf_hub = ""
    if hf_hub:
        repo_id, filename = os.path.split(hf_hub)
        names = [filename] if filename else ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
        if filename.endswith((".bin", ".pth")):
            names.insert(0, filename[:-4] + ".safetensors")
        for name in names:
            found = huggingface_hub.try_to_load_from_cache(repo_id, name, cache_dir=cache_dir)
            if isinstance(found, str) and os.path.isfile(found):
                return found, hc.ENDPOINT
        return None, hc.ENDPOINT
    url = pcfg.get("url", "")
    if url:
        target = os.path.join(cache_dir or os.path.expanduser("~/.cache/clip"), os.path.basename(url))
        return (target if os.path.isfile(target) else None), url
    return None, ""


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
    kwargs = dict(force_quick_gelu=bool(pcfg.get("quick_gelu", False)), cache_dir=cache_dir)
    if local is not None:
        log.info("loading %s/%s from cache: %s", model_name, pretrained, local)
        model = open_clip.create_model(model_name, pretrained=local, **kwargs)
    else:
        if _hf_offline() or not remote or not _reachable(remote):
            raise CLIPLoadError(_offline_hint(model_name, pretrained))
        log.info("downloading pretrained CLIP %s/%s", model_name, pretrained)
        try:
            model = open_clip.create_model(model_name, pretrained=pretrained, **kwargs)
        except Exception as e:  # noqa: BLE001
            raise CLIPLoadError(f"{_offline_hint(model_name, pretrained)} (download failed: {e})") from e
    # the tag's own image normalisation (create_model only merges it when it downloads by tag)
    pp = dict(open_clip.model.get_model_preprocess_cfg(model))
    for key in ("mean", "std", "interpolation", "resize_mode"):
        if key in pcfg:
            pp[key] = pcfg[key]
    open_clip.model.set_model_preprocess_cfg(model, {**{"mean": OPENAI_MEAN, "std": OPENAI_STD}, **pp})
    return model, tokenizer_for(model, model_name), model_name
