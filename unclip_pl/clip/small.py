"""Small open_clip architectures trained here (contrastively, on the built-in data) and their export format.

``unclip-tiny``: 64px ViT (width 128, 4 layers, patch 8, 4 heads) + text transformer (width 128, 4 layers, 4 heads),
embedding 128, context 77 -- about 8M parameters, most of them in the 49,408-token embedding table.

The configs are plain open_clip model configs (``embed_dim`` / ``vision_cfg`` / ``text_cfg``), registered with
open_clip (so ``open_clip.create_model("unclip-tiny")`` and ``open_clip.get_tokenizer("unclip-tiny")`` work) and
buildable directly with :func:`build_small_clip`.

Export file (``torch.save`` of a plain dict, loadable with ``weights_only=True``)::

    {"format": "unclip_pl.clip/1", "model_name": str, "model_cfg": dict, "preprocess_cfg": dict,
     "state_dict": {name: tensor}, "training": dict (optional, see below)}

``training`` records how the CLIP was trained (written by ``python train.py stage=clip``)::

    {"steps": int, "epochs": int (completed), "recommended_epochs": int | None, "smoke_test": bool,
     "val": {"i2t_top1": float, "i2t_top5": float, "t2i_top1": float, "t2i_top5": float, ...},
     "data": str (the training data's id, e.g. "emoji/format2/val0.07/limitNone"), "seed": int | None}

``smoke_test`` is true when the run stopped before its recommended epochs (``trainer.max_steps=5``, ``debug=fast``,
a ``max_time`` cut): such a CLIP is never put in the shared cache by autotraining, and loading it warns.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import open_clip
from torch import nn

from unclip_pl.checkpoint import atomic_save

EXPORT_FORMAT = "unclip_pl.clip/1"

# Images reach the small CLIP in [-1, 1]; mean = std = 0.5 makes the [0, 1] -> normalised step an exact inverse.
SMALL_PREPROCESS = {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5), "interpolation": "bicubic"}

SMALL_CLIP_CONFIGS: dict[str, dict[str, Any]] = {
    "unclip-tiny": {
        "embed_dim": 128,
        "vision_cfg": {"image_size": 64, "layers": 4, "width": 128, "head_width": 32, "patch_size": 8},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 128, "heads": 4, "layers": 4},
    },
}
DEFAULT_SMALL = "unclip-tiny"

_registered: set[str] = set()


def register_small_clips() -> None:
    """Register :data:`SMALL_CLIP_CONFIGS` with open_clip's model-config registry (idempotent).

    open_clip only reads configs from JSON files, so each config is written once to a per-user temp folder whose name
    includes a hash of the config (so an edited config never collides with a stale file).
    """
    for name, cfg in SMALL_CLIP_CONFIGS.items():
        if name in _registered and name in open_clip.list_models():
            continue
        text = json.dumps(cfg, sort_keys=True, indent=1)
        folder = Path(tempfile.gettempdir()) / f"unclip_pl_open_clip_{hashlib.sha1(text.encode()).hexdigest()[:10]}"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{name}.json"
        if not path.exists():
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            tmp.write_text(text)
            os.replace(tmp, path)
        open_clip.add_model_config(path)
        _registered.add(name)


def small_clip_config(name: str = DEFAULT_SMALL, **overrides: Any) -> dict[str, Any]:
    """A deep copy of a registered small config with ``overrides`` merged in (``vision_cfg``/``text_cfg`` merged
    key by key, everything else replaced)."""
    if name not in SMALL_CLIP_CONFIGS:
        raise KeyError(f"unknown small CLIP {name!r}; choose one of {sorted(SMALL_CLIP_CONFIGS)}")
    cfg = copy.deepcopy(SMALL_CLIP_CONFIGS[name])
    for key, value in _plain(overrides).items():
        if value is None:
            continue
        if key in ("vision_cfg", "text_cfg") and isinstance(value, dict):
            cfg[key].update(value)
        else:
            cfg[key] = value
    return cfg


def build_small_clip(name: str = DEFAULT_SMALL, **cfg: Any) -> open_clip.CLIP:
    """Randomly initialised open_clip ``CLIP`` from the small config ``name`` with ``cfg`` overrides.

    Example: ``build_small_clip(embed_dim=32, vision_cfg={"width": 32, "layers": 1})``.
    The model's preprocess config is set to mean = std = 0.5 (see :data:`SMALL_PREPROCESS`).
    """
    register_small_clips()
    model_cfg = small_clip_config(name, **cfg)
    return build_from_config(model_cfg)


def build_from_config(model_cfg: dict[str, Any], preprocess_cfg: dict[str, Any] | None = None) -> open_clip.CLIP:
    """open_clip ``CLIP`` (random init) from a plain model config dict; attaches ``preprocess_cfg``."""
    model_cfg = _plain(model_cfg)
    model_cfg.pop("custom_text", None)
    model = open_clip.CLIP(**model_cfg)
    size = model.visual.image_size
    pp = dict(SMALL_PREPROCESS if preprocess_cfg is None else preprocess_cfg)
    pp.setdefault("size", size)
    open_clip.model.set_model_preprocess_cfg(model, pp)
    return model


def export_clip(model: nn.Module, model_name: str, model_cfg: dict[str, Any], path: str | os.PathLike,
                preprocess_cfg: dict[str, Any] | None = None, training: dict[str, Any] | None = None) -> Path:
    """Write ``model``'s weights + config (+ the ``training`` record) to ``path`` atomically (temp file in the same
    folder + ``os.replace``).

    The file loads back with ``unclip_pl.clip.frozen.load_clip(model_name, checkpoint=path)``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if preprocess_cfg is None:
        preprocess_cfg = dict(open_clip.model.get_model_preprocess_cfg(model)) or dict(SMALL_PREPROCESS)
    preprocess_cfg = {k: (list(v) if isinstance(v, tuple) else v) for k, v in _plain(preprocess_cfg).items()}
    payload = {
        "format": EXPORT_FORMAT,
        "model_name": str(model_name),
        "model_cfg": _plain(model_cfg),
        "preprocess_cfg": preprocess_cfg,
        "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
    }
    if training is not None:
        payload["training"] = _plain(training)
    return atomic_save(payload, path)


