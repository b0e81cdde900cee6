"""The training entry: compose -> frozen CLIP -> data -> stage module -> ``Trainer.fit``.

``train.py`` at the repository root only calls :func:`run`. Everything a stage needs is built here from the
composed Hydra config with ``hydra.utils.instantiate``; the stage's maths lives in ``unclip_pl.models``.
"""

from __future__ import annotations

import inspect
import logging
import os
import time
import types
import typing
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from unclip_pl.utils.checkpoint import CheckpointError, check_fits, last_checkpoint, verify_checkpoint
from unclip_pl.utils.gitinfo import git_commit
from unclip_pl.utils.runid import persistent_run_id
from unclip_pl.utils.scaling import apply_lr_scaling

log = logging.getLogger(__name__)

#: Stages chosen by selecting their config group (`prior=diffusion`), in cascade order.
GROUP_STAGES = ("prior", "decoder", "upsampler")


class ConfigError(ValueError):
    """A configuration mistake, reported as one sentence instead of a traceback."""


# ---------------------------------------------------------------------------------------------------- selection
def selected_stage(cfg: DictConfig) -> str:
    """Return the one stage this run trains: ``clip``, ``prior``, ``decoder`` or ``upsampler``."""
    chosen = [name for name in GROUP_STAGES if cfg.get(name) is not None]
    if cfg.get("stage") is not None:
        if cfg.stage != "clip":
            raise ConfigError(f"stage={cfg.stage} is not a stage option: use stage=clip, or select prior=..., "
                              f"decoder=... or upsampler=... to train those.")
        chosen.insert(0, "clip")
    if not chosen:
        raise ConfigError("No stage selected: choose exactly one of stage=clip, prior=diffusion, decoder=base, "
                          "upsampler=emoji (or another option of those groups).")
    if len(chosen) > 1:
        raise ConfigError(f"Exactly one stage trains per run, but {len(chosen)} were selected "
                          f"({', '.join(chosen)}): train them one after another.")
    return chosen[0]


def stage_config(cfg: DictConfig, stage: str) -> DictConfig:
    """The stage's own block: ``cfg.clip.train`` for the CLIP, else ``cfg.<stage>``."""
    return cfg.clip.train if stage == "clip" else cfg[stage]


# ---------------------------------------------------------------------------------------------------- checking
def check_config(cfg: DictConfig) -> None:
    """Resolve every interpolation and find missing required values up front, naming the key."""
    missing = sorted(_missing_keys(cfg))
    if missing:
        raise ConfigError(f"Missing required config value(s): {', '.join(missing)} (set them on the command line, "
                          f"e.g. {missing[0]}=...).")
    try:
        OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or "?"
        raise ConfigError(f"Config key '{key}' could not be resolved: {_first_line(e)}") from None
    for path, node in _target_nodes(cfg):
        _check_types(node, path)


def _target_nodes(cfg: Any, prefix: str = ""):
    """Yield ``(dotted path, node)`` for every block with a ``_target_`` (Hydra's own config excluded)."""
    if isinstance(cfg, DictConfig):
        if "_target_" in cfg:
            yield prefix.rstrip("."), cfg
        for key in cfg.keys():
            if key == "hydra" and not prefix:
                continue
            node = cfg._get_node(key)
            if isinstance(node, DictConfig) or OmegaConf.is_list(node):
                yield from _target_nodes(node, f"{prefix}{key}.")
    elif OmegaConf.is_list(cfg):
        for i, node in enumerate(cfg):
            if isinstance(node, DictConfig) or OmegaConf.is_list(node):
                yield from _target_nodes(node, f"{prefix}{i}.")


