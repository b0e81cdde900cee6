"""Evaluate a checkpoint set on the val (and train) split:
`python eval.py checkpoints.decoder=D.ckpt checkpoints.prior=P.ckpt`.

For each split: the real images and their captions (the whole split, or a seeded random subset of at most
``max_samples.<split>`` drawn across all of its shards), then, per variant, generated images for the same captions
(one per caption, fixed seeds) and
  - CLIP-space FID (always; features of real vs generated images) and Inception FID (when its weights are available),
  - CLIP score (cosine between each generated image and its caption),
  - caption retrieval top-1 / top-5 (each generated image against the evaluated images' distinct captions: the
    pool, whose size is reported beside every retrieval figure),
  - diversity (mean pairwise CLIP distance among several samples of one caption).
Every CLIP metric is scored by each judge: the conditioning CLIP (the one the prior and decoder were trained on, which
they can partly satisfy by inverting it) and, with ``judge=...``, a separate evaluation CLIP
(``unclip_pl.metrics.judge``).
Variants: ``prior`` (caption -> prior z_i -> decoder), ``no_prior`` (caption + CLIP text embedding used as the image
embedding, the paper's caption-only baseline on the same decoder), ``oracle`` (the real image's CLIP embedding
decoded: what the decoder can do with a perfect prior). ``real`` reports the same metrics for the real images.
Writes ``results.json`` (and ``results.md``, a table) into the run directory.
"""

from __future__ import annotations

import json
import logging
import os
import random
import sys
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
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

    dm = instantiate(cfg.data, needs=("image", "txt"))
    dm.setup("validate")
    return {"train": dm.train_urls, "val": dm.val_urls}


def split_cap(max_samples: Any, split: str) -> int | None:
    """The image cap of ``split``: ``max_samples`` is null (no cap), an int (every split) or {split: int | null}
    (a split it does not name is read whole)."""
    if isinstance(max_samples, Mapping):
        max_samples = max_samples.get(split)
    if max_samples is None:
        return None
    if isinstance(max_samples, bool) or not isinstance(max_samples, int) or max_samples < 1:
        raise EvalError(f"max_samples for {split} must be a positive integer or null (the whole split), "
                        f"got {max_samples!r}")
    return int(max_samples)


def seeded_subset(items: Iterable[Any], k: int, seed: int) -> tuple[list[Any], int]:
    """A uniform random subset of ``k`` of ``items`` in one pass (reservoir sampling), returned in stream order;
    the same ``seed`` and stream give the same subset. Returns (subset, number of items seen)."""
    rng = random.Random(seed)
    reservoir: list[tuple[int, Any]] = []
    n = 0
    for n, item in enumerate(items, start=1):
        if len(reservoir) < k:
            reservoir.append((n - 1, item))
        else:
            j = rng.randrange(n)
            if j < k:
                reservoir[j] = (n - 1, item)
    reservoir.sort(key=lambda t: t[0])
    return [item for _, item in reservoir], n


@dataclass
class SplitData:
    """The evaluated samples of one split: images (N, 3, S, S) in [-1, 1], and per sample caption, key, shard."""

    images: torch.Tensor
    captions: list[str]
    keys: list[str]
    shards: list[str]
    split_size: int       # samples in the whole split
    shards_total: int     # shards of the whole split
    max_samples: int | None
    seed: int

    def describe(self) -> dict[str, Any]:
        subset = "all" if self.max_samples is None or self.max_samples >= self.split_size else "random"
        out: dict[str, Any] = {"kind": subset, "n": len(self.captions), "split_size": self.split_size,
                               "shards_used": len(set(self.shards)), "shards_total": self.shards_total,
                               "max_samples": self.max_samples}
        if subset == "random":
            out["seed"] = self.seed
        return out


