"""diffusers' ``PriorTransformer`` (Karlo's prior) <-> this project's diffusion prior, the same function exactly.

The two networks compute the same thing once the project's :class:`unclip_pl.nets.prior.PriorTransformer` is built
with ``bias=True, gelu="none", time_freq_dim=dim`` (:func:`net_kwargs`):

==========================================  ==========================================================
diffusers ``PriorTransformer``              project ``DiffusionPrior`` (``net.`` = the Transformer)
==========================================  ==========================================================
token order [text states, proj_embedding,   [caption tokens, z_t, timestep embedding, noised z_i,
time embedding, hidden_states, prd token]   final query] (the same order)
``encoder_hidden_states_proj``              ``net.text_proj``
``embedding_proj`` / ``proj_in``            ``net.txt_emb_proj`` / ``net.x_proj``
``time_proj`` + ``time_embedding``          ``net.time_embed`` (sinusoid [cos, sin] of width dim, MLP)
``positional_embedding`` (1, L + 4, dim)    ``net.pos_embedding_text`` (L, dim), ``net.pos_embedding_tail`` (4, dim)
``prd_embedding``                           ``net.query``
block ``norm1``, ``attn1.to_q|k|v``,        ``norm1``, ``attn.qkv`` (q, k, v stacked), ``attn.proj``,
``to_out.0``, ``norm3``, ``ff.net.0|2``     ``norm2``, ``mlp.0|2`` (pre-LN, exact GELU, biases)
``norm_out``, ``proj_to_clip_embeddings``   ``net.norm_out``, ``net.out``
causal mask + text padding (-1e4 added)     causal mask + caption key padding (boolean)
``clip_mean``, ``clip_std`` (1, D)          ``norm_mean``, ``norm_std`` (D,) with ``normalization="standardize"``
==========================================  ==========================================================

Karlo's prior predicts x0 (``prediction_type: sample``) over the 1000-step ``squaredcos_cap_v2`` schedule (the
project's ``cosine``), clamping x0 to [-5, 5] while sampling (``clip_sample_range``).

Karlo's pipeline feeds the prior CLIP's raw projections and guides it against the CLIP encoding of the empty caption;
``prior_from_diffusers(..., karlo=True)`` (what ``python -m unclip_pl.convert from-diffusers`` writes) configures the
project prior the same way: ``unit_norm=False, uncond="empty_caption"``. The project's network also holds learned
null conditioning (``null_text_token``, ``null_txt_emb``), which Karlo's does not; the converter sets them to the
network's projections of an all-zero caption token and z_t (the projection biases). They are used only with
``uncond="learned"`` (``karlo=False``); converting back drops them.
"""

from __future__ import annotations

from typing import Any

import torch

#: diffusers PriorTransformer config values this bridge reproduces (others are refused in one line).
SUPPORTED = {"time_embed_act_fn": ("silu",), "norm_in_type": (None,), "embedding_proj_norm_type": (None,),
             "encoder_hid_proj_type": ("linear",), "added_emb_type": ("prd",), "additional_embeddings": (4,)}


def _config(prior: Any) -> dict[str, Any]:
    return dict(prior.config) if hasattr(prior, "config") else dict(prior)


def check_supported(config: dict[str, Any]) -> None:
    """A one-line ValueError for a ``PriorTransformer`` config the project's prior cannot express exactly."""
    config = _config(config)
    inner = config["num_attention_heads"] * config["attention_head_dim"]
    for key, allowed in SUPPORTED.items():
        value = config.get(key, allowed[0])
        if value not in allowed:
            raise ValueError(f"PriorTransformer {key}={value!r} is not supported (supported: {allowed[0]!r})")
    for key, same in (("time_embed_dim", inner), ("embedding_proj_dim", config["embedding_dim"]),
                      ("clip_embed_dim", config["embedding_dim"])):
        if config.get(key) not in (None, same):
            raise ValueError(f"PriorTransformer {key}={config[key]} is not supported (only None or {same})")


