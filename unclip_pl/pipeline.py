"""The unCLIP inference pipeline: frozen CLIP -> prior -> decoder -> upsamplers (no training code).

Every method takes and returns images as float tensors (B, 3, H, W) in [-1, 1] and embeddings as unit-norm (B, D),
or as CLIP's raw projections with a CLIP of ``normalize=False`` (the stages converted from Karlo, whose prior then
has ``unit_norm=False``; its unconditional branch is the empty caption's encoding, ``uncond="empty_caption"``).

Seeding: every random draw is per item, from a generator seeded with
``unclip_pl.diffusion.seeds.derive_seed(seed, stream, step)``, a hash of the item's seed, the stream (stage
"prior" / "decoder" / "upsampler<j>", purpose x_T or step noise, best-of-N candidate) and the sampler step, so no two
streams share a seed (the first step noise is not x_T again; one stage's noise is not another's). Image i depends only
on seeds[i] and its caption, not on the rest of the batch; a row with one repeated seed shares its noise. Identical
calls give identical images.

Decoder caption input: token ids from ``clip.tokenize`` through the decoder's own text encoder, or the frozen CLIP's
per-token states when the decoder has none (``text_source="clip"``). A caption of ``None`` means "no caption": the
states are masked out exactly as the caption dropout does in training.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from unclip_pl.interp import slerp_path, text_diff_path
from unclip_pl.sample_settings import (
    DecoderSettings,
    PipelineSettings,
    PriorSettings,
    UpsamplerSettings,
    resolve_settings,
)

__all__ = ["DecoderSettings", "PipelineSettings", "PriorSettings", "UnCLIPPipeline", "UpsamplerSettings",
           "load_pipeline_clip", "resolve_settings", "stage_stream"]

Captions = Sequence[str | None]
log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------------------- helpers
def _as_batch(image: torch.Tensor) -> torch.Tensor:
    """(3, H, W) or (B, 3, H, W) -> (B, 3, H, W) float."""
    if image.ndim == 3:
        image = image[None]
    if image.ndim != 4 or image.shape[1] != 3:
        raise ValueError(f"expected an image (3, H, W) or batch (B, 3, H, W), got {tuple(image.shape)}")
    return image.float()


def resize_images(images: torch.Tensor, size: int) -> torch.Tensor:
    """(B, 3, H, W) -> (B, 3, size, size) (antialiased bicubic, clamped to [-1, 1]); identity at that size."""
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    return F.interpolate(images, size=(size, size), mode="bicubic", antialias=True,
                         align_corners=False).clamp(-1, 1)


def default_seeds(n: int, start: int = 0) -> list[int]:
    return [start + i for i in range(n)]


def stage_stream(stage: str, index: int = 0) -> str:
    """The stage name a stage's seeded noise streams are derived under (``unclip_pl.diffusion.seeds``):
    "prior", "decoder", or "upsampler<index>" for the index-th upsampler."""
    if stage not in ("prior", "decoder", "upsampler"):
        raise ValueError(f"unknown stage {stage!r}")
    return f"upsampler{int(index)}" if stage == "upsampler" else stage


# ----------------------------------------------------------------------------------------------------------- pipeline
class UnCLIPPipeline:
    """Frozen CLIP + (optional) prior + decoder + upsamplers, each with its own sampler settings.

    Args:
        clip: ``FrozenCLIP``.
        prior: ``DiffusionPrior`` (any object with the same ``sample`` signature), or None (text_to_image then needs
            ``use_prior=False``: the CLIP text embedding stands in for the image embedding).
        decoder: ``Decoder``.
        upsamplers: ``Upsampler`` objects, run in order.
        settings: ``PipelineSettings`` (or a dict of it): every used stage's sampler settings, in full (there are
            no defaults here; :meth:`from_checkpoints` takes them from each checkpoint's stored ``sample:`` block).
        device: where to run (default: the decoder's device).
        sources: where the stages came from (checkpoint paths, weights used, CLIP), written beside sampled images.
    """

    def __init__(self, clip: nn.Module, prior: nn.Module | None, decoder: nn.Module,
                 upsamplers: Sequence[nn.Module] = (), settings: PipelineSettings | dict | None = None,
                 device: str | torch.device | None = None, sources: dict[str, Any] | None = None):
        self.clip = clip
        self.prior = prior
        self.decoder = decoder
        self.upsamplers = list(upsamplers)
        self.settings = settings if isinstance(settings, PipelineSettings) else PipelineSettings.from_dict(settings)
        self.sources: dict[str, Any] = dict(sources or {})  # where the stages came from (recorded with the images)
        clip_dim = getattr(decoder, "clip_dim", None)
        if clip_dim is not None and int(clip_dim) != int(clip.embed_dim):
            raise ValueError(f"the decoder expects CLIP embeddings of width {clip_dim} but the CLIP has "
                             f"{clip.embed_dim}: use the CLIP the decoder was trained with")
        if prior is not None and getattr(prior, "embed_dim", clip.embed_dim) != clip.embed_dim:
            raise ValueError(f"the prior makes embeddings of width {prior.embed_dim} but the CLIP has "
                             f"{clip.embed_dim}")
        raw_prior = prior is not None and not getattr(prior, "unit_norm", True)
        if prior is not None and raw_prior == getattr(clip, "normalize", True):
            want, have = ("raw", "unit-norm") if raw_prior else ("unit-norm", "raw")
            raise ValueError(f"the prior reads {want} CLIP embeddings but the CLIP gives {have} ones: load it with "
                             f"clip.loader.normalize={'false' if raw_prior else 'true'}")
        if device is None:
            device = next(iter(decoder.parameters())).device
        self.to(device)

    # ------------------------------------------------------------------ construction
    def to(self, device: str | torch.device) -> UnCLIPPipeline:
        self.device = torch.device(device)
        for m in [self.clip, self.prior, self.decoder, *self.upsamplers]:
            if m is not None:
                m.to(self.device).eval()
        return self

    @classmethod
    def from_checkpoints(cls, clip: Any = None, prior: str | None = None, decoder: str | None = None,
                         upsamplers: Sequence[str] = (), settings: PipelineSettings | dict | None = None,
                         which: str = "ema", device: str | torch.device = "cpu") -> UnCLIPPipeline:
        """Load each stage from a Lightning checkpoint or an exported weights file (``unclip_pl.checkpoint``).

        ``clip``: a FrozenCLIP, a ``clip.loader`` config (dict with ``_target_``), or None for the loader stored in
        the decoder's checkpoint (the CLIP the decoder was trained with).
        ``settings``: each stage samples with its checkpoint's stored ``sample:`` block; a dict shaped like
        :class:`PipelineSettings` overrides it key by key (``None`` values keep the stored ones); a
        ``PipelineSettings`` replaces it.
        """
        from unclip_pl.checkpoint import CheckpointError, load_stage

        if decoder is None:
            raise ValueError("a decoder checkpoint is required")
        # stage=: a checkpoint of another stage, or one that cannot be read, is a CheckpointError naming the stage
        dec = load_stage(decoder, which=which, stage="decoder")
        pri = load_stage(prior, which=which, stage="prior") if prior else None
        ups = [load_stage(p, which=which, stage="upsampler") for p in (upsamplers or [])]
        clip_model = load_pipeline_clip(clip, dec)
        # raw CLIP projections (Karlo's stages) vs unit-norm embeddings: the CLIP must give what the stages read
        stored = ((getattr(dec, "clip", None) or {}).get("loader") or {}).get("normalize", True)
        wants = [(f"the decoder checkpoint {decoder}", bool(stored))]
        if pri is not None:
            wants.append((f"the prior checkpoint {prior}", getattr(pri.model, "unit_norm", True)))
        for what, unit in wants:
            if unit != bool(getattr(clip_model, "normalize", True)):
                raise CheckpointError(f"{what} reads {'unit-norm CLIP embeddings' if unit else 'raw CLIP projections'}"
                                      f" but the CLIP gives {'raw' if unit else 'unit-norm'} ones: give the CLIP "
                                      f"normalize: {'true' if unit else 'false'} (clip.loader.normalize)")
        if not isinstance(settings, PipelineSettings):
            settings = resolve_settings(settings, pri.sample if pri is not None else None, dec.sample,
                                        [u.sample for u in ups])
        sources = {"prior": prior, "decoder": decoder, "upsamplers": list(upsamplers or []), "which": which,
                   "clip": getattr(clip_model, "model_name", None),
                   "clip_fingerprint": getattr(clip_model, "fingerprint", None)}
        return cls(clip_model, pri.model if pri is not None else None, dec.model, [u.model for u in ups], settings,
                   device=device, sources=sources)

    @property
    def image_size(self) -> int:
        """Side of the final images (after every upsampler)."""
        size = int(self.decoder.image_size)
        for up in self.upsamplers:
            size = int(up.image_size)
        return size

    # ------------------------------------------------------------------ CLIP
    @torch.no_grad()
    def encode_text(self, captions: Sequence[str]):
        """captions -> ``TextEncoding`` (emb (B, D), tokens (B, L', W), mask (B, L'))."""
        return self.clip.encode_text(self.clip.tokenize(list(captions)).to(self.device))

    @torch.no_grad()
    def embed_images(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) or (3, H, W) in [-1, 1] -> (B, D) CLIP image embeddings (unit norm unless the CLIP's
        ``normalize`` is False)."""
        return self.clip.encode_image(_as_batch(images).to(self.device)).float()

    @torch.no_grad()
    def embed_texts(self, captions: Sequence[str]) -> torch.Tensor:
        """captions -> (B, D) CLIP text embeddings (unit norm unless the CLIP's ``normalize`` is False)."""
        return self.encode_text(captions).emb.float()

    # ------------------------------------------------------------------ prior
    @torch.no_grad()
    def prior_embeddings(self, captions: Sequence[str], seeds: Sequence[int] | None = None) -> torch.Tensor:
        """Sample z_i for each caption with the prior: (B, D) unit norm. ``seeds``: one per caption (default
        0..B-1); caption i's candidates draw from seeds[i]'s "prior" streams."""
        if self.prior is None:
            raise ValueError("this pipeline has no prior: give a prior checkpoint, or use the CLIP text embedding "
                             "(use_prior=False)")
        if self.settings.prior is None:
            raise ValueError("no prior sampler settings: give settings={'prior': {...}}")
        s = self.settings.prior
        enc = self.encode_text(captions)
        empty = {}
        if getattr(self.prior, "uncond", "learned") == "empty_caption":  # Karlo's prior guides against ""
            e = self.encode_text([""])
            empty = {"uncond_text": (e.tokens.float(), e.mask.bool(), e.emb.float())}
        out = []
        bs = max(1, self.settings.batch_size)
        seeds = list(seeds) if seeds is not None else default_seeds(len(captions))
        if len(seeds) != len(captions):
            raise ValueError(f"{len(captions)} captions but {len(seeds)} seeds")
        for i in range(0, len(captions), bs):
            sl = slice(i, i + bs)
            out.append(self.prior.sample(enc.emb[sl], enc.tokens[sl], enc.mask[sl], **s.sampler_kwargs(),
                                         seeds=seeds[sl], stream=stage_stream("prior"), **empty).float())
        return torch.cat(out)

    # ------------------------------------------------------------------ decoder
    @torch.no_grad()
    def _caption_states(self, captions: Captions) -> tuple[torch.Tensor, torch.Tensor]:
        """Decoder context for captions (None = no caption; the empty caption for a decoder whose unconditional
        branch sees it, Karlo's): (states (B, S, C), mask (B, S) bool)."""
        texts = [c if c is not None else "" for c in captions]
        tokens = self.clip.tokenize(texts).to(self.device)
        if getattr(self.decoder, "text_encoder", None) is not None:
            states, mask = self.decoder.encode_text(tokens)
        else:
            enc = self.clip.encode_text(tokens)
            states, mask = enc.tokens.float(), enc.mask
        if getattr(self.decoder, "takes_text_emb", False):
            return states, mask.bool()
        keep = torch.tensor([c is not None for c in captions], dtype=torch.bool, device=self.device)
        return states, mask.bool() & keep[:, None]

    @torch.no_grad()
    def _pooled_text(self, captions: Captions) -> dict[str, Any]:
        """For a decoder that adds CLIP's pooled text embedding to its time embedding (Karlo's): ``text_emb`` (B, D)
        of the captions (None entries: the empty caption) and ``uncond_text``, the encoding of the empty caption its
        unconditional branch sees. Other decoders: {}."""
        if not getattr(self.decoder, "takes_text_emb", False):
            return {}
        texts = [c if c is not None else "" for c in captions]
        emb = self.clip.encode_text(self.clip.tokenize(texts).to(self.device)).emb.float()
        empty = self.clip.encode_text(self.clip.tokenize([""]).to(self.device))
        return {"text_emb": emb, "uncond_text": (empty.tokens.float(), empty.mask.bool(), empty.emb.float())}

    @torch.no_grad()
    def decode(self, z_i: torch.Tensor, captions: Captions | None = None, seeds: Sequence[int] | None = None,
               x_T: torch.Tensor | None = None, guidance_scale: float | None = None, eta: float | None = None,
               upsample: bool = True, sampler: str | None = None, steps: Any = None) -> torch.Tensor:
        """Decode image embeddings, then run the upsamplers.

        Args:
            z_i: (B, D) CLIP image embeddings (any norm; used as given).
            captions: B captions (None entries, or None for all: no caption).
            seeds: B per-image seeds (default 0..B-1) of the starting noise and of the stochastic samplers' step
                noise (only the latter where ``x_T`` is given).
            x_T: optional (B, 3, S, S) starting noise of the decoder (e.g. a DDIM inversion).
            guidance_scale / eta / sampler / steps: override the decoder settings for this call.
        Returns:
            (B, 3, S', S') in [-1, 1], S' = :attr:`image_size` when ``upsample`` else the decoder's size.
        """
        z_i = z_i.to(self.device).float()
        b = z_i.shape[0]
        captions = list(captions) if captions is not None else [None] * b
        if len(captions) != b:
            raise ValueError(f"{b} embeddings but {len(captions)} captions")
        seeds = list(seeds) if seeds is not None else default_seeds(b)
        if len(seeds) != b:
            raise ValueError(f"{b} embeddings but {len(seeds)} seeds")
        given = dict(steps=steps, sampler=sampler, eta=eta, guidance_scale=guidance_scale)
        kwargs = {**self.settings.decoder.sampler_kwargs(), **{k: v for k, v in given.items() if v is not None}}
        bs = max(1, self.settings.batch_size)
        out = []
        for i in range(0, b, bs):
            sl = slice(i, i + bs)
            text = self._caption_states(captions[sl])
            x_T_sl = x_T[sl].to(self.device) if x_T is not None else None  # else drawn per image from its seed
            out.append(self.decoder.sample(z_i[sl], text=text, **kwargs, seeds=seeds[sl], x_T=x_T_sl,
                                           progress=self.settings.progress, stream=stage_stream("decoder"),
                                           **self._pooled_text(captions[sl])).float())
        images = torch.cat(out)
        return self.upsample(images, seeds) if upsample else images

    @torch.no_grad()
    def upsample(self, images: torch.Tensor, seeds: Sequence[int] | None = None) -> torch.Tensor:
        """Run every upsampler in order: (B, 3, s, s) -> (B, 3, S, S). Each upsampler's input is first resized to
        its ``low_res_size`` when it differs; upsampler j draws its noise from the seeds' "upsampler<j>" streams."""
        seeds = list(seeds) if seeds is not None else default_seeds(images.shape[0])
        bs = max(1, self.settings.batch_size)
        for j, up in enumerate(self.upsamplers):
            s = self.settings.upsampler(j)
            low = resize_images(images, int(up.low_res_size))
            parts = []
            for i in range(0, low.shape[0], bs):
                parts.append(up.sample(low[i:i + bs], **s.sampler_kwargs(), seeds=seeds[i:i + bs],
                                       stream=stage_stream("upsampler", j), progress=self.settings.progress).float())
            images = torch.cat(parts)
        return images

    # ------------------------------------------------------------------ modes
    @torch.no_grad()
    def text_to_image(self, captions: Sequence[str], n_per_caption: int = 1, seeds: Sequence[int] | None = None,
                      use_prior: bool = True, return_embeddings: bool = False):
        """Captions -> images, ``n_per_caption`` each, grouped by caption: (len(captions) * n, 3, S, S).

        ``use_prior=False``: the CLIP text embedding is used as the image embedding (the paper's "no prior"
        baseline). ``seeds``: one per output image (default 0..N-1). With ``return_embeddings`` returns
        (images, z_i (N, D)).
        """
        rep = [c for c in captions for _ in range(n_per_caption)]
        seeds = list(seeds) if seeds is not None else default_seeds(len(rep))
        if len(seeds) != len(rep):
            raise ValueError(f"{len(rep)} images requested but {len(seeds)} seeds given")
        if use_prior:
            z_i = self.prior_embeddings(rep, seeds)
        else:
            z_i = self.embed_texts(rep)
        images = self.decode(z_i, rep, seeds)
        return (images, z_i) if return_embeddings else images

    @torch.no_grad()
    def variations(self, image: torch.Tensor, n: int = 4, invert: bool = False, eta: float | None = None,
                   seeds: Sequence[int] | None = None, caption: str | None = None) -> torch.Tensor:
        """n decodes of one image's CLIP embedding: (n, 3, S, S).

        ``invert=True`` (the paper's variations): invert the image (at the decoder's size) with deterministic DDIM
        under the decoder, conditioned on its embedding and ``caption``, to x_T; then sample every variation back
        from that x_T with DDIM and ``eta`` (default ``settings.decoder.variation_eta`` > 0), so that samples differ
        but stay close to the input (eta = 0 reconstructs it). Both directions use the same DDIM schedule
        (``settings.decoder.invert_steps``), the same guided model function (``settings.decoder.guidance_scale``)
        and the same x0 clipping, whatever the decoder's configured sampler. Otherwise fresh noise per seed with the
        decoder's own sampler and eta.
        """
        image = _as_batch(image)[:1].to(self.device)
        z = self.embed_images(image).expand(n, -1)
        seeds = list(seeds) if seeds is not None else default_seeds(n)
        captions = [caption] * n
        if not invert:
            return self.decode(z, captions, seeds, eta=eta)
        s = self.settings.decoder
        if s.invert_steps is None or (eta is None and s.variation_eta is None):
            raise ValueError("variations with invert=True need settings.decoder.invert_steps and variation_eta (or "
                             "eta=...): set them in the decoder's sample: block or as overrides")
        x0 = resize_images(image, int(self.decoder.image_size))
        text = self._caption_states([caption])
        x_T = self.decoder.invert(x0, z[:1], text=text, steps=s.invert_steps, guidance_scale=s.guidance_scale,
                                  **self._pooled_text([caption]))
        return self.decode(z, captions, seeds, x_T=x_T.expand(n, -1, -1, -1), sampler="ddim", steps=s.invert_steps,
                           guidance_scale=s.guidance_scale, eta=s.variation_eta if eta is None else eta)

    @torch.no_grad()
    def interpolate(self, img_a: torch.Tensor, img_b: torch.Tensor, k: int = 8, seed: int = 0,
                    caption: str | None = None) -> torch.Tensor:
        """Decode slerp(z_a, z_b, t) for k evenly spaced t in [0, 1], one fixed decoder seed: (k, 3, S, S)."""
        z = torch.cat([self.embed_images(img_a)[:1], self.embed_images(img_b)[:1]])
        path = slerp_path(z[0], z[1], k)  # (k, D)
        return self.decode(path, [caption] * k, [seed] * k)

    @torch.no_grad()
    def text_diff(self, image: torch.Tensor, caption: str, new_caption: str,
                  thetas: Sequence[float] = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5), seed: int = 0,
                  decode_caption: str | None = None) -> torch.Tensor:
        """Decode slerp(z_i, normalise(z_t_new - z_t_old), theta) for each theta, one fixed seed: (T, 3, S, S).

        ``decode_caption``: caption given to the decoder (default none: the edit comes from the embedding only)."""
        z_i = self.embed_images(image)[0]
        z_t = self.embed_texts([caption, new_caption])
        path = text_diff_path(z_i, z_t[0], z_t[1], thetas)  # (T, D)
        return self.decode(path, [decode_caption] * len(thetas), [seed] * len(thetas))

    @torch.no_grad()
    def conditioning_ablation(self, captions: Sequence[str], seeds: Sequence[int] | None = None
                              ) -> dict[str, torch.Tensor]:
        """Paper figure 7, the same decoder and seeds, captions given to the decoder in every row:
        ``caption_only``: no CLIP embedding, i.e. the decoder's null embedding (what it was trained with in place of
        a dropped embedding: zeros with ``null_clip: zeros``, as the paper's decoder, else its learned null);
        ``text_emb``: the CLIP text embedding as the image embedding; ``prior``: a prior-sampled image embedding
        (when there is a prior). Each (B, 3, S, S)."""
        captions = list(captions)
        seeds = list(seeds) if seeds is not None else default_seeds(len(captions))
        z_t = self.embed_texts(captions)
        null = self.decoder.null_clip_emb(len(captions)).to(device=z_t.device, dtype=z_t.dtype)
        rows = {"caption_only": self.decode(null, captions, seeds),
                "text_emb": self.decode(z_t, captions, seeds)}
        if self.prior is not None:
            rows["prior"] = self.decode(self.prior_embeddings(captions, seeds), captions, seeds)
        return rows

    @torch.no_grad()
    def guidance_sweep(self, z_i: torch.Tensor, captions: Captions | None, scales: Sequence[float],
                       seeds: Sequence[int] | None = None) -> torch.Tensor:
        """Paper figure 8: the same z_i (B, D) and seeds decoded at each guidance scale: (len(scales), B, 3, S, S)."""
        return torch.stack([self.decode(z_i, captions, seeds, guidance_scale=float(g)) for g in scales])

    @torch.no_grad()
    def probe(self, image: torch.Tensor, labels: Sequence[str]) -> torch.Tensor:
        """CLIP zero-shot label probabilities for one image: softmax over labels of logit_scale * cos:
        (len(labels),)."""
        z_i = self.embed_images(image)[:1]
        z_t = self.embed_texts(labels)
        scale = getattr(getattr(self.clip, "model", None), "logit_scale", None)
        scale = float(scale.exp()) if isinstance(scale, torch.Tensor) else 100.0
        return torch.softmax(scale * (z_i @ z_t.T)[0], dim=-1).cpu()


