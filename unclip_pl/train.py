"""The training entry, in the shape of lightning-hydra-template's ``src/train.py``: instantiate, then fit.

``python train.py`` calls :func:`run`, which takes the composed Hydra config through two announced steps:

1. **The CLIP** (only when the stage needs the frozen CLIP and ``clip.autotrain`` has none to load): the small CLIP
   is trained by its own :func:`fit`, in its own run directory ``<run dir>/clip_autotrain``, and a complete run
   fills the cache file ``clip.loader.checkpoint``.
2. **The stage** (:func:`fit`): the frozen CLIP, the stage's LightningModule and the data module are instantiated
   with everything they depend on as constructor arguments (nothing is set on them afterwards), then
   ``Trainer.fit``. The config saved in the run directory and in every checkpoint is the one that ran (after
   ``lr_scaling`` and with the CLIP file actually loaded).
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from unclip_pl.checkpoint import (
    STAGES,
    CheckpointError,
    check_fits,
    init_weights,
    last_checkpoint,
    verify_checkpoint,
)
from unclip_pl.data.datamodule import DEFAULT_BATCH_SIZE
from unclip_pl.data.decode import MissingKeyError
from unclip_pl.data.embedding_folder import EmbeddingFolderError
from unclip_pl.data.stats import BadDataError
from unclip_pl.data.tar_reader import ShardError
from unclip_pl.utils.config import ConfigError, build, build_accepting, check_config
from unclip_pl.utils.gitinfo import git_commit
from unclip_pl.utils.runid import persistent_run_id
from unclip_pl.utils.scaling import apply_lr_scaling

__all__ = ["DATA_ERRORS", "ConfigError", "check_config", "data_error_line", "fit", "run", "selected_stage"]

log = logging.getLogger(__name__)

#: Errors of bad training data (unreadable shards, missing members, too many bad samples, a broken embedding
#: folder): ``train.py`` prints them as one ``Data error:`` line and exits with status 2.
DATA_ERRORS = (ShardError, MissingKeyError, BadDataError, EmbeddingFolderError)


def data_error_line(e: BaseException) -> str:
    """The message of a data error as one line, also when a DataLoader worker raised it: PyTorch re-raises it in the
    main process as the same type with "Caught X in DataLoader worker process N. Original Traceback ..." around the
    original message, which is the traceback's last line (``module.Class: message``)."""
    text = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
    if "Original Traceback" in text:
        last = [line for line in text.strip().splitlines() if line.strip()][-1]
        text = last.split(": ", 1)[1] if f"{type(e).__name__}: " in last else last
    return " ".join(text.split())


# ---------------------------------------------------------------------------------------------------- selection
def selected_stage(cfg: DictConfig) -> str:
    """Return the one stage this run trains: ``clip``, ``prior``, ``decoder`` or ``upsampler``."""
    chosen = [name for name in STAGES if cfg.get(name) is not None]
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


def stage_needs_clip(cfg: DictConfig, stage: str) -> bool:
    needs = set(stage_config(cfg, stage).get("needs", []))
    return stage != "clip" and bool(needs & {"tokens", "img_emb", "txt_emb"})


# ---------------------------------------------------------------------------------------------------- step 1: CLIP
def clip_to_train(cfg: DictConfig, stage: str) -> bool:
    """Whether step 1 runs: the stage needs the frozen CLIP, ``clip.autotrain`` is on, and the cache file
    ``clip.loader.checkpoint`` is missing or stale (:func:`clip_is_stale`: trained on an older emoji split that
    overlaps today's val split; that file is kept beside it as ``*.stale-<time>.pt``)."""
    checkpoint = cfg.clip.loader.get("checkpoint")
    if not (stage_needs_clip(cfg, stage) and cfg.clip.get("autotrain", False) and checkpoint):
        return False
    if Path(checkpoint).exists():
        # A data module is cheap to construct (it reads nothing before setup) and knows the id of its data.
        _set_aside_if_stale(Path(checkpoint), build_accepting(cfg.data, "data").data_id)
    return not Path(checkpoint).exists()