def net_kwargs(config: Any) -> dict[str, Any]:
    """The project ``PriorTransformer`` arguments for a diffusers ``PriorTransformer`` config (or the model)."""
    config = _config(config)
    check_supported(config)
    dim = config["num_attention_heads"] * config["attention_head_dim"]
    return {"embed_dim": config["embedding_dim"], "text_width": config["embedding_dim"], "dim": dim,
            "depth": config["num_layers"], "heads": config["num_attention_heads"],
            "max_text_len": config["num_embeddings"], "dropout": float(config.get("dropout", 0.0)), "ff_mult": 4,
            "bias": True, "gelu": "none", "time_freq_dim": dim}


def diffusers_config(kwargs: dict[str, Any]) -> dict[str, Any]:
    """The diffusers ``PriorTransformer`` config for project net arguments made by :func:`net_kwargs`."""
    expected = {"bias": True, "gelu": "none", "ff_mult": 4, "text_width": kwargs["embed_dim"],
                "time_freq_dim": kwargs["dim"]}
    wrong = {k: kwargs.get(k) for k, v in expected.items() if kwargs.get(k) != v}
    if wrong:
        raise ValueError(f"this prior has no diffusers PriorTransformer equivalent: {wrong} (need {expected})")
    return {"num_attention_heads": kwargs["heads"], "attention_head_dim": kwargs["dim"] // kwargs["heads"],
            "num_layers": kwargs["depth"], "embedding_dim": kwargs["embed_dim"],
            "num_embeddings": kwargs["max_text_len"], "additional_embeddings": 4,
            "dropout": float(kwargs.get("dropout", 0.0))}


def model_config(net: dict[str, Any], clip_sample_range: float | None = 5.0, num_train_timesteps: int = 1000,
                 cond_drop_prob: float = 0.1, karlo: bool = False) -> dict[str, Any]:
    """The Hydra node of the project's ``DiffusionPrior`` for a converted prior (``instantiate`` builds it).
    ``karlo``: Karlo's pipeline conditioning (raw CLIP projections, the empty caption as the unconditional branch);
    else unit-norm embeddings and the learned nulls."""
    return {"_target_": "unclip_pl.models.prior.DiffusionPrior",
            "net": {"_target_": "unclip_pl.nets.prior.PriorTransformer", **net},
            "diffusion": {"_target_": "unclip_pl.diffusion.GaussianDiffusion", "target": "x0",
                          "betas": {"_target_": "unclip_pl.diffusion.get_betas", "name": "cosine",
                                    "num_steps": int(num_train_timesteps)}},
            "cond_drop_prob": cond_drop_prob, "normalization": "standardize", "embed_dim": net["embed_dim"],
            "clip_sample_range": clip_sample_range, "unit_norm": not karlo,
            "uncond": "empty_caption" if karlo else "learned"}


# (diffusers name, project name) of the tensors that are copied as they are (blocks: per-layer, see below)
_DIRECT = (("time_embedding.linear_1", "net.time_embed.mlp.0"), ("time_embedding.linear_2", "net.time_embed.mlp.2"),
           ("proj_in", "net.x_proj"), ("embedding_proj", "net.txt_emb_proj"),
           ("encoder_hidden_states_proj", "net.text_proj"), ("norm_out", "net.norm_out"),
           ("proj_to_clip_embeddings", "net.out"))
_BLOCK = (("norm1", "norm1"), ("attn1.to_out.0", "attn.proj"), ("norm3", "norm2"), ("ff.net.0.proj", "mlp.0"),
          ("ff.net.2", "mlp.2"))


