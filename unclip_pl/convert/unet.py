"""diffusers <-> project bridge for the U-Net stages of Karlo's unCLIP pipeline: the decoder
(``UNet2DConditionModel`` + ``UnCLIPTextProjModel``) and the 64 -> 256 super-resolution stage (two ``UNet2DModel``).

API (diffusers is never imported here: the functions read the modules' ``config`` and ``state_dict()``, and give
back plain state dicts and constructor kwargs):

- ``decoder_from_diffusers(unet, text_proj) -> (state_dict, net_config, sample_settings)``: ``state_dict`` holds the
  keys of the project's ``Decoder`` model (``unet.*`` and ``clip_null``), ``net_config`` is the ``module.model``
  block of a decoder stage config (``_target_`` dicts, instantiable with ``hydra.utils.instantiate``; as in
  ``conf/decoder/karlo.yaml``), ``sample_settings`` the stage's ``sample:`` block with the pipeline's defaults
  (25 ancestral steps, guidance scale 8).
- ``decoder_to_diffusers(state_dict, net_config) -> (unet_state_dict, unet_config, text_proj_state_dict,
  text_proj_config)``: the configs are constructor kwargs of ``UNet2DConditionModel`` / ``UnCLIPTextProjModel``.
- ``superres_from_diffusers(first, last=None, low_res_size=64) -> (state_dict, net_config)``: Karlo's 256 stage is
  ONE project upsampler with two networks. ``super_res_first`` becomes ``unet`` (every sampler step but the last)
  and ``super_res_last`` becomes ``last_unet`` (the final step only), keys ``unet.*`` and ``last_unet.*`` of the
  project's ``Upsampler`` (``unclip_pl.models.upsampler``); without ``last`` one network runs every step.
- ``superres_to_diffusers(state_dict, net_config) -> (first_state_dict, first_config, last_state_dict | None,
  last_config | None)``: the configs are ``UNet2DModel`` constructor kwargs.
- ``SUPERRES_SAMPLE``: the 256 stage's ``sample:`` block with the pipeline's default (7 ancestral steps).

The mapping is exact, not an approximation: every project tensor is a diffusers tensor, a concatenation of them
(the attention's q/k/v and the added k/v) or a row permutation (the CLIP-token projection), so both directions
reproduce every tensor bit for bit. Karlo's conditioning (``text_proj``) maps onto the project's U-Net as: image
embedding -> time embedding (``clip_to_time``), CLIP text embedding -> time embedding (``text_to_time``), image
embedding -> 4 extra context tokens (``clip_to_tokens``), caption states -> Linear + LayerNorm
(``context_proj``/``context_norm``), the learned guidance embedding -> ``clip_null``. Anything outside Karlo's
layout (other block types, attention heads, embeddings) is a one-line ValueError naming the fields.
"""

from __future__ import annotations

from typing import Any

import torch

UNET_TARGET = "unclip_pl.nets.unet.UNet"
DECODER_TARGET = "unclip_pl.models.decoder.Decoder"
UPSAMPLER_TARGET = "unclip_pl.models.upsampler.Upsampler"

#: sampler settings of Karlo's pipeline (``UnCLIPPipeline.__call__`` defaults) in the stages' ``sample:`` form; the
#: UnCLIPScheduler's loop is ancestral sampling over ``round(i * 999 / (N - 1))``, i.e. ddpm with ``steps: N``
DECODER_SAMPLE = {"steps": 25, "sampler": "ddpm", "eta": 0.0, "guidance_scale": 8.0, "invert_steps": 25,
                  "variation_eta": 0.5}
SUPERRES_SAMPLE = {"steps": 7, "sampler": "ddpm", "eta": 0.0}