def clip_is_stale(trained_on: str | None, data_id: str) -> bool:
    """Whether a cached CLIP trained on ``trained_on`` (its record's data id) must be trained again for a run on
    ``data_id``: when it was trained on another version of the built-in emoji data (an older split overlaps
    today's val split), or records no data at all while this run uses that data. A CLIP trained on other data is
    used as it is: the user's shards may have been embedded with it."""
    if not data_id.startswith("emoji/") or trained_on == data_id:
        return False
    return trained_on is None or trained_on.startswith("emoji/")


def _set_aside_if_stale(checkpoint: Path, data_id: str) -> None:
    """Rename a stale cached CLIP (:func:`clip_is_stale`) so that step 1 replaces it."""
    from unclip_pl.clip.small import read_training_record

    trained_on = (read_training_record(checkpoint) or {}).get("data")
    if not clip_is_stale(trained_on, data_id):
        if trained_on != data_id:
            log.info("The cached CLIP %s was trained on %s; this run's data is %s: using it as it is.", checkpoint,
                     trained_on or "data it does not record", data_id)
        return
    aside = checkpoint.with_name(f"{checkpoint.stem}.stale-{time.strftime('%Y%m%d-%H%M%S')}{checkpoint.suffix}")
    os.replace(checkpoint, aside)
    log.warning("The cached CLIP %s was trained on %s, but this run's data is %s: training it again (the old file "
                "is kept as %s). Set clip.autotrain=false to use it anyway.", checkpoint,
                trained_on or "data it does not record", data_id, aside)


def clip_run_config(cfg: DictConfig) -> DictConfig:
    """The config of step 1: ``stage=clip`` for the CLIP's own recommended run (whatever length or time budget the
    user set for the stage that needs it), in ``<run dir>/clip_autotrain``."""
    clip_cfg = cfg.copy()
    with open_dict(clip_cfg):
        clip_cfg.stage = "clip"
        for name in STAGES:
            clip_cfg[name] = None
        clip_cfg.ckpt_path = None
        clip_cfg.trainer.max_epochs = clip_cfg.trainer.max_steps = clip_cfg.trainer.max_time = None
        clip_cfg.clip.export_to = None
        clip_cfg.paths.output_dir = str(Path(cfg.paths.output_dir) / "clip_autotrain")
    return clip_cfg


def train_clip(cfg: DictConfig) -> Path:
    """Step 1: train the small CLIP (:func:`clip_run_config`) and copy it to the cache when the run is complete.
    Returns the file the stage loads: the cache, or the run's own ``clip.pt`` after a shorter run (``debug=fast``),
    which serves this run alone and leaves the cache empty."""
    from unclip_pl.checkpoint import atomic_save
    from unclip_pl.clip.small import describe_training, read_training_record

    cache = Path(cfg.clip.loader.checkpoint)
    clip_cfg = clip_run_config(cfg)
    log.info("Step 1 of 2: no usable CLIP at %s, so training the small CLIP first (its recommended run, in %s); "
             "later runs reuse it. Step 2 of 2 is the stage itself.", cache, clip_cfg.paths.output_dir)
    fit(clip_cfg)
    trained = Path(clip_cfg.paths.output_dir) / "clip.pt"
    record = read_training_record(trained)
    if record is None:
        raise RuntimeError(f"CLIP training finished but did not write {trained}.")
    if record.get("smoke_test"):
        log.warning("The CLIP autotrain was shorter than its recommended run (%s): this run uses %s, and the shared "
                    "cache %s stays empty.", describe_training(record), trained, cache)
        return trained
    atomic_save(torch.load(trained, map_location="cpu", weights_only=True), cache)
    log.info("Cached the trained CLIP at %s (%s).", cache, describe_training(record))
    return cache


def with_clip_file(cfg: DictConfig, checkpoint: Path) -> DictConfig:
    """A copy of ``cfg`` that loads the frozen CLIP from ``checkpoint``."""
    cfg = cfg.copy()
    with open_dict(cfg):
        cfg.clip.loader.checkpoint = str(checkpoint)
    return cfg