def _missing_keys(cfg: Any, prefix: str = "") -> list[str]:
    out = []
    if isinstance(cfg, DictConfig):
        for key in cfg.keys():
            path = f"{prefix}{key}"
            if OmegaConf.is_missing(cfg, key):
                out.append(path)
            else:
                node = cfg._get_node(key)
                if isinstance(node, DictConfig) or OmegaConf.is_list(node):
                    out += _missing_keys(node, path + ".")
    elif OmegaConf.is_list(cfg):
        for i in range(len(cfg)):
            if OmegaConf.is_missing(cfg, i):
                out.append(f"{prefix}{i}")
    return out


def _first_line(e: BaseException) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def _check_types(node: DictConfig, what: str) -> None:
    """Check plain values against the target's annotations (int, float, bool, str, optional/unions of them), so
    ``data.batch_size=lots`` is reported by key instead of failing deep inside a DataLoader."""
    from hydra._internal.utils import _locate

    try:
        target = _locate(node._target_)
        hints: dict[str, Any] = {}
        # A class forwarding **kwargs to its bases: their __init__ annotations apply too (subclass wins).
        for fn in ([c.__init__ for c in reversed(target.__mro__)] if inspect.isclass(target) else [target]):
            hints.update(typing.get_type_hints(fn))
    except Exception:  # unresolvable annotations: nothing to check
        return
    for key, annotation in hints.items():
        if key not in node or OmegaConf.is_missing(node, key):
            continue
        # interpolations (e.g. ${oc.decode:${oc.env:SLURM_JOB_NUM_NODES,1}}) are checked by their resolved value
        value = node[key] if OmegaConf.is_interpolation(node, key) else node._get_node(key)._value()
        allowed = _plain_types(annotation)
        if allowed is None or value is None or isinstance(value, (DictConfig,)) or OmegaConf.is_list(node[key]):
            continue
        if isinstance(value, bool) and bool not in allowed:
            ok = False
        else:
            ok = isinstance(value, allowed) or (float in allowed and isinstance(value, int))
        if not ok:
            names = " or ".join(t.__name__ for t in allowed)
            raise ConfigError(f"{what}.{key} should be {names}, got {value!r}.")


def _plain_types(annotation: Any) -> tuple[type, ...] | None:
    """The plain types an annotation allows, or None when it allows anything else too."""
    plain = (int, float, bool, str, type(None))
    args = typing.get_args(annotation) if typing.get_origin(annotation) in (typing.Union, types.UnionType) else (
        annotation,)
    if all(a in plain for a in args):
        return tuple(a for a in args if a is not type(None))
    return None


def build(node: DictConfig, what: str, **kwargs: Any) -> Any:
    """``instantiate`` with a one-line error that names the config block and the target."""
    if isinstance(node, DictConfig) and "_target_" in node:
        _check_types(node, what)
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as e:
        cause = e.__cause__ or e
        raise ConfigError(f"Could not build {what} ({node.get('_target_', '?')}): {_first_line(cause)}") from e


def build_with_optional(node: DictConfig, what: str, **extra: Any) -> Any:
    """Instantiate ``node`` passing only the ``extra`` kwargs its target accepts (e.g. ``clip=``)."""
    from hydra._internal.utils import _locate

    target = _locate(node._target_)
    params = inspect.signature(target).parameters
    accepts_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
    kwargs = {k: v for k, v in extra.items() if accepts_any or k in params}
    return build(node, what, **kwargs)


# ---------------------------------------------------------------------------------------------------- CLIP
def stage_needs_clip(cfg: DictConfig, stage: str) -> bool:
    needs = set(stage_config(cfg, stage).get("needs", []))
    return stage != "clip" and bool(needs & {"tokens", "img_emb", "txt_emb"})


