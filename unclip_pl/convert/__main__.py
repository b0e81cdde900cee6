"""``python -m unclip_pl.convert``: diffusers' unCLIP pipeline folder (Karlo) <-> one project weights file per stage.

    python -m unclip_pl.convert from-diffusers PIPELINE_DIR OUT_DIR [--clip-checkpoint FILE]
    python -m unclip_pl.convert to-diffusers IN_DIR OUT_DIR [--prior|--decoder|--upsampler FILE]

``from-diffusers`` reads an ``UnCLIPPipeline.save_pretrained`` folder component by component (``prior``,
``text_proj``, ``decoder``, ``super_res_first``, ``super_res_last`` and the three schedulers' configs; the CLIP text
and image encoders are not read) and writes ``OUT_DIR/prior.pt``, ``decoder.pt`` and ``upsampler_<size>.pt`` in the
weights-file format of :func:`unclip_pl.checkpoint.export_weights` (each with its model config and its ``sample:``
block: the sampler settings the pipeline used), and ``sample_settings.yaml`` with those blocks side by side. The
files store the CLIP preset ``clip=vit_l14`` (Karlo's CLIP) with ``loader.normalize: false`` (CLIP's raw projections,
which Karlo's stages read), and ``--clip-checkpoint`` as its local weights file. The prior is stored as Karlo's
pipeline runs it: raw projections in and out, guided against the empty caption's encoding.

``to-diffusers`` writes those files back as the pipeline's component folders (``save_pretrained`` of each
component and scheduler) in ``OUT_DIR``, a stage's file replaced by ``--<stage> FILE`` (a fine-tuned run's ``.ckpt``
or an export); the tokenizer and CLIP encoders of the original pipeline are not part of it.
Bad input is one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

from unclip_pl.convert import ConvertError, require_diffusers

#: The pipeline's components this converter reads, by subfolder.
MODELS = ("prior", "text_proj", "decoder", "super_res_first", "super_res_last")
SCHEDULERS = ("prior_scheduler", "decoder_scheduler", "super_res_scheduler")
#: ``UnCLIPPipeline.__call__`` defaults (Karlo's sampling): steps and guidance scales per stage.
PIPELINE_DEFAULTS = {"prior_num_inference_steps": 25, "decoder_num_inference_steps": 25,
                     "super_res_num_inference_steps": 7, "prior_guidance_scale": 4.0, "decoder_guidance_scale": 8.0}
CLIP_PRESET = Path(__file__).resolve().parents[2] / "conf" / "clip" / "vit_l14.yaml"


# ----------------------------------------------------------------------------------------------------------- reading
def check_pipeline_dir(folder: Path) -> None:
    """One-line :class:`ConvertError` unless ``folder`` is an unCLIP pipeline folder with every needed component."""
    if not folder.is_dir():
        raise ConvertError(f"{folder}: not a folder (expected an UnCLIPPipeline.save_pretrained folder)")
    index = folder / "model_index.json"
    if not index.is_file():
        raise ConvertError(f"{folder}: not a diffusers pipeline folder (no model_index.json)")
    try:
        name = json.loads(index.read_text()).get("_class_name")
    except (json.JSONDecodeError, AttributeError) as e:
        raise ConvertError(f"{index}: not a readable model_index.json ({e})") from None
    if name not in (None, "UnCLIPPipeline"):
        raise ConvertError(f"{folder}: a {name} folder, not an UnCLIPPipeline (Karlo) one")
    for sub in MODELS:
        if not (folder / sub / "config.json").is_file():
            raise ConvertError(f"{folder}: the {sub}/ component is missing (no {sub}/config.json)")
    for sub in SCHEDULERS:
        if not (folder / sub / "scheduler_config.json").is_file():
            raise ConvertError(f"{folder}: the {sub}/ component is missing (no {sub}/scheduler_config.json)")


def load_component(folder: Path, sub: str):
    """The model in ``folder/sub`` via its class's ``from_pretrained`` (float32, eval mode)."""
    diffusers = require_diffusers()
    from diffusers.pipelines.deprecated.unclip.text_proj import UnCLIPTextProjModel

    cls = {"prior": diffusers.PriorTransformer, "text_proj": UnCLIPTextProjModel,
           "decoder": diffusers.UNet2DConditionModel, "super_res_first": diffusers.UNet2DModel,
           "super_res_last": diffusers.UNet2DModel}[sub]
    try:
        return cls.from_pretrained(str(folder / sub), torch_dtype=torch.float32, low_cpu_mem_usage=False).eval()
    except Exception as e:  # noqa: BLE001 - missing/corrupt weights, another class's config: unusable either way
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConvertError(f"{folder / sub}: cannot load it as a {cls.__name__} ({first[:200]})") from None