def load_frozen_clip(cfg: DictConfig):
    """Build the frozen CLIP from ``clip.loader`` (its file must exist: step 1 trains a missing one)."""
    checkpoint = cfg.clip.loader.get("checkpoint")
    if checkpoint and not Path(checkpoint).exists():
        raise ConfigError(f"CLIP checkpoint {checkpoint} does not exist: pass an existing file with "
                          "clip.loader.checkpoint=/path/to/weights, or train one with "
                          "`python train.py stage=clip clip.export_to=PATH` (or set clip.autotrain=true).")
    expect = {k: cfg.clip[k] for k in ("embed_dim", "text_width", "context_length", "image_size") if k in cfg.clip}
    return build(cfg.clip.loader, "clip.loader", **expect)


# ---------------------------------------------------------------------------------------------------- step 2: stage
def per_device_batch(cfg: DictConfig, stage: str) -> int:
    """``data.batch_size`` when set, else the stage's recommended ``batch_size``, else the data module default."""
    return int(cfg.data.get("batch_size") or stage_config(cfg, stage).get("batch_size") or DEFAULT_BATCH_SIZE)


def data_image_size(cfg: DictConfig, stage: str) -> int | None:
    """The image side the data module serves: the stage's ``image_size`` (the size its network is built for), else
    ``data.image_size``; both set and different is an error, never a silent override."""
    own, data = stage_config(cfg, stage).get("image_size"), cfg.data.get("image_size")
    if own and data and int(own) != int(data):
        raise ConfigError(f"data.image_size={data} disagrees with {stage}.image_size={own} (the size the {stage} is "
                          f"built for): set {stage}.image_size={data} instead, or leave data.image_size null.")
    return int(own or data) if (own or data) else None


def loader_tokenizer(clip: Any, module: pl.LightningModule, needs: tuple[str, ...]) -> Any:
    """The tokenizer the loader workers run: the frozen CLIP's, or for the CLIP stage the one of the CLIP it trains
    (both trim the caption padding there, exactly; no GPU sync)."""
    if "tokens" not in needs:
        return None
    return clip.loader_tokenizer if clip is not None else module.loader_tokenizer


def fit(cfg: DictConfig) -> dict[str, float]:
    """Step 2: train the selected stage; return the final logged metrics."""
    stage = selected_stage(cfg)
    scfg = stage_config(cfg, stage)
    pl.seed_everything(cfg.seed, workers=True)
    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    log.info("Training stage '%s'; run directory %s", stage, out)

    clip = load_frozen_clip(cfg) if stage_needs_clip(cfg, stage) else None
    batch_size = per_device_batch(cfg, stage)
    apply_lr_scaling(cfg, scfg, batch_size)  # before the config is saved and the module built: what runs
    OmegaConf.save(cfg, out / "config_resolved.yaml", resolve=True)
    needs = tuple(scfg.needs)
    # every stage module stores the run config in its checkpoints; only those that use the frozen CLIP take it
    run_config = OmegaConf.to_container(cfg, resolve=True)
    module = build_accepting(scfg.module, f"{stage}.module", {"run_config": run_config}, clip=clip)
    datamodule = build_accepting(
        cfg.data, "data", batch_size=batch_size, needs=needs, image_size=data_image_size(cfg, stage),
        tokenizer=loader_tokenizer(clip, module, needs), clip=clip,
        # work the module moves into the loader workers (e.g. the upsampler's BSR corruption)
        train_batch_transform=getattr(module, "loader_batch_transform", None))
    ckpt_path = resolve_ckpt_path(cfg)
    if cfg.get("init_from"):
        init_from_weights(cfg, module, stage, ckpt_path)
    if cfg.get("compile"):
        compile_networks(module.model)

    if ckpt_path is not None:
        check_checkpoint_fits(module, ckpt_path, f"{stage}.module")
    trainer = build_trainer(cfg, stage)
    _log_hyperparameters(trainer, cfg, stage)
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    finally:
        _finish_wandb(trainer)
    return {k: float(v) for k, v in trainer.callback_metrics.items() if torch.is_tensor(v) and v.numel() == 1}


