"""Load a stage model (``unclip_pl.models.*``) from a Lightning checkpoint or an exported weights file.

Lightning checkpoints written by ``unclip_pl.train`` hold the resolved run config as a plain dict under
``checkpoint["cfg"]`` and the weights under ``checkpoint["state_dict"]`` with the StageModule's prefixes
(``model.`` for the trained weights, ``ema.module.`` for the EMA copy; the frozen CLIP's weights are stripped).
The stage is the one config group set in that config (``prior`` / ``decoder`` / ``upsampler``); its model is rebuilt
with ``hydra.utils.instantiate(cfg[stage]["module"]["model"])`` and the weights are loaded strictly.

Everything is read with ``torch.load(weights_only=True)``: Lightning's extra entries (loops, optimizer and scheduler
states, callback states) are tensors and plain containers, which the restricted unpickler accepts. If a checkpoint
holds one of a few known harmless classes (``pathlib`` paths), they are allow-listed for that one load with
``torch.serialization.safe_globals``; nothing else is ever unpickled.

Exported weights file (:func:`export_weights`), a plain dict::

    {"format": "unclip_pl.stage/1", "stage": "decoder", "cfg": <cfg[stage] block>, "clip": <cfg["clip"] block>,
     "which": "ema", "state_dict": {name: tensor}}
"""

from __future__ import annotations

import logging
import os
import pathlib
import pickle
from pathlib import Path
from typing import Any

import torch
from torch import nn

from unclip_pl.utils.checkpoint import atomic_save

log = logging.getLogger(__name__)

EXPORT_FORMAT = "unclip_pl.stage/1"
STAGES = ("prior", "decoder", "upsampler")
PREFIXES = {"ema": "ema.module.", "model": "model."}