def read_export_header(path: str | os.PathLike) -> dict[str, Any] | None:
    """``format``, ``model_name`` and ``training`` of an exported CLIP file, read through a memory map (the weights
    are not loaded); None when the file cannot be read or is not an export."""
    import torch

    try:
        obj = torch.load(Path(path), map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 -- unreadable files are reported by load_clip, not here
        return None
    if not (isinstance(obj, dict) and obj.get("format") == EXPORT_FORMAT and obj.get("model_name")):
        return None
    training = obj.get("training")
    return {"format": obj["format"], "model_name": str(obj["model_name"]),
            "training": dict(training) if isinstance(training, dict) else None}


def read_training_record(path: str | os.PathLike) -> dict[str, Any] | None:
    """The ``training`` record of an exported CLIP file (None when the file has none or is not an export)."""
    header = read_export_header(path)
    return header["training"] if header else None


def describe_training(record: dict[str, Any] | None) -> str:
    """One line: ``trained 450 steps, 15 of 15 recommended epochs on emoji/...; val i2t top-1 0.55, top-5 0.75``."""
    if not record:
        return "no training record (trained elsewhere or by an older version)"
    rec = record.get("recommended_epochs")
    epochs = f"{record.get('epochs')} of {rec} recommended epochs" if rec else f"{record.get('epochs')} epochs"
    val = record.get("val") or {}
    figures = ", ".join(f"{k.replace('_top', ' top-')} {v:.3f}" for k, v in val.items() if k.endswith(("1", "5")))
    line = f"trained {record.get('steps')} steps, {epochs} on {record.get('data') or 'unknown data'}"
    line += f"; val {figures}" if figures else "; no val metrics"
    return line + (" [SMOKE TEST: shorter than its recommended run]" if record.get("smoke_test") else "")


register_small_clips()  # so open_clip.create_model / get_tokenizer know the names as soon as this is imported


def _plain(obj: Any) -> Any:
    """Convert OmegaConf containers / tuples to plain python (dict, list, scalars) so torch.load(weights_only) and
    json accept them."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(obj, (DictConfig, ListConfig)):
            return OmegaConf.to_container(obj, resolve=True)
    except ImportError:  # pragma: no cover
        pass
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj
