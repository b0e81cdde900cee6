"""Sampler settings of the stages: one source, the stage's ``sample:`` config block.

Each stage config (``conf/prior|decoder|upsampler/*.yaml``) has a ``sample:`` block (steps, sampler, eta, guidance
scale, best-of); the lit modules take it as ``sample: ${<stage>.sample}`` for their validation samples, and the run
config that holds it is stored in every checkpoint (``checkpoint["cfg"]``). The pipeline samples a loaded stage with
its stored block, overridden key by key only by what the user sets explicitly (``settings.<stage>.<key>=...`` of
``sample.py`` / ``eval.py``; ``None`` = keep the stored value). Nothing else holds a default.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any

from unclip_pl.diffusion import get_sampler


@dataclass
class _StageSettings:
    def __post_init__(self):
        get_sampler(self.sampler)  # an unknown name fails here, in one line listing the valid ones

    def sampler_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of the stage model's ``sample`` (the settings it takes)."""
        return {k: getattr(self, k) for k in self.MODEL_KEYS}

    @classmethod
    def from_block(cls, block: dict[str, Any] | None) -> _StageSettings:
        """From a ``sample:``-shaped dict: an unknown key, or a missing or null required one, is a one-line
        ValueError naming the stage and the keys."""
        block = dict(_plain(block) or {})
        names = [f.name for f in fields(cls)]
        stage = cls.__name__.replace("Settings", "").lower()
        bad = sorted(set(block) - set(names))
        if bad:
            raise ValueError(f"unknown {stage} sampler setting(s) {bad}; valid: {names}")
        required = [f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING]
        missing = [k for k in required if block.get(k) is None]
        if missing:
            how = "settings.upsamplers=[{...}]" if stage == "upsampler" else f"settings.{stage}.<key>=..."
            raise ValueError(f"{stage} sampler setting(s) {missing} not given: set them in the stage's sample: "
                             f"block or with {how}")
        return cls(**{k: v for k, v in block.items() if v is not None or k not in required})


@dataclass
class PriorSettings(_StageSettings):
    """Diffusion prior sampling (paper: 64 steps, best of 2 by the dot product with z_t)."""
    steps: Any
    sampler: str
    eta: float
    guidance_scale: float
    best_of: int
    MODEL_KEYS = ("steps", "sampler", "eta", "guidance_scale", "best_of")


@dataclass
class ARPriorSettings:
    """Autoregressive prior sampling: classifier-free guidance on the logits, ``temperature``, ``top_k`` / ``top_p``
    truncation of each code's distribution (None = off), ``dot_fraction`` (the dot-product token is drawn from the
    top fraction of its distribution; paper: the top half) and best-of-N by the dot product with z_t."""
    guidance_scale: float
    temperature: float
    top_k: int | None
    top_p: float | None
    dot_fraction: float
    best_of: int
    MODEL_KEYS = ("guidance_scale", "temperature", "top_k", "top_p", "dot_fraction", "best_of")
    OPTIONAL = ("top_k", "top_p")

    def sampler_kwargs(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.MODEL_KEYS}

    @classmethod
    def from_block(cls, block: dict[str, Any] | None) -> ARPriorSettings:
        """From the AR prior's ``sample:`` block: an unknown key, or a missing required one, is a one-line error."""
        block = dict(_plain(block) or {})
        names = [f.name for f in fields(cls)]
        bad = sorted(set(block) - set(names))
        if bad:
            raise ValueError(f"unknown ar prior sampler setting(s) {bad}; valid: {names}")
        missing = [k for k in names if k not in cls.OPTIONAL and block.get(k) is None]
        if missing:
            raise ValueError(f"ar prior sampler setting(s) {missing} not given: set them in the stage's sample: "
                             f"block or with settings.prior.<key>=...")
        return cls(**{k: block.get(k) for k in names})


def prior_settings(block: dict[str, Any] | None) -> PriorSettings | ARPriorSettings:
    """The settings of either prior, told apart by their keys: the AR prior's block has ``temperature``, the
    diffusion prior's ``steps``."""
    block = _plain(block) or {}
    if "temperature" in block and "steps" in block:
        raise ValueError("prior sampler settings of both kinds given: the diffusion prior takes steps, sampler, eta, "
                         "guidance_scale, best_of; the AR prior guidance_scale, temperature, top_k, top_p, "
                         "dot_fraction, best_of")
    return (ARPriorSettings if "temperature" in block else PriorSettings).from_block(block)


