"""The AR-vs-diffusion comparison's table: both priors' checkpoints measured the same way, side by side.

For each prior (its EMA weights and the ``sample:`` settings stored in its checkpoint):
  - parameters (the network's; the AR prior's PCA codec is buffers, listed apart),
  - training samples/s (median of the run's logged ``perf/samples_per_sec``), steps and samples seen,
  - validation metrics on the whole val split (``unclip_pl.metrics.prior_metrics``): cos(predicted z_i, true z_i),
    retrieval top-1/top-5 of the true image among the val images with the predicted z_i and with z_t as the query,
    cos to another caption's z_i; the pool size beside them,
  - sampling embeddings/s on the val captions at one torch thread (both with their K/V cache; the AR prior also
    without it, for the ratio),
  - with ``--eval-<prior> DIR``: eval.py's generated-image metrics of the ``prior`` variant on val (caption retrieval
    top-1/top-5 among the pool, CLIP-FD, CLIP score), per judge.

    python experiments/ar_vs_diffusion/compare.py --diffusion D.ckpt --ar A.ckpt \
        --eval-diffusion DIR --eval-ar DIR --out experiments/ar_vs_diffusion/results

Writes ``comparison.json`` and ``comparison.md`` into ``--out``.
"""

from __future__ import annotations

import argparse
import csv
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from unclip_pl.checkpoint import load_stage  # noqa: E402
from unclip_pl.data.emoji import EmojiDataModule  # noqa: E402
from unclip_pl.metrics.prior_metrics import prior_metrics  # noqa: E402
from unclip_pl.pipeline import load_pipeline_clip  # noqa: E402
from unclip_pl.sample_settings import prior_settings  # noqa: E402

PRIORS = ("diffusion", "ar")
NEEDS = ("tokens", "img_emb", "txt_emb")


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def val_batches(clip, root: str, batch_size: int, limit: int | None = None,
                val_fraction: float = 0.07) -> list[dict[str, torch.Tensor]]:
    """The whole emoji val split with its CLIP embeddings, as (tokens, img_emb, txt_emb) batches in shard order."""
    dm = EmojiDataModule(root=root, limit=limit, val_fraction=val_fraction, batch_size=batch_size, num_workers=0,
                         needs=NEEDS, tokenizer=clip.loader_tokenizer, clip=clip, persistent_workers=False)
    dm.prepare_data()
    dm.setup("validate")
    return [{k: b[k] for k in NEEDS} for b in dm.val_dataloader()]


def training_stats(run_dir: Path) -> dict:
    """Steps, samples seen and the median logged samples/s of a run (its csv/metrics.csv)."""
    path = run_dir / "csv" / "metrics.csv"
    if not path.exists():
        return {}
    rates, steps = [], 0
    with path.open() as f:
        for row in csv.DictReader(f):
            steps = max(steps, int(row.get("step") or 0))
            if row.get("perf/samples_per_sec"):
                rates.append(float(row["perf/samples_per_sec"]))
    return {"steps": steps + 1, "samples_per_s_median": statistics.median(rates) if rates else None}


def measure(path: Path, batches, clip, speed_batches: int) -> dict:
    """Params, val metrics and sampling speed of one prior checkpoint (EMA weights, its stored settings)."""
    stage = load_stage(path, which="ema", stage="prior")
    model, settings = stage.model, prior_settings(stage.sample)
    kwargs = settings.sampler_kwargs()
    is_ar = hasattr(model, "codec")
    out = {"checkpoint": str(path), "kind": "ar" if is_ar else "diffusion", "settings": kwargs,
           "params": sum(p.numel() for p in model.parameters()),
           "buffers": sum(b.numel() for b in model.buffers())}
    enc = [clip.encode_text(b["tokens"]) for b in batches]
    preds, imgs, txts = [], [], []
    for i, (b, e) in enumerate(zip(batches, enc)):
        g = torch.Generator().manual_seed(i)
        txt = b["txt_emb"].float()
        preds.append(model.sample(txt, e.tokens.float(), e.mask, generator=g, **kwargs).float())
        imgs.append(b["img_emb"].float())
        txts.append(txt)
    pred, img, txt = torch.cat(preds), torch.cat(imgs), torch.cat(txts)
    out["val"] = {"n": int(img.shape[0]), "pool_size": int(torch.unique(img, dim=0).shape[0]),
                  **prior_metrics(pred, img, txt)}
    if is_ar:  # what the codes can express at best: z_i through the codec and back
        out["val"]["codec_cosine"] = float(model.codec.reconstruction(img)["cosine"])

    def rate(**extra) -> float:
        n, t0 = 0, time.perf_counter()
        for b, e in list(zip(batches, enc))[:speed_batches]:
            model.sample(b["txt_emb"].float(), e.tokens.float(), e.mask, generator=torch.Generator().manual_seed(0),
                         **{**kwargs, **extra})
            n += b["txt_emb"].shape[0]
        return n / (time.perf_counter() - t0)

    out["sampling_emb_s"] = rate(use_cache=True)
    if is_ar:
        out["sampling_emb_s_no_cache"] = rate(use_cache=False)
    return out


def eval_metrics(eval_dir: Path) -> dict:
    """eval.py's val metrics of the ``prior`` variant (and of the real images), per judge."""
    res = json.loads((eval_dir / "results.json").read_text())
    val = res["splits"]["val"]
    return {"judges": res["judges"], "n": val["n"], "pool_size": val["pool_size"], "prior": val["prior"],
            "real": val["real"], "settings": res["settings"], "image_size": res["image_size"]}