def load_frozen_clip(cfg: DictConfig, data_id: str | None = None):
    """Load the frozen CLIP from ``clip.loader``.

    With ``clip.autotrain`` the small CLIP is trained first (announced, in ``<run dir>/clip_autotrain``) when the
    cache file ``clip.loader.checkpoint`` is missing, or when it was trained on other data than ``data_id`` (e.g. an
    older emoji split that overlaps today's val split; the old file is kept beside it as ``*.stale-<time>.pt``).
    Only a complete autotrain fills the cache; a shorter one (``debug=fast``) serves this run alone, with a warning.
    """
    checkpoint = cfg.clip.loader.get("checkpoint")
    autotrain = bool(cfg.clip.get("autotrain", False))
    if checkpoint and autotrain and Path(checkpoint).exists():
        _set_aside_if_stale(Path(checkpoint), data_id)
    loader = cfg.clip.loader
    if checkpoint and not Path(checkpoint).exists():
        if not autotrain:
            raise ConfigError(f"CLIP checkpoint {checkpoint} does not exist: pass an existing file with "
                              "clip.loader.checkpoint=/path/to/weights, or train one with "
                              "`python train.py stage=clip clip.export_to=PATH`.")
        trained = autotrain_clip(cfg, Path(checkpoint))
        if trained != Path(checkpoint):
            loader = loader.copy()
            with open_dict(loader):
                loader.checkpoint = str(trained)
    expect = {k: cfg.clip[k] for k in ("embed_dim", "text_width", "context_length", "image_size") if k in cfg.clip}
    return build(loader, "clip.loader", **expect)


def _set_aside_if_stale(checkpoint: Path, data_id: str | None) -> None:
    """Rename a cached CLIP trained on other data (or with no record of its data) so that autotrain replaces it."""
    from unclip_pl.clip.small import read_training_record

    if data_id is None:
        return
    record = read_training_record(checkpoint)
    trained_on = (record or {}).get("data")
    if trained_on == data_id:
        return
    aside = checkpoint.with_name(f"{checkpoint.stem}.stale-{time.strftime('%Y%m%d-%H%M%S')}{checkpoint.suffix}")
    os.replace(checkpoint, aside)
    log.warning("The cached CLIP %s was trained on %s, but this run's data is %s: training it again (the old file "
                "is kept as %s). Set clip.autotrain=false to use it anyway.", checkpoint,
                trained_on or "data it does not record", data_id, aside)


def autotrain_clip(cfg: DictConfig, cache_path: Path) -> Path:
    """Train the small CLIP for its recommended run in ``<run dir>/clip_autotrain`` and copy it to ``cache_path``
    when the run is complete. Returns the file to load: the cache, or the run's own ``clip.pt`` for a short run."""
    from unclip_pl.clip.small import describe_training, read_training_record
    from unclip_pl.utils.checkpoint import atomic_save

    run_dir = Path(cfg.paths.output_dir) / "clip_autotrain"
    log.info("Step 1 of 2: no usable CLIP at %s, so training the small CLIP first (its recommended run, in %s); "
             "later runs reuse it. Step 2 of 2 is the stage itself.", cache_path, run_dir)
    clip_cfg = cfg.copy()
    with open_dict(clip_cfg):
        clip_cfg.stage = "clip"
        for name in GROUP_STAGES:
            clip_cfg[name] = None
        clip_cfg.ckpt_path = None
        # The CLIP's own run length, whatever length or time budget the user set for the stage that needs it.
        clip_cfg.trainer.max_epochs = None
        clip_cfg.trainer.max_steps = None
        clip_cfg.trainer.max_time = None
        clip_cfg.clip.export_to = None
        clip_cfg.paths.output_dir = str(run_dir)
    fit(clip_cfg)
    trained = run_dir / "clip.pt"
    record = read_training_record(trained)
    if record is None:
        raise RuntimeError(f"CLIP training finished but did not write {trained}.")
    if record.get("smoke_test"):
        log.warning("The CLIP autotrain was shorter than its recommended run (%s): this run uses %s, and the shared "
                    "cache %s stays empty.", describe_training(record), trained, cache_path)
        return trained
    atomic_save(torch.load(trained, map_location="cpu", weights_only=True), cache_path)
    log.info("Cached the trained CLIP at %s (%s).", cache_path, describe_training(record))
    return cache_path