# Fields of the diffusers configs that the project's U-Net expresses only at these values.
_DECODER_FIXED = {
    "center_input_sample": False, "flip_sin_to_cos": True, "freq_shift": 0, "act_fn": "silu",
    "mid_block_type": "UNetMidBlock2DSimpleCrossAttn", "class_embed_type": "identity", "encoder_hid_dim": None,
    "encoder_hid_dim_type": None, "addition_embed_type": None, "num_class_embeds": None,
    "time_embedding_type": "positional", "time_embedding_act_fn": None, "timestep_post_act": None,
    "time_cond_proj_dim": None, "resnet_skip_time_act": False, "resnet_out_scale_factor": 1.0,
    "mid_block_scale_factor": 1, "conv_in_kernel": 3, "conv_out_kernel": 3, "only_cross_attention": False,
    "cross_attention_norm": None, "dual_cross_attention": False, "class_embeddings_concat": False,
    "mid_block_only_cross_attention": None, "transformer_layers_per_block": 1, "num_attention_heads": None,
    "attention_type": "default", "reverse_transformer_layers_per_block": None,
}
_SUPERRES_FIXED = {
    "center_input_sample": False, "time_embedding_type": "positional", "flip_sin_to_cos": True, "freq_shift": 0,
    "act_fn": "silu", "mid_block_type": "UNetMidBlock2D", "add_attention": False, "class_embed_type": None,
    "num_class_embeds": None, "mid_block_scale_factor": 1,
}
_ATTN_DOWN, _RES_DOWN = "SimpleCrossAttnDownBlock2D", "ResnetDownsampleBlock2D"
_ATTN_UP, _RES_UP = "SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"


# --------------------------------------------------------------------------------------------------------- helpers
def _config(module: Any) -> dict[str, Any]:
    cfg = getattr(module, "config", module)
    return {k: v for k, v in dict(cfg).items() if not k.startswith("_")}


def _state(module: Any) -> dict[str, torch.Tensor]:
    sd = module.state_dict() if hasattr(module, "state_dict") else module
    return {k: v.detach().cpu() for k, v in sd.items()}


def _check_fixed(cfg: dict[str, Any], fixed: dict[str, Any], what: str) -> None:
    bad = [f"{k}={cfg[k]!r} (supported: {v!r})" for k, v in fixed.items() if k in cfg and cfg[k] != v
           and not (isinstance(v, (int, float)) and not isinstance(v, bool) and isinstance(cfg[k], (int, float))
                    and float(cfg[k]) == float(v))]
    if bad:
        raise ValueError(f"{what}: this layout is not one the project's U-Net expresses: {', '.join(bad)}")


def _single(value: Any, name: str, what: str) -> Any:
    """A per-block config value that must be the same for every block (an int, or a list of one value)."""
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise ValueError(f"{what}: {name}={list(value)} differs between blocks; the project's U-Net takes one")
        return value[0]
    return value