def scheduler_config(folder: Path, sub: str) -> dict[str, Any]:
    try:
        return json.loads((folder / sub / "scheduler_config.json").read_text())
    except json.JSONDecodeError as e:
        raise ConvertError(f"{folder / sub}/scheduler_config.json: not JSON ({e})") from None


def _check_scheduler(cfg: dict[str, Any], sub: str, variance: str, prediction: str) -> None:
    if cfg.get("_class_name") not in (None, "UnCLIPScheduler"):
        raise ConvertError(f"{sub}: a {cfg['_class_name']}, but the converter reproduces the UnCLIPScheduler only")
    got = (cfg.get("variance_type", "fixed_small_log"), cfg.get("prediction_type", "epsilon"),
           cfg.get("beta_schedule", "squaredcos_cap_v2"))
    if got != (variance, prediction, "squaredcos_cap_v2"):
        raise ConvertError(f"{sub}: variance_type/prediction_type/beta_schedule {got}; this stage's project model "
                           f"samples ({variance}, {prediction}, squaredcos_cap_v2)")


def pipeline_defaults() -> dict[str, Any]:
    """The sampling defaults of ``UnCLIPPipeline.__call__`` (read from its signature when diffusers can import it,
    which needs transformers; else the values of diffusers' pipeline, :data:`PIPELINE_DEFAULTS`)."""
    try:
        import inspect

        from diffusers.pipelines.deprecated.unclip.pipeline_unclip import UnCLIPPipeline

        params = inspect.signature(UnCLIPPipeline.__call__).parameters
        return {k: params[k].default for k in PIPELINE_DEFAULTS}
    except Exception:  # noqa: BLE001 - transformers missing: the known defaults
        return dict(PIPELINE_DEFAULTS)


# ----------------------------------------------------------------------------------------------------------- writing
def clip_block(checkpoint: str | None) -> dict[str, Any]:
    """The ``clip=vit_l14`` preset as stored in the files (``checkpoint``: its local weights file), giving CLIP's
    raw projections (``loader.normalize: false``), as Karlo's pipeline feeds its stages."""
    from omegaconf import OmegaConf

    block = OmegaConf.to_container(OmegaConf.load(CLIP_PRESET), resolve=True)
    block["loader"]["checkpoint"] = checkpoint
    block["loader"]["normalize"] = False
    return block


def write_stage(path: Path, stage: str, model_cfg: dict[str, Any], state_dict: dict[str, torch.Tensor],
                sample: dict[str, Any], clip: dict[str, Any], source: dict[str, Any],
                extra_cfg: dict[str, Any] | None = None) -> Path:
    """One weights file in the :func:`unclip_pl.checkpoint.export_weights` format (``weights: model``)."""
    from unclip_pl.checkpoint import FORMAT, atomic_save

    block = {"name": stage, **(extra_cfg or {}), "sample": dict(sample), "module": {"model": model_cfg},
             "source": source}
    entry = {"format": FORMAT, "stage": stage, "cfg": block, "model": model_cfg, "sample": dict(sample),
             "clip": clip, "weights": "model", "source": source}
    sd = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    return atomic_save({"unclip_pl": entry, "state_dict": sd}, path)