@dataclass
class DecoderSettings(_StageSettings):
    """Decoder sampling (paper: 250 strided steps; DDIM with far fewer is fine). Variations from the image's DDIM
    inversion run DDIM both ways, whatever ``sampler`` is: ``invert_steps`` steps in each direction and
    ``variation_eta`` for the way back (paper: DDIM with eta > 0; eta = 0 reconstructs the image); None = not set
    (only ``variations(invert=True)`` needs them)."""
    steps: Any
    sampler: str
    eta: float
    guidance_scale: float
    invert_steps: Any = None
    variation_eta: float | None = None
    MODEL_KEYS = ("steps", "sampler", "eta", "guidance_scale")


@dataclass
class UpsamplerSettings(_StageSettings):
    """Upsampler sampling (paper: DDIM 27 and 15 steps)."""
    steps: Any
    sampler: str
    eta: float
    MODEL_KEYS = ("steps", "sampler", "eta")


@dataclass
class PipelineSettings:
    """Every stage's settings; ``prior`` None = no prior; one entry per upsampler (missing ones repeat the last)."""
    decoder: DecoderSettings
    prior: PriorSettings | ARPriorSettings | None = None
    upsamplers: list[UpsamplerSettings] = field(default_factory=list)
    #: images per decoder/upsampler forward batch
    batch_size: int = 16
    progress: bool = False

    @classmethod
    def from_dict(cls, d: dict[str, Any] | Any) -> PipelineSettings:
        """Build from a plain dict / DictConfig shaped like this class (unknown keys raise, naming them)."""
        d = dict(_plain(d) or {})
        if d.get("decoder") is None:
            raise ValueError("no decoder sampler settings: give settings={'decoder': {...}} or load checkpoints")
        prior = d.pop("prior", None)
        out = cls(decoder=DecoderSettings.from_block(d.pop("decoder")),
                  prior=prior_settings(prior) if prior is not None else None,
                  upsamplers=[UpsamplerSettings.from_block(u) for u in (d.pop("upsamplers", None) or [])])
        for key in ("batch_size", "progress"):
            if d.get(key) is not None:
                setattr(out, key, d.pop(key))
        if any(v is not None for v in d.values()):
            raise ValueError(f"unknown pipeline setting(s) {sorted(d)}")
        return out

    def upsampler(self, i: int) -> UpsamplerSettings:
        if not self.upsamplers:
            raise ValueError("no upsampler sampler settings: give settings={'upsamplers': [{...}]}")
        return self.upsamplers[min(i, len(self.upsamplers) - 1)]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _plain(d: Any) -> Any:
    if d is None or isinstance(d, dict):
        return d
    from omegaconf import OmegaConf

    return OmegaConf.to_container(d, resolve=True)


def resolve_settings(overrides: dict[str, Any] | Any, prior: dict[str, Any] | None, decoder: dict[str, Any],
                     upsamplers: Sequence[dict[str, Any]]) -> PipelineSettings:
    """Settings = each stage's stored ``sample:`` block (``prior`` None = no prior), overridden key by key by
    ``overrides`` (shaped like :class:`PipelineSettings`; ``None`` values keep the stored value; the upsampler
    overrides are one per upsampler, the last repeating)."""
    overrides = dict(_plain(overrides) or {})

    def merged(stored: dict | None, over: dict | None) -> dict:
        return {**dict(stored or {}), **{k: v for k, v in dict(over or {}).items() if v is not None}}

    up_over = list(overrides.pop("upsamplers", None) or [])
    ups = [merged(block, up_over[min(i, len(up_over) - 1)] if up_over else None) for i, block in enumerate(upsamplers)]
    prior_over = overrides.pop("prior", None)
    d = {"decoder": merged(decoder, overrides.pop("decoder", None)),
         "prior": merged(prior, prior_over) if prior is not None else None,
         "upsamplers": ups}
    d.update({k: v for k, v in overrides.items() if v is not None})
    return PipelineSettings.from_dict(d)