def _unet_kwargs(cfg: dict[str, Any], what: str) -> dict[str, Any]:
    """The project UNet kwargs shared by both kinds (channels, levels, norms, time embedding)."""
    boc = [int(c) for c in cfg["block_out_channels"]]
    base = boc[0]
    if any(c % base for c in boc):
        raise ValueError(f"{what}: block_out_channels {boc} are not multiples of the first one")
    if cfg.get("norm_num_groups", 32) is None:
        raise ValueError(f"{what}: norm_num_groups=None (no output norm) is not a layout the project's U-Net has")
    groups = int(cfg.get("norm_num_groups", 32))
    if any(c % groups for c in boc):
        raise ValueError(f"{what}: block_out_channels {boc} are not divisible by norm_num_groups={groups}")
    if cfg.get("time_embedding_dim") not in (None, 4 * base):
        raise ValueError(f"{what}: time_embedding_dim={cfg['time_embedding_dim']} (the project's U-Net uses "
                         f"4 * block_out_channels[0] = {4 * base})")
    shift = cfg.get("resnet_time_scale_shift", "default")
    if shift not in ("default", "scale_shift"):
        raise ValueError(f"{what}: resnet_time_scale_shift={shift!r} (supported: 'default', 'scale_shift')")
    size = cfg.get("sample_size")
    if not isinstance(size, int):
        raise ValueError(f"{what}: sample_size={size!r}; the project's U-Net needs one square size")
    return dict(model_channels=base, channel_mult=[c // base for c in boc],
                num_res_blocks=int(_single(cfg.get("layers_per_block", 2), "layers_per_block", what)),
                image_size=size, dropout=float(cfg.get("dropout", 0.0)), use_checkpoint=False,
                resblock_updown=True, scale_shift_norm=shift == "scale_shift", norm_groups=groups,
                norm_eps=float(cfg.get("norm_eps", 1e-5)))


def _block_names(unet_kw: dict[str, Any], has_attention) -> list[tuple[str, str, bool]]:
    """(project prefix, diffusers prefix, is_attention) of every residual and attention block, in order.

    ``has_attention(level)`` tells whether level ``level`` (0 = full size) has attention layers."""
    levels, nrb = len(unet_kw["channel_mult"]), int(unet_kw["num_res_blocks"])
    names: list[tuple[str, str, bool]] = []
    k = 0
    for level in range(levels):
        for j in range(nrb):
            names.append((f"down.{k}.layer", f"down_blocks.{level}.resnets.{j}", False))
            if has_attention(level):
                names.append((f"down.{k}.attn", f"down_blocks.{level}.attentions.{j}", True))
            k += 1
        if level != levels - 1:
            names.append((f"down.{k}.layer", f"down_blocks.{level}.downsamplers.0", False))
            k += 1
    names.append(("middle.0.layer", "mid_block.resnets.0", False))
    if any(has_attention(level) for level in range(levels)):
        names.append(("middle.0.attn", "mid_block.attentions.0", True))
    names.append(("middle.1.layer", "mid_block.resnets.1", False))
    k = 0
    for i, level in enumerate(reversed(range(levels))):
        for j in range(nrb + 1):
            names.append((f"up.{k}.layer", f"up_blocks.{i}.resnets.{j}", False))
            if has_attention(level):
                names.append((f"up.{k}.attn", f"up_blocks.{i}.attentions.{j}", True))
            k += 1
        if level > 0:
            names.append((f"up.{k}.layer", f"up_blocks.{i}.upsamplers.0", False))
            k += 1
    return names


_RES_PAIRS = [("in_layers.0", "norm1"), ("in_layers.2", "conv1"), ("emb_layers.1", "time_emb_proj"),
              ("out_norm", "norm2"), ("out_layers.2", "conv2"), ("skip", "conv_shortcut")]
_TOP_PAIRS = [("time_embed.0", "time_embedding.linear_1"), ("time_embed.2", "time_embedding.linear_2"),
              ("conv_in", "conv_in"), ("out.0", "conv_norm_out"), ("out.2", "conv_out")]
_PARAMS = ("weight", "bias")


def _take(sd: dict[str, torch.Tensor], key: str, used: set[str]) -> torch.Tensor:
    if key not in sd:
        raise ValueError(f"the diffusers weights have no {key!r}")
    used.add(key)
    return sd[key]


def _unet_from(sd: dict[str, torch.Tensor], names, used: set[str]) -> dict[str, torch.Tensor]:
    """diffusers U-Net weights -> project UNet weights (no prefix)."""
    out: dict[str, torch.Tensor] = {}
    for p, d in _TOP_PAIRS:
        for n in _PARAMS:
            out[f"{p}.{n}"] = _take(sd, f"{d}.{n}", used)
    for p, d, is_attn in names:
        if is_attn:
            for n in _PARAMS:
                out[f"{p}.norm.{n}"] = _take(sd, f"{d}.group_norm.{n}", used)
                out[f"{p}.qkv.{n}"] = torch.cat([_take(sd, f"{d}.to_{c}.{n}", used) for c in "qkv"])
                out[f"{p}.encoder_kv.{n}"] = torch.cat([_take(sd, f"{d}.add_{c}_proj.{n}", used) for c in "kv"])
                out[f"{p}.proj_out.{n}"] = _take(sd, f"{d}.to_out.0.{n}", used)
        else:
            for pp, dd in _RES_PAIRS:
                for n in _PARAMS:
                    if dd == "conv_shortcut" and f"{d}.{dd}.{n}" not in sd:
                        continue
                    out[f"{p}.{pp}.{n}"] = _take(sd, f"{d}.{dd}.{n}", used)
    return out


def _unet_to(sd: dict[str, torch.Tensor], names, used: set[str]) -> dict[str, torch.Tensor]:
    """project UNet weights (no prefix) -> diffusers U-Net weights."""
    out: dict[str, torch.Tensor] = {}
    for p, d in _TOP_PAIRS:
        for n in _PARAMS:
            out[f"{d}.{n}"] = _take(sd, f"{p}.{n}", used)
    for p, d, is_attn in names:
        if is_attn:
            for n in _PARAMS:
                out[f"{d}.group_norm.{n}"] = _take(sd, f"{p}.norm.{n}", used)
                for c, part in zip("qkv", _take(sd, f"{p}.qkv.{n}", used).chunk(3)):
                    out[f"{d}.to_{c}.{n}"] = part.clone()
                for c, part in zip("kv", _take(sd, f"{p}.encoder_kv.{n}", used).chunk(2)):
                    out[f"{d}.add_{c}_proj.{n}"] = part.clone()
                out[f"{d}.to_out.0.{n}"] = _take(sd, f"{p}.proj_out.{n}", used)
        else:
            for pp, dd in _RES_PAIRS:
                for n in _PARAMS:
                    if pp == "skip" and f"{p}.{pp}.{n}" not in sd:
                        continue
                    out[f"{d}.{dd}.{n}"] = _take(sd, f"{p}.{pp}.{n}", used)
    return out


def _check_all_used(sd: dict[str, Any], used: set[str], what: str) -> None:
    left = sorted(set(sd) - used)
    if left:
        raise ValueError(f"{what}: {len(left)} weight(s) with no place in the converted model: "
                         f"{', '.join(left[:5])}" + (" ..." if len(left) > 5 else ""))


def _strip(sd: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def _plain_unet_kwargs(net_config: dict[str, Any], key: str) -> dict[str, Any]:
    block = net_config.get(key)
    if not isinstance(block, dict):
        raise ValueError(f"net_config has no {key!r} block")
    return {k: v for k, v in dict(block).items() if k != "_target_"}


# ----------------------------------------------------------------------------------------------------------- decoder
def _token_rows(n_tokens: int, width: int) -> torch.Tensor:
    """Row order mapping diffusers' CLIP-token projection to the project's: diffusers lays its output out as
    (width, tokens) (it reshapes to (B, width, tokens) and permutes), the project as (tokens, width)."""
    return torch.arange(width * n_tokens).view(width, n_tokens).t().reshape(-1)


def decoder_net_config(unet_config: Any, text_proj_config: Any) -> dict[str, Any]:
    """The project ``Decoder``'s ``module.model`` block for a ``UNet2DConditionModel`` + ``UnCLIPTextProjModel``
    config pair (dicts or the modules' ``config``); a layout the project cannot express is a one-line ValueError."""
    return _decoder_layout(_config(unet_config), _config(text_proj_config))[0]


def _decoder_layout(cfg: dict[str, Any], tcfg: dict[str, Any]):
    what = "decoder UNet2DConditionModel"
    _check_fixed(cfg, _DECODER_FIXED, what)
    kw = _unet_kwargs(cfg, what)
    downs, ups = list(cfg["down_block_types"]), list(cfg["up_block_types"])
    levels = len(kw["channel_mult"])
    if len(downs) != levels or len(ups) != levels or any(b not in (_ATTN_DOWN, _RES_DOWN) for b in downs) \
            or any(b not in (_ATTN_UP, _RES_UP) for b in ups):
        raise ValueError(f"{what}: down/up block types {downs} / {ups}; supported: {_RES_DOWN}/{_ATTN_DOWN} and "
                         f"{_RES_UP}/{_ATTN_UP}, one per block_out_channels entry")
    attn_levels = [lvl for lvl, b in enumerate(downs) if b == _ATTN_DOWN]
    if [levels - 1 - i for i, b in enumerate(ups) if b == _ATTN_UP][::-1] != attn_levels or not attn_levels:
        raise ValueError(f"{what}: attention in down blocks {downs} and up blocks {ups} must mirror each other and "
                         "exist at one level at least")
    head = int(_single(cfg["attention_head_dim"], "attention_head_dim", what))
    boc = [int(c) for c in cfg["block_out_channels"]]
    if any(boc[lvl] % head for lvl in attn_levels) or head > min(boc[lvl] for lvl in attn_levels):
        raise ValueError(f"{what}: attention_head_dim={head} does not divide the attention levels' channels")
    ctx = int(_single(cfg["cross_attention_dim"], "cross_attention_dim", what))
    out_ch, in_ch = int(cfg["out_channels"]), int(cfg["in_channels"])
    if out_ch not in (in_ch, 2 * in_ch):
        raise ValueError(f"{what}: out_channels={out_ch} with in_channels={in_ch} (the project predicts eps, and "
                         "with twice the channels also the variance interpolation)")
    clip_dim = int(tcfg["clip_embeddings_dim"])
    n_tok = int(tcfg.get("clip_extra_context_tokens", 4))
    if int(tcfg["time_embed_dim"]) != 4 * boc[0] or int(tcfg["cross_attention_dim"]) != ctx:
        raise ValueError(f"text_proj: time_embed_dim={tcfg['time_embed_dim']}, cross_attention_dim="
                         f"{tcfg['cross_attention_dim']} do not fit the decoder (4 * {boc[0]}, {ctx})")
    size = kw["image_size"]
    kw.update(in_channels=in_ch, out_channels=in_ch, learn_sigma=out_ch == 2 * in_ch,
              attention_resolutions=[size // 2 ** lvl for lvl in attn_levels], num_head_channels=head,
              clip_dim=clip_dim, num_clip_tokens=n_tok, context_dim=ctx, pool_context=False,
              context_in_dim=clip_dim, text_emb_dim=clip_dim)
    names = _block_names(kw, lambda lvl: lvl in attn_levels)
    net_config = {
        "_target_": DECODER_TARGET,
        "unet": {"_target_": UNET_TARGET, **kw},
        "diffusion": {"_target_": "unclip_pl.diffusion.GaussianDiffusion",
                      "betas": {"_target_": "unclip_pl.diffusion.get_betas", "name": "cosine", "num_steps": 1000},
                      "target": "eps", "learn_sigma": kw["learn_sigma"],
                      "loss": "hybrid" if kw["learn_sigma"] else "mse"},
        "text_encoder": None,
        "clip_drop_prob": 0.1,
        "text_drop_prob": 0.5,
        "null_clip": "learned",
        "clip_scale": 1.0,
    }
    return net_config, names, n_tok, ctx


def decoder_from_diffusers(unet: Any, text_proj: Any) -> tuple[dict[str, torch.Tensor], dict[str, Any],
                                                                dict[str, Any]]:
    """Karlo's decoder (``UNet2DConditionModel`` + ``UnCLIPTextProjModel`` modules) -> (project ``Decoder`` state
    dict, its ``module.model`` config block, its ``sample:`` block)."""
    what = "decoder UNet2DConditionModel"
    net_config, names, n_tok, ctx = _decoder_layout(_config(unet), _config(text_proj))
    sd, used = _state(unet), set()
    out = {f"unet.{k}": v for k, v in _unet_from(sd, names, used).items()}
    _check_all_used(sd, used, what)
    tsd, tused = _state(text_proj), set()
    rows = _token_rows(n_tok, ctx)
    pairs = [("clip_to_time", "clip_image_embeddings_project_to_time_embeddings"), ("text_to_time", "embedding_proj"),
             ("context_proj", "encoder_hidden_states_proj"), ("context_norm", "text_encoder_hidden_states_norm")]
    for p, d in pairs:
        for n in _PARAMS:
            out[f"unet.{p}.{n}"] = _take(tsd, f"{d}.{n}", tused)
    for n in _PARAMS:
        out[f"unet.clip_to_tokens.{n}"] = _take(tsd, f"clip_extra_context_tokens_proj.{n}", tused)[rows].clone()
    out["clip_null"] = _take(tsd, "learned_classifier_free_guidance_embeddings", tused)
    _check_all_used(tsd, tused, "text_proj UnCLIPTextProjModel")
    return out, net_config, dict(DECODER_SAMPLE)


def decoder_to_diffusers(state_dict: dict[str, torch.Tensor], net_config: dict[str, Any]
                         ) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, torch.Tensor], dict[str, Any]]:
    """Project ``Decoder`` state dict + its ``module.model`` config -> (``UNet2DConditionModel`` state dict and
    kwargs, ``UnCLIPTextProjModel`` state dict and kwargs)."""
    kw = _plain_unet_kwargs(net_config, "unet")
    what = "decoder net_config"
    need = {"resblock_updown": True, "pool_context": False, "low_res_channels": 0}
    bad = [f"{k}={kw.get(k)!r}" for k, v in need.items() if kw.get(k, v) != v]
    dims = {kw.get("clip_dim"), kw.get("context_in_dim"), kw.get("text_emb_dim")}
    if bad or len(dims) != 1 or None in dims:
        why = ", ".join(bad) or "clip_dim, context_in_dim and text_emb_dim must be one width"
        raise ValueError(f"{what}: not Karlo's layout ({why}): it has no diffusers UNet2DConditionModel + "
                         "UnCLIPTextProjModel form")
    if float(net_config.get("clip_scale") or 0) != 1.0:
        raise ValueError(f"{what}: clip_scale={net_config.get('clip_scale')!r}; Karlo's decoder takes the embedding "
                         "as it is (clip_scale: 1.0)")
    base, mult, size = int(kw["model_channels"]), list(kw["channel_mult"]), int(kw["image_size"])
    attn_res = {int(r) for r in kw.get("attention_resolutions") or ()}
    attn_levels = [lvl for lvl in range(len(mult)) if size // 2 ** lvl in attn_res]
    head = int(kw.get("num_head_channels", 64))
    if any(base * mult[lvl] < head for lvl in attn_levels):
        raise ValueError(f"{what}: num_head_channels={head} exceeds an attention level's channels")
    learn_sigma = bool(kw.get("learn_sigma", False))
    in_ch = int(kw.get("in_channels", 3))
    unet_config = {
        "sample_size": size, "in_channels": in_ch, "out_channels": int(kw.get("out_channels", 3)) * (
            2 if learn_sigma else 1),
        "down_block_types": [_ATTN_DOWN if lvl in attn_levels else _RES_DOWN for lvl in range(len(mult))],
        "up_block_types": [_ATTN_UP if lvl in attn_levels else _RES_UP for lvl in reversed(range(len(mult)))],
        "mid_block_type": "UNetMidBlock2DSimpleCrossAttn",
        "block_out_channels": [base * m for m in mult], "layers_per_block": int(kw["num_res_blocks"]),
        "cross_attention_dim": int(kw["context_dim"]), "attention_head_dim": head, "class_embed_type": "identity",
        "resnet_time_scale_shift": "scale_shift" if kw.get("scale_shift_norm", True) else "default",
        "norm_num_groups": int(kw.get("norm_groups", 32)), "norm_eps": float(kw.get("norm_eps", 1e-5)),
        "dropout": float(kw.get("dropout", 0.0)),
    }
    kw_full = dict(kw, channel_mult=mult)
    names = _block_names(kw_full, lambda lvl: lvl in attn_levels)
    sd, used = dict(state_dict), set()
    usd = _strip(sd, "unet.")
    uused: set[str] = set()
    unet_sd = _unet_to(usd, names, uused)
    n_tok, ctx, clip_dim = int(kw.get("num_clip_tokens", 4)), int(kw["context_dim"]), int(kw["clip_dim"])
    inverse = torch.argsort(_token_rows(n_tok, ctx))
    tp = {}
    pairs = [("clip_to_time", "clip_image_embeddings_project_to_time_embeddings"), ("text_to_time", "embedding_proj"),
             ("context_proj", "encoder_hidden_states_proj"), ("context_norm", "text_encoder_hidden_states_norm")]
    for p, d in pairs:
        for n in _PARAMS:
            tp[f"{d}.{n}"] = _take(usd, f"{p}.{n}", uused)
    for n in _PARAMS:
        tp[f"clip_extra_context_tokens_proj.{n}"] = _take(usd, f"clip_to_tokens.{n}", uused)[inverse].clone()
    tp["learned_classifier_free_guidance_embeddings"] = _take(sd, "clip_null", used)
    used |= {f"unet.{k}" for k in uused}
    _check_all_used(sd, used, "decoder state dict")
    text_proj_config = {"clip_extra_context_tokens": n_tok, "clip_embeddings_dim": clip_dim,
                        "time_embed_dim": 4 * base, "cross_attention_dim": ctx}
    return unet_sd, unet_config, tp, text_proj_config


# -------------------------------------------------------------------------------------------------- super-resolution
def _superres_kwargs(cfg: dict[str, Any], what: str) -> tuple[dict[str, Any], list]:
    _check_fixed(cfg, _SUPERRES_FIXED, what)
    kw = _unet_kwargs(cfg, what)
    levels = len(kw["channel_mult"])
    downs, ups = list(cfg["down_block_types"]), list(cfg["up_block_types"])
    if downs != [_RES_DOWN] * levels or ups != [_RES_UP] * levels:
        raise ValueError(f"{what}: block types {downs} / {ups}; supported: {_RES_DOWN} / {_RES_UP} only")
    for k in ("downsample_type", "upsample_type"):
        if cfg.get(k, "conv") not in ("conv", "resnet"):
            raise ValueError(f"{what}: {k}={cfg[k]!r} is not supported")
    in_ch, out_ch = int(cfg["in_channels"]), int(cfg["out_channels"])
    if in_ch <= out_ch:
        raise ValueError(f"{what}: in_channels={in_ch} must be out_channels={out_ch} plus the low-res image's")
    kw.update(in_channels=out_ch, out_channels=out_ch, learn_sigma=False, attention_resolutions=[],
              low_res_channels=in_ch - out_ch, low_res_mode="bicubic")
    return kw, _block_names(kw, lambda lvl: False)


def _superres_unet_from(unet: Any, what: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    kw, names = _superres_kwargs(_config(unet), what)
    sd, used = _state(unet), set()
    out = _unet_from(sd, names, used)
    _check_all_used(sd, used, what)
    return out, kw


def superres_from_diffusers(first: Any, last: Any = None, low_res_size: int = 64
                            ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Karlo's super-resolution ``UNet2DModel`` s (``super_res_first``, optional ``super_res_last``) -> (project
    ``Upsampler`` state dict, its ``module.model`` config block). The two networks must have one layout."""
    sd, _ = _superres_unet_from(first, "super_res_first UNet2DModel")
    out = {f"unet.{k}": v for k, v in sd.items()}
    if last is not None:
        lsd, _ = _superres_unet_from(last, "super_res_last UNet2DModel")
        out.update({f"last_unet.{k}": v for k, v in lsd.items()})
    net_config = superres_net_config(first, last if last is None else _config(last), low_res_size)
    return out, net_config


def superres_net_config(first_config: Any, last_config: Any = None, low_res_size: int = 64) -> dict[str, Any]:
    """The project ``Upsampler``'s ``module.model`` block for super-resolution ``UNet2DModel`` config(s) (dicts or
    the modules' ``config``): ``last_unet`` is set when ``last_config`` is given (it must have the same layout)."""
    kw, _ = _superres_kwargs(_config(first_config), "super_res_first UNet2DModel")
    last_block = None
    if last_config is not None:
        lkw, _ = _superres_kwargs(_config(last_config), "super_res_last UNet2DModel")
        if lkw != kw:
            diff = sorted(k for k in kw if kw[k] != lkw.get(k))
            raise ValueError(f"super_res_last differs from super_res_first in {diff}; both must have one layout")
        last_block = {"_target_": UNET_TARGET, **kw}
    size = int(kw["image_size"])
    if size % int(low_res_size):
        raise ValueError(f"super-resolution sample_size {size} is not a multiple of low_res_size {low_res_size}")
    net_config = {
        "_target_": UPSAMPLER_TARGET,
        "unet": {"_target_": UNET_TARGET, **kw},
        "last_unet": last_block,
        "diffusion": {"_target_": "unclip_pl.diffusion.GaussianDiffusion",
                      "betas": {"_target_": "unclip_pl.diffusion.get_betas", "name": "cosine", "num_steps": 1000},
                      "target": "eps", "fixed_var": "small"},
        "low_res_size": int(low_res_size),
        "image_size": size,
        "degradation": None,
        "crop_size": None,
        "downsample_mode": "bicubic",
    }
    return net_config


def _superres_unet_to(sd: dict[str, torch.Tensor], kw: dict[str, Any], what: str
                      ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    if not kw.get("resblock_updown") or kw.get("attention_resolutions") or not kw.get("low_res_channels") \
            or kw.get("learn_sigma") or kw.get("clip_dim") is not None:
        raise ValueError(f"{what}: not Karlo's super-resolution layout (needs resblock_updown, no attention, no CLIP "
                         "conditioning, a low-res input, fixed variance): it has no diffusers UNet2DModel form")
    base, mult = int(kw["model_channels"]), list(kw["channel_mult"])
    out_ch = int(kw.get("out_channels", 3))
    config = {
        "sample_size": int(kw["image_size"]), "in_channels": int(kw.get("in_channels", 3)) + int(
            kw["low_res_channels"]), "out_channels": out_ch,
        "down_block_types": [_RES_DOWN] * len(mult), "up_block_types": [_RES_UP] * len(mult),
        "block_out_channels": [base * m for m in mult], "layers_per_block": int(kw["num_res_blocks"]),
        "add_attention": False,
        "resnet_time_scale_shift": "scale_shift" if kw.get("scale_shift_norm", True) else "default",
        "norm_num_groups": int(kw.get("norm_groups", 32)), "norm_eps": float(kw.get("norm_eps", 1e-5)),
        "dropout": float(kw.get("dropout", 0.0)),
    }
    names = _block_names(dict(kw, channel_mult=mult), lambda lvl: False)
    used: set[str] = set()
    out = _unet_to(sd, names, used)
    _check_all_used(sd, used, what)
    return out, config


def superres_to_diffusers(state_dict: dict[str, torch.Tensor], net_config: dict[str, Any]
                          ) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, torch.Tensor] | None,
                                     dict[str, Any] | None]:
    """Project ``Upsampler`` state dict + its ``module.model`` config -> (``super_res_first`` state dict and
    ``UNet2DModel`` kwargs, the same for ``super_res_last`` or (None, None) when the stage has one network)."""
    sd = dict(state_dict)
    known = [k for k in sd if k.startswith("unet.") or k.startswith("last_unet.")]
    if len(known) != len(sd):
        extra = sorted(set(sd) - set(known))
        raise ValueError(f"upsampler state dict: {len(extra)} weight(s) with no place: {', '.join(extra[:5])}")
    first_sd, first_cfg = _superres_unet_to(_strip(sd, "unet."), _plain_unet_kwargs(net_config, "unet"),
                                            "upsampler unet")
    has_last = any(k.startswith("last_unet.") for k in sd)
    if not has_last:
        if net_config.get("last_unet"):
            raise ValueError("upsampler net_config has a last_unet but the state dict has no last_unet.* weights")
        return first_sd, first_cfg, None, None
    last_sd, last_cfg = _superres_unet_to(_strip(sd, "last_unet."), _plain_unet_kwargs(net_config, "last_unet"),
                                          "upsampler last_unet")
    return first_sd, first_cfg, last_sd, last_cfg