# ---------------------------------------------------------------------------------------------------- trainer
def trainer_kwargs(cfg: DictConfig, stage: str) -> dict[str, Any]:
    """``cfg.trainer`` with nulls filled from the stage's recommended ``trainer:`` block, remaining nulls dropped."""
    kwargs = OmegaConf.to_container(cfg.trainer, resolve=True)
    for key, value in (stage_config(cfg, stage).get("trainer") or {}).items():
        if kwargs.get(key) is None:
            kwargs[key] = value
    return {k: v for k, v in kwargs.items() if v is not None}


def wandb_mode(requested: str) -> str:
    """``online`` needs an API key; without one fall back to ``offline`` with one message instead of failing."""
    if requested != "online":  # an explicit offline/disabled always wins
        return requested
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_MODE"):
        return os.environ.get("WANDB_MODE", requested)
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    if netrc.exists() and "api.wandb.ai" in netrc.read_text(errors="ignore"):
        return requested
    log.warning("wandb: no API key found (WANDB_API_KEY or `wandb login`): logging offline; "
                "sync later with `wandb sync`.")
    return "offline"


def build_loggers(cfg: DictConfig) -> list:
    loggers = []
    for key, node in (cfg.get("logger") or {}).items():
        if node is None:
            continue
        if node._target_.endswith("WandbLogger"):
            node = node.copy()
            with open_dict(node):
                node.mode = wandb_mode(node.get("mode", "online"))
                if node.get("id") is None and node.mode != "disabled":  # same wandb run after a restart
                    node.id = persistent_run_id(cfg.paths.output_dir)
        loggers.append(build(node, f"logger.{key}"))
    return loggers


def data_batch_size(cfg: DictConfig, stage: str) -> int | None:
    """Per-device batch: ``data.batch_size`` when set, else the stage's recommended ``batch_size`` (else the data
    module's default)."""
    return cfg.data.get("batch_size") or stage_config(cfg, stage).get("batch_size")


def build_trainer(cfg: DictConfig, stage: str) -> pl.Trainer:
    callbacks = [build(c, f"callbacks.{k}") for k, c in (cfg.get("callbacks") or {}).items() if c is not None]
    loggers = build_loggers(cfg)
    kwargs = trainer_kwargs(cfg, stage)
    target = kwargs.pop("_target_", "pytorch_lightning.Trainer")
    node = OmegaConf.create({"_target_": target, **kwargs})
    return build(node, "trainer", callbacks=callbacks, logger=loggers or False)


# ---------------------------------------------------------------------------------------------------- run
def fit(cfg: DictConfig) -> dict[str, float]:
    """Train the selected stage; return the final logged metrics."""
    stage = selected_stage(cfg)
    scfg = stage_config(cfg, stage)
    pl.seed_everything(cfg.seed, workers=True)
    Path(cfg.paths.output_dir).mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, Path(cfg.paths.output_dir) / "config_resolved.yaml", resolve=True)
    log.info("Training stage '%s'; run directory %s", stage, cfg.paths.output_dir)

    datamodule = build(cfg.data, "data", batch_size=data_batch_size(cfg, stage))
    clip = load_frozen_clip(cfg, getattr(datamodule, "data_id", None)) if stage_needs_clip(cfg, stage) else None
    datamodule.needs = tuple(scfg.needs)
    apply_lr_scaling(cfg, scfg, getattr(datamodule, "batch_size", None) or cfg.data.get("batch_size") or 1)
    if scfg.get("image_size"):
        datamodule.image_size = int(scfg.image_size)
    if clip is not None:
        datamodule.tokenizer = clip.loader_tokenizer  # trims caption padding in the workers (exact; no GPU sync)
        datamodule.clip = clip

    module = build_with_optional(scfg.module, f"{stage}.module", clip=clip)
    if clip is None and "tokens" in scfg.needs:  # the CLIP stage tokenises for the model it trains
        datamodule.tokenizer = module.loader_tokenizer
    transform = getattr(module, "loader_batch_transform", None)
    if transform is not None:  # work the module moves into the loader workers (e.g. the upsampler's BSR)
        datamodule.train_batch_transform = transform
    module.run_config = OmegaConf.to_container(cfg, resolve=True)
    if cfg.get("compile"):
        compile_networks(module.model)

    ckpt_path = resolve_ckpt_path(cfg)
    if ckpt_path is not None:
        check_checkpoint_fits(module, ckpt_path, f"{stage}.module")
    trainer = build_trainer(cfg, stage)
    _log_hyperparameters(trainer, cfg, stage)
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    finally:
        _finish_wandb(trainer)
    return {k: float(v) for k, v in trainer.callback_metrics.items() if torch.is_tensor(v) and v.numel() == 1}


