"""This project's unCLIP decoder against DALLE2-pytorch's at the same wall-clock budget (experiments/vs_dalle2).

Subcommands (``run.sh`` runs them in order; see the README for the setup):

- ``prepare``: the emoji train and val images at the decoder's size (uint8), their captions, and the frozen
  conditioning CLIP's image embeddings and per-token caption states (zero at padding) -> one ``data.pt``. Both
  decoders read these same tensors (this project's training reads the same images and embeddings through its own
  loader and runs the CLIP text tower in its step).
- ``train-dalle2``: DALLE2-pytorch's ``Unet`` + ``Decoder`` at the shape of ``conf/decoder/base.yaml`` from those
  tensors in memory, for a wall-clock budget (AdamW, linear warm-up, the project's EMA, gradient clipping 1, bf16
  autocast as the project's ``trainer.precision=bf16-mixed``); refuses (exit 3) when its loss did not fall.
- ``decode``: every val item from its real z_i and caption, with this project's DDIM sampler for both decoders (the
  same code, the same starting noise ``x_T`` per seed = item index; DALLE2-pytorch's network and its own
  classifier-free guidance ``forward_with_cond_scale`` inside it, after checking that its noise schedule is this
  project's cosine schedule).
- ``score``: caption retrieval top-1/top-5 among all distinct val captions (pool size stated) and the Frechet
  distance to the real val images in CLIP image-embedding space, under the conditioning CLIP and the judge CLIP.

``prepare`` and ``score`` run in the project's environment; ``train-dalle2`` and ``decode --kind dalle2`` in one
with the ``vs_dalle2`` extra (``dalle2-pytorch`` pins an older open_clip, so it is best kept in its own virtual
environment; this script imports nothing of open_clip there). DALLE2-pytorch is used here only: the package never
imports it.
"""

from __future__ import annotations

import argparse
import csv
import functools
import json
import math
import sys
import tarfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

SAMPLER = {"sampler": "ddim", "steps": 25, "eta": 0.0}   # the one sampler setting both decoders are decoded with


def fail(msg: str, code: int = 2):
    print(f"vs_dalle2: {msg}", file=sys.stderr)
    raise SystemExit(code)


# ------------------------------------------------------------------------------------------------------------ prepare
def read_split(urls: list[str], size: int, limit: int | None = None) -> tuple[torch.Tensor, list[str]]:
    """The (image, caption) samples of webdataset shards in shard and member order -> (N, 3, size, size) uint8 and
    N captions. Members of one sample share the name before the first dot."""
    from unclip_pl.data.transforms import decode_image

    images, captions = [], []
    for url in urls:
        parts: dict[str, dict[str, bytes]] = {}
        order: list[str] = []
        with tarfile.open(url) as tar:
            for m in tar:
                if not m.isfile():
                    continue
                key, _, ext = Path(m.name).name.partition(".")
                if key not in parts:
                    parts[key] = {}
                    order.append(key)
                parts[key][ext] = tar.extractfile(m).read()
        for key in order:
            p = parts[key]
            img = p.get("png") or p.get("jpg") or p.get("webp")
            if img is None or "txt" not in p:
                continue
            images.append(torch.from_numpy(decode_image(img, size).copy()).permute(2, 0, 1))
            captions.append(p["txt"].decode("utf-8").strip())
            if limit is not None and len(images) >= limit:
                return torch.stack(images), captions
    if not images:
        fail(f"no (image, caption) samples in {urls}")
    return torch.stack(images), captions


@torch.no_grad()
def clip_conditioning(clip, images: torch.Tensor, captions: list[str], batch: int = 128):
    """uint8 (N, 3, S, S) + N captions -> img_emb (N, D) unit-norm, states (N, L, W) and mask (N, L) bool, L the
    longest caption's length; states are zero where the mask is False (DALLE2-pytorch reads its text mask from the
    non-zero rows of the encodings)."""
    embs, states, masks = [], [], []
    for i in range(0, len(captions), batch):
        x = images[i:i + batch].float() / 127.5 - 1.0
        embs.append(clip.encode_image(x).float())
        enc = clip.encode_text(list(captions[i:i + batch]))
        states.append(enc.tokens.float())
        masks.append(enc.mask.bool())
    L = max(s.shape[1] for s in states)
    states = torch.cat([F.pad(s, (0, 0, 0, L - s.shape[1])) for s in states])
    mask = torch.cat([F.pad(m, (0, L - m.shape[1])) for m in masks])
    return torch.cat(embs), states * mask[..., None], mask