def run(cfg: DictConfig) -> dict[str, float]:
    """Check the config, run step 1 when the stage needs a CLIP that is not there yet, then step 2.
    Configuration mistakes surface as :class:`ConfigError`."""
    check_config(cfg)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if clip_to_train(cfg, selected_stage(cfg)):
        cfg = with_clip_file(cfg, train_clip(cfg))
    return fit(cfg)


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
        kwargs = {}
        if node._target_.endswith("WandbLogger"):
            kwargs["mode"] = wandb_mode(node.get("mode", "online"))
            if node.get("id") is None and kwargs["mode"] != "disabled":  # same wandb run after a restart
                kwargs["id"] = persistent_run_id(cfg.paths.output_dir)
        loggers.append(build(node, f"logger.{key}", **kwargs))
    return loggers


def build_trainer(cfg: DictConfig, stage: str) -> pl.Trainer:
    callbacks = [build(c, f"callbacks.{k}") for k, c in (cfg.get("callbacks") or {}).items() if c is not None]
    kwargs = trainer_kwargs(cfg, stage)
    node = OmegaConf.create({"_target_": kwargs.pop("_target_", "pytorch_lightning.Trainer"), **kwargs})
    return build(node, "trainer", callbacks=callbacks, logger=build_loggers(cfg) or False)


def _log_hyperparameters(trainer: pl.Trainer, cfg: DictConfig, stage: str) -> None:
    params = OmegaConf.to_container(cfg, resolve=True)
    params["stage_trained"] = stage
    params["git_commit"] = git_commit()
    for logger in trainer.loggers:
        logger.log_hyperparams(params)


def _finish_wandb(trainer: pl.Trainer) -> None:
    """Close this fit's wandb run: Lightning leaves it open, and the next fit in the same process (the stage after
    step 1, a test) would otherwise log into it."""
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


# ---------------------------------------------------------------------------------------------------- resume
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


def continues_own_init(cfg: DictConfig, ckpt_path: str) -> bool:
    """Whether ``ckpt_path`` is this run directory's last.ckpt found by ``resume: auto`` (no ``ckpt_path`` given)
    and was written by a run started with the same ``init_from``: a restarted job (SLURM requeue, preemption)
    then resumes as any run does, instead of failing."""
    if cfg.get("ckpt_path") is not None or Path(ckpt_path).is_dir():
        return False
    try:
        saved = (verify_checkpoint(ckpt_path) or {}).get("cfg") or {}
    except CheckpointError:
        return False
    return saved.get("init_from") is not None and str(saved.get("init_from")) == str(cfg.init_from)


def init_from_weights(cfg: DictConfig, module: pl.LightningModule, stage: str, ckpt_path: str | None) -> None:
    """``init_from``: load weights only into the stage's model before the fit (see
    :func:`unclip_pl.checkpoint.init_weights`). Refused together with a checkpoint to resume, which already
    restores the weights (and the optimiser, step, EMA and data position), except the last.ckpt of the run that
    this ``init_from`` started (:func:`continues_own_init`), which resumes."""
    if ckpt_path is not None and continues_own_init(cfg, ckpt_path):
        log.info("Resuming %s, the run that init_from=%s started (resume=auto after a restart): init_from is not "
                 "loaded again.", ckpt_path, cfg.init_from)
        return
    if ckpt_path is not None:
        how = (f"ckpt_path={cfg.ckpt_path}" if cfg.get("ckpt_path") not in (None, "last")
               else f"this run directory's {ckpt_path} (resume=auto)")
        raise ConfigError(f"init_from={cfg.init_from} and {how} together: ckpt_path resumes a run (weights, "
                          "optimiser, step, EMA, data position); init_from starts a new run from weights only. Drop "
                          "init_from to resume, or start a new run (another run_name, or resume=never) to use "
                          "init_from.")
    if not Path(cfg.init_from).exists():
        raise ConfigError(f"init_from={cfg.init_from} does not exist.")
    try:
        init_weights(module, cfg.init_from, stage, strict=bool(cfg.get("init_strict", True)))
    except CheckpointError as e:
        raise ConfigError(str(e)) from None


def check_checkpoint_fits(module: torch.nn.Module, ckpt_path: str, what: str) -> None:
    """Compare the checkpoint's weights with the freshly built module; list mismatched keys in a ConfigError."""
    try:
        ckpt = verify_checkpoint(ckpt_path)
        if ckpt is not None:
            check_fits(module, ckpt, ckpt_path, what)
    except CheckpointError as e:
        raise ConfigError(str(e)) from None
