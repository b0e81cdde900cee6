"""Sample images from trained unCLIP checkpoints: `python sample.py mode=text prompt="..." checkpoints.decoder=...`.

Modes (see conf/sample.yaml): text | variations | interpolate | textdiff | conditioning | guidance | probe.
Each writes ``<mode>.png`` (a grid) and ``<mode>.json`` (settings: seeds, steps, captions, checkpoints, ...) into the
run directory (``logs/sample/runs/<time>`` by default, ``paths.output_dir``).
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

os.environ.setdefault("PROJECT_ROOT", os.path.dirname(os.path.abspath(__file__)))

import hydra  # noqa: E402
import torch  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402
from torchvision.utils import make_grid, save_image  # noqa: E402

log = logging.getLogger("sample")

MODES = ("text", "variations", "interpolate", "textdiff", "conditioning", "guidance", "probe")


class SampleError(ValueError):
    """A usage mistake, reported as one sentence."""


# ----------------------------------------------------------------------------------------------------------- io
def save_grid(images: torch.Tensor, path: Path, nrow: int) -> Path:
    """Images (N, 3, H, W) in [-1, 1] -> a PNG grid with ``nrow`` images per row."""
    path.parent.mkdir(parents=True, exist_ok=True)
    grid = make_grid((images.detach().float().cpu().clamp(-1, 1) + 1) / 2, nrow=max(1, nrow), padding=2,
                     pad_value=1.0)
    save_image(grid, path)
    return path


def load_image(path: str | os.PathLike, size: int) -> torch.Tensor:
    """An image file -> (1, 3, size, size) in [-1, 1] (centre square crop, bicubic resize)."""
    from PIL import Image

    from unclip_pl.data.transforms import flatten_alpha

    p = Path(path).expanduser()
    if not p.is_file():
        raise SampleError(f"image file not found: {p}")
    img = flatten_alpha(Image.open(p))  # transparent pixels onto white, as the training data
    w, h = img.size
    s = min(w, h)
    img = img.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s)).resize((size, size),
                                                                                          Image.BICUBIC)
    x = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(size, size, 3)
    return x.permute(2, 0, 1)[None].float() / 127.5 - 1.0


def read_prompts(cfg: DictConfig) -> list[str]:
    """``prompt`` (a string or a list) and/or ``prompts_file`` (one caption per non-empty line)."""
    prompts: list[str] = []
    if cfg.get("prompt"):
        p = cfg.prompt
        prompts += [str(x) for x in p] if OmegaConf.is_list(p) else [str(p)]
    if cfg.get("prompts_file"):
        f = Path(cfg.prompts_file).expanduser()
        if not f.is_file():
            raise SampleError(f"prompts_file {f} does not exist")
        prompts += [line.strip() for line in f.read_text().splitlines() if line.strip()]
    return prompts


def pick_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


# ----------------------------------------------------------------------------------------------------------- build
def build_pipeline(cfg: DictConfig):
    from unclip_pl.pipeline import UnCLIPPipeline

    ck = cfg.checkpoints
    if not ck.get("decoder"):
        raise SampleError("no decoder checkpoint: set checkpoints.decoder=/path/to/decoder.ckpt")
    settings = OmegaConf.to_container(cfg.settings, resolve=True) if cfg.get("settings") is not None else None
    clip = OmegaConf.to_container(cfg.clip, resolve=True) if cfg.get("clip") is not None else None
    return UnCLIPPipeline.from_checkpoints(clip=clip, prior=ck.get("prior"), decoder=ck.decoder,
                                           upsamplers=list(ck.get("upsamplers") or []), settings=settings,
                                           which=ck.get("which", "ema"), device=pick_device(cfg.device))


def input_image(pipe, cfg: DictConfig, key: str, prompt_index: int, record: dict[str, Any]) -> torch.Tensor:
    """The image in ``cfg[key]`` (a file), or else one generated from the ``prompt_index``-th prompt."""
    size = pipe.image_size
    if cfg.get(key):
        record[key] = str(cfg[key])
        return load_image(cfg[key], size)
    prompts = read_prompts(cfg)
    if len(prompts) <= prompt_index:
        raise SampleError(f"mode={cfg.mode} needs {key}=/path/to/image.png (or prompt=[...] with at least "
                          f"{prompt_index + 1} caption(s) to generate it from)")
    seed = int(cfg.seed) + 10_000 + prompt_index
    img = pipe.text_to_image([prompts[prompt_index]], 1, [seed], use_prior=pipe.prior is not None)
    record[key] = {"generated_from": prompts[prompt_index], "seed": seed}
    return img


# ----------------------------------------------------------------------------------------------------------- modes
def mode_text(pipe, cfg, rec):
    prompts = read_prompts(cfg)
    if not prompts:
        raise SampleError('mode=text needs prompt="..." or prompts_file=...')
    n = int(cfg.n)
    seeds = [int(cfg.seed) + i for i in range(len(prompts) * n)]
    use_prior = bool(cfg.use_prior) and pipe.prior is not None
    images = pipe.text_to_image(prompts, n, seeds, use_prior=use_prior)
    rec.update(captions=prompts, n=n, seeds=seeds, use_prior=use_prior,
               layout="one row per caption")
    return images, n


def mode_variations(pipe, cfg, rec):
    image = input_image(pipe, cfg, "image", 0, rec)
    n = int(cfg.n)
    seeds = [int(cfg.seed) + i for i in range(n)]
    out = pipe.variations(image, n, invert=bool(cfg.invert), eta=cfg.get("eta"), seeds=seeds,
                          caption=cfg.get("caption"))
    d = pipe.settings.decoder
    rec.update(n=n, seeds=seeds, invert=bool(cfg.invert), caption=cfg.get("caption"),
               eta=cfg.get("eta") if cfg.get("eta") is not None else (d.variation_eta if cfg.invert else d.eta),
               layout="input image, then n variations")
    if cfg.invert:  # inversion and sampling both run DDIM with invert_steps, whatever the decoder's sampler
        rec.update(variation_sampler={"inversion": "ddim", "sampler": "ddim", "steps": d.invert_steps,
                                      "guidance_scale": d.guidance_scale})
    return torch.cat([image.to(out), out]), n + 1


def mode_interpolate(pipe, cfg, rec):
    a = input_image(pipe, cfg, "image", 0, rec)
    b = input_image(pipe, cfg, "image_b", 1, rec)
    k = int(cfg.k)
    out = pipe.interpolate(a, b, k, seed=int(cfg.seed), caption=cfg.get("caption"))
    rec.update(k=k, seed=int(cfg.seed), layout="image, k slerp steps from image to image_b, image_b")
    return torch.cat([a.to(out), out, b.to(out)]), k + 2


def mode_textdiff(pipe, cfg, rec):
    if not cfg.get("caption") or not cfg.get("new_caption"):
        raise SampleError('mode=textdiff needs caption="<describes the image>" and new_caption="<the edit>"')
    image = input_image(pipe, cfg, "image", 0, rec)
    thetas = [float(t) for t in cfg.thetas]
    out = pipe.text_diff(image, cfg.caption, cfg.new_caption, thetas, seed=int(cfg.seed))
    rec.update(caption=cfg.caption, new_caption=cfg.new_caption, thetas=thetas, seed=int(cfg.seed),
               layout="input image, then one decode per theta")
    return torch.cat([image.to(out), out]), len(thetas) + 1


def mode_conditioning(pipe, cfg, rec):
    prompts = read_prompts(cfg)
    if not prompts:
        raise SampleError('mode=conditioning needs prompt="..." or prompts_file=...')
    seeds = [int(cfg.seed) + i for i in range(len(prompts))]
    rows = pipe.conditioning_ablation(prompts, seeds)
    rec.update(captions=prompts, seeds=seeds, rows=list(rows),
               layout="rows: caption only (the decoder's null CLIP embedding) / CLIP text embedding / prior "
                      "embedding; one column per caption")
    return torch.cat(list(rows.values())), len(prompts)


def mode_guidance(pipe, cfg, rec):
    n = int(cfg.n)
    scales = [float(s) for s in cfg.scales]
    seeds = [int(cfg.seed) + i for i in range(n)]
    if cfg.get("image"):
        image = input_image(pipe, cfg, "image", 0, rec)
        z = pipe.embed_images(image).expand(n, -1)
        captions = [cfg.get("caption")] * n
        rec["z_i"] = "CLIP embedding of the image"
    else:
        prompts = read_prompts(cfg)
        if not prompts:
            raise SampleError('mode=guidance needs prompt="..." (z_i from the prior) or image=...')
        captions = [prompts[0]] * n
        z = pipe.prior_embeddings(captions, seeds) if pipe.prior is not None else pipe.embed_texts(captions)
        rec["z_i"] = "prior samples" if pipe.prior is not None else "CLIP text embedding (no prior)"
    out = pipe.guidance_sweep(z, captions, scales, seeds)  # (S, n, 3, H, W)
    rec.update(scales=scales, seeds=seeds, captions=captions[:1], layout="one row per guidance scale")
    return out.flatten(0, 1), n


def mode_probe(pipe, cfg, rec):
    labels = [str(x) for x in (cfg.get("labels") or [])]
    if not labels:
        raise SampleError('mode=probe needs labels=["a label","another label",...]')
    image = input_image(pipe, cfg, "image", 0, rec)
    probs = pipe.probe(image, labels)
    n = int(cfg.n)
    seeds = [int(cfg.seed) + i for i in range(n)]
    out = pipe.variations(image, n, seeds=seeds)
    rec.update(labels=labels, probs={lab: round(float(p), 6) for lab, p in zip(labels, probs)},
               top_label=labels[int(probs.argmax())], seeds=seeds,
               layout="input image, then n decoder samples of its CLIP embedding")
    log.info("probe: %s", ", ".join(f"{lab}: {float(p):.3f}" for lab, p in zip(labels, probs)))
    return torch.cat([image.to(out), out]), n + 1


MODE_FUNCS = {"text": mode_text, "variations": mode_variations, "interpolate": mode_interpolate,
              "textdiff": mode_textdiff, "conditioning": mode_conditioning, "guidance": mode_guidance,
              "probe": mode_probe}


# ----------------------------------------------------------------------------------------------------------- run
def run(cfg: DictConfig, pipe=None) -> dict[str, Any]:
    """Run ``cfg.mode``; returns the JSON record (with ``png`` and ``json`` paths). ``pipe``: reuse a pipeline."""
    if cfg.mode not in MODE_FUNCS:
        raise SampleError(f"mode={cfg.mode} is not a mode: choose one of {', '.join(MODES)}")
    torch.manual_seed(int(cfg.seed))
    pipe = pipe if pipe is not None else build_pipeline(cfg)
    out_dir = Path(cfg.paths.output_dir)
    name = cfg.get("out_name") or cfg.mode
    rec: dict[str, Any] = {"mode": cfg.mode}
    images, nrow = MODE_FUNCS[cfg.mode](pipe, cfg, rec)
    png = save_grid(images, out_dir / f"{name}.png", nrow)
    rec.update(png=str(png), image_size=int(images.shape[-1]), num_images=int(images.shape[0]),
               checkpoints=pipe.sources, settings=pipe.settings.to_dict(), device=str(pipe.device))
    path = out_dir / f"{name}.json"
    path.write_text(json.dumps(rec, indent=2, default=str))
    rec["json"] = str(path)
    log.info("wrote %s and %s", png, path)
    return rec


@hydra.main(config_path="conf", config_name="sample", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from unclip_pl.checkpoint import CheckpointError

    try:
        run(cfg)
    except (SampleError, CheckpointError) as e:
        print(f"sample.py: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    from unclip_pl.utils.cli import exit_on_unknown_override

    exit_on_unknown_override(__file__, "sample")  # a mistyped key: the keys that exist there, not Hydra's bare error
    main()