def cmd_prepare(args) -> None:
    from unclip_pl.clip.frozen import load_clip
    from unclip_pl.data.emoji import prepare_emoji

    torch.set_num_threads(args.threads)
    urls = prepare_emoji(args.data_root, progress=False)
    clip = load_clip("unclip-tiny", checkpoint=args.clip)
    out = {"image_size": args.image_size, "clip": {"path": str(args.clip), "fingerprint": clip.fingerprint,
                                                   "embed_dim": clip.embed_dim, "text_width": clip.text_width}}
    for split, limit in (("train", args.limit_train), ("val", args.limit_val)):
        images, captions = read_split(urls[split], args.image_size, limit)
        emb, states, mask = clip_conditioning(clip, images, captions)
        out[split] = {"images": images, "captions": captions, "img_emb": emb, "states": states, "mask": mask}
        print(f"[prepare] {split}: {len(captions)} items, {len(set(captions))} distinct captions, caption states "
              f"{tuple(states.shape)}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    torch.save(out, args.out)


# ------------------------------------------------------------------------------------------------------- DALLE2 side
def attention_levels(image_size: int, num_levels: int, resolutions: list[int]) -> tuple[bool, ...]:
    """Self-attention per U-Net level (level i works at image_size / 2**i) at the given resolutions."""
    return tuple((image_size >> i) in set(resolutions) for i in range(num_levels))


def build_dalle2(cfg: dict):
    """DALLE2-pytorch's (Unet, Decoder) from the plain ``cfg`` this script stores. Returns (decoder, its unet)."""
    from dalle2_pytorch import Decoder, Unet

    # Pitfall 3: DALLE2-pytorch's Unet makes image_to_tokens an nn.Identity when cond_dim equals the image
    # embedding width, and then fails on the (B, D) embedding where it expects (B, tokens, cond_dim).
    if cfg["cond_dim"] == cfg["image_embed_dim"]:
        fail(f"cond_dim {cfg['cond_dim']} equals the image-embedding width: DALLE2-pytorch's Unet fails then; "
             f"give another --cond-dim")
    unet = Unet(dim=cfg["dim"], image_embed_dim=cfg["image_embed_dim"], text_embed_dim=cfg["text_embed_dim"],
                cond_dim=cfg["cond_dim"], dim_mults=tuple(cfg["dim_mults"]), num_resnet_blocks=cfg["num_res_blocks"],
                self_attn=tuple(cfg["self_attn"]), attn_dim_head=cfg["attn_dim_head"], attn_heads=cfg["attn_heads"],
                cond_on_text_encodings=True, cond_on_image_embeds=True, max_text_len=cfg["max_text_len"],
                channels=3)
    decoder = Decoder(unet, image_size=cfg["image_size"], timesteps=1000, beta_schedule="cosine", loss_type="l2",
                      image_cond_drop_prob=cfg["clip_drop_prob"], text_cond_drop_prob=cfg["text_drop_prob"],
                      learned_variance=False)
    # Pitfall 1: Decoder re-creates the Unet it is given whenever its settings differ from the decoder's
    # (cast_model_parameters builds a new one with fresh weights): the network that trains and samples is
    # decoder.unets[0], never the object passed in. Everything below uses that one.
    return decoder, decoder.unets[0]


@torch.no_grad()
def probe_loss(unet, noise_scheduler, images01: torch.Tensor, emb: torch.Tensor, enc: torch.Tensor) -> float:
    """Noise-prediction MSE of ``unet`` on a fixed batch at fixed timesteps and noise (no condition dropout)."""
    g = torch.Generator().manual_seed(1234)
    x0 = images01 * 2 - 1
    t = torch.randint(0, noise_scheduler.num_timesteps, (x0.shape[0],), generator=g)
    noise = torch.randn(x0.shape, generator=g)
    xt = noise_scheduler.q_sample(x_start=x0, t=t, noise=noise)
    was = unet.training
    unet.eval()
    pred = unet(xt, t, image_embed=emb, text_encodings=enc)
    unet.train(was)
    return F.mse_loss(pred.float(), noise).item()


def autocast(precision: str):
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")


def cmd_train_dalle2(args) -> None:
    from unclip_pl.lit.base import EMA, warmup_cosine

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    data = torch.load(args.data, weights_only=False)
    tr = data["train"]
    # Pitfall 2: DALLE2-pytorch's Decoder takes images in [0, 1] (it maps them to [-1, 1] itself) and returns
    # [0, 1] from its own sampler; this project's tensors are [-1, 1]. decode() below works in [-1, 1] throughout.
    images01 = tr["images"].float() / 255.0
    emb, enc = tr["img_emb"].float(), tr["states"].float()
    S = int(data["image_size"])
    levels = len(args.dim_mults)
    cfg = {"dim": args.dim, "dim_mults": list(args.dim_mults), "num_res_blocks": args.num_res_blocks,
           "self_attn": list(attention_levels(S, levels, args.attention_resolutions)),
           "attn_dim_head": args.head_channels, "attn_heads": args.attn_heads,
           "cond_dim": args.cond_dim if args.cond_dim else args.dim, "image_embed_dim": int(emb.shape[1]),
           "text_embed_dim": int(enc.shape[2]), "max_text_len": int(enc.shape[1]), "image_size": S,
           "clip_drop_prob": args.clip_drop_prob, "text_drop_prob": args.text_drop_prob}
    decoder, unet = build_dalle2(cfg)
    params = list(decoder.unets.parameters())       # pitfall 1: the decoder's own copy of the network
    n_params = sum(p.numel() for p in params)
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, functools.partial(warmup_cosine, warmup=args.warmup,
                                                                     total=None, min_ratio=1.0))
    ema = EMA(unet, args.ema)
    scheduler = decoder.noise_schedulers[0]
    pb = slice(0, min(64, len(images01)))
    before = probe_loss(unet, scheduler, images01[pb], emb[pb], enc[pb])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(args.seed)
    N, B = len(images01), args.batch_size
    perm, pos, step, losses = torch.randperm(N, generator=g), 0, 0, []
    budget = args.minutes * 60.0
    print(f"[dalle2] {n_params / 1e6:.2f}M parameters; {N} training items; {args.minutes} min budget; probe loss "
          f"{before:.4f}", flush=True)
    decoder.train()
    t0 = time.perf_counter()
    with open(out / "train_log.csv", "w", newline="") as fh:
        log = csv.writer(fh)
        log.writerow(["step", "seconds", "loss", "lr"])
        while True:
            elapsed = time.perf_counter() - t0
            if elapsed >= budget or (args.max_steps and step >= args.max_steps):
                break
            if pos + B > N:
                perm, pos = torch.randperm(N, generator=g), 0
            idx = perm[pos:pos + B]
            pos += B
            with autocast(args.precision):
                loss = decoder(images01[idx], image_embed=emb[idx], text_encodings=enc[idx])
            if not torch.isfinite(loss):
                fail(f"DALLE2-pytorch's loss is {loss.item()} at step {step}", 3)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)   # trainer.gradient_clip_val of this project's runs
            opt.step()
            sched.step()
            ema.update(unet)
            step += 1
            losses.append(loss.item())
            log.writerow([step, f"{time.perf_counter() - t0:.2f}", f"{losses[-1]:.5f}",
                          f"{sched.get_last_lr()[0]:.3g}"])
            if step % 10 == 0:
                fh.flush()
    seconds = time.perf_counter() - t0
    after = probe_loss(unet, scheduler, images01[pb], emb[pb], enc[pb])
    after_ema = probe_loss(ema.module, scheduler, images01[pb], emb[pb], enc[pb])
    k = max(1, len(losses) // 10)
    check = {"probe_before": before, "probe_after": after, "probe_after_ema": after_ema,
             "first_tenth_mean": sum(losses[:k]) / k if losses else math.nan,
             "last_tenth_mean": sum(losses[-k:]) / k if losses else math.nan, "min_drop": args.min_loss_drop}
    check["falls"] = bool(losses) and after < before * (1 - args.min_loss_drop)
    summary = {"kind": "dalle2", "steps": step, "seconds": seconds, "img_per_s": step * B / max(seconds, 1e-9),
               "batch_size": B, "params": n_params, "loss_check": check, "precision": args.precision,
               "threads": args.threads, "dalle2_pytorch": _version("dalle2-pytorch")}
    torch.save({"config": cfg, "ema": ema.module.state_dict(), "model": unet.state_dict(), **summary},
               out / "dalle2.pt")
    (out / "train.json").write_text(json.dumps(summary, indent=1))
    print(f"[dalle2] {step} steps in {seconds:.0f} s ({summary['img_per_s']:.1f} img/s); probe loss {before:.4f} -> "
          f"{after:.4f} (EMA {after_ema:.4f})", flush=True)
    if not check["falls"]:
        fail(f"DALLE2-pytorch's loss did not fall (probe {before:.4f} -> {after:.4f}, needs a drop of "
             f"{args.min_loss_drop:.0%}): its numbers would mean nothing", 3)


def _version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def cmd_train_info(args) -> None:
    """train.json of this project's run (train.py): its optimiser steps (the checkpoint's global_step) in the
    budget."""
    obj = torch.load(args.ckpt, map_location="cpu", weights_only=False, mmap=True)
    steps = int(obj.get("global_step", 0))
    seconds = args.minutes * 60.0
    summary = {"kind": "unclip_pl", "steps": steps, "seconds": seconds, "img_per_s": steps * args.batch_size / seconds,
               "batch_size": args.batch_size, "params": sum(v.numel() for k, v in obj["state_dict"].items()
                                                            if k.startswith("model.unet."))}
    Path(args.out).write_text(json.dumps(summary, indent=1))


# ------------------------------------------------------------------------------------------------------------ decode
def dalle2_model_fn(unet, emb: torch.Tensor, enc: torch.Tensor, guidance: float):
    """model_fn(x, t) -> eps for this project's samplers: DALLE2-pytorch's network with its own classifier-free
    guidance (its learned null image and text tokens in the unconditional pass); x in [-1, 1] (pitfall 2)."""
    return lambda x, t: unet.forward_with_cond_scale(x, t, image_embed=emb, text_encodings=enc, cond_scale=guidance)


def check_same_schedule(diffusion, noise_scheduler) -> None:
    ours = diffusion.alphas_cumprod.double()
    theirs = noise_scheduler.alphas_cumprod.double().cpu()
    if ours.shape != theirs.shape or not torch.allclose(ours, theirs, atol=1e-5):
        fail("DALLE2-pytorch's noise schedule is not this project's cosine schedule: one sampler cannot decode both")


def load_decoder(kind: str, ckpt: str, weights: str = "ema"):
    """-> (model, summary): this project's Decoder or DALLE2-pytorch's Unet, with its EMA weights (``weights="ema"``)
    or the trained weights themselves ("raw"). The summary says which, the steps and the caption input."""
    if kind == "unclip_pl":
        from unclip_pl.checkpoint import load_stage

        st = load_stage(ckpt, which="ema" if weights == "ema" else "model", stage="decoder")
        obj = torch.load(ckpt, map_location="cpu", weights_only=False, mmap=True)
        return st.model, {"steps": int(obj.get("global_step", 0)), "weights": weights,
                          "text_source": st.cfg.get("text_source", "own")}
    obj = torch.load(ckpt, map_location="cpu", weights_only=False)
    decoder, unet = build_dalle2(obj["config"])
    unet.load_state_dict(obj["ema" if weights == "ema" else "model"])
    unet.eval().requires_grad_(False)
    return (unet, decoder.noise_schedulers[0]), {"steps": obj["steps"], "weights": weights, "text_source": "clip"}


def caption_tokens(data: dict, captions: list[str]) -> torch.Tensor:
    """Token ids (N, L) of ``captions`` from the conditioning CLIP's tokenizer, for a decoder with its own caption
    encoder (decoder=base), which reads tokens where the others read the CLIP's caption states."""
    from unclip_pl.clip.frozen import load_clip

    return load_clip("unclip-tiny", checkpoint=data["clip"]["path"]).tokenize(list(captions))


@torch.no_grad()
def cmd_decode(args) -> None:
    from unclip_pl.diffusion import GaussianDiffusion, get_betas, initial_noise, sample_ddim

    torch.set_num_threads(args.threads)
    data = torch.load(args.data, weights_only=False)
    va = data["val"]
    S = int(data["image_size"])
    model, info = load_decoder(args.kind, args.ckpt, args.weights)
    diffusion = GaussianDiffusion(get_betas("cosine", 1000))
    if args.kind == "dalle2":
        unet, noise_scheduler = model
        check_same_schedule(diffusion, noise_scheduler)
    tokens = caption_tokens(data, va["captions"]) if info["text_source"] == "own" else None
    n_all = len(va["captions"])
    runs = {}
    settings = [(g, args.limit) for g in args.guidance]
    if 1.0 not in args.guidance:
        settings.append((1.0, args.unguided_limit))
    for guidance, limit in settings:
        n = n_all if limit is None else min(limit, n_all)
        if n <= 0:
            continue
        t0 = time.perf_counter()
        parts = []
        for i in range(0, n, args.batch_size):
            idx = list(range(i, min(n, i + args.batch_size)))
            emb, states, mask = va["img_emb"][idx].float(), va["states"][idx].float(), va["mask"][idx]
            x_T = initial_noise((len(idx), 3, S, S), "cpu", seeds=idx, stage="decoder")   # seed = item index
            with autocast(args.precision):
                if args.kind == "unclip_pl" and tokens is not None:
                    x = model.sample(emb, tokens[idx], guidance_scale=guidance, x_T=x_T, **SAMPLER)
                elif args.kind == "unclip_pl":
                    x = model.sample(emb, text=(states, mask), guidance_scale=guidance, x_T=x_T, **SAMPLER)
                else:
                    x = sample_ddim(diffusion, dalle2_model_fn(unet, emb, states, guidance), x_T, SAMPLER["steps"],
                                    eta=SAMPLER["eta"], clip_denoised=True)
            parts.append(x.float().clamp(-1, 1).to(torch.float16))
        seconds = time.perf_counter() - t0
        runs[f"{guidance:g}"] = {"images": torch.cat(parts), "guidance": guidance, "n": n, "seconds": seconds}
        print(f"[decode {args.kind}] guidance {guidance:g}: {n} images in {seconds:.0f} s", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    torch.save({"kind": args.kind, "ckpt": str(args.ckpt), "sampler": SAMPLER, "precision": args.precision,
                "runs": runs, **info}, args.out)


# ------------------------------------------------------------------------------------------------------------- probe
PROBE_T = (100, 300, 500, 700, 900)    # fixed timesteps of the conditioning probe, every val item at each


def probe_fn(kind: str, model, data: dict, idx: list[int], tokens: torch.Tensor | None = None):
    """-> predict(xt, t, condition) -> eps for the val items ``idx``, under one of the probe's conditions: "full"
    (z_i and caption), "clip" (z_i, no caption), "none" (null z_i, no caption), "wrong" (another item's z_i and
    caption: the next item in ``idx``). ``tokens`` (N, L): every val caption's token ids, for a decoder with its
    own caption encoder."""
    va = data["val"]
    emb, states, mask = va["img_emb"][idx].float(), va["states"][idx].float(), va["mask"][idx]
    roll = lambda v: torch.roll(v, 1, dims=0)   # noqa: E731
    if kind == "dalle2":
        unet = model[0]

        def predict(xt, t, condition):
            e, s = (roll(emb), roll(states)) if condition == "wrong" else (emb, states)
            drop_img = 1.0 if condition == "none" else 0.0
            drop_txt = 1.0 if condition in ("clip", "none") else 0.0
            return unet(xt, t, image_embed=e, text_encodings=s, image_cond_drop_prob=drop_img,
                        text_cond_drop_prob=drop_txt)
        return predict
    text = (states, mask) if model.text_encoder is None else None
    context, cmask = model.encode_text(tokens[idx] if text is None else None, text)

    def predict(xt, t, condition):
        e, c, m = emb, context, cmask
        if condition == "wrong":
            e, c, m = roll(emb), roll(context), roll(cmask)
        if condition in ("clip", "none"):
            m = torch.zeros_like(cmask)
        if condition == "none":
            e = model.null_clip_emb(len(idx)).to(emb.dtype)
        out, _ = model.diffusion.split_output(model.unet(xt, t, **model.cond_kwargs(e, c, m)))
        return model.diffusion.predict_eps(out.float(), xt.float(), t)   # eps from whatever target it predicts
    return predict


@torch.no_grad()
def cmd_probe(args) -> None:
    """Noise-prediction MSE on every val item at the fixed timesteps PROBE_T (noise seeded by item and step), under
    each conditioning: how much of its error the decoder removes with z_i and the caption, and whether it is the
    item's own conditioning that helps (against another item's). Works for both kinds; no sampling."""
    from unclip_pl.diffusion import GaussianDiffusion, get_betas

    torch.set_num_threads(args.threads)
    data = torch.load(args.data, weights_only=False)
    va = data["val"]
    n = len(va["captions"]) if args.limit is None else min(args.limit, len(va["captions"]))
    model, info = load_decoder(args.kind, args.ckpt, args.weights)
    diffusion = GaussianDiffusion(get_betas("cosine", 1000))
    tokens = caption_tokens(data, va["captions"]) if info["text_source"] == "own" else None   # tokenised once
    conditions = ("full", "clip", "none", "wrong")
    sums = {(c, t): 0.0 for c in conditions for t in PROBE_T}
    for i in range(0, n, args.batch_size):
        idx = list(range(i, min(n, i + args.batch_size)))
        x0 = va["images"][idx].float() / 127.5 - 1.0
        predict = probe_fn(args.kind, model, data, idx, tokens)
        for step in PROBE_T:
            g = torch.Generator().manual_seed(10_000 * step + i)
            noise = torch.randn(x0.shape, generator=g)
            t = torch.full((len(idx),), step, dtype=torch.long)
            xt = diffusion.q_sample(x0, t, noise)
            for c in conditions:
                with autocast(args.precision):
                    eps = predict(xt, t, c).float()
                sums[(c, step)] += ((eps - noise) ** 2).mean(dim=(1, 2, 3)).sum().item()
    mse = {c: {str(t): sums[(c, t)] / n for t in PROBE_T} for c in conditions}
    mean = {c: sum(v.values()) / len(PROBE_T) for c, v in mse.items()}
    out = {"kind": args.kind, "ckpt": str(args.ckpt), "n": n, "timesteps": list(PROBE_T), "mse": mse,
           "mean": mean, "gain_vs_none": 1 - mean["full"] / mean["none"],
           "gain_vs_wrong": 1 - mean["full"] / mean["wrong"], **info}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(f"[probe {args.kind}] {n} val items, t in {PROBE_T}: MSE full {mean['full']:.4f}, z_i only "
          f"{mean['clip']:.4f}, none {mean['none']:.4f}, wrong item's {mean['wrong']:.4f}; conditioning removes "
          f"{out['gain_vs_none']:.1%} of the unconditional error, own vs wrong {out['gain_vs_wrong']:.1%}")


# ------------------------------------------------------------------------------------------------------------- score
def load_scoring_clips(clip_path: str, judge_path: str):
    from unclip_pl.clip.frozen import load_clip
    from unclip_pl.metrics.judge import load_judge

    judge = load_judge(judge_path)
    return {"conditioning": load_clip("unclip-tiny", checkpoint=clip_path), "judge": judge.clip}


@torch.no_grad()
def cmd_score(args) -> None:
    from unclip_pl.metrics.clip_score import caption_retrieval, encode_captions, encode_images, unique_captions
    from unclip_pl.metrics.fid import frechet_distance_features
    from unclip_pl.metrics.retrieval import retrieval_topk

    torch.set_num_threads(args.threads)
    data = torch.load(args.data, weights_only=False)
    va = data["val"]
    captions = list(va["captions"])
    real = va["images"].float() / 127.5 - 1.0
    decoded = [torch.load(p, weights_only=False) for p in args.samples]
    names = args.names or [d["kind"] for d in decoded]
    clips = load_scoring_clips(args.clip, args.judge)
    pool = unique_captions(captions)
    rows: list[dict] = []
    for role, clip in clips.items():
        pool_emb = encode_captions(clip, pool)
        real_emb = encode_images(clip, real)
        r = caption_retrieval(real_emb, captions, pool, pool_emb)
        rows.append({"clip": role, "decoder": "real images", "guidance": None, "n": len(captions), **r, "fd": 0.0})
        for name, d in zip(names, decoded):
            for run in d["runs"].values():
                n = min(run["n"], args.limit) if args.limit else run["n"]
                emb = encode_images(clip, run["images"][:n].float())
                r = caption_retrieval(emb, captions[:n], pool, pool_emb)
                # Does the decoded image retrieve the val image whose z_i it was decoded from, among all val images?
                # Unlike caption retrieval, real images score 1 here: it measures the decoder alone.
                ri = retrieval_topk(emb, real_emb, torch.arange(n))
                fd = frechet_distance_features(real_emb, emb) if n == len(captions) else None
                rows.append({"clip": role, "decoder": name, "guidance": run["guidance"], "n": n, **r,
                             "img_top1": ri["top1"], "img_top5": ri["top5"], "fd": fd, "steps": d.get("steps"),
                             "weights": d.get("weights", "ema")})
    info = {"sampler": decoded[0]["sampler"] if decoded else SAMPLER, "pool_size": len(pool),
            "val_items": len(captions), "clip": data["clip"],
            "judge": {"path": str(args.judge), "fingerprint": clips["judge"].fingerprint},
            "train": [json.loads(Path(p).read_text()) for p in (args.train_info or [])]}
    # the conditioning probe of each decoder, when it ran (probe.json beside its samples)
    probes = {name: json.loads((Path(p).parent / "probe.json").read_text()) for name, p in zip(names, args.samples)
              if (Path(p).parent / "probe.json").exists()}
    info["probes"] = probes
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"rows": rows, **info}, indent=1))
    text = table(rows, len(pool), len(captions)) + probe_table(probes)
    (out / "results.md").write_text(text)
    print(text)
    if decoded:
        grid(real, [(n, d) for n, d in zip(names, decoded)], out / "grid.png", args.grid_items)


