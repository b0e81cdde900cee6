"""Shared LightningModule glue for every trainable stage.

A stage's maths lives in ``unclip_pl.models`` (``loss`` / ``sample``); this module only adds what every stage needs
around it: the optimiser (AdamW with decoupled weight decay, no decay on biases, norms and embeddings), linear
warm-up, an EMA copy of the weights used for validation and sampling, a frozen CLIP that is never checkpointed,
and the standard training logs (loss, learning rate, gradient norm).
"""

from __future__ import annotations

import copy
import functools
import math
from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

import pytorch_lightning as pl
import torch
from torch import nn


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Split trainable parameters into decayed (matrices, convolutions) and non-decayed (biases, norms, embeddings)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim < 2 or "embedding" in name or name.endswith("null") or ".null_" in name:
            no_decay.append(p)
        else:
            decay.append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


class EMA(nn.Module):
    """Exponential moving average of a module's parameters (buffers are copied), updated once per optimiser step.

    The effective decay warms up as ``min(decay, (1 + n) / (10 + n))`` (``n``: optimiser steps averaged so far) so
    early averages are not dominated by the random initialisation.

    Kept instead of Lightning's ``EMAWeightAveraging`` (fixed decay, a device->host read of its count every update,
    the average swapped into the trained model's keys): this one warms up, needs no sync, and lives in the checkpoint
    under the stable ``ema.module.*`` keys that validation, sampling and export read.
    """

    def __init__(self, model: nn.Module, decay: float):
        super().__init__()
        self.decay = decay
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        # The count lives in a buffer (saved in checkpoints) and is mirrored on the host, so the per-step decay needs
        # no device->host read; the mirror is refreshed once after a checkpoint load.
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))
        self._host_updates: int | None = None

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._host_updates = None

    @torch.no_grad()
    def restart_from(self, model: nn.Module) -> None:
        """Copy ``model``'s parameters and buffers and reset the update count (a run initialised from weights)."""
        for p_ema, p in zip(self.module.parameters(), model.parameters()):
            p_ema.copy_(p.detach())
        for b_ema, b in zip(self.module.buffers(), model.buffers()):
            b_ema.copy_(b)
        self.num_updates.zero_()
        self._host_updates = 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        if self._host_updates is None:
            self._host_updates = int(self.num_updates)
        self._host_updates += 1
        self.num_updates.fill_(self._host_updates)
        n = float(self._host_updates)
        decay = min(self.decay, (1.0 + n) / (10.0 + n))
        ema_params = [p for p in self.module.parameters()]
        params = [p.detach() for p in model.parameters()]
        torch._foreach_lerp_(ema_params, params, 1.0 - decay)
        for b_ema, b in zip(self.module.buffers(), model.buffers()):
            b_ema.copy_(b)


