"""Evaluate a checkpoint set on the val (and train) split: `python eval.py checkpoints.decoder=D.ckpt checkpoints.prior=P.ckpt`.

For each split: the real images and their captions (the first ``max_samples``), then, per variant,
generated images for the same captions (one per caption, fixed seeds) and
  - CLIP-space FID (always; features of real vs generated images) and Inception FID (when its weights are available),
  - CLIP score (cosine between each generated image and its caption),
  - caption retrieval top-1 / top-5 (each generated image against the split's distinct captions),
  - diversity (mean pairwise CLIP distance among several samples of one caption).
Variants: ``prior`` (caption -> prior z_i -> decoder), ``no_prior`` (caption + CLIP text embedding used as the image
embedding, the paper's caption-only baseline on the same decoder), ``oracle`` (the real image's CLIP embedding
decoded: what the decoder can do with a perfect prior). ``real`` reports the same metrics for the real images.
Writes ``results.json`` (and ``results.md``, a table) into the run directory.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("PROJECT_ROOT", os.path.dirname(os.path.abspath(__file__)))

import hydra  # noqa: E402
import torch  # noqa: E402
from omegaconf import DictConfig  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

log = logging.getLogger("eval")

VARIANTS = ("prior", "no_prior", "oracle")


class EvalError(ValueError):
    """A usage mistake, reported as one sentence."""


# ----------------------------------------------------------------------------------------------------------- data
def split_urls(cfg: DictConfig) -> dict[str, Any]:
    """{"train": urls, "val": urls} of the configured data module (prepares the emoji shards if needed)."""
    from hydra.utils import instantiate

    dm = instantiate(cfg.data)
    dm.needs = ("image", "txt")
    dm.setup("validate")
    return {"train": dm.train_urls, "val": dm.val_urls}


def read_split(urls: Any, image_size: int, max_samples: int, batch_size: int) -> tuple[torch.Tensor, list[str]]:
    """The first ``max_samples`` (image (N, 3, S, S) in [-1, 1], captions) of ``urls`` in shard order."""
    from unclip_pl.data.shards import build_pipeline

    if urls is None:
        raise EvalError("the data config gives no shards for this split")
    pipe = build_pipeline(urls, needs=("image", "txt"), image_size=image_size, batch_size=batch_size, train=False)
    images, captions = [], []
    for batch in pipe:
        images.append(batch["image"])
        captions += list(batch["txt"])
        if len(captions) >= max_samples:
            break
    if not captions:
        raise EvalError(f"no samples in {urls}")
    return torch.cat(images)[:max_samples], captions[:max_samples]


# ----------------------------------------------------------------------------------------------------------- generate
def generate(pipe, variant: str, captions: list[str], real: torch.Tensor | None, batch_size: int, seed: int,
             upsample: bool, desc: str) -> torch.Tensor:
    """Images for ``captions`` (one each, image i with seed + i) with the given variant: (N, 3, S, S) on the CPU."""
    out = []
    for i in tqdm(range(0, len(captions), batch_size), desc=desc, unit="batch", leave=False):
        caps = captions[i:i + batch_size]
        seeds = [seed + i + j for j in range(len(caps))]
        if variant == "prior":
            z = pipe.prior_embeddings(caps, seeds)
        elif variant == "no_prior":
            z = pipe.embed_texts(caps)
        elif variant == "oracle":
            z = pipe.embed_images(real[i:i + batch_size])
        else:
            raise EvalError(f"unknown variant {variant!r}; choose from {VARIANTS}")
        out.append(pipe.decode(z, caps, seeds, upsample=upsample).float().cpu())
    return torch.cat(out)


# ----------------------------------------------------------------------------------------------------------- metrics
def image_metrics(clip, images: torch.Tensor, captions: list[str], pool: list[str], pool_emb: torch.Tensor,
                  real_feats: torch.Tensor | None, real_images: torch.Tensor | None, inception_weights: Any,
                  k: list[int]) -> tuple[dict[str, Any], torch.Tensor]:
    """Metrics of ``images`` (N, 3, S, S) against their ``captions``; returns (metrics, CLIP features (N, D))."""
    from unclip_pl.metrics.clip_score import caption_retrieval, cosine_scores, encode_captions, encode_images
    from unclip_pl.metrics.fid import InceptionFID, frechet_distance_features

    feats = encode_images(clip, images)
    out: dict[str, Any] = {"n": int(images.shape[0])}
    out["clip_score"] = float(cosine_scores(feats, encode_captions(clip, captions)).mean())
    out.update({k_: v for k_, v in caption_retrieval(feats, captions, pool, pool_emb, k).items() if k_ != "pool_size"})
    if real_feats is not None and min(real_feats.shape[0], feats.shape[0]) < 2:
        log.warning("FID needs at least 2 images per set (got %d): skipped", min(real_feats.shape[0], feats.shape[0]))
        out["clip_fid"] = None
    elif real_feats is not None:
        out["clip_fid"] = frechet_distance_features(real_feats, feats)
        metric, _ = InceptionFID.create(inception_weights)
        if metric is not None and real_images is not None:
            for i in range(0, real_images.shape[0], 64):
                metric.update(real_images[i:i + 64], real=True)
            for i in range(0, images.shape[0], 64):
                metric.update(images[i:i + 64], real=False)
            out["fid_inception"] = metric.compute()
    return out, feats


def diversity_for(pipe, variant: str, captions: list[str], samples: int, seed: int, upsample: bool) -> dict:
    from unclip_pl.metrics.clip_score import encode_images
    from unclip_pl.metrics.diversity import diversity_by_group

    rep = [c for c in captions for _ in range(samples)]
    seeds = [seed + 50_000 + i for i in range(len(rep))]
    if variant == "prior":
        z = pipe.prior_embeddings(rep, seeds)
    else:
        z = pipe.embed_texts(rep)
    images = pipe.decode(z, rep, seeds, upsample=upsample)
    groups = [i // samples for i in range(len(rep))]
    return diversity_by_group(encode_images(pipe.clip, images), groups)


# ----------------------------------------------------------------------------------------------------------- run
def evaluate(cfg: DictConfig, pipe=None, urls: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run the evaluation described by ``cfg``; returns the results dict (also written to results.json)."""
    from sample import build_pipeline
    from unclip_pl.metrics.clip_score import encode_captions, unique_captions
    from unclip_pl.metrics.fid import inception_weights_status

    torch.manual_seed(int(cfg.seed))
    pipe = pipe if pipe is not None else build_pipeline(cfg)
    variants = [str(v) for v in cfg.variants]
    bad = [v for v in variants if v not in VARIANTS]
    if bad:
        raise EvalError(f"unknown variant(s) {bad}; choose from {list(VARIANTS)}")
    if "prior" in variants and pipe.prior is None:
        log.warning("no prior checkpoint: skipping the 'prior' variant")
        variants = [v for v in variants if v != "prior"]
    upsample = bool(cfg.upsample)
    size = pipe.image_size if upsample else int(pipe.decoder.image_size)
    urls = urls if urls is not None else split_urls(cfg)
    k = [int(x) for x in cfg.retrieval_k]
    _, inception_reason = inception_weights_status(cfg.get("inception_weights"))
    log.info("Inception FID: %s", inception_reason)

    results: dict[str, Any] = {
        "checkpoints": pipe.sources, "settings": pipe.settings.to_dict(), "image_size": size, "upsample": upsample,
        "variants": variants, "inception": inception_reason, "seed": int(cfg.seed), "splits": {},
    }
    bs = int(cfg.batch_size)
    for split in cfg.splits:
        t0 = time.time()
        real, captions = read_split(urls[split], size, int(cfg.max_samples), bs)
        pool = unique_captions(captions)
        pool_emb = encode_captions(pipe.clip, pool)
        log.info("%s: %d images, %d distinct captions", split, len(captions), len(pool))
        res: dict[str, Any] = {"n": len(captions), "pool_size": len(pool), "timing_s": {}}
        real_metrics, real_feats = image_metrics(pipe.clip, real, captions, pool, pool_emb, None, None, None, k)
        res["real"] = real_metrics
        for variant in variants:
            t1 = time.time()
            fake = generate(pipe, variant, captions, real, bs, int(cfg.seed), upsample, f"{split}/{variant}")
            res[variant], _ = image_metrics(pipe.clip, fake, captions, pool, pool_emb, real_feats, real,
                                            cfg.get("inception_weights"), k)
            res["timing_s"][variant] = round(time.time() - t1, 1)
            if cfg.get("save_grids"):
                from sample import save_grid

                n = min(32, fake.shape[0])
                save_grid(torch.cat([real[:n], fake[:n]]), Path(cfg.paths.output_dir) / f"{split}_{variant}.png",
                          nrow=8)
        div = cfg.get("diversity") or {}
        if int(div.get("captions", 0)) > 0 and int(div.get("samples", 0)) >= 2:
            caps = pool[: int(div.captions)]
            for variant in [v for v in variants if v in ("prior", "no_prior")]:
                res[variant]["diversity"] = diversity_for(pipe, variant, caps, int(div.samples), int(cfg.seed),
                                                          upsample)["diversity"]
        res["timing_s"]["total"] = round(time.time() - t0, 1)
        results["splits"][split] = res
    out_dir = Path(cfg.paths.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / str(cfg.out)
    path.write_text(json.dumps(results, indent=2, default=str))
    (out_dir / (Path(str(cfg.out)).stem + ".md")).write_text(results_table(results))
    results["json"] = str(path)
    log.info("wrote %s\n%s", path, results_table(results))
    return results


def results_table(results: dict[str, Any]) -> str:
    """A markdown table: one row per (split, variant)."""
    cols = ["clip_fid", "fid_inception", "clip_score", "top1", "top5", "diversity"]
    lines = ["| split | variant | n | " + " | ".join(cols) + " |", "|" + "---|" * (len(cols) + 3)]
    for split, res in results["splits"].items():
        for variant in ["real", *results["variants"]]:
            m = res.get(variant, {})
            vals = [f"{m[c]:.4f}" if isinstance(m.get(c), (int, float)) else "-" for c in cols]
            lines.append(f"| {split} | {variant} | {m.get('n', '-')} | " + " | ".join(vals) + " |")
    return "\n".join(lines) + "\n"


@hydra.main(config_path="conf", config_name="eval", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from sample import SampleError
    from unclip_pl.checkpoint_io import CheckpointError

    try:
        evaluate(cfg)
    except (EvalError, SampleError, CheckpointError) as e:
        print(f"eval.py: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
