"""Checkpoints: atomic writes, verified reads, one strict key comparer, and loading a stage model for inference.

Every file is read with ``torch.load(weights_only=True)``: Lightning's entries (loops, optimizer and scheduler
states, callback states) are tensors and plain containers, which the restricted unpickler accepts; ``pathlib`` paths
are allow-listed for one retry; nothing else is ever unpickled. Lightning's own resume (``trainer.fit(ckpt_path=)``)
reads through :class:`AtomicCheckpointIO`, which asks for ``weights_only=True`` too.

Stage-checkpoint format (``FORMAT = 2``)
----------------------------------------
A Lightning checkpoint written by a :class:`unclip_pl.lit.base.StageModule` holds, next to Lightning's own entries:

* ``state_dict``: the module's weights, ``model.*`` (trained) and ``ema.module.*`` (EMA copy); the frozen CLIP's
  ``clip.*`` weights are left out (it is rebuilt from its own config);
* ``cfg``: the resolved run config (plain dict);
* ``unclip_pl``: the entry this module reads (:func:`stage_entry`)::

    {"format": 2,                  # this layout's version; an unknown one is refused on load
     "stage": "prior" | "decoder" | "upsampler" | "clip",
     "cfg": dict,                  # the stage's config block (cfg[stage])
     "model": dict,                # the stage model's Hydra node: instantiate(model) builds it (random weights)
     "sample": dict,               # the stage's sample: settings ({} when it has none)
     "clip": dict | None}          # the run's clip block (loader + embed_dim, text_width, ...)

An exported weights file (:func:`export_weights`) is ``{"unclip_pl": <the same entry plus "weights": "ema" |
"model">, "state_dict": {name: tensor}}`` with the chosen model's weights under their plain names.

Version history: 1, implicit (files written before the entry existed, still read by :func:`_legacy_entry`):
Lightning checkpoints with only ``cfg`` (the stage found as the one of :data:`STAGES` set, its model at
``cfg[stage]["module"]["model"]``) and export files ``{"format": "unclip_pl.stage/1", "stage", "cfg" (stage
block), "clip", "which", "state_dict"}``. 2: the explicit ``unclip_pl`` entry above, in both kinds of file.
"""

from __future__ import annotations

import logging
import os
import pathlib
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO
from torch import nn

log = logging.getLogger(__name__)

FORMAT = 2
STAGES = ("prior", "decoder", "upsampler")
PREFIXES = {"ema": "ema.module.", "model": "model."}
LEGACY_EXPORT_FORMAT = "unclip_pl.stage/1"

#: Classes a checkpoint may legitimately hold besides tensors and plain containers (allow-listed on a retry).
_SAFE_EXTRA = [pathlib.PosixPath, pathlib.WindowsPath, pathlib.PurePosixPath, pathlib.PureWindowsPath]


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the file and what is wrong."""


# ----------------------------------------------------------------------------------------------------------- writing
class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose saves are atomic (temp file in the same folder, fsync, ``os.replace``) and whose
    loads use ``weights_only=True`` (Lightning passes None, leaving the choice to torch's default)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO does not take storage_options")
        if "://" in str(path):  # remote filesystems: Lightning's writer
            return super().save_checkpoint(checkpoint, path, storage_options)
        atomic_save(checkpoint, path)

    def load_checkpoint(self, path, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        kwargs = {} if map_location is None else {"map_location": map_location}
        return super().load_checkpoint(path, weights_only=True if weights_only is None else weights_only, **kwargs)


def atomic_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` to a temp file in the same folder, fsync, then ``os.replace``: never a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


# ----------------------------------------------------------------------------------------------------------- reading
def read_checkpoint(path: str | os.PathLike, map_location: Any = "cpu", mmap: bool = False) -> Any:
    """``torch.load(path, weights_only=True)`` (retried once allow-listing :data:`_SAFE_EXTRA`); every failure is a
    one-line :class:`CheckpointError` starting with ``"<path>: "``."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path}: a directory, not a checkpoint file")
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: empty file (0 bytes), not a complete checkpoint")
    try:
        try:
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
        except pickle.UnpicklingError as first:
            try:
                with torch.serialization.safe_globals(_SAFE_EXTRA):
                    return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
            except pickle.UnpicklingError:
                reason = _unpickler_reason(first)
            if "Unsupported global" in reason:
                raise CheckpointError(f"{path}: holds objects torch.load(weights_only=True) refuses (not loading "
                                      f"arbitrary pickles): {reason}") from None
            raise CheckpointError(f"{path}: not a PyTorch checkpoint file ({reason})") from None
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - truncated zip, another file format, ...: unusable either way
        if mmap and "mmap" in str(e):  # a legacy (non-zip) file cannot be memory-mapped
            return read_checkpoint(path, map_location)
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


def verify_checkpoint(path: str | os.PathLike, load: bool = True) -> dict[str, Any] | None:
    """Check that ``path`` is a complete Lightning checkpoint before ``fit``; return it (memory-mapped, on CPU) when
    ``load``. A folder (a sharded FSDP/DeepSpeed checkpoint, read by Lightning's strategy) returns None."""
    if Path(path).is_dir():
        return None
    try:
        ckpt = read_checkpoint(path, "cpu", mmap=True)
    except CheckpointError as e:
        raise CheckpointError(f"{e}. Delete it or pass another ckpt_path (an older step*.ckpt in the same "
                              f"folder).") from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise CheckpointError(f"{path}: not a Lightning checkpoint (no 'state_dict' entry)")
    return ckpt if load else None


def last_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """``<output_dir>/checkpoints/last.ckpt`` when it exists (the file preemption and ``save_last`` write)."""
    last = Path(output_dir) / "checkpoints" / "last.ckpt"
    return last if last.exists() else None


# ----------------------------------------------------------------------------------------------------------- keys
def normalise_key(key: str) -> str:
    """Drop ``torch.compile``'s ``_orig_mod.`` wrapper from a parameter name."""
    return key.replace("._orig_mod.", ".").replace("_orig_mod.", "")


def mismatch_message(model: nn.Module, state_dict: dict[str, Any], source: Any, what: str,
                     ignore: tuple[str, ...] = (), limit: int = 5) -> str | None:
    """The one wording for weights that do not fit a module, or None when they fit (names normalised, keys
    starting with ``ignore`` skipped). At most ``limit`` keys per kind, one line per kind::

        <source> does not fit <what> (trained with another config?):
          2 shape mismatch: net.w: model (48, 16), checkpoint (32, 16); ...
          1 missing from checkpoint: net.query
          1 unexpected in checkpoint: net.extra
    """
    want = {normalise_key(k): v for k, v in model.state_dict().items() if not k.startswith(ignore)}
    have = {normalise_key(k): v for k, v in state_dict.items() if not k.startswith(ignore)}
    kinds = {
        "shape mismatch": [f"{k}: model {tuple(want[k].shape)}, checkpoint {tuple(have[k].shape)}" for k in want
                           if k in have and tuple(getattr(have[k], "shape", ())) != tuple(want[k].shape)],
        "missing from checkpoint": sorted(set(want) - set(have)),
        "unexpected in checkpoint": sorted(set(have) - set(want)),
    }
    lines = [f"  {len(keys)} {label}: " + "; ".join(keys[:limit]) + (f" (+{len(keys) - limit} more)"
             if len(keys) > limit else "") for label, keys in kinds.items() if keys]
    if not lines:
        return None
    return f"{source} does not fit {what} (trained with another config?):\n" + "\n".join(lines)


def check_fits(module: nn.Module, ckpt: dict[str, Any], path: Any, what: str = "the model") -> None:
    """Raise :class:`CheckpointError` when ``ckpt["state_dict"]`` does not fit ``module`` (a whole StageModule: the
    frozen CLIP's ``clip.*`` weights, never checkpointed, are not compared)."""
    msg = mismatch_message(module, ckpt["state_dict"], path, what, ignore=("clip.",))
    if msg:
        raise CheckpointError(msg)


def load_strict(model: nn.Module, state_dict: dict[str, Any], source: Any, what: str,
                error: type[Exception] = CheckpointError) -> None:
    """``model.load_state_dict(state_dict)`` after :func:`mismatch_message` (``error`` raised with it)."""
    msg = mismatch_message(model, state_dict, source, what)
    if msg:
        raise error(msg)
    own = {normalise_key(k): k for k in model.state_dict()}
    model.load_state_dict({own[normalise_key(k)]: v for k, v in state_dict.items()}, strict=True)


# ----------------------------------------------------------------------------------------------------------- format
def _to_plain(cfg: Any) -> Any:
    from omegaconf import DictConfig, ListConfig, OmegaConf

    return OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, (DictConfig, ListConfig)) else cfg


def checkpoint_stage(cfg: dict[str, Any]) -> str:
    """The stage a run config trained: the one of :data:`STAGES` that is set."""
    chosen = [s for s in STAGES if cfg.get(s)]
    if len(chosen) != 1:
        if cfg.get("stage") == "clip":
            raise CheckpointError("this is a CLIP checkpoint: load it with unclip_pl.clip.load_clip (clip.loader)")
        raise CheckpointError(f"cannot tell the stage of this checkpoint: config sets {chosen or 'none'} of {STAGES}")
    return chosen[0]


def _entry(stage: str, block: dict[str, Any], clip: Any) -> dict[str, Any]:
    module = block.get("module") or {}
    model = module.get("model") if isinstance(module, dict) else None
    return {"format": FORMAT, "stage": stage, "cfg": block, "model": model, "sample": dict(block.get("sample") or {}),
            "clip": clip}


def stage_entry(run_config: Any) -> dict[str, Any] | None:
    """The ``unclip_pl`` entry (format :data:`FORMAT`) for a resolved run config; None when it names no stage."""
    cfg = _to_plain(run_config) or {}
    if cfg.get("stage") == "clip":
        return _entry("clip", dict(cfg.get("clip") or {}).get("train") or {}, cfg.get("clip"))
    try:
        stage = checkpoint_stage(cfg)
    except CheckpointError:
        return None
    return _entry(stage, cfg[stage], cfg.get("clip"))


def _legacy_entry(obj: dict[str, Any]) -> dict[str, Any]:
    """The entry of a file written before the format had one (version 1): an ``unclip_pl.stage/1`` export or a
    Lightning checkpoint with only the run config ``cfg``."""
    if obj.get("format") == LEGACY_EXPORT_FORMAT:
        block = _upgrade_v1_block(obj["stage"], obj["cfg"])
        return {**_entry(obj["stage"], block, obj.get("clip")), "weights": obj.get("which", "ema")}
    if not obj.get("cfg"):
        raise CheckpointError("the checkpoint has no 'cfg' entry (the resolved run config that unclip_pl.train "
                              "stores): cannot rebuild its model")
    cfg = _to_plain(obj["cfg"])
    stage = checkpoint_stage(cfg)
    return _entry(stage, _upgrade_v1_block(stage, cfg[stage]), cfg.get("clip"))


#: Sampler settings that version-1 model configs repeated from the stage's ``sample:`` block.
_V1_MODEL_SAMPLER_KEYS = ("sample_steps", "sampler", "guidance_scale", "eta")


def _upgrade_v1_block(stage: str, block: dict[str, Any]) -> dict[str, Any]:
    """A version-1 stage block in today's shape: the model config loses its copies of the sampler settings (the
    ``sample:`` block holds the same values), the decoder's ``sample:`` block gets the inversion settings that were
    then pipeline defaults (50 steps, eta 0.5), and ``text_encoder: own|clip`` is called ``text_source``."""
    block = dict(block)
    module = dict(block.get("module") or {})
    if isinstance(module.get("model"), dict):
        module["model"] = {k: v for k, v in module["model"].items() if k not in _V1_MODEL_SAMPLER_KEYS}
        block["module"] = module
    if stage == "decoder":
        block["sample"] = {"invert_steps": 50, "variation_eta": 0.5, **(block.get("sample") or {})}
        if isinstance(block.get("text_encoder"), str):
            block["text_source"] = block.pop("text_encoder")
    return block


def stage_weights(state_dict: dict[str, torch.Tensor], which: str = "ema") -> tuple[dict[str, torch.Tensor], str]:
    """One model's weights from a StageModule state dict, prefix stripped and names normalised.

    ``which="ema"`` falls back to ``"model"`` (with a warning) when the run had no EMA. Returns (weights, used)."""
    if which not in PREFIXES:
        raise ValueError(f"which must be 'ema' or 'model', got {which!r}")
    if which == "ema" and not any(k.startswith(PREFIXES["ema"]) for k in state_dict):
        log.warning("checkpoint has no EMA weights: loading the trained weights (model.*) instead")
        which = "model"
    prefix = PREFIXES[which]
    out = {normalise_key(k[len(prefix):]): v for k, v in state_dict.items() if k.startswith(prefix)}
    if not out:
        raise CheckpointError(f"no '{prefix}*' weights in the checkpoint (keys start with "
                              f"{sorted({k.split('.')[0] for k in state_dict})})")
    return out, which


def resolve_checkpoint(obj: Any, which: str = "ema", source: str = "?") -> tuple[dict[str, Any], dict, str]:
    """A loaded Lightning checkpoint or export file -> (entry, the chosen model's plain weights, which used)."""
    if not isinstance(obj, dict):
        raise CheckpointError(f"{source}: not a checkpoint dict ({type(obj).__name__})")
    if "model_cfg" in obj and "state_dict" in obj:  # unclip_pl.clip.export_clip
        raise CheckpointError(f"{source}: a CLIP weights file, not a prior/decoder/upsampler checkpoint (a CLIP is "
                              f"given as clip.loader.checkpoint)")
    if "state_dict" not in obj:
        raise CheckpointError(f"{source}: neither a Lightning checkpoint nor an exported stage file "
                              f"(keys: {sorted(obj)[:10]})")
    try:
        entry = obj.get("unclip_pl")
        if entry is None:
            entry = _legacy_entry(obj)
        elif not isinstance(entry, dict) or entry.get("format") != FORMAT:
            version = entry.get("format") if isinstance(entry, dict) else entry
            raise CheckpointError(f"stage-checkpoint format {version!r} is not one this unclip_pl reads (format "
                                  f"{FORMAT}, or files older than the format entry): update unclip_pl")
        if entry["stage"] == "clip":
            raise CheckpointError("this is a CLIP checkpoint: load it with unclip_pl.clip.load_clip (clip.loader)")
        if "weights" in entry:  # an export file: plain names
            weights, used = {normalise_key(k): v for k, v in obj["state_dict"].items()}, entry["weights"]
        else:
            weights, used = stage_weights(obj["state_dict"], which)
    except CheckpointError as e:
        raise CheckpointError(f"{source}: {e}") from None
    return entry, weights, used


# ----------------------------------------------------------------------------------------------------------- loading
@dataclass(frozen=True)
class LoadedStage:
    """A stage model rebuilt from a checkpoint (eval mode, gradients off) and what its file says about it.

    model: the ``unclip_pl.models`` object. stage: "prior" | "decoder" | "upsampler". cfg: the stage's config
    block (plain dict). sample: its ``sample:`` settings ({} when none). clip: the run's clip block, or None.
    path: the file it came from.
    """

    model: nn.Module
    stage: str
    cfg: dict[str, Any]
    sample: dict[str, Any]
    clip: dict[str, Any] | None
    path: str


def load_stage(path: str | os.PathLike, which: str = "ema", map_location: Any = "cpu",
               stage: str | None = None) -> LoadedStage:
    """Rebuild and load a stage model from a Lightning ``.ckpt`` or an :func:`export_weights` file.

    Args:
        path: checkpoint path. which: "ema" (default; falls back to "model" without EMA) or "model".
        stage: the stage the caller expects ("prior" | "decoder" | "upsampler"), or None for any. When given, a
            checkpoint of another stage is refused before its model is built, and every :class:`CheckpointError`
            names the stage: ``"decoder checkpoint /path/x.ckpt: file not found"``.
    """
    if stage is not None and stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
    from hydra.utils import instantiate

    try:
        entry, weights, _ = resolve_checkpoint(read_checkpoint(path, map_location), which, str(path))
        if stage is not None and entry["stage"] != stage:
            raise CheckpointError(f"{path}: this is a checkpoint of the {entry['stage']} stage, not of the {stage}")
        if not entry.get("model"):
            raise CheckpointError(f"{path}: the {entry['stage']} config has no module.model block")
        model = instantiate(entry["model"], _convert_="partial")
        load_strict(model, weights, path, f"the model its config builds ({type(model).__name__})")
    except CheckpointError as e:
        if stage is None:
            raise
        raise CheckpointError(f"{stage} checkpoint {e}") from None
    model.eval().requires_grad_(False)
    if isinstance(map_location, (str, torch.device)):
        model = model.to(map_location)
    return LoadedStage(model=model, stage=entry["stage"], cfg=entry["cfg"], sample=dict(entry["sample"] or {}),
                       clip=entry["clip"], path=str(path))