def from_diffusers(pipeline_dir: str | Path, out_dir: str | Path, clip_checkpoint: str | None = None
                   ) -> dict[str, Path]:
    """Convert a pipeline folder; returns ``{stage file name: path}`` of what was written."""
    from unclip_pl.convert import prior as prior_bridge

    try:
        from unclip_pl.convert import unet as unet_bridge
    except ImportError as e:  # the U-Net bridge is a module of this package; a broken install says so
        raise ConvertError(f"the U-Net converter unclip_pl.convert.unet cannot be imported ({e})") from None
    folder, out = Path(pipeline_dir), Path(out_dir)
    check_pipeline_dir(folder)
    require_diffusers()
    defaults = pipeline_defaults()
    scheds = {s: scheduler_config(folder, s) for s in SCHEDULERS}
    _check_scheduler(scheds["prior_scheduler"], "prior_scheduler", "fixed_small_log", "sample")
    _check_scheduler(scheds["decoder_scheduler"], "decoder_scheduler", "learned_range", "epsilon")
    _check_scheduler(scheds["super_res_scheduler"], "super_res_scheduler", "fixed_small_log", "epsilon")
    clip = clip_block(clip_checkpoint)
    written: dict[str, Path] = {}
    settings: dict[str, Any] = {}

    def num_steps(sub: str) -> int:
        return int(scheds[sub].get("num_train_timesteps", 1000))

    try:
        # prior
        prior = load_component(folder, "prior")
        ps = scheds["prior_scheduler"]
        clip_range = float(ps.get("clip_sample_range", 1.0)) if ps.get("clip_sample", True) else None
        model_cfg, sd = prior_bridge.prior_from_diffusers(prior, clip_range, num_steps("prior_scheduler"), karlo=True)
        del prior
        sample = {"steps": int(defaults["prior_num_inference_steps"]), "sampler": "ddpm", "eta": 0.0,
                  "guidance_scale": float(defaults["prior_guidance_scale"]), "best_of": 1}
        written["prior.pt"] = write_stage(out / "prior.pt", "prior", model_cfg, sd, sample, clip,
                                          {"diffusers": "prior", "scheduler": ps},
                                          {"needs": ["tokens", "img_emb", "txt_emb"], "image_size": None})
        settings["prior"] = sample

        # decoder (+ text_proj)
        unet, text_proj = load_component(folder, "decoder"), load_component(folder, "text_proj")
        sd, model_cfg, sample = unet_bridge.decoder_from_diffusers(unet, text_proj)
        size = int(unet.config.sample_size)
        del unet, text_proj
        sample = {**sample, "steps": int(defaults["decoder_num_inference_steps"]),
                  "guidance_scale": float(defaults["decoder_guidance_scale"])}
        written["decoder.pt"] = write_stage(out / "decoder.pt", "decoder", model_cfg, sd, sample, clip,
                                            {"diffusers": "decoder", "scheduler": scheds["decoder_scheduler"]},
                                            {"image_size": size})
        settings["decoder"] = sample

        # super-resolution (first for every step but the last, last for the last)
        first, last = load_component(folder, "super_res_first"), load_component(folder, "super_res_last")
        sd, model_cfg = unet_bridge.superres_from_diffusers(first, last, low_res_size=size)
        up_size = int(first.config.sample_size)
        del first, last
        sample = {**unet_bridge.SUPERRES_SAMPLE, "steps": int(defaults["super_res_num_inference_steps"])}
        name = f"upsampler_{up_size}.pt"
        written[name] = write_stage(out / name, "upsampler", model_cfg, sd, sample, clip,
                                    {"diffusers": "super_res", "scheduler": scheds["super_res_scheduler"]},
                                    {"image_size": up_size, "low_res_size": size})
        settings["upsamplers"] = [sample]
    except ValueError as e:  # a structure the bridges cannot express exactly: their one-line reason
        raise ConvertError(f"{folder}: {e}") from None

    import yaml

    (out / "sample_settings.yaml").write_text(
        "# Sampler settings of the converted pipeline (UnCLIPPipeline's defaults), in the stages' sample: form; each\n"
        "# weights file stores its own block. Override one with settings.<stage>.<key>=... of sample.py.\n"
        + yaml.safe_dump(settings, sort_keys=False))
    return written


