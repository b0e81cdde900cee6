"""Converters between diffusers' unCLIP components (Karlo's ``UnCLIPPipeline`` layout) and this project's stages.

``python -m unclip_pl.convert from-diffusers PIPELINE_DIR OUT_DIR`` writes one weights file per stage (the
:func:`unclip_pl.checkpoint.export_weights` format, which ``sample.py``, ``eval.py`` and ``train.py init_from=`` read)
plus the sampler settings the pipeline used; ``to-diffusers IN_DIR OUT_DIR`` writes the components back. One module
per component: :mod:`unclip_pl.convert.prior` (``PriorTransformer``) and :mod:`unclip_pl.convert.unet` (the decoder
with its text projection, and the super-resolution UNets).

diffusers is an optional dependency (``pip install -e ".[diffusers]"``), imported only here, never by
``unclip_pl.nets`` or the rest of the project.
"""

from __future__ import annotations


class ConvertError(RuntimeError):
    """Input the converter cannot use; the message is one line saying what and where."""


def require_diffusers():
    """The ``diffusers`` module, or a one-line :class:`ConvertError` saying how to install it."""
    try:
        import diffusers
    except ImportError:
        raise ConvertError('the converter needs diffusers: pip install -e ".[diffusers]"') from None
    return diffusers
