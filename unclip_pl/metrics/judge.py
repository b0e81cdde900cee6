"""The CLIPs that score generated images ("judges") in eval.py.

The prior and the decoder are trained on one frozen CLIP's embeddings. Scoring their images with that same CLIP (CLIP
score, caption retrieval, CLIP-space FID, diversity) partly rewards inverting it: a decoder can reproduce the CLIP's
image embedding without drawing what a person, or another CLIP, would recognise. eval.py therefore scores every
CLIP metric once per judge: always the conditioning CLIP (key ``conditioning``) and, when given, a separate evaluation
CLIP (key ``judge``), loaded from

- the path of a CLIP file written by :func:`unclip_pl.clip.small.export_clip` (format ``unclip_pl.clip/1``; the
  architecture comes from the file's ``model_name`` and config), or
- a loader block as for ``clip:`` (``{_target_: unclip_pl.clip.frozen.load_clip, model_name: ..., pretrained: ...}``
  or ``{loader: {...}}``), e.g. an open_clip model by name and tag or an open_clip state dict by
  ``checkpoint``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

CONDITIONING, JUDGE = "conditioning", "judge"
#: column prefix of each judge in results.md
LABELS = {CONDITIONING: "cond", JUDGE: "judge"}


class JudgeError(ValueError):
    """The judge CLIP cannot be loaded; the message says what to give instead."""


@dataclass
class Judge:
    """One scoring CLIP. ``key``: ``conditioning`` or ``judge`` (its metrics' key in results.json)."""

    key: str
    clip: Any
    source: str

    @property
    def label(self) -> str:
        return LABELS.get(self.key, self.key)

    @property
    def model_name(self) -> str:
        return str(getattr(self.clip, "model_name", "") or type(self.clip).__name__)

    @property
    def fingerprint(self) -> str | None:
        return getattr(self.clip, "fingerprint", None)

    def describe(self) -> dict[str, Any]:
        return {"role": self.key, "label": self.label, "model_name": self.model_name,
                "fingerprint": self.fingerprint, "embed_dim": int(getattr(self.clip, "embed_dim", 0)) or None,
                "source": self.source}


def conditioning_judge(clip: Any, source: str = "the CLIP the checkpoints were trained with") -> Judge:
    return Judge(CONDITIONING, clip, source)


def _plain(spec: Any) -> Any:
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(spec, DictConfig):
            return OmegaConf.to_container(spec, resolve=True)
    except ImportError:  # pragma: no cover
        pass
    return spec


def describe_block(block: Mapping[str, Any]) -> str:
    loader = block.get("loader", block) if "_target_" not in block else block
    name = loader.get("model_name", "?")
    if loader.get("checkpoint"):
        return f"{name} from {loader['checkpoint']}"
    if loader.get("pretrained"):
        return f"{name}/{loader['pretrained']}"
    return str(name)


def load_judge(spec: Any, device: str | torch.device = "cpu") -> Judge | None:
    """The separate evaluation CLIP of ``spec`` (see the module docstring), on ``device``; None for None/""."""
    from unclip_pl.clip.frozen import CLIPLoadError, load_clip
    from unclip_pl.clip.small import EXPORT_FORMAT, read_export_header

    spec = _plain(spec)
    if spec is None or spec == "":
        return None
    if isinstance(spec, (str, os.PathLike)):
        path = Path(spec).expanduser()
        if not path.is_file():
            raise JudgeError(f"judge={spec}: no such file. Give the path of a CLIP exported with "
                             f"unclip_pl.clip.small.export_clip, or a loader block "
                             f"judge={{_target_:unclip_pl.clip.frozen.load_clip,model_name:NAME,checkpoint:PATH}}")
        header = read_export_header(path)  # memory-mapped: load_clip below reads the weights once
        if header is None:
            raise JudgeError(
                f"judge={spec} is not an exported CLIP file, or cannot be read (format {EXPORT_FORMAT}, written by "
                f"unclip_pl.clip.small.export_clip). For an open_clip state dict, name the architecture with a "
                f"loader block: judge={{_target_:unclip_pl.clip.frozen.load_clip,model_name:ViT-B-32,"
                f"checkpoint:{spec}}}")
        name = header["model_name"]
        try:
            clip = load_clip(name, checkpoint=path, device=device)
        except CLIPLoadError as e:
            raise JudgeError(f"judge={spec}: {e}") from e
        return Judge(JUDGE, clip, f"{name} from {path}")
    if isinstance(spec, Mapping):
        from unclip_pl.pipeline import load_pipeline_clip

        try:
            clip = load_pipeline_clip(dict(spec))
        except Exception as e:  # noqa: BLE001 -- Hydra wraps the loader's CLIPLoadError in its own exception
            raise JudgeError(f"judge: cannot load the CLIP of the loader block {spec}: {e}") from e
        return Judge(JUDGE, clip.to(device).eval(), describe_block(spec))
    if isinstance(spec, torch.nn.Module):
        return Judge(JUDGE, spec.to(device).eval(), getattr(spec, "model_name", type(spec).__name__))
    raise JudgeError(f"judge: expected null, a file path or a loader block, got {type(spec).__name__}")
