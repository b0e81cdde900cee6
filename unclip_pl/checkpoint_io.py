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

from unclip_pl.utils.checkpoint import CheckpointError, atomic_save

log = logging.getLogger(__name__)

EXPORT_FORMAT = "unclip_pl.stage/1"
STAGES = ("prior", "decoder", "upsampler")
PREFIXES = {"ema": "ema.module.", "model": "model."}

#: Classes a checkpoint may legitimately contain besides tensors and plain containers (allow-listed on demand).
_SAFE_EXTRA = [pathlib.PosixPath, pathlib.WindowsPath, pathlib.PurePosixPath, pathlib.PureWindowsPath]

# Errors: ``CheckpointError`` (the one of ``unclip_pl.utils.checkpoint``, importable from here too): a checkpoint that
# cannot be read, is of another stage, or does not fit the model its config builds (the keys listed).


# ----------------------------------------------------------------------------------------------------------- reading
def read_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> dict[str, Any]:
    """``torch.load(path, weights_only=True)``, allow-listing only :data:`_SAFE_EXTRA` if the first try needs it."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path}: a directory, not a checkpoint file")
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: empty file (0 bytes), not a complete checkpoint")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as first:
        try:
            with torch.serialization.safe_globals(_SAFE_EXTRA):
                return torch.load(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError:
            reason = _unpickler_reason(first)
            if "Unsupported global" in reason:
                raise CheckpointError(f"{path}: holds objects torch.load(weights_only=True) refuses (not loading "
                                      f"arbitrary pickles): {reason}") from None
            raise CheckpointError(f"{path}: not a PyTorch checkpoint file ({reason})") from None
    except Exception as e:  # noqa: BLE001 - truncated zip, another file format, ...: unusable either way
        raise CheckpointError(f"{path}: not a PyTorch checkpoint file, or a truncated or corrupt one "
                              f"({type(e).__name__}: {_first_line(e)})") from None


def _first_line(e: BaseException, limit: int = 160) -> str:
    lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
    return lines[0][:limit] if lines else type(e).__name__


def _unpickler_reason(e: BaseException) -> str:
    """The one useful line of torch's page-long weights-only error (what the unpickler met), else its first line."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    for i, line in enumerate(lines):
        if "WeightsUnpickler error:" in line:
            rest = line.split("WeightsUnpickler error:", 1)[1].strip() or (lines[i + 1] if i + 1 < len(lines) else "")
            return rest.split(" was not an allowed global")[0][:160]
    return _first_line(e)


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
    if "model_cfg" in obj and "state_dict" in obj:  # unclip_pl.clip.export_clip
        raise CheckpointError(f"{source}: a CLIP weights file, not a prior/decoder/upsampler checkpoint (a CLIP is "
                              f"given as clip.loader.checkpoint)")
    if "state_dict" not in obj:
        raise CheckpointError(f"{source}: neither a Lightning checkpoint nor an {EXPORT_FORMAT} export file "
                              f"(keys: {sorted(obj)[:10]})")
    cfg = obj.get("cfg")
    if not cfg:
        raise CheckpointError(f"{source}: the checkpoint has no 'cfg' entry (the resolved run config that "
                              f"unclip_pl.train stores): cannot rebuild its model")
    cfg = _to_plain(cfg)
    try:
        stage = checkpoint_stage(cfg)
        weights, used = stage_weights(obj["state_dict"], which)
    except CheckpointError as e:
        raise CheckpointError(f"{source}: {e}") from None
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
        lines = [f"{source}: does not fit the model its config builds ({type(model).__name__}):"]
        for name, want, got in mismatched:
            lines.append(f"  shape mismatch {name}: model expects {want}, checkpoint has {got}")
        lines += [f"  missing from checkpoint: {k}" for k in missing]
        lines += [f"  unexpected in checkpoint: {k}" for k in unexpected]
        raise CheckpointError("\n".join(lines))
    model.load_state_dict(state_dict, strict=True)


def load_stage(path: str | os.PathLike, which: str = "ema", map_location: Any = "cpu",
               stage: str | None = None) -> nn.Module:
    """Rebuild and load a stage model from a Lightning ``.ckpt`` or an :func:`export_weights` file.

    Args:
        path: checkpoint path. which: "ema" (default; falls back to "model" without EMA) or "model".
        stage: the stage the caller expects ("prior" | "decoder" | "upsampler"), or None for any. When given, a
            checkpoint of another stage is refused before its model is built, and every :class:`CheckpointError`
            names the stage: ``"decoder checkpoint /path/x.ckpt: file not found"``.
    Returns:
        the ``unclip_pl.models`` object in eval mode with gradients off. Attributes set on it: ``stage_name``,
        ``stage_cfg`` (the stage's config block), ``clip_cfg`` (the run's clip block, or None), ``source_path``.
    """
    if stage is not None and stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
    try:
        info = resolve_checkpoint(read_checkpoint(path, map_location), which, str(path))
        if stage is not None and info["stage"] != stage:
            raise CheckpointError(f"{path}: this is a checkpoint of the {info['stage']} stage, not of the {stage}")
        model = build_stage_model(info["cfg"])
        load_weights_strict(model, info["state_dict"], str(path))
    except CheckpointError as e:
        if stage is None:
            raise
        raise CheckpointError(f"{stage} checkpoint {e}") from None
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