def export_weights(ckpt: str | os.PathLike, out: str | os.PathLike, which: str = "ema") -> Path:
    """Write the small inference file ``{"unclip_pl": entry + "weights", "state_dict"}`` for ``ckpt`` (a Lightning
    checkpoint or an older export), atomically. Returns ``out``."""
    entry, weights, used = resolve_checkpoint(read_checkpoint(ckpt), which, str(ckpt))
    payload = {"unclip_pl": {**entry, "format": FORMAT, "weights": used},
               "state_dict": {k: v.detach().cpu().contiguous() for k, v in weights.items()}}
    return atomic_save(payload, out)


# ----------------------------------------------------------------------------------------------------------- init_from
def init_weights(module: nn.Module, path: str | os.PathLike, stage: str, strict: bool = True,
                 which: str = "ema") -> dict[str, list[str]]:
    """Load model weights only (``init_from``) into ``module.model`` of a StageModule before a fit.

    ``path`` is a Lightning ``.ckpt`` of this project (its ``which`` weights: the EMA copy by default, else the
    trained ones), or a weights file in the :func:`export_weights` format (also what ``python -m unclip_pl.convert``
    writes). Nothing else is read: no optimiser, step, EMA state or data position. The EMA copy (when the module has
    one) restarts from the loaded weights with its update count at zero.

    Strict by default: a missing or unexpected key is a :class:`CheckpointError` listing them. With ``strict=False``
    they are logged (one line per kind) and the rest is loaded. A shape mismatch is always an error (one line,
    naming the keys). A checkpoint of another stage is refused. Returns ``{"missing": [...], "unexpected": [...]}``.
    """
    source = f"init_from={path}"
    try:
        entry, weights, _ = resolve_checkpoint(read_checkpoint(path), which, str(path))
    except CheckpointError as e:
        raise CheckpointError(f"init_from: {e}") from None
    if entry["stage"] != stage:
        raise CheckpointError(f"{source}: weights of the {entry['stage']} stage, but this run trains the {stage}")
    model = module.model
    want = {normalise_key(k): k for k in model.state_dict()}
    own = model.state_dict()
    shapes = [f"{k}: model {tuple(own[want[k]].shape)}, file {tuple(v.shape)}" for k, v in weights.items()
              if k in want and tuple(v.shape) != tuple(own[want[k]].shape)]
    if shapes:
        raise CheckpointError(f"{source}: {len(shapes)} shape mismatch(es) with this {stage} config: "
                              + "; ".join(shapes[:5]) + (f" (+{len(shapes) - 5} more)" if len(shapes) > 5 else ""))
    missing = sorted(set(want) - set(weights))
    unexpected = sorted(set(weights) - set(want))
    if strict and (missing or unexpected):
        parts = [f"{len(keys)} {label}: {', '.join(keys[:5])}" + (f" (+{len(keys) - 5} more)" if len(keys) > 5
                 else "") for label, keys in (("missing from the file", missing), ("unexpected", unexpected)) if keys]
        raise CheckpointError(f"{source}: the weights do not fit this {stage} config ({'; '.join(parts)}); pass "
                              f"init_strict=false to load the keys that match")
    if missing:
        log.warning("init_from: %d key(s) missing from %s, left as initialised: %s", len(missing), path,
                    ", ".join(missing))
    if unexpected:
        log.warning("init_from: %d unexpected key(s) in %s, ignored: %s", len(unexpected), path, ", ".join(unexpected))
    model.load_state_dict({want[k]: v for k, v in weights.items() if k in want}, strict=False)
    ema = getattr(module, "ema", None)
    if ema is not None:
        ema.restart_from(model)
    log.info("init_from: loaded %d tensors of the %s from %s (weights only: optimiser, step and EMA start afresh)",
             len(weights) - len(unexpected), stage, path)
    return {"missing": missing, "unexpected": unexpected}