def to_diffusers(in_dir: str | Path, out_dir: str | Path, files: dict[str, str | Path | None] | None = None
                 ) -> list[Path]:
    """Write the stage files of ``in_dir`` (as ``from-diffusers`` names them) back as diffusers component folders.
    ``files``: ``{"prior" | "decoder" | "upsampler": path}`` replacing a stage's file, e.g. a fine-tuned ``.ckpt``
    (its EMA weights)."""
    from unclip_pl.checkpoint import CheckpointError, read_checkpoint, resolve_checkpoint
    from unclip_pl.convert import prior as prior_bridge
    from unclip_pl.convert import unet as unet_bridge

    diffusers = require_diffusers()
    from diffusers.pipelines.deprecated.unclip.text_proj import UnCLIPTextProjModel

    src, out = Path(in_dir), Path(out_dir)
    if not src.is_dir():
        raise ConvertError(f"{src}: not a folder (expected the OUT_DIR of from-diffusers)")
    ups = sorted(src.glob("upsampler_*.pt"))
    files = {"prior": src / "prior.pt", "decoder": src / "decoder.pt", "upsampler": ups[0] if ups else None,
             **{k: Path(v) for k, v in (files or {}).items() if v is not None}}
    missing = [f"{k}.pt" if k != "upsampler" else "upsampler_<size>.pt" for k, p in files.items()
               if p is None or not p.is_file()]
    if missing:
        raise ConvertError(f"{src}: no {', '.join(missing)} (the files from-diffusers writes)")
    loaded = {}
    for stage, path in files.items():
        try:
            entry, weights, _ = resolve_checkpoint(read_checkpoint(path), "ema", str(path))
        except CheckpointError as e:
            raise ConvertError(str(e)) from None
        if entry["stage"] != stage:
            raise ConvertError(f"{path}: weights of the {entry['stage']} stage, not of the {stage}")
        loaded[stage] = (entry, weights)
    written = []

    def save(module, sub: str) -> None:
        module.save_pretrained(str(out / sub))
        written.append(out / sub)

    def scheduler(stage: str, sub: str, **fallback) -> None:
        cfg = dict((loaded[stage][0].get("source") or {}).get("scheduler") or fallback)
        cfg = {k: v for k, v in cfg.items() if not k.startswith("_")}
        save(diffusers.UnCLIPScheduler(**cfg), sub)

    try:
        entry, weights = loaded["prior"]
        save(prior_bridge.prior_to_diffusers(entry["model"], weights), "prior")
        clip_range = entry["model"].get("clip_sample_range")
        scheduler("prior", "prior_scheduler", variance_type="fixed_small_log", prediction_type="sample",
                  clip_sample=clip_range is not None, clip_sample_range=clip_range or 1.0)

        entry, weights = loaded["decoder"]
        unet_sd, unet_cfg, tp_sd, tp_cfg = unet_bridge.decoder_to_diffusers(weights, entry["model"])
        for module, sd, sub in ((diffusers.UNet2DConditionModel(**unet_cfg), unet_sd, "decoder"),
                                (UnCLIPTextProjModel(**tp_cfg), tp_sd, "text_proj")):
            module.load_state_dict(sd, strict=True)
            save(module, sub)
        scheduler("decoder", "decoder_scheduler", variance_type="learned_range", prediction_type="epsilon")

        entry, weights = loaded["upsampler"]
        first_sd, first_cfg, last_sd, last_cfg = unet_bridge.superres_to_diffusers(weights, entry["model"])
        for sd, cfg, sub in ((first_sd, first_cfg, "super_res_first"),
                             (last_sd if last_sd is not None else first_sd,
                              last_cfg if last_cfg is not None else first_cfg, "super_res_last")):
            module = diffusers.UNet2DModel(**cfg)
            module.load_state_dict(sd, strict=True)
            save(module, sub)
        scheduler("upsampler", "super_res_scheduler", variance_type="fixed_small_log", prediction_type="epsilon")
    except (ValueError, KeyError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConvertError(f"{src}: cannot write these weights in diffusers' form ({first[:300]})") from None
    return written


# ----------------------------------------------------------------------------------------------------------- CLI
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m unclip_pl.convert",
                                     description="Convert between a diffusers unCLIP (Karlo) pipeline folder and "
                                                 "unclip_pl weights files (one per stage).")
    sub = parser.add_subparsers(dest="command", required=True)
    a = sub.add_parser("from-diffusers", help="pipeline folder -> OUT_DIR/prior.pt, decoder.pt, upsampler_<N>.pt")
    a.add_argument("pipeline_dir")
    a.add_argument("out_dir")
    a.add_argument("--clip-checkpoint", default=None,
                   help="local open_clip ViT-L-14 (openai) weights file stored as the files' CLIP "
                        "(clip.loader.checkpoint); default: open_clip's download or cache")
    b = sub.add_parser("to-diffusers", help="IN_DIR of from-diffusers -> diffusers component folders in OUT_DIR")
    b.add_argument("in_dir")
    b.add_argument("out_dir")
    for stage in ("prior", "decoder", "upsampler"):
        b.add_argument(f"--{stage}", default=None, help=f"the {stage}'s weights instead of IN_DIR's: e.g. a fine-tuned "
                                                         "run's .ckpt (its EMA weights) or an exported file")
    args = parser.parse_args(argv)
    try:
        if args.command == "from-diffusers":
            written = from_diffusers(args.pipeline_dir, args.out_dir, args.clip_checkpoint)
            for path in written.values():
                print(f"wrote {path}")
            print(f"wrote {Path(args.out_dir) / 'sample_settings.yaml'}")
        else:
            replace = {"prior": args.prior, "decoder": args.decoder, "upsampler": args.upsampler}
            for path in to_diffusers(args.in_dir, args.out_dir, replace):
                print(f"wrote {path}")
    except ConvertError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