def read_split(urls: Any, image_size: int, max_samples: int | None, seed: int, batch_size: int = 256) -> SplitData:
    """The samples of ``urls`` (a shard spec): all of them in shard order when ``max_samples`` is None (or at least
    the split's size), else ``max_samples`` of them drawn uniformly at random across every shard with ``seed``.

    Only the chosen samples' images are decoded; corrupt images are skipped (one warning each).
    """
    from unclip_pl.data.decode import DecodeSamples, collate
    from unclip_pl.data.stats import LoaderStats
    from unclip_pl.data.tar_reader import tar_samples
    from unclip_pl.data.urls import expand_urls

    if urls is None:
        raise EvalError("the data config gives no shards for this split")
    url_list = expand_urls(urls)
    raw = tar_samples({"url": u} for u in url_list)
    split_size = 0
    if max_samples is None:
        chosen: Iterable[dict] = raw
    else:
        chosen, split_size = seeded_subset(raw, int(max_samples), seed)
    decode = DecodeSamples(("image", "txt"), image_size, False, LoaderStats())
    images, captions, keys, shards, buf = [], [], [], [], []
    seen = 0
    for sample in chosen:
        seen += 1
        out = next(iter(decode([sample])), None)
        if out is None:
            continue
        buf.append(out)
        shards.append(sample.get("__url__", ""))
        if len(buf) >= batch_size:
            images.append(collate(buf)["image"])
            buf = []
        captions.append(out["txt"])
        keys.append(out["key"])
    if buf:
        images.append(collate(buf)["image"])
    if not captions:
        raise EvalError(f"no samples in {urls}")
    split_size = seen if max_samples is None else split_size
    return SplitData(torch.cat(images), captions, keys, shards, split_size, len(url_list), max_samples, seed)


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
@dataclass
class JudgeFeatures:
    """One judge's fixed features of a split: caption embeddings (N, D), pool embeddings (U, D), real images' (N, D)."""

    judge: Any
    cap_emb: torch.Tensor
    pool_emb: torch.Tensor
    real_feats: torch.Tensor


def judge_features(judge, real: torch.Tensor, captions: list[str], pool: list[str]) -> JudgeFeatures:
    from unclip_pl.metrics.clip_score import encode_captions, encode_images

    pool_emb = encode_captions(judge.clip, pool)
    index = {c: i for i, c in enumerate(pool)}
    cap_emb = pool_emb[torch.tensor([index[c] for c in captions], dtype=torch.long)]
    return JudgeFeatures(judge, cap_emb, pool_emb, encode_images(judge.clip, real))


def clip_metrics(feats: torch.Tensor, jf: JudgeFeatures, captions: list[str], pool: list[str], k: list[int],
                 fid: bool) -> dict[str, Any]:
    """One judge's metrics of images with CLIP features ``feats`` (N, D): CLIP score, retrieval top-k among the
    ``pool`` (its size and the image count beside them), and CLIP-space FID against the real images when ``fid``."""
    from unclip_pl.metrics.clip_score import caption_retrieval, cosine_scores
    from unclip_pl.metrics.fid import frechet_distance_features

    out: dict[str, Any] = {"n": int(feats.shape[0])}
    out["clip_score"] = float(cosine_scores(feats, jf.cap_emb).mean())
    retrieval = caption_retrieval(feats, captions, pool, jf.pool_emb, k)
    out.update({k_: v for k_, v in retrieval.items() if k_ != "pool_size"})
    out["pool_size"] = int(retrieval["pool_size"])
    if fid:
        n = min(jf.real_feats.shape[0], feats.shape[0])
        if n < 2:
            log.warning("FID needs at least 2 images per set (got %d): skipped", n)
            out["clip_fid"] = None
        else:
            out["clip_fid"] = frechet_distance_features(jf.real_feats, feats)
    return out


def inception_fid(real_images: torch.Tensor, images: torch.Tensor, weights: Any) -> float | None:
    """Inception FID of ``images`` against ``real_images`` (both (N, 3, S, S) in [-1, 1]); None without weights."""
    from unclip_pl.metrics.fid import InceptionFID

    if min(real_images.shape[0], images.shape[0]) < 2:
        return None
    metric, _ = InceptionFID.create(weights)
    if metric is None:
        return None
    for i in range(0, real_images.shape[0], 64):
        metric.update(real_images[i:i + 64], real=True)
    for i in range(0, images.shape[0], 64):
        metric.update(images[i:i + 64], real=False)
    return metric.compute()