def _finish_wandb(trainer: pl.Trainer) -> None:
    """Close this fit's wandb run: Lightning leaves it open, and the next fit in the same process (the stage after
    a CLIP autotrain, a test) would otherwise log into it."""
    for logger in trainer.loggers:
        run = getattr(logger, "_experiment", None)
        if type(logger).__name__ == "WandbLogger" and run is not None and hasattr(run, "finish"):
            run.finish()


def compile_networks(model: torch.nn.Module, **compile_kwargs: Any) -> list[str]:
    """``torch.compile`` the network(s) of a stage model in place (its ``loss``/``sample`` stay plain Python).

    Uses ``nn.Module.compile``, which compiles the module's forward without wrapping it, so parameter names and
    checkpoints stay the same with and without compilation (a run may resume with ``compile`` toggled).
    Returns the names of the compiled networks."""
    names = [n for n in ("net", "unet", "text_encoder") if isinstance(getattr(model, n, None), torch.nn.Module)]
    for name in names:
        getattr(model, name).compile(**compile_kwargs)
    return names


def resolve_ckpt_path(cfg: DictConfig) -> str | None:
    """The checkpoint to resume from: ``ckpt_path`` when set ("last": the run directory's last.ckpt if any), else
    with ``resume: auto`` the run directory's last.ckpt when it exists (restart after preemption). The file is
    opened and checked first, so a truncated or corrupt checkpoint fails here with its name."""
    ckpt = cfg.get("ckpt_path")
    if ckpt is None or ckpt == "last":
        if ckpt is None and cfg.get("resume", "never") != "auto":
            return None
        last = last_checkpoint(cfg.paths.output_dir)
        if last is None:
            return None
        log.info("Resuming from %s (resume=auto; pass resume=never or another run_name to start afresh).", last)
        ckpt = str(last)
    if not Path(ckpt).exists():
        raise ConfigError(f"ckpt_path={ckpt} does not exist.")
    try:
        verify_checkpoint(ckpt, load=False)
    except CheckpointError as e:
        raise ConfigError(str(e)) from None
    return str(ckpt)


def check_checkpoint_fits(module: torch.nn.Module, ckpt_path: str, what: str) -> None:
    """Compare the checkpoint's weights with the freshly built module; list mismatched keys in a ConfigError."""
    try:
        ckpt = verify_checkpoint(ckpt_path)
        if ckpt is not None:
            check_fits(module, ckpt, ckpt_path, what)
    except CheckpointError as e:
        raise ConfigError(str(e)) from None


def _log_hyperparameters(trainer: pl.Trainer, cfg: DictConfig, stage: str) -> None:
    params = OmegaConf.to_container(cfg, resolve=True)
    params["stage_trained"] = stage
    params["git_commit"] = git_commit()
    for logger in trainer.loggers:
        logger.log_hyperparams(params)


def run(cfg: DictConfig) -> dict[str, float]:
    """Check the config, then fit. Configuration mistakes surface as :class:`ConfigError`."""
    check_config(cfg)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return fit(cfg)
