"""LightningModule training the small CLIP contrastively (``python train.py stage=clip``).

Each validation epoch it embeds ALL val samples (gathered across steps and ranks), de-duplicates captions and logs
``val/i2t_top1``, ``val/i2t_top5``, ``val/t2i_top1``, ``val/t2i_top5`` and ``val/loss``. When fit ends, rank 0
exports the weights with ``export_clip`` into the run directory (``export_path``) and, when asked, to ``export_to``
(not when a signal stopped the run to be resumed: the shared copy waits for the run that completes), with a record
of how the CLIP was trained (steps, epochs, val retrieval, data; a run shorter than ``recommended_epochs`` is marked
as a smoke test). ``load_clip(model_name, checkpoint=path)`` gives the frozen CLIP.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from pytorch_lightning.utilities import rank_zero_info

from unclip_pl.callbacks.preemption import stopped_to_resume
from unclip_pl.clip.contrastive import ContrastiveCLIP
from unclip_pl.clip.frozen import text_tower
from unclip_pl.clip.small import DEFAULT_SMALL, describe_training, export_clip
from unclip_pl.lit.base import StageModule
from unclip_pl.metrics.retrieval import caption_groups, clip_retrieval
from unclip_pl.utils.distributed import gather_rows


class CLIPModule(StageModule):
    """Contrastive training of an open_clip CLIP.

    Args:
        model_name: small architecture name (``unclip-tiny``); stored in the export.
        model_cfg: open_clip config overrides: ``embed_dim``, ``vision_cfg`` {image_size, width, layers, patch_size,
            head_width}, ``text_cfg`` {context_length, width, heads, layers, vocab_size}.
        optimizer: partial optimiser (``torch.optim.AdamW``, ``_partial_: true``); called with parameter groups
            (no weight decay on biases, norms, embeddings, logit scale).
        warmup_steps: linear warm-up in optimiser steps.
        lr_schedule: ``"cosine"`` (decay to ``min_lr_ratio`` x lr over the run's estimated steps, when Lightning can
            estimate them) or ``"constant"`` after warm-up.
        export_path: where to write the trained CLIP at fit end (the run directory's ``clip.pt``; None: no export).
        export_to: a second copy, e.g. the shared cache other stages load from (``clip.export_to=...``).
        recommended_epochs: the recommended run length; a run that completes fewer epochs is a smoke test.
        trim_text: tokenise with caption padding trimmed in the loader (exact for causal text towers; cheaper).
        ema_decay: weight EMA (None by default: short runs).
    Batch: ``image`` (B, 3, H, W) in [-1, 1], ``tokens`` (B, L) int64; ``txt`` is not needed (captions are
    de-duplicated by their token ids).
    """

    def __init__(
        self,
        model_name: str = DEFAULT_SMALL,
        model_cfg: dict[str, Any] | None = None,
        optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        warmup_steps: int = 0,
        lr_schedule: str = "cosine",
        min_lr_ratio: float = 0.1,
        export_path: str | None = None,
        trim_text: bool = True,
        ema_decay: float | None = None,
        export_to: str | None = None,
        recommended_epochs: int | None = None,
        run_config: dict[str, Any] | None = None,
    ):
        model = ContrastiveCLIP(model_name, model_cfg, trim_text=trim_text)
        super().__init__(model=model, optimizer=optimizer, warmup_steps=warmup_steps, ema_decay=ema_decay,
                         lr_schedule=lr_schedule, min_lr_ratio=min_lr_ratio, run_config=run_config)
        self.export_path = str(export_path) if export_path else None
        self.export_to = str(export_to) if export_to else None
        self.recommended_epochs = int(recommended_epochs) if recommended_epochs else None
        self._val_outputs: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self._context_length = int(text_tower(model.clip).positional_embedding.shape[0])
        self._gather_pad_to: int | None = None

    # ------------------------------------------------------------------ training
    @property
    def loader_tokenizer(self) -> Any:
        """The data loader's tokenizer: the trained architecture's own, trimming caption padding in the workers."""
        return self.model.loader_tokenizer

    def setup(self, stage: str) -> None:
        # an upper bound on every rank's batch lets the multi-rank feature gather run without host syncs
        batch_size = getattr(getattr(self.trainer, "datamodule", None), "batch_size", None)
        self._gather_pad_to = int(batch_size) if batch_size else None

    def compute_loss(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        return self.model.loss(batch, pad_to=self._gather_pad_to)

    # ------------------------------------------------------------------ validation
    def on_validation_epoch_start(self) -> None:
        self._val_outputs = []

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        model = self.eval_model
        img = model.encode_image(batch["image"])
        txt = model.encode_text(batch["tokens"])
        out = model.contrastive_loss(img, txt, gather=False)
        self.log("val/loss", out["loss"], on_epoch=True, sync_dist=True, batch_size=img.shape[0])
        tokens = batch["tokens"].cpu()  # trimmed per batch by the loader: pad back to one length to concatenate
        tokens = F.pad(tokens, (0, self._context_length - tokens.shape[1]))
        self._val_outputs.append((img.float().cpu(), txt.float().cpu(), tokens))

    def on_validation_epoch_end(self) -> None:
        if not self._val_outputs:
            return
        img = torch.cat([o[0] for o in self._val_outputs])
        txt = torch.cat([o[1] for o in self._val_outputs])
        tokens = torch.cat([o[2] for o in self._val_outputs])
        self._val_outputs = []
        img, txt, tokens = (gather_rows(t) for t in (img, txt, tokens))  # (sum N_r, ...) over ranks, on the CPU
        metrics = clip_retrieval(img, txt, caption_groups(tokens), k=(1, 5))
        # identical on every rank after the gather, so no further sync is needed
        for name, value in metrics.items():
            self.log(f"val/{name}", value, prog_bar=name == "i2t_top1")
        self.log("val/n_samples", float(img.shape[0]))

    # ------------------------------------------------------------------ export
    def training_record(self) -> dict[str, Any]:
        """How this CLIP was trained (see ``unclip_pl.clip.small``): steps, completed epochs, the last val
        retrieval figures, the data's id, and whether the run was shorter than ``recommended_epochs``."""
        trainer = self.trainer
        epochs = int(trainer.current_epoch)  # epochs begun; the last one counts when it reached its last batch
        if epochs and not trainer.fit_loop.epoch_loop.batch_progress.is_last_batch:
            epochs -= 1  # stopped inside it (max_steps, max_time)
        short = self.recommended_epochs is not None and epochs < self.recommended_epochs
        val = {k.split("/", 1)[1]: float(v) for k, v in trainer.callback_metrics.items()
               if k.startswith("val/") and ("top" in k) and torch.is_tensor(v) and v.numel() == 1}
        return {"steps": int(trainer.global_step), "epochs": epochs, "recommended_epochs": self.recommended_epochs,
                "smoke_test": bool(short or trainer.fast_dev_run or trainer.interrupted), "val": val,
                "data": getattr(trainer.datamodule, "data_id", None), "seed": _seed()}

    def export(self, path: str | None = None, record: dict[str, Any] | None = None) -> str | None:
        """Write the (EMA if any) CLIP weights + config + training record with ``export_clip``; returns the path."""
        path = path or self.export_path
        if not path:
            return None
        model = self.eval_model
        export_clip(model.clip, model.model_name, model.model_cfg, path,
                    training=record if record is not None else self.training_record())
        return path

    def on_fit_end(self) -> None:
        if not self.trainer.is_global_zero:
            return
        record = self.training_record()
        paths = [self.export_path, self.export_to]
        if self.export_to and stopped_to_resume(self.trainer):
            # a signal stopped the run to be resumed: the shared copy waits for the run that completes
            rank_zero_info(f"[clip] stopped to be resumed: not exporting to {self.export_to} yet")
            paths = [self.export_path]
        for path in paths:
            if path:
                self.export(path, record)
                rank_zero_info(f"[clip] exported the trained CLIP to {path} ({describe_training(record)}); later "
                               f"stages load it with clip.loader.checkpoint={path}")


def _seed() -> int | None:
    import os

    value = os.environ.get("PL_GLOBAL_SEED")
    return int(value) if value is not None and value.lstrip("-").isdigit() else None
