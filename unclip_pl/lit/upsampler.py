"""LightningModule of a diffusion upsampler (``python train.py upsampler=emoji``).

Training: ``Upsampler.loss(image)`` (random quarter-size crops; the low-res input is made in the step, or with
``degrade_in_loader`` in the data-loader workers: down-sample + degradation).
Validation (EMA weights): ``val/loss`` with fixed noise; every ``sample_every_n_val``-th validation run a grid of the
first ``num_grid_items`` validation images is logged (row 1: the low-res input, row 2: the upsampled sample at full
size, row 3: the real image).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from unclip_pl.callbacks.image_grid import log_image_grid, to_grid
from unclip_pl.data.pipeline import AddKey
from unclip_pl.lit.base import ImageStageMixin, StageModule
from unclip_pl.sample_settings import UpsamplerSettings


class UpsamplerModule(ImageStageMixin, StageModule):
    """Upsampler training/validation glue.

    Args:
        model: ``unclip_pl.models.upsampler.Upsampler``.
        optimizer, warmup_steps, ema_decay: see ``StageModule`` (no CLIP: the upsampler sees only images).
        channels_last: convert images and weights to channels_last memory format.
        degrade_in_loader: make the corrupted low-res input in the loader workers (``loader_batch_transform``)
            instead of the training step: for BSR, whose per-image loop and CPU JPEG would stall an accelerator.
        sample_every_n_val / num_grid_items: grid logging, as in ``DecoderModule``.
        sample: the stage's ``sample:`` block (steps, sampler, eta; ``sample: ${upsampler.sample}`` in the config),
            the sampler settings of the grids.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        warmup_steps: int = 0,
        ema_decay: float | None = 0.999,
        channels_last: bool = False,
        sample_every_n_val: int = 1,
        num_grid_items: int = 8,
        sample: dict[str, Any] | None = None,
        degrade_in_loader: bool = False,
        run_config: dict[str, Any] | None = None,
    ):
        super().__init__(model, optimizer, warmup_steps, ema_decay, clip=None, run_config=run_config)
        self.degrade_in_loader = bool(degrade_in_loader)
        self._init_image_stage(channels_last, sample_every_n_val, num_grid_items)
        self.sample_settings = UpsamplerSettings.from_block(sample)

    @property
    def loader_batch_transform(self) -> AddKey | None:
        """With ``degrade_in_loader``: the batch stage the data module runs in its workers (adds ``low_res``)."""
        return AddKey("image", "low_res", self.model.low_res_maker) if self.degrade_in_loader else None

    def compute_loss(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        if self.degrade_in_loader and "low_res" not in batch:
            raise KeyError("degrade_in_loader=true but the batch has no 'low_res': give the data module "
                           "module.loader_batch_transform as its train_batch_transform (train.py does)")
        return self.model.loss(self._images(batch["image"]), low_res=batch.get("low_res"))

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        out = self.eval_model.loss(self._images(batch["image"]), generator=self._generator(batch_idx))
        self.log("val/loss", out["loss"], on_epoch=True, sync_dist=True, batch_size=batch["image"].shape[0])
        self._keep_grid_items(batch, ("image",))

    def on_validation_epoch_end(self) -> None:
        if self._grid_due():
            self.log_samples()

    @torch.no_grad()
    def sample_grid_items(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(low-res inputs (N, 3, h, w), samples (N, 3, H, W)) for the fixed validation images, fixed seeds."""
        images = self._images(self._grid_items["image"].to(self.device))
        model = self.eval_model
        with torch.random.fork_rng(devices=[]):   # fixed degradation draws (BSR uses the global CPU RNG)
            torch.manual_seed(0)
            low = model.make_low_res(images)
        with self._autocast():
            samples = model.sample(low, seeds=list(range(low.shape[0])),
                                   **self.sample_settings.sampler_kwargs()).float()
        return low, samples

    def log_samples(self) -> list[str]:
        low, samples = self.sample_grid_items()
        grid = to_grid([low, samples, self._grid_items["image"]])
        return log_image_grid(self.trainer, "val/samples", grid)