def table(rows: list[dict], pool: int, val_items: int) -> str:
    lines = ["| scored by | decoder | guidance | items | caption top-1 | caption top-5 | image top-1 | image top-5 | "
             "CLIP-space FD to real |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        fd = "" if r["fd"] is None else f"{r['fd']:.3f}"
        g = "" if r["guidance"] is None else f"{r['guidance']:g}"
        img = (f"{r['img_top1']:.3f} | {r['img_top5']:.3f}" if "img_top1" in r else "1 | 1")
        lines.append(f"| {r['clip']} CLIP | {r['decoder']} | {g} | {r['n']} | {r['top1']:.3f} | {r['top5']:.3f} | "
                     f"{img} | {fd} |")
    lines.append(f"\nCaption retrieval: among the {pool} distinct val captions (chance: top-1 {1 / pool:.3f}, top-5 "
                 f"{5 / pool:.3f}). Image retrieval: the decoded image retrieves the val image whose z_i it was "
                 f"decoded from, among all {val_items} val images (chance: top-1 {1 / val_items:.3f}, top-5 "
                 f"{5 / val_items:.3f}).")
    return "\n".join(lines) + "\n"


def probe_table(probes: dict) -> str:
    if not probes:
        return ""
    lines = ["", "| decoder | probe MSE: own z_i + caption | z_i only | null z_i, no caption | another item's | "
             "conditioning removes | own vs another item's |", "|---|---|---|---|---|---|---|"]
    for name, p in probes.items():
        m = p["mean"]
        lines.append(f"| {name} | {m['full']:.4f} | {m['clip']:.4f} | {m['none']:.4f} | {m['wrong']:.4f} | "
                     f"{p['gain_vs_none']:.1%} | {p['gain_vs_wrong']:.1%} |")
    n = next(iter(probes.values()))["n"]
    lines.append(f"\nProbe: eps MSE on {n} val items at t in {PROBE_T} (seeded noise, no sampling).")
    return "\n".join(lines) + "\n"


def grid(real: torch.Tensor, decoded: list, path: Path, items: int) -> None:
    """Rows: the real val images, then each decoder's guided samples of the same items."""
    from torchvision.utils import save_image

    rows = [real[:items]]
    for _, d in decoded:
        run = max(d["runs"].values(), key=lambda r: r["guidance"])
        rows.append(run["images"][:items].float())
    n = min(r.shape[0] for r in rows)
    save_image(torch.cat([r[:n] for r in rows]) * 0.5 + 0.5, path, nrow=n, padding=1)


# ---------------------------------------------------------------------------------------------------- ablation-table
def probe_cells(path: Path) -> str:
    """The probe's three table cells (MSE with its own conditioning, the two gains) from its probe.json, or blanks."""
    if not path.exists():
        return " | | "
    pr = json.loads(path.read_text())
    return f"{pr['mean']['full']:.4f} | {pr['gain_vs_none']:.1%} | {pr['gain_vs_wrong']:.1%}"


def cmd_ablation_table(args) -> None:
    """One row per ablation run: steps and img/s in the budget, the conditioning probe, and the guided decodings'
    retrieval under both CLIPs (from ``score``'s results.json); the baseline's other guidance scales and its raw
    weights follow as rows of their own."""
    res = json.loads(Path(args.results).read_text())
    by = {}
    for r in res["rows"]:
        by[(r["decoder"], r["guidance"], r["clip"])] = r
    head = ("| run | steps | img/s | probe MSE (full) | conditioning removes | own vs wrong item | "
            "caption top-5, cond. / judge | image top-5, cond. / judge |")
    lines = [head, "|---|---|---|---|---|---|---|---|"]

    def cells(name: str, guidance: float) -> str:
        c, j = by.get((name, guidance, "conditioning")), by.get((name, guidance, "judge"))
        if c is None or j is None:
            return "| |"
        return f"{c['top5']:.3f} / {j['top5']:.3f} | {c['img_top5']:.3f} / {j['img_top5']:.3f} |"

    for name in args.names:
        run = next(Path(args.runs).glob(f"*/{name}"), Path(args.runs) / name)   # <runs>/core<c>/<name>
        ck = torch.load(run / "checkpoints/last.ckpt", map_location="cpu", weights_only=False, mmap=True)
        steps = int(ck.get("global_step", 0))
        probe = probe_cells(run / "probe.json")
        lines.append(f"| {name} | {steps} | {steps * args.batch_size / args.budget_s:.1f} | {probe} | "
                     f"{cells(name, 3.0)}")
    for name, g, label in (("baseline", 1.0, "baseline, guidance 1"), ("baseline", 2.0, "baseline, guidance 2"),
                           ("baseline", 5.0, "baseline, guidance 5"),
                           ("baseline_raw", 3.0, "baseline, raw weights (no EMA)")):
        if (name, g, "conditioning") in by:
            probe = probe_cells(Path(args.runs) / name / "probe.json") if name != "baseline" else " | | "
            lines.append(f"| {label} | | | {probe} | {cells(name, g)}")
    n = next((r["n"] for r in res["rows"] if r["decoder"] != "real images"), None)
    lines.append(f"\nBudget {args.budget_s:g} s per run, batch {args.batch_size}. Probe: eps MSE on all "
                 f"{res['val_items']} val items at t in {PROBE_T} (seeded noise); \"conditioning removes\" = 1 - "
                 f"MSE(z_i + caption) / MSE(null z_i, no caption), \"own vs wrong\" = 1 - MSE(own) / MSE(the next "
                 f"item's z_i + caption). Retrieval: the first {n} val items decoded (DDIM {SAMPLER['steps']}, "
                 f"guidance 3 unless stated, seed = index); caption top-5 among the {res['pool_size']} distinct val "
                 f"captions (chance {5 / res['pool_size']:.3f}), image top-5 among all {res['val_items']} val images "
                 f"(chance {5 / res['val_items']:.3f}); conditioning CLIP {res['clip']['fingerprint']}, judge "
                 f"{res['judge']['fingerprint']}.")
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


# -------------------------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("--clip", required=True, help="the conditioning CLIP (an exported unclip-tiny file)")
    p.add_argument("--data-root", default="data/emoji")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--limit-train", type=int, default=None)
    p.add_argument("--limit-val", type=int, default=None)
    p.add_argument("--out", required=True)
    p.add_argument("--threads", type=int, default=1)
    p = sub.add_parser("train-dalle2")
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--minutes", type=float, required=True)
    p.add_argument("--max-steps", type=int, default=0, help="stop earlier after this many steps (0: budget only)")
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--dim-mults", type=int, nargs="+", default=[1, 2, 2])
    p.add_argument("--num-res-blocks", type=int, default=2)
    p.add_argument("--attention-resolutions", type=int, nargs="*", default=[16, 8])
    p.add_argument("--head-channels", type=int, default=32)
    p.add_argument("--attn-heads", type=int, default=4)
    p.add_argument("--cond-dim", type=int, default=0, help="its conditioning-token width (0: --dim)")
    p.add_argument("--clip-drop-prob", type=float, default=0.05)
    p.add_argument("--text-drop-prob", type=float, default=0.5)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    p.add_argument("--min-loss-drop", type=float, default=0.2, help="required fall of the probe loss (fraction)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p = sub.add_parser("train-info")
    p.add_argument("--ckpt", required=True)
    p.add_argument("--minutes", type=float, required=True)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--out", required=True)
    p = sub.add_parser("decode")
    p.add_argument("--kind", choices=["unclip_pl", "dalle2"], required=True)
    p.add_argument("--ckpt", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--guidance", type=float, nargs="+", default=[3.0], help="guidance scales (one run each)")
    p.add_argument("--limit", type=int, default=None, help="guided: the first N val items (default: all)")
    p.add_argument("--unguided-limit", type=int, default=None, help="unguided: the first N (default: all; 0: none)")
    p.add_argument("--weights", choices=["ema", "raw"], default="ema",
                   help="the EMA weights (default) or the trained weights themselves")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    p.add_argument("--threads", type=int, default=1)
    p = sub.add_parser("probe")
    p.add_argument("--kind", choices=["unclip_pl", "dalle2"], required=True)
    p.add_argument("--ckpt", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--limit", type=int, default=None, help="the first N val items (default: all)")
    p.add_argument("--weights", choices=["ema", "raw"], default="ema")
    p.add_argument("--batch-size", type=int, default=73)
    p.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    p.add_argument("--threads", type=int, default=1)
    p = sub.add_parser("ablation-table")
    p.add_argument("--runs", required=True, help="the ablation's directory (runs in <runs>/core<c>/<name>)")
    p.add_argument("--names", nargs="+", required=True)
    p.add_argument("--results", required=True, help="score's results.json of these runs")
    p.add_argument("--budget-s", type=float, required=True)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--out", required=True)
    p = sub.add_parser("score")
    p.add_argument("--data", required=True)
    p.add_argument("--samples", nargs="*", default=[])
    p.add_argument("--names", nargs="*", default=None)
    p.add_argument("--train-info", nargs="*", default=None, help="train.json files to copy into results.json")
    p.add_argument("--clip", required=True)
    p.add_argument("--judge", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--limit", type=int, default=None, help="score the first N decoded items of each run only")
    p.add_argument("--grid-items", type=int, default=12)
    p.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    if args.cmd == "score" and args.names is not None and len(args.names) != len(args.samples):
        fail(f"{len(args.names)} --names for {len(args.samples)} --samples")
    commands = {"prepare": cmd_prepare, "train-dalle2": cmd_train_dalle2, "train-info": cmd_train_info,
                "decode": cmd_decode, "probe": cmd_probe, "score": cmd_score,
                "ablation-table": cmd_ablation_table}
    commands[args.cmd](args)


if __name__ == "__main__":
    main()