def _find_stored_clip(path: str, stage_path: str | None) -> str:
    """The CLIP file a stage checkpoint names. A relative name is relative to the directory the stage was trained
    in; when it does not exist from here, it is looked for under each folder above the checkpoint file (the
    training directory holds its run folders), so sampling works from any directory. Returns ``path`` unchanged
    when it exists or nothing is found (the loader then says which file is missing)."""
    if os.path.isabs(path) or os.path.exists(path) or not stage_path:
        return path
    for parent in Path(stage_path).resolve().parents:
        if (parent / path).is_file():
            log.info("CLIP %s (relative to the training directory) found at %s", path, parent / path)
            return str(parent / path)
    return path


def load_pipeline_clip(clip: Any, decoder: Any = None):
    """A FrozenCLIP from: a FrozenCLIP (returned as is), a loader config (``_target_`` dict / DictConfig), or None
    (the ``clip.loader`` stored with the decoder checkpoint, ``decoder``: a ``LoadedStage``)."""
    if clip is not None and isinstance(clip, nn.Module):
        return clip
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate
    from omegaconf import DictConfig, OmegaConf

    from unclip_pl.checkpoint import CheckpointError
    from unclip_pl.clip.frozen import CLIPLoadError

    if isinstance(clip, DictConfig):
        clip = OmegaConf.to_container(clip, resolve=True)
    where = "the CLIP given with clip=" if clip is not None else (
        f"the CLIP of the decoder checkpoint {getattr(decoder, 'path', '?')}")
    if clip is None:
        clip_cfg = getattr(decoder, "clip", None)
        if not clip_cfg or "loader" not in clip_cfg:
            raise ValueError("no CLIP given and the decoder checkpoint stores no clip.loader config: pass clip=...")
        clip = dict(clip_cfg["loader"])
        if clip.get("checkpoint"):
            clip["checkpoint"] = _find_stored_clip(str(clip["checkpoint"]), getattr(decoder, "path", None))
        expect = {k: clip_cfg.get(k) for k in ("embed_dim", "text_width", "context_length", "image_size")}
        clip.update({k: v for k, v in expect.items() if v is not None})
    if isinstance(clip, dict) and "loader" in clip and "_target_" not in clip:
        clip = clip["loader"]
    try:
        return instantiate(clip)
    except InstantiationException as e:  # a missing or unfit CLIP file: one sentence naming it, not Hydra's wrapper
        if isinstance(e.__cause__, CLIPLoadError):
            reason = str(e.__cause__).split(". Pass ")[0]
            raise CheckpointError(f"{where}: {reason} (pass another CLIP with clip=..., see conf/sample.yaml)") \
                from None
        raise
