"""Global batch size and the learning-rate scaling rule.

``global batch = per-device batch x devices x nodes x accumulate_grad_batches``. With ``lr_scaling.rule``
``linear`` the optimiser's ``lr`` is multiplied by ``global / reference_batch``, with ``sqrt`` by its square root,
with ``none`` it is left as configured. Applied by ``unclip_pl.train.fit`` before the module is built.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
from omegaconf import DictConfig, open_dict

log = logging.getLogger(__name__)

RULES = ("none", "linear", "sqrt")


def count_devices(accelerator: Any, devices: Any) -> int:
    """Devices per node the Trainer will use for ``(accelerator, devices)`` as written in ``conf/trainer``."""
    if isinstance(devices, (list, tuple)) or (hasattr(devices, "__len__") and not isinstance(devices, str)):
        return max(1, len(devices))
    if isinstance(devices, str):
        text = devices.strip()
        if "," in text:
            return len([d for d in text.split(",") if d.strip()])
        if text not in ("auto", "-1"):
            return max(1, int(text))
        devices = -1
    if isinstance(devices, int) and devices > 0:
        return devices
    # -1 / "auto": every visible GPU for GPU accelerators, one process on CPU.
    if str(accelerator) in ("gpu", "cuda", "auto") and torch.cuda.is_available():
        return max(1, torch.cuda.device_count())
    return 1


def global_batch(batch_size: int, trainer_cfg: DictConfig | dict) -> tuple[int, dict[str, int]]:
    """Return ``(global batch, parts)`` with parts ``per_device``, ``devices``, ``nodes``, ``accumulate``."""
    parts = {
        "per_device": int(batch_size),
        "devices": count_devices(trainer_cfg.get("accelerator", "cpu"), trainer_cfg.get("devices", 1)),
        "nodes": int(trainer_cfg.get("num_nodes") or 1),
        "accumulate": int(trainer_cfg.get("accumulate_grad_batches") or 1),
    }
    return math.prod(parts.values()), parts


def scale_factor(rule: str, batch: int, reference_batch: int) -> float:
    if rule not in RULES:
        raise ValueError(f"lr_scaling.rule={rule!r} is not one of {', '.join(RULES)}")
    if rule == "none":
        return 1.0
    ratio = batch / float(reference_batch)
    return ratio if rule == "linear" else math.sqrt(ratio)


def apply_lr_scaling(cfg: DictConfig, stage_cfg: DictConfig, batch_size: int) -> dict[str, Any]:
    """Scale ``stage_cfg.module.optimizer.lr`` in place by ``cfg.lr_scaling`` and report it.

    Records ``global_batch`` and ``effective_lr`` under ``cfg.lr_scaling`` (so they reach the logged
    hyperparameters and the checkpoint's config). Returns those numbers.
    """
    spec = cfg.get("lr_scaling") or {}
    rule = str(spec.get("rule", "none"))
    reference = int(spec.get("reference_batch") or 256)
    total, parts = global_batch(batch_size, cfg.trainer)
    factor = scale_factor(rule, total, reference)
    opt = stage_cfg.get("module", {}).get("optimizer") if stage_cfg.get("module") is not None else None
    base_lr = opt.get("lr") if opt is not None else None
    info: dict[str, Any] = {"global_batch": total, **parts, "rule": rule, "base_lr": base_lr, "effective_lr": base_lr}
    if base_lr is not None:
        info["effective_lr"] = float(base_lr) * factor
        if factor != 1.0:
            with open_dict(opt):
                opt.lr = info["effective_lr"]
    elif rule != "none":
        log.warning("lr_scaling.rule=%s but the stage's module has no optimizer.lr to scale: left unchanged.", rule)
    if "lr_scaling" in cfg:
        with open_dict(cfg.lr_scaling):
            cfg.lr_scaling.global_batch = total
            cfg.lr_scaling.effective_lr = info["effective_lr"]
    lr_text = "" if base_lr is None else (
        f"; lr {info['effective_lr']:.4g}" + ("" if rule == "none" else
                                              f" (= {float(base_lr):.4g} x {factor:.4g}, {rule} rule, "
                                              f"reference batch {reference})"))
    msg = (f"global batch {total} = {parts['per_device']} per device x {parts['devices']} device(s) x "
           f"{parts['nodes']} node(s) x {parts['accumulate']} accumulation{lr_text}")
    log.info(msg)
    return info
