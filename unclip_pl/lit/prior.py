"""LightningModule of the priors: the diffusion prior (``python train.py prior=diffusion``) and the autoregressive
prior (``prior=ar``), which share their inputs, validation and metrics.

Training: captions' token ids are encoded by the frozen CLIP text tower (per-token states + padding mask) and the
prior's loss is applied to the batch's CLIP image/text embeddings. At fit start the diffusion prior's normaliser
(``normalization="standardize"``) or the AR prior's PCA codec is fitted on training embeddings, unless the model
already holds one (a resumed run).
Validation (EMA weights): ``val/loss`` every time; every ``sample_every_n_val``-th validation run it also samples z_i
for the captions, gathers predictions across steps and ranks, and logs the metrics of
``unclip_pl.metrics.prior_metrics`` as ``val/<name>``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from unclip_pl.lit.base import StageModule
from unclip_pl.metrics.prior_metrics import prior_metrics
from unclip_pl.sample_settings import prior_settings
from unclip_pl.utils.distributed import gather_rows

log = logging.getLogger(__name__)


class PriorModule(StageModule):
    """Prior training/validation glue.

    Args:
        model: ``unclip_pl.models.prior.DiffusionPrior`` or ``unclip_pl.models.ar_prior.ARPrior``.
        optimizer, warmup_steps, ema_decay, clip: see ``StageModule`` (``clip`` is required: a FrozenCLIP-like object
            with ``encode_text(tokens) -> .emb (B, D), .tokens (B, L', W), .mask (B, L')``).
        normalizer_batches: with ``normalization="standardize"``, the number of training batches read at fit start
            to fit the per-dimension statistics (skipped when already fitted, e.g. when resuming).
        codec_batches: for the AR prior, the number of training batches (per rank, gathered across ranks) its PCA
            codec is fitted on at fit start, and of validation batches its reconstruction is measured on.
        sample_every_n_val: sample and compute the embedding metrics on every n-th validation run.
        sample_max_batches: sample at most this many validation batches per run (None = all).
        sample: the stage's ``sample:`` block (``sample: ${prior.sample}`` in the config), the sampler settings of
            validation: steps, sampler, eta, guidance_scale, best_of for the diffusion prior; guidance_scale,
            temperature, top_k, top_p, dot_fraction, best_of for the AR prior.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        warmup_steps: int = 0,
        ema_decay: float | None = 0.999,
        clip: nn.Module | None = None,
        normalizer_batches: int = 100,
        sample_every_n_val: int = 1,
        sample_max_batches: int | None = None,
        sample: dict[str, Any] | None = None,
        run_config: dict[str, Any] | None = None,
        codec_batches: int = 100,
    ):
        super().__init__(model, optimizer, warmup_steps, ema_decay, clip, run_config=run_config)
        self.normalizer_batches = normalizer_batches
        self.sample_every_n_val = max(1, int(sample_every_n_val))
        self.sample_max_batches = sample_max_batches
        self.codec_batches = int(codec_batches)
        self.sample_settings = prior_settings(sample)
        self._val_runs = 0
        self._sample_now = False
        self._val_outputs: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    # ------------------------------------------------------------------ helpers
    @torch.no_grad()
    def encode_text(self, tokens: torch.Tensor):
        """Frozen CLIP text encoding of (B, L) token ids -> TextEncoding(emb (B,D), tokens (B,L',W), mask (B,L'))."""
        if self.clip is None:
            raise RuntimeError("PriorModule needs the frozen CLIP (clip=...) to encode caption tokens")
        return self.clip.encode_text(tokens)

    def _inputs(self, batch: dict[str, Any]):
        enc = self.encode_text(batch["tokens"])
        txt_emb = batch.get("txt_emb")
        if txt_emb is None:
            txt_emb = enc.emb
        return batch["img_emb"].float(), txt_emb.float(), enc.tokens.float(), enc.mask

    @torch.no_grad()
    def _uncond(self, model: nn.Module) -> dict[str, Any]:
        """``{"uncond_text": (tokens, mask, txt_emb)}``, the frozen CLIP's encoding of ``""``, for a diffusion prior
        whose unconditional branch is the empty caption (``uncond="empty_caption"``, Karlo's); else {}."""
        if getattr(model, "uncond", "learned") != "empty_caption":
            return {}
        enc = self.encode_text(self.clip.tokenize([""]))
        return {"uncond_text": (enc.tokens.float(), enc.mask.bool(), enc.emb.float())}

    # ------------------------------------------------------------------ normaliser
    def on_fit_start(self) -> None:
        if not getattr(self.model, "unit_norm", True) and getattr(self.clip, "normalize", False):
            log.warning("prior: the model reads CLIP's raw projections (unit_norm=false) but the CLIP gives unit-norm "
                        "embeddings: set clip.loader.normalize=false, with embeddings made by that CLIP")
        if getattr(self.model, "needs_fit", False):
            self.fit_normalizer_from_data()
        codec = getattr(self.model, "codec", None)
        if codec is not None and not codec.is_fitted:
            self.fit_codec_from_data()

    def _train_loader(self):
        source = getattr(self.trainer.fit_loop, "_data_source", None)
        return source.dataloader() if source is not None else self.trainer.datamodule.train_dataloader()

    def _embeddings(self, loader, batches: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(img_emb, txt_emb), each (N, D) float32: up to ``batches`` batches of this rank, gathered across ranks."""
        img, txt = [], []
        for i, batch in enumerate(loader):
            if i >= batches:
                break
            img.append(batch["img_emb"].to(self.device, torch.float32))
            txt.append(batch["txt_emb"].to(self.device, torch.float32))
        return gather_rows(torch.cat(img)), gather_rows(torch.cat(txt))

    @torch.no_grad()
    def fit_codec_from_data(self) -> None:
        """Fit the AR prior's PCA codec on training embeddings (every rank fits the same codec on the same gathered
        rows and seed), copy it into the EMA model, and log what it keeps: explained variance, and reconstruction
        MSE and cosine on training and validation embeddings."""
        img, txt = self._embeddings(self._train_loader(), self.codec_batches)
        stats = self.model.codec.fit(img, txt, seed=0)
        if self.ema is not None:
            self.ema.module.codec.load_state_dict(self.model.codec.state_dict())
        metrics = {f"codec/train_{k}" if k != "explained_variance" else "codec/explained_variance": float(v)
                   for k, v in stats.items()}
        val_loader = self.trainer.datamodule.val_dataloader() if self.trainer.datamodule is not None else None
        if isinstance(val_loader, torch.utils.data.DataLoader):  # [] without val data
            val_img, _ = self._embeddings(val_loader, self.codec_batches)
            metrics.update({f"codec/val_{k}": float(v) for k, v in self.model.codec.reconstruction(val_img).items()})
        log.info("prior: fitted the PCA codec (%d components, %d buckets) on %d training embeddings: %s",
                 self.model.codec.num_components, self.model.codec.num_buckets, img.shape[0],
                 ", ".join(f"{k.split('/')[1]} {v:.4g}" for k, v in metrics.items()))
        for logger in self.loggers:
            logger.log_metrics(metrics, step=self.global_step)

    @torch.no_grad()
    def fit_normalizer_from_data(self) -> None:
        """Fit the model's per-dimension statistics from up to ``normalizer_batches`` training batches per rank
        (sufficient statistics summed across ranks), then copy them into the EMA model."""
        source = getattr(self.trainer.fit_loop, "_data_source", None)
        loader = source.dataloader() if source is not None else self.trainer.datamodule.train_dataloader()
        d = self.model.embed_dim
        count = torch.zeros((), dtype=torch.float64, device=self.device)
        total = torch.zeros(d, dtype=torch.float64, device=self.device)
        total_sq = torch.zeros(d, dtype=torch.float64, device=self.device)
        for i, batch in enumerate(loader):
            if i >= self.normalizer_batches:
                break
            x = batch["img_emb"].to(self.device, torch.float64)
            count += x.shape[0]
            total += x.sum(0)
            total_sq += (x * x).sum(0)
        if self.trainer.world_size > 1:
            count, total, total_sq = (self.all_gather(v).sum(0) for v in (count, total, total_sq))
        self.model.fit_normalizer_from_stats(count, total, total_sq)
        if self.ema is not None:
            for b_ema, b in zip(self.ema.module.buffers(), self.model.buffers()):
                b_ema.copy_(b)
        log.info("prior: fitted the embedding normaliser on %d training embeddings", int(count.item()))

    # ------------------------------------------------------------------ training
    def compute_loss(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        img_emb, txt_emb, tokens, mask = self._inputs(batch)
        return self.model.loss(img_emb, txt_emb, tokens, mask, **self._uncond(self.model))

    # ------------------------------------------------------------------ validation
    def on_validation_epoch_start(self) -> None:
        self._val_outputs = []
        self._sample_now = self._val_runs % self.sample_every_n_val == 0
        if not self.trainer.sanity_checking:
            self._val_runs += 1

    def _generator(self, batch_idx: int) -> torch.Generator:
        """Fixed per-batch seeds: validation noise is the same at every run, so metrics are comparable."""
        g = torch.Generator(device=self.device)
        g.manual_seed(1000003 * self.global_rank + batch_idx)
        return g

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        model = self.eval_model
        img_emb, txt_emb, tokens, mask = self._inputs(batch)
        uncond = self._uncond(model)
        out = model.loss(img_emb, txt_emb, tokens, mask, generator=self._generator(batch_idx), **uncond)
        self.log("val/loss", out["loss"], on_epoch=True, sync_dist=True, batch_size=img_emb.shape[0])
        if self._sample_now and (self.sample_max_batches is None or batch_idx < self.sample_max_batches):
            pred = model.sample(txt_emb, tokens, mask, generator=self._generator(batch_idx),
                                **self.sample_settings.sampler_kwargs(), **uncond)
            self._val_outputs.append((pred.float(), img_emb, txt_emb))

    def on_validation_epoch_end(self) -> None:
        if not self._val_outputs:
            return
        pred, img, txt = (gather_rows(torch.cat(xs)) for xs in zip(*self._val_outputs))  # (sum N_r, D)
        self._val_outputs = []
        metrics = prior_metrics(pred, img, txt)
        self.log_dict({f"val/{k}": v for k, v in metrics.items()}, sync_dist=False, rank_zero_only=False)