def fmt(v, digits: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, int):
        return f"{v:,}"
    return f"{v:.{digits}f}" if abs(v) < 100 else f"{v:,.0f}"


def table(res: dict) -> str:
    d, a = res["diffusion"], res["ar"]
    rows = [
        ("network parameters", fmt(d["params"]), fmt(a["params"])),
        ("buffers (normaliser / PCA codec)", fmt(d["buffers"]), fmt(a["buffers"])),
        ("training steps in the budget (batch 64)", fmt(d["train"].get("steps")), fmt(a["train"].get("steps"))),
        ("training samples/s (median, one core)", fmt(d["train"].get("samples_per_s_median"), 1),
         fmt(a["train"].get("samples_per_s_median"), 1)),
        (f"val cos(predicted z_i, true z_i) (n = {d['val']['n']})", fmt(d["val"]["cos_pred_true"]),
         fmt(a["val"]["cos_pred_true"])),
        ("val baseline cos(z_t, z_i)", fmt(d["val"]["cos_text_true"]), fmt(a["val"]["cos_text_true"])),
        ("val cos(z_i, z_i through the PCA codec) (the AR prior's ceiling)", "-", fmt(a["val"].get("codec_cosine"))),
        ("val cos(predicted z_i, another caption's z_i)", fmt(d["val"]["cos_pred_other"]),
         fmt(a["val"]["cos_pred_other"])),
        (f"val image retrieval top-1 / top-5, predicted z_i as query (pool {d['val']['pool_size']})",
         f"{fmt(d['val']['retrieval_top1'])} / {fmt(d['val']['retrieval_top5'])}",
         f"{fmt(a['val']['retrieval_top1'])} / {fmt(a['val']['retrieval_top5'])}"),
        (f"val image retrieval top-1 / top-5, z_t as query (pool {d['val']['pool_size']})",
         f"{fmt(d['val']['text_retrieval_top1'])} / {fmt(d['val']['text_retrieval_top5'])}",
         f"{fmt(a['val']['text_retrieval_top1'])} / {fmt(a['val']['text_retrieval_top5'])}"),
        ("sampling embeddings/s (K/V cache, one thread)", fmt(d["sampling_emb_s"], 1), fmt(a["sampling_emb_s"], 1)),
        ("sampling embeddings/s without the K/V cache", "-", fmt(a.get("sampling_emb_s_no_cache"), 1)),
    ]
    if "eval" in d and "eval" in a:
        for key, judge in d["eval"]["judges"].items():
            de, ae = d["eval"]["prior"][key], a["eval"]["prior"][key]
            label = f"{judge['label']} ({judge['model_name']}, {judge['fingerprint']})"
            pool = d["eval"]["pool_size"]
            rows += [
                (f"generated val images: caption top-1 / top-5 (pool {pool}), by {label}",
                 f"{fmt(de['top1'])} / {fmt(de['top5'])}", f"{fmt(ae['top1'])} / {fmt(ae['top5'])}"),
                (f"generated val images: CLIP-FD, by {label} (real val images' own top-1/top-5: "
                 f"{fmt(d['eval']['real'][key]['top1'])} / {fmt(d['eval']['real'][key]['top5'])})",
                 fmt(de["clip_fid"]), fmt(ae["clip_fid"])),
                (f"generated val images: CLIP score, by {label}", fmt(de["clip_score"]), fmt(ae["clip_score"])),
            ]
    lines = ["| | diffusion prior | AR prior |", "|---|---|---|"]
    lines += [f"| {name} | {x} | {y} |" for name, x, y in rows]
    lines += ["", f"Sampler settings: diffusion {d['settings']}; AR {a['settings']}.",
              f"Measured on {res['device']}, torch {res['torch']}, {res['threads']} torch thread(s); load average "
              f"{res['load_average']} at the end."]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for name in PRIORS:
        p.add_argument(f"--{name}", type=Path, required=True, help=f"the {name} prior's checkpoint")
        p.add_argument(f"--eval-{name}", type=Path, default=None, help="eval.py run directory of that prior")
    p.add_argument("--data-root", default=str(ROOT / "data" / "emoji"))
    p.add_argument("--data-limit", type=int, default=None, help="data.limit of the runs (default: all emoji)")
    p.add_argument("--val-fraction", type=float, default=0.07, help="data.val_fraction of the runs")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--speed-batches", type=int, default=2, help="val batches timed for the sampling speed")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    first = load_stage(args.diffusion, which="ema", stage="prior")
    clip = load_pipeline_clip(None, decoder=first)
    batches = val_batches(clip, args.data_root, args.batch_size, args.data_limit, args.val_fraction)
    res = {"device": f"CPU {cpu_name()}", "torch": torch.__version__, "threads": torch.get_num_threads(),
           "clip": clip.fingerprint}
    for name in PRIORS:
        path = getattr(args, name)
        m = measure(path, batches, clip, args.speed_batches)
        m["train"] = training_stats(path.parent.parent)
        ev = getattr(args, f"eval_{name}")
        if ev is not None:
            m["eval"] = eval_metrics(ev)
        res[name] = m
        print(f"{name}: {json.dumps({k: v for k, v in m.items() if k != 'eval'}, default=str)}", flush=True)
    res["load_average"] = " / ".join(Path("/proc/loadavg").read_text().split()[:3])
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "comparison.json").write_text(json.dumps(res, indent=2, default=str))
    md = table(res)
    (args.out / "comparison.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