def variant_metrics(images: torch.Tensor, features: list[JudgeFeatures], captions: list[str], pool: list[str],
                    k: list[int], real_images: torch.Tensor | None = None, inception_weights: Any = None
                    ) -> dict[str, Any]:
    """{"n", "pool_size", <judge key>: that judge's metrics, ..., "fid_inception"?} of ``images``; FIDs (CLIP and
    Inception) only when ``real_images`` is given (generated images)."""
    from unclip_pl.metrics.clip_score import encode_images

    out: dict[str, Any] = {"n": int(images.shape[0]), "pool_size": len(pool)}
    for jf in features:
        out[jf.judge.key] = clip_metrics(encode_images(jf.judge.clip, images), jf, captions, pool, k,
                                         fid=real_images is not None)
    if real_images is not None:
        value = inception_fid(real_images, images, inception_weights)
        if value is not None:
            out["fid_inception"] = value
    return out


def diversity_images(pipe, variant: str, captions: list[str], samples: int, seed: int, upsample: bool
                     ) -> tuple[torch.Tensor, list[int]]:
    """``samples`` images of each caption (seeds from seed + 50,000) and the caption index of each."""
    rep = [c for c in captions for _ in range(samples)]
    seeds = [seed + 50_000 + i for i in range(len(rep))]
    if variant == "prior":
        z = pipe.prior_embeddings(rep, seeds)
    else:
        z = pipe.embed_texts(rep)
    images = pipe.decode(z, rep, seeds, upsample=upsample)
    return images, [i // samples for i in range(len(rep))]


def load_judges(cfg: DictConfig, pipe) -> list:
    """[the conditioning CLIP, the ``judge`` CLIP if one is configured]."""
    from unclip_pl.metrics.judge import JudgeError, conditioning_judge, describe_block, load_judge

    clip_cfg = cfg.get("clip")
    source = ("the CLIP stored with the decoder checkpoint" if clip_cfg is None
              else f"clip: {describe_block(clip_cfg)}")
    judges = [conditioning_judge(pipe.clip, source)]
    try:
        judge = load_judge(cfg.get("judge"), device=pipe.device)
    except JudgeError as e:
        raise EvalError(str(e)) from e
    if judge is not None:
        if judge.fingerprint is not None and judge.fingerprint == judges[0].fingerprint:
            log.warning("the judge CLIP has the same weights as the conditioning CLIP (fingerprint %s): its figures "
                        "are not independent", judge.fingerprint)
        judges.append(judge)
    for j in judges:
        log.info("judge %s: %s (fingerprint %s)", j.label, j.source, j.fingerprint)
    return judges


# ----------------------------------------------------------------------------------------------------------- run
def evaluate(cfg: DictConfig, pipe=None, urls: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run the evaluation described by ``cfg``; returns the results dict (also written to results.json)."""
    from sample import build_pipeline
    from unclip_pl.metrics.clip_score import encode_images, unique_captions
    from unclip_pl.metrics.diversity import diversity_by_group
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
    judges = load_judges(cfg, pipe)
    upsample = bool(cfg.upsample)
    size = pipe.image_size if upsample else int(pipe.decoder.image_size)
    urls = urls if urls is not None else split_urls(cfg)
    k = [int(x) for x in cfg.retrieval_k]
    _, inception_reason = inception_weights_status(cfg.get("inception_weights"))
    log.info("Inception FID: %s", inception_reason)

    results: dict[str, Any] = {
        "checkpoints": pipe.sources, "settings": pipe.settings.to_dict(), "image_size": size, "upsample": upsample,
        "variants": variants, "inception": inception_reason, "seed": int(cfg.seed), "retrieval_k": k,
        "judges": {j.key: j.describe() for j in judges}, "splits": {},
    }
    bs = int(cfg.batch_size)
    for split in cfg.splits:
        t0 = time.time()
        data = read_split(urls[split], size, split_cap(cfg.get("max_samples"), split), int(cfg.seed))
        real, captions = data.images, data.captions
        pool = unique_captions(captions)
        log.info("%s: %d images (%s of %d), retrieval pool %d distinct captions", split, len(captions),
                 data.describe()["kind"], data.split_size, len(pool))
        res: dict[str, Any] = {"n": len(captions), "pool_size": len(pool), "subset": data.describe(),
                               "timing_s": {}}
        features = [judge_features(j, real, captions, pool) for j in judges]
        res["real"] = variant_metrics(real, features, captions, pool, k)
        for variant in variants:
            t1 = time.time()
            fake = generate(pipe, variant, captions, real, bs, int(cfg.seed), upsample, f"{split}/{variant}")
            res[variant] = variant_metrics(fake, features, captions, pool, k, real, cfg.get("inception_weights"))
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
                images, groups = diversity_images(pipe, variant, caps, int(div.samples), int(cfg.seed), upsample)
                for j in judges:
                    res[variant][j.key]["diversity"] = diversity_by_group(encode_images(j.clip, images),
                                                                          groups)["diversity"]
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


def judged_columns(retrieval_k: list[int]) -> list[str]:
    """The metrics every judge reports, in table order."""
    return ["clip_fid", "clip_score", *[f"top{k}" for k in retrieval_k], "diversity"]


def _fmt(v: Any) -> str:
    return f"{v:.4f}" if isinstance(v, (int, float)) and not isinstance(v, bool) else "-"


def results_table(results: dict[str, Any]) -> str:
    """Markdown: who judged, what was evaluated per split, then one row per (split, variant) with a column group
    per judge (``cond ...``, ``judge ...``) and the images / retrieval pool size beside the figures."""
    from unclip_pl.metrics.judge import CONDITIONING, JUDGE

    judges = results.get("judges", {})
    keys = [key for key in (CONDITIONING, JUDGE) if key in judges]
    lines = ["Scored by (every CLIP metric once per judge; the column prefix names the judge):", ""]
    for key in keys:
        j = judges[key]
        role = ("the conditioning CLIP, which the prior and decoder were trained on: its figures partly reward "
                "inverting it" if key == CONDITIONING else "a separate evaluation CLIP")
        lines.append(f"- `{j['label']}` = {j['model_name']} (fingerprint {j['fingerprint']}, {j['source']}): {role}")
    if JUDGE not in judges:
        lines.append("- no separate judge (`judge: null`): only the conditioning CLIP scored these images; set "
                     "`judge=/path/to/clip.pt` (an exported CLIP) for figures from an independent CLIP")
    elif judges[JUDGE].get("fingerprint") == judges[CONDITIONING].get("fingerprint"):
        lines.append("- note: the judge has the same weights as the conditioning CLIP, so it is not independent")
    lines += ["", f"Inception FID (no CLIP involved): {results.get('inception', '-')}", "", "Evaluated images:", ""]
    for split, res in results["splits"].items():
        sub = res.get("subset", {})
        if sub.get("kind") == "random":
            what = (f"{res['n']} drawn at random (seed {sub.get('seed')}) from the {sub.get('split_size')} of the "
                    f"split, from {sub.get('shards_used')} of its {sub.get('shards_total')} shard(s)")
        else:
            what = f"all {res['n']} of the split ({sub.get('shards_total', '?')} shard(s))"
        trivial = [k_ for k_ in results.get("retrieval_k", []) if k_ >= res["pool_size"]]
        note = (f" (top{trivial[0]} is 1 by construction: the pool has only {res['pool_size']})" if trivial else "")
        lines.append(f"- {split}: {what}; retrieval ranks among the {res['pool_size']} distinct captions of these "
                     f"images{note}")
    judged = judged_columns(results.get("retrieval_k", [1, 5]))
    cols = [f"{judges[key]['label']} {c}" for key in keys for c in judged] + ["fid_inception"]
    lines += ["", "| split | variant | images | pool | " + " | ".join(cols) + " |", "|" + "---|" * (len(cols) + 4)]
    for split, res in results["splits"].items():
        for variant in ["real", *results["variants"]]:
            m = res.get(variant, {})
            vals = [_fmt(m.get(key, {}).get(c)) for key in keys for c in judged] + [_fmt(m.get("fid_inception"))]
            lines.append(f"| {split} | {variant} | {m.get('n', '-')} | {m.get('pool_size', '-')} | "
                         + " | ".join(vals) + " |")
    return "\n".join(lines) + "\n"


@hydra.main(config_path="conf", config_name="eval", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from sample import SampleError
    from unclip_pl.checkpoint import CheckpointError

    try:
        evaluate(cfg)
    except (EvalError, SampleError, CheckpointError) as e:
        print(f"eval.py: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    from unclip_pl.utils.cli import exit_on_unknown_override

    exit_on_unknown_override(__file__, "eval")  # a mistyped key: the keys that exist there, not Hydra's bare error
    main()
