"""diffusers <-> project bridge for the U-Net stages of Karlo's unCLIP pipeline: the decoder
(``UNet2DConditionModel`` + ``UnCLIPTextProjModel``) and the 64 -> 256 super-resolution stage (two ``UNet2DModel``).

API (diffusers is imported by the caller; these functions only read modules' ``config`` and ``state_dict()``):

- ``decoder_from_diffusers(unet, text_proj) -> (state_dict, net_config, sample_settings)``: ``state_dict`` holds the
  keys of the project's ``Decoder`` model (``unet.*`` and ``clip_null``), ``net_config`` is the ``module.model``
  block of a decoder stage config (``_target_`` dicts, instantiable with ``hydra.utils.instantiate``),
  ``sample_settings`` the stage's ``sample:`` block with the pipeline's defaults (25 ddpm steps, guidance 8).
- ``decoder_to_diffusers(state_dict, net_config) -> (unet_state_dict, unet_config, text_proj_state_dict,
  text_proj_config)``: configs are constructor kwargs of ``UNet2DConditionModel`` / ``UnCLIPTextProjModel``.
- ``superres_from_diffusers(first, last=None) -> (state_dict, net_config)``: Karlo's 256 stage is ONE project
  upsampler with two networks: ``super_res_first`` is ``unet`` (every sampler step but the last) and
  ``super_res_last`` is ``last_unet`` (the final step), keys ``unet.*`` and ``last_unet.*`` of the project's
  ``Upsampler``. Without ``last`` the stage has one network for every step.
- ``superres_to_diffusers(state_dict, net_config) -> (first_state_dict, first_config, last_state_dict | None,
  last_config | None)``: configs are ``UNet2DModel`` constructor kwargs.
"""

from __future__ import annotations

from typing import Any


def decoder_from_diffusers(unet: Any, text_proj: Any) -> tuple[dict, dict, dict]:
    raise NotImplementedError("decoder_from_diffusers is not written yet")


def decoder_to_diffusers(state_dict: dict, net_config: dict) -> tuple[dict, dict, dict, dict]:
    raise NotImplementedError("decoder_to_diffusers is not written yet")


def superres_from_diffusers(first: Any, last: Any = None) -> tuple[dict, dict]:
    raise NotImplementedError("superres_from_diffusers is not written yet")


def superres_to_diffusers(state_dict: dict, net_config: dict) -> tuple[dict, dict, dict | None, dict | None]:
    raise NotImplementedError("superres_to_diffusers is not written yet")
