"""Lightning callback: CLIP-space FID, CLIP score and caption retrieval of decoder samples on a small fixed val set.

Decoder stage only (``DecoderModule``-like: ``eval_model`` is a ``Decoder``, ``clip`` a FrozenCLIP). The fixed set is
the first ``num_samples`` validation items seen (the sanity check fills it); every ``every_n_steps`` optimizer steps
their CLIP image embeddings are decoded with fixed seeds (the real z_i, so this measures the decoder alone) and

    eval/clip_fid     Frechet distance of real vs decoded images in the CLIP's image space (features gathered
                      across ranks before the distance is computed)
    eval/clip_score   mean cosine between each decoded image and its caption
    eval/top1, top5   does each decoded image retrieve its caption among the set's distinct captions

are logged, with a grid (real row over decoded row) through ``unclip_pl.callbacks.image_grid`` when available.
"""

from __future__ import annotations

import logging
from contextlib import nullcontext
from typing import Any

import pytorch_lightning as pl
import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


class EvalMetricsCallback(pl.Callback):
    """Args:
        every_n_steps: evaluate when ``global_step % every_n_steps == 0`` (and at the end of fit).
        num_samples: size of the fixed val set per rank.
        steps / sampler / guidance_scale / eta: overrides of the decoder module's sampler settings (its ``sample:``
            block, ``pl_module.sample_settings``); None = keep that value.
        batch_size: decode batch size.
        grid_items: images of the fixed set shown in the logged grid (0 = no grid).
        at_fit_end: also evaluate once when training ends.
    """

    def __init__(self, every_n_steps: int = 500, num_samples: int = 32, steps: Any = None, sampler: str | None = None,
                 guidance_scale: float | None = None, eta: float | None = None, batch_size: int = 32,
                 grid_items: int = 8, at_fit_end: bool = True):
        super().__init__()
        self.every_n_steps = int(every_n_steps)
        self.num_samples = int(num_samples)
        self.sample = dict(steps=steps, sampler=sampler, guidance_scale=guidance_scale, eta=eta)
        self.batch_size = int(batch_size)
        self.grid_items = int(grid_items)
        self.at_fit_end = bool(at_fit_end)
        self.items: dict[str, Any] = {"image": [], "img_emb": [], "txt": []}
        self._last_step = -1
        self.last_metrics: dict[str, float] = {}

    # ------------------------------------------------------------------ fixed set
    @property
    def _count(self) -> int:
        return len(self.items["txt"])

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if self._count >= self.num_samples or not isinstance(batch, dict):
            return
        if not all(k in batch for k in ("image", "img_emb", "txt")):
            return
        take = self.num_samples - self._count
        self.items["image"].append(batch["image"][:take].detach().float().cpu())
        self.items["img_emb"].append(batch["img_emb"][:take].detach().float().cpu())
        self.items["txt"] += list(batch["txt"][:take])

    # ------------------------------------------------------------------ schedule
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self.every_n_steps > 0 and step > 0 and step % self.every_n_steps == 0 and step != self._last_step:
            self.evaluate(trainer, pl_module)

    def on_fit_end(self, trainer, pl_module) -> None:
        if self.at_fit_end and trainer.global_step != self._last_step:
            self.evaluate(trainer, pl_module)

    # ------------------------------------------------------------------ evaluation
    def _ready(self, pl_module) -> bool:
        ok = self._count >= 2 and getattr(pl_module, "clip", None) is not None and hasattr(pl_module, "eval_model")
        if dist.is_available() and dist.is_initialized():  # every rank must take part in the gathers, or none
            flag = torch.tensor([int(ok)], device=pl_module.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
            ok = bool(flag.item())
        return ok

    @torch.no_grad()
    def compute(self, pl_module) -> tuple[dict[str, float], torch.Tensor, torch.Tensor]:
        """Decode the fixed set; returns (metrics, real (N, 3, S, S), decoded (N, 3, S, S))."""
        from unclip_pl.metrics.clip_score import caption_retrieval, encode_captions, unique_captions
        from unclip_pl.metrics.fid import FrechetFeatureDistance, gather_features
        from unclip_pl.pipeline import UnCLIPPipeline
        from unclip_pl.sample_settings import resolve_settings

        model = pl_module.eval_model
        was_training = model.training
        stored = pl_module.sample_settings.sampler_kwargs()     # the module's sample: block
        settings = resolve_settings({"decoder": self.sample, "batch_size": self.batch_size}, None, stored, [])
        try:
            pipe = UnCLIPPipeline(pl_module.clip, None, model, [], settings, device=pl_module.device)
            real = torch.cat(self.items["image"])
            z = torch.cat(self.items["img_emb"]).to(pl_module.device)
            captions = list(self.items["txt"])
            plugin = getattr(pl_module.trainer, "precision_plugin", None) if pl_module._trainer else None
            with plugin.forward_context() if plugin is not None else nullcontext():
                fake = pipe.decode(z, captions, seeds=list(range(len(captions)))).float().cpu()
        finally:
            model.train(was_training)
        clip = pl_module.clip
        real_feats = clip.encode_image(real.to(pl_module.device)).float()
        fake_feats = clip.encode_image(fake.to(pl_module.device)).float()
        fid = FrechetFeatureDistance()
        fid.update(real_feats, real=True)
        fid.update(fake_feats, real=False)
        metrics = {"eval/clip_fid": fid.compute()}
        # CLIP score and retrieval over all ranks' items
        all_fake = gather_features(fake_feats.cpu())
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            parts: list[list[str]] = [None] * dist.get_world_size()  # type: ignore[list-item]
            dist.all_gather_object(parts, captions)
            captions = [c for p in parts for c in p]
        pool = unique_captions(captions)
        pool_emb = encode_captions(clip, pool)
        cap_emb = pool_emb[torch.tensor([pool.index(c) for c in captions])]
        metrics["eval/clip_score"] = float((torch.nn.functional.normalize(all_fake, dim=-1) * cap_emb).sum(-1).mean())
        ret = caption_retrieval(all_fake, captions, pool, pool_emb, k=(1, 5))
        metrics["eval/top1"], metrics["eval/top5"] = ret["top1"], ret["top5"]
        return metrics, real, fake

    def evaluate(self, trainer, pl_module, log_metrics: bool = True) -> dict[str, float]:
        if not self._ready(pl_module):
            return {}
        self._last_step = trainer.global_step
        metrics, real, fake = self.compute(pl_module)
        self.last_metrics = metrics
        # Straight to the loggers, once: values passed to self.log in a train-batch hook would be re-emitted (stale)
        # at every later logging step, and fit-end hooks cannot use self.log at all.
        if log_metrics and trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=trainer.global_step)
        if trainer.is_global_zero:
            log.info("step %d: %s", trainer.global_step, ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
            if self.grid_items > 0:
                self._log_grid(trainer, real[: self.grid_items], fake[: self.grid_items])
        return metrics

    @staticmethod
    def _log_grid(trainer, real: torch.Tensor, fake: torch.Tensor) -> None:
        try:
            from unclip_pl.callbacks.image_grid import log_image_grid, to_grid
        except ImportError:  # pragma: no cover - the image-grid helper is optional
            return
        log_image_grid(trainer, "eval/samples", to_grid([real, fake]))
