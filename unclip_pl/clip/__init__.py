"""CLIP: the frozen encoder every stage conditions on, the small trainable architecture, and its contrastive loss."""

from unclip_pl.clip.frozen import CLIPLoadError, FrozenCLIP, TextEncoding, load_clip
from unclip_pl.clip.small import build_small_clip, export_clip

__all__ = ["CLIPLoadError", "FrozenCLIP", "TextEncoding", "load_clip", "build_small_clip", "export_clip"]