class StageModule(pl.LightningModule):
    """Base class of every stage's LightningModule.

    Args:
        model: the stage model from ``unclip_pl.models`` (trainable); exposes ``loss(...)`` and ``sample(...)``.
        optimizer: a partial optimiser constructor (Hydra ``_partial_: true``), called with parameter groups.
        warmup_steps: linear learning-rate warm-up length in optimiser steps (0 for none).
        lr_schedule: ``"constant"`` after warm-up, or ``"cosine"`` decay to ``min_lr_ratio`` x lr over the run's
            estimated optimiser steps (constant when Lightning cannot estimate them, e.g. unsized loaders).
        ema_decay: decay of the weight EMA used for validation and sampling; ``None`` disables it.
        clip: optional frozen CLIP used to encode captions/images on the fly. Registered (so it moves with the module)
            but stripped from checkpoints: it is rebuilt from its own config.
        run_config: the resolved run config (plain dict or DictConfig) stored in every checkpoint, as ``cfg`` and
            as the ``unclip_pl`` stage entry that :func:`unclip_pl.checkpoint.load_stage` reads (see the format in
            :mod:`unclip_pl.checkpoint`); None stores neither.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        warmup_steps: int = 0,
        ema_decay: float | None = 0.999,
        clip: nn.Module | None = None,
        lr_schedule: str = "constant",
        min_lr_ratio: float = 0.1,
        run_config: dict[str, Any] | None = None,
    ):
        super().__init__()
        if lr_schedule not in ("constant", "cosine"):
            raise ValueError(f"lr_schedule must be 'constant' or 'cosine', got {lr_schedule!r}")
        self.model = model
        self.optimizer_factory = optimizer or functools.partial(torch.optim.AdamW, lr=1e-4)
        self.warmup_steps = warmup_steps
        self.lr_schedule = lr_schedule
        self.min_lr_ratio = min_lr_ratio
        self.ema = EMA(model, ema_decay) if ema_decay is not None else None
        self._ema_step = 0  # the optimiser step (trainer.global_step) the EMA last saw
        self.clip = clip
        self.run_config = _plain_config(run_config)

    # ------------------------------------------------------------------ model access
    @property
    def eval_model(self) -> nn.Module:
        """The weights to validate and sample with: the EMA copy when there is one."""
        return self.ema.module if self.ema is not None else self.model

    def compute_loss(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Return a dict with a scalar ``loss`` and any other scalars to log. Subclasses implement it."""
        raise NotImplementedError

    # ------------------------------------------------------------------ training
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        out = self.compute_loss(batch)
        bs = _batch_size(batch)
        self.log("train/loss", out["loss"].detach(), prog_bar=True, batch_size=bs)
        self.log_dict({f"train/{k}": v.detach() for k, v in out.items() if k != "loss"}, batch_size=bs)
        return out["loss"]

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        if self.global_step % max(1, self.trainer.log_every_n_steps) == 0:
            grads = [p.grad for p in self.model.parameters() if p.grad is not None]
            if grads:
                norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
                self.log("train/grad_norm", norm)

    def on_train_start(self) -> None:
        self._ema_step = self.trainer.global_step  # restored from the checkpoint when resuming

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.update_ema()

    def update_ema(self) -> None:
        """Average the weights of the optimiser step just taken into the EMA; a second call in the same step does
        nothing. The preemption callback calls it before it saves (callbacks' ``on_train_batch_end`` runs before
        the module's), so a checkpoint saved there holds this step's EMA."""
        # Once per optimiser step, not per micro-batch: with accumulate_grad_batches=k the optimiser steps every k-th
        # batch (global_step, a host int, counts the steps in automatic and manual optimisation alike).
        step = self.trainer.global_step
        if self.ema is not None and step > self._ema_step:
            self.ema.update(self.model)
        self._ema_step = step

    def configure_optimizers(self):
        factory = self.optimizer_factory
        wd = factory.keywords.get("weight_decay", 0.0) if isinstance(factory, functools.partial) else 0.0
        optimizer = factory(param_groups(self.model, wd))
        total = self._estimated_steps() if self.lr_schedule == "cosine" else None
        if self.warmup_steps <= 0 and total is None:
            return optimizer
        lr_lambda = functools.partial(warmup_cosine, warmup=self.warmup_steps, total=total,
                                      min_ratio=self.min_lr_ratio)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def _estimated_steps(self) -> int | None:
        try:
            est = self.trainer.estimated_stepping_batches
        except Exception:  # no trainer attached, or an unsized loader
            return None
        return int(est) if est is not None and math.isfinite(est) else None

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Store the resolved run config (``cfg``) and the stage entry (``unclip_pl``, see :mod:`unclip_pl.checkpoint`);
        drop the frozen CLIP's weights (rebuilt from ``cfg['clip']`` on load)."""
        from unclip_pl.checkpoint import stage_entry

        if self.run_config is not None:
            checkpoint["cfg"] = self.run_config
            entry = stage_entry(self.run_config)
            if entry is not None:
                checkpoint["unclip_pl"] = entry
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if not k.startswith("clip.")}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.clip is not None:
            for k, v in self.clip.state_dict().items():
                checkpoint["state_dict"].setdefault(f"clip.{k}", v)

    def state_dict_for_export(self) -> dict[str, torch.Tensor]:
        """The weights a pipeline needs: the EMA model when present, else the trained model."""
        return self.eval_model.state_dict()


def warmup_cosine(step: int, warmup: int, total: int | None, min_ratio: float) -> float:
    """LR multiplier: linear warm-up over ``warmup`` steps, then cosine to ``min_ratio`` at ``total`` (or constant)."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if total is None or total <= warmup:
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def _plain_config(cfg: Any) -> dict[str, Any] | None:
    """A DictConfig (what Hydra passes) as a resolved plain dict; dicts and None unchanged."""
    from omegaconf import DictConfig, OmegaConf

    return OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg


def _batch_size(batch: Any) -> int | None:
    if isinstance(batch, dict):
        for v in batch.values():
            if isinstance(v, torch.Tensor):
                return v.shape[0]
            if isinstance(v, (list, tuple)):
                return len(v)
    return None


class ImageStageMixin:
    """What the image stages (decoder, upsampler) share besides :class:`StageModule`: channels-last weights and
    inputs, fixed validation items with a sample grid every n-th validation, per-batch generators and autocast."""

    def _init_image_stage(self, channels_last: bool, sample_every_n_val: int, num_grid_items: int) -> None:
        self.channels_last = bool(channels_last)
        if self.channels_last:  # faster convolutions on GPUs
            self.model.to(memory_format=torch.channels_last)
            if self.ema is not None:
                self.ema.module.to(memory_format=torch.channels_last)
        self.sample_every_n_val = max(0, int(sample_every_n_val))
        self.num_grid_items = int(num_grid_items)
        self._grid_items: dict[str, torch.Tensor] | None = None
        self._val_runs = 0

    def _images(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) float, channels-last when the weights are."""
        images = images.float()
        return images.contiguous(memory_format=torch.channels_last) if self.channels_last else images

    def _keep_grid_items(self, batch: dict[str, Any], keys: tuple[str, ...]) -> None:
        if self._grid_items is None and self.num_grid_items > 0:
            n = self.num_grid_items
            self._grid_items = {k: batch[k][:n].detach().clone() for k in keys if k in batch}

    def _grid_due(self) -> bool:
        if self.trainer.sanity_checking or self.sample_every_n_val <= 0 or self._grid_items is None:
            return False
        self._val_runs += 1
        return (self._val_runs - 1) % self.sample_every_n_val == 0 and self.trainer.is_global_zero

    def _autocast(self):
        plugin = getattr(self.trainer, "precision_plugin", None)
        return plugin.forward_context() if plugin is not None else nullcontext()

    def _generator(self, batch_idx: int) -> torch.Generator:
        g = torch.Generator(device=self.device)
        g.manual_seed(1000003 * self.global_rank + batch_idx)
        return g