def state_dict_from_diffusers(sd: dict[str, torch.Tensor], num_layers: int, num_embeddings: int
                              ) -> dict[str, torch.Tensor]:
    """A diffusers ``PriorTransformer`` state dict -> the project ``DiffusionPrior`` state dict (new tensors)."""
    out: dict[str, torch.Tensor] = {}

    def linear(src: str, dst: str) -> None:
        for p in ("weight", "bias"):
            out[f"{dst}.{p}"] = sd[f"{src}.{p}"].clone()

    for src, dst in _DIRECT:
        linear(src, dst)
    for i in range(num_layers):
        b = f"transformer_blocks.{i}"
        for src, dst in _BLOCK:
            linear(f"{b}.{src}", f"net.blocks.{i}.{dst}")
        for p in ("weight", "bias"):
            out[f"net.blocks.{i}.attn.qkv.{p}"] = torch.cat([sd[f"{b}.attn1.to_{n}.{p}"] for n in "qkv"], dim=0)
    pos = sd["positional_embedding"][0]
    out["net.pos_embedding_text"] = pos[:num_embeddings].clone()
    out["net.pos_embedding_tail"] = pos[num_embeddings:].clone()
    out["net.query"] = sd["prd_embedding"][0, 0].clone()
    out["net.null_text_token"] = sd["encoder_hidden_states_proj.bias"].clone()
    out["net.null_txt_emb"] = sd["embedding_proj.bias"].clone()
    out["norm_mean"] = sd["clip_mean"][0].clone()
    out["norm_std"] = sd["clip_std"][0].clone()
    out["norm_fitted"] = torch.tensor(True)
    return out


def state_dict_to_diffusers(sd: dict[str, torch.Tensor], num_layers: int) -> dict[str, torch.Tensor]:
    """The inverse of :func:`state_dict_from_diffusers` (the learned nulls and ``norm_fitted`` are dropped)."""
    out: dict[str, torch.Tensor] = {}

    def linear(dst: str, src: str) -> None:
        for p in ("weight", "bias"):
            out[f"{dst}.{p}"] = sd[f"{src}.{p}"].clone()

    for dst, src in _DIRECT:
        linear(dst, src)
    for i in range(num_layers):
        b = f"transformer_blocks.{i}"
        for dst, src in _BLOCK:
            linear(f"{b}.{dst}", f"net.blocks.{i}.{src}")
        for p in ("weight", "bias"):
            for n, part in zip("qkv", sd[f"net.blocks.{i}.attn.qkv.{p}"].chunk(3, dim=0)):
                out[f"{b}.attn1.to_{n}.{p}"] = part.clone()
    out["positional_embedding"] = torch.cat([sd["net.pos_embedding_text"], sd["net.pos_embedding_tail"]])[None]
    out["prd_embedding"] = sd["net.query"][None, None].clone()
    out["clip_mean"] = sd["norm_mean"][None].clone()
    out["clip_std"] = sd["norm_std"][None].clone()
    return out


def prior_from_diffusers(prior: Any, clip_sample_range: float | None = 5.0, num_train_timesteps: int = 1000,
                         karlo: bool = False) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """A diffusers ``PriorTransformer`` -> (the project ``DiffusionPrior``'s Hydra node, its state dict).
    ``karlo``: configured as ``UnCLIPPipeline`` runs it (see :func:`model_config`)."""
    config = _config(prior)
    kwargs = net_kwargs(config)
    sd = state_dict_from_diffusers(prior.state_dict(), config["num_layers"], config["num_embeddings"])
    return model_config(kwargs, clip_sample_range, num_train_timesteps, karlo=karlo), sd


def prior_to_diffusers(model_cfg: dict[str, Any], state_dict: dict[str, torch.Tensor]):
    """The project ``DiffusionPrior`` (its Hydra node and state dict) -> a diffusers ``PriorTransformer``."""
    from unclip_pl.convert import require_diffusers

    diffusers = require_diffusers()
    net = {k: v for k, v in model_cfg["net"].items() if k != "_target_"}
    if model_cfg.get("normalization") != "standardize":
        raise ValueError("only a prior with normalization=standardize has diffusers' clip_mean/clip_std form")
    config = diffusers_config(net)
    prior = diffusers.PriorTransformer(**config)
    prior.load_state_dict(state_dict_to_diffusers(state_dict, config["num_layers"]), strict=True)
    return prior.eval()