#: Classes a checkpoint may legitimately contain besides tensors and plain containers (allow-listed on demand).
_SAFE_EXTRA = [pathlib.PosixPath, pathlib.WindowsPath, pathlib.PurePosixPath, pathlib.PureWindowsPath]


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read or does not fit the model its config builds (message lists the keys)."""


# ----------------------------------------------------------------------------------------------------------- reading
def read_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> dict[str, Any]:
    """``torch.load(path, weights_only=True)``, allow-listing only :data:`_SAFE_EXTRA` if the first try needs it."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as first:
        try:
            with torch.serialization.safe_globals(_SAFE_EXTRA):
                return torch.load(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError:
            raise CheckpointError(
                f"{path} holds objects torch.load(weights_only=True) refuses (not loading arbitrary pickles): "
                f"{str(first).strip().splitlines()[0]}") from first


def checkpoint_stage(cfg: dict[str, Any]) -> str:
    """The stage a run config trained: the one of prior/decoder/upsampler that is set."""
    chosen = [s for s in STAGES if cfg.get(s)]
    if len(chosen) != 1:
        if cfg.get("stage") == "clip":
            raise CheckpointError("this is a CLIP checkpoint: load it with unclip_pl.clip.load_clip (clip.loader)")
        raise CheckpointError(f"cannot tell the stage of this checkpoint: config sets {chosen or 'none'} of {STAGES}")
    return chosen[0]


def stage_weights(state_dict: dict[str, torch.Tensor], which: str = "ema") -> tuple[dict[str, torch.Tensor], str]:
    """Select one model's weights from a StageModule state dict and strip the prefix.

    ``which="ema"`` falls back to ``"model"`` (with a warning) when the run had no EMA. ``torch.compile`` wrappers
    (``_orig_mod.``) are stripped too. Returns (weights, which actually used).
    """
    if which not in PREFIXES:
        raise ValueError(f"which must be 'ema' or 'model', got {which!r}")
    prefix = PREFIXES[which]
    if which == "ema" and not any(k.startswith(prefix) for k in state_dict):
        log.warning("checkpoint has no EMA weights: loading the trained weights (model.*) instead")
        which, prefix = "model", PREFIXES["model"]
    out = {k[len(prefix):].replace("_orig_mod.", ""): v for k, v in state_dict.items() if k.startswith(prefix)}
    if not out:
        raise CheckpointError(f"no '{prefix}*' weights in the checkpoint (keys start with "
                              f"{sorted({k.split('.')[0] for k in state_dict})})")
    return out, which


def _to_plain(cfg: Any) -> dict[str, Any]:
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(cfg, DictConfig):
            return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
    except ImportError:  # pragma: no cover
        pass
    return cfg


def resolve_checkpoint(obj: dict[str, Any], which: str = "ema", source: str = "?") -> dict[str, Any]:
    """Normalise a loaded Lightning checkpoint or export file to
    ``{"stage", "cfg" (stage block), "clip" (clip block or None), "state_dict", "which", "run_cfg"}``."""
    if not isinstance(obj, dict):
        raise CheckpointError(f"{source}: not a checkpoint dict ({type(obj).__name__})")
    if obj.get("format") == EXPORT_FORMAT:
        return {"stage": obj["stage"], "cfg": obj["cfg"], "clip": obj.get("clip"), "state_dict": obj["state_dict"],
                "which": obj.get("which", "ema"), "run_cfg": None}
    if "state_dict" not in obj:
        raise CheckpointError(f"{source}: neither a Lightning checkpoint nor an {EXPORT_FORMAT} export file "
                              f"(keys: {sorted(obj)[:10]})")
    cfg = obj.get("cfg")
    if not cfg:
        raise CheckpointError(f"{source}: the checkpoint has no 'cfg' entry (the resolved run config that "
                              f"unclip_pl.train stores): cannot rebuild its model")
    cfg = _to_plain(cfg)
    stage = checkpoint_stage(cfg)
    weights, used = stage_weights(obj["state_dict"], which)
    return {"stage": stage, "cfg": cfg[stage], "clip": cfg.get("clip"), "state_dict": weights, "which": used,
            "run_cfg": cfg}


# ----------------------------------------------------------------------------------------------------------- building
def build_stage_model(stage_cfg: dict[str, Any]) -> nn.Module:
    """Instantiate ``stage_cfg["module"]["model"]`` (the models/* object) with random weights."""
    from hydra.utils import instantiate

    try:
        node = stage_cfg["module"]["model"]
    except (KeyError, TypeError):
        raise CheckpointError("stage config has no module.model block") from None
    return instantiate(node, _convert_="partial")


def load_weights_strict(model: nn.Module, state_dict: dict[str, torch.Tensor], source: str = "?") -> None:
    """``model.load_state_dict(state_dict)`` that fails listing every mismatched shape and missing/unexpected key."""
    own = model.state_dict()
    mismatched = [(k, tuple(own[k].shape), tuple(v.shape)) for k, v in state_dict.items()
                  if k in own and tuple(own[k].shape) != tuple(v.shape)]
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    if mismatched or missing or unexpected:
        lines = [f"checkpoint {source} does not fit the model its config builds ({type(model).__name__}):"]
        for name, want, got in mismatched:
            lines.append(f"  shape mismatch {name}: model expects {want}, checkpoint has {got}")
        lines += [f"  missing from checkpoint: {k}" for k in missing]
        lines += [f"  unexpected in checkpoint: {k}" for k in unexpected]
        raise CheckpointError("\n".join(lines))
    model.load_state_dict(state_dict, strict=True)


def load_stage(path: str | os.PathLike, which: str = "ema", map_location: Any = "cpu") -> nn.Module:
    """Rebuild and load a stage model from a Lightning ``.ckpt`` or an :func:`export_weights` file.

    Args:
        path: checkpoint path. which: "ema" (default; falls back to "model" without EMA) or "model".
    Returns:
        the ``unclip_pl.models`` object in eval mode with gradients off. Attributes set on it: ``stage_name``,
        ``stage_cfg`` (the stage's config block), ``clip_cfg`` (the run's clip block, or None), ``source_path``.
    """
    info = resolve_checkpoint(read_checkpoint(path, map_location), which, str(path))
    model = build_stage_model(info["cfg"])
    load_weights_strict(model, info["state_dict"], str(path))
    model.eval().requires_grad_(False)
    model.stage_name = info["stage"]
    model.stage_cfg = info["cfg"]
    model.clip_cfg = info["clip"]
    model.source_path = str(path)
    return model.to(map_location) if isinstance(map_location, (str, torch.device)) else model


def export_weights(ckpt: str | os.PathLike, out: str | os.PathLike, which: str = "ema") -> Path:
    """Write the small inference file ``{"format", "stage", "cfg", "clip", "which", "state_dict"}`` for ``ckpt``
    (a Lightning checkpoint). Written atomically. Returns ``out``."""
    info = resolve_checkpoint(read_checkpoint(ckpt), which, str(ckpt))
    payload = {"format": EXPORT_FORMAT, "stage": info["stage"], "cfg": info["cfg"], "clip": info["clip"],
               "which": info["which"],
               "state_dict": {k: v.detach().cpu().contiguous() for k, v in info["state_dict"].items()}}
    return atomic_save(payload, out)
