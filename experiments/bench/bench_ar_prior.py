"""Benchmark of the autoregressive prior: training and sampling throughput at a fixed reference shape.

Reference shape: ARPriorTransformer width 768, 12 layers, 12 heads (the diffusion prior's), k = 319 PCA codes in
1024 buckets, 1024 dot-product buckets, 77 caption tokens (D = W = 768), so a sequence of 77 + 2 + 318 = 397
tokens predicting 320; bf16 autocast (fp32 master weights, AdamW), batch 128. Reports training samples/s and
tokens/s (sequence positions through the network) and model TFLOP/s (FLOPs counted with
torch.utils.flop_counter.FlopCounterMode on one forward+backward) with a bf16 matmul peak measured in the same run;
sampling embeddings/s with the K/V cache (``ARPrior.sample``: one prefix pass, then one token per step) and without
it (every step recomputes the whole sequence), and their ratio, both measured in this run.

    python experiments/bench/bench_ar_prior.py                          # CPU: reduced batch, no-cache extrapolated
    python experiments/bench/bench_ar_prior.py --device cuda --compile  # GPU: eager and torch.compile rows

On the CPU the sampler without the cache would take minutes per embedding at this shape, so only its first
``--no-cache-steps`` decoding steps are timed (each costs the same: the whole sequence every time) and the time of
all 320 is extrapolated from them (stated in the table); on the GPU the whole sampler runs.
Writes a markdown table into the "## Autoregressive prior" section of experiments/bench/README.md (``--out``).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from benchlib import (  # this folder (scripts run as files)
    device_name,
    matmul_peak,
    prior_inputs,
    sync,
    time_train_step,
    timed,
    write_section,
)
from torch.utils.flop_counter import FlopCounterMode

from unclip_pl.models.ar_prior import ARPrior, draw, filter_logits, restrict_dot
from unclip_pl.models.pca_codec import PCACodec
from unclip_pl.nets.ar_prior import ARPriorTransformer

SECTION = "## Autoregressive prior"
HERE = Path(__file__).resolve().parent


def build(args, device: torch.device) -> ARPrior:
    """The reference-shape AR prior with its codec fitted on random unit vectors (the speed does not depend on the
    codec's statistics, only on k and the vocabularies)."""
    net = ARPriorTransformer(text_width=args.width, embed_dim=args.width, num_components=args.codes,
                             num_buckets=args.buckets, num_dot_buckets=args.buckets, dim=args.width,
                             depth=args.depth, heads=args.heads, max_text_len=args.text_len)
    codec = PCACodec(args.width, args.codes, args.buckets, args.buckets)
    img, txt, _, _ = prior_inputs(args.fit_rows, args.width, 1, torch.device("cpu"), seed=2)
    codec.fit(img, txt, seed=0)
    return ARPrior(net, codec).to(device)


def seq_len(args) -> int:
    """Positions through the network per sample: caption tokens, z_t, the dot token, codes 1..k-1."""
    return args.text_len + 2 + args.codes - 1


def bench_train(args, device: torch.device, compile_net: bool) -> dict:
    torch.manual_seed(0)
    model = build(args, device)
    opt = torch.optim.AdamW(model.parameters(), lr=1.6e-4, betas=(0.9, 0.91), eps=1e-10, weight_decay=4e-2,
                            fused=device.type == "cuda")
    if compile_net:
        model.net = torch.compile(model.net)
    inputs = prior_inputs(args.batch, args.width, args.text_len, device)
    sec, flops = time_train_step(model, opt, inputs, args.iters, args.warmup, device, count_flops=not compile_net)
    return {"sec": sec, "samples_s": args.batch / sec, "tokens_s": args.batch * seq_len(args) / sec, "flops": flops,
            "params": sum(p.numel() for p in model.parameters())}


SAMPLE_KW = {"guidance_scale": 1.0, "temperature": 1.0, "top_k": None, "top_p": None, "dot_fraction": 0.5,
             "best_of": 1}


def uncached_steps(model: ARPrior, txt, tok, mask, steps: int) -> None:
    """The first ``steps`` decoding steps of ``ARPrior.sample(use_cache=False)`` with guidance 1: each scores the whole
    sequence (``net.forward``), then restricts and draws one token with the sampler's own functions."""
    b, k = txt.shape[0], model.net.num_components
    dot = torch.zeros(b, dtype=torch.long, device=txt.device)
    codes = torch.zeros(b, k, dtype=torch.long, device=txt.device)
    dot_values = model.codec.decode_dot(torch.arange(model.net.num_dot_buckets, device=txt.device)).float()
    for i in range(steps):
        dot_logits, code_logits = model.net(tok, mask, txt, dot, codes, None)
        if i == 0:
            dot = draw(restrict_dot(dot_logits.float(), dot_values, SAMPLE_KW["dot_fraction"]))
        else:
            codes[:, i - 1] = draw(filter_logits(code_logits[:, i - 1].float(), None, None))


def bench_sample(args, device: torch.device) -> dict:
    """Sampling with and without the cache. On the CPU with one thread: a cached step is a few small ops per layer,
    which a second thread only slows down on a shared machine (every op waits for both)."""
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(1)
    try:
        return _bench_sample(args, device)
    finally:
        torch.set_num_threads(threads)


def _bench_sample(args, device: torch.device) -> dict:
    torch.manual_seed(0)
    model = build(args, device).eval()
    _, txt, tok, mask = prior_inputs(args.sample_batch, args.width, args.text_len, device, seed=1)
    g = torch.Generator(device=device).manual_seed(0)

    def run(use_cache: bool):
        with torch.autocast(device.type, dtype=torch.bfloat16):
            model.sample(txt, tok, mask, use_cache=use_cache, generator=g, **SAMPLE_KW)

    flops = None
    if device.type == "cuda":  # one counted call, which also warms up (on the CPU a call costs tens of seconds)
        with FlopCounterMode(display=False) as counter:
            run(True)
        flops = counter.get_total_flops()
    cached = timed(lambda: run(True), args.sample_iters, 0, device)
    total_steps = args.codes + 1
    n = args.no_cache_steps or total_steps
    if n >= total_steps:
        uncached = timed(lambda: run(False), 1, 0, device)
    else:
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
            uncached_steps(model, txt, tok, mask, 1)  # warm-up
            sync(device)
            t0 = time.perf_counter()
            uncached_steps(model, txt, tok, mask, n)
            sync(device)
        uncached = (time.perf_counter() - t0) * total_steps / n
    return {"sec": cached, "emb_s": args.sample_batch / cached, "flops": flops,
            "no_cache_sec": uncached, "no_cache_emb_s": args.sample_batch / uncached,
            "no_cache_steps": min(n, total_steps)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--compile", action="store_true", help="also time torch.compile training (CUDA only)")
    p.add_argument("--width", type=int, default=768)
    p.add_argument("--depth", type=int, default=12)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--codes", type=int, default=319, help="k, the PCA components per embedding")
    p.add_argument("--buckets", type=int, default=1024, help="buckets per code and of the dot-product token")
    p.add_argument("--text-len", type=int, default=77)
    p.add_argument("--fit-rows", type=int, default=4096, help="random embeddings the codec is fitted on")
    p.add_argument("--batch", type=int, default=None, help="training batch (default 128 on GPU, 2 on CPU)")
    p.add_argument("--iters", type=int, default=None)
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--sample-batch", type=int, default=None, help="default 64 on GPU, 2 on CPU")
    p.add_argument("--sample-iters", type=int, default=None)
    p.add_argument("--no-cache-steps", type=int, default=None,
                   help="decoding steps timed without the cache (default: all on GPU, 4 on CPU; the rest extrapolated)")
    p.add_argument("--peak-n", type=int, default=None, help="matmul size (default 8192 on GPU, 1024 on CPU)")
    p.add_argument("--out", type=Path, default=HERE / "README.md", help="README to write the table into ('-': none)")
    args = p.parse_args()

    device = torch.device(args.device)
    gpu = device.type == "cuda"
    args.batch = args.batch or (128 if gpu else 2)
    args.iters = args.iters or (10 if gpu else 1)
    args.warmup = args.warmup if args.warmup is not None else (3 if gpu else 0)
    args.sample_batch = args.sample_batch or (64 if gpu else 2)
    args.sample_iters = args.sample_iters or (3 if gpu else 1)
    args.no_cache_steps = args.no_cache_steps if args.no_cache_steps is not None else (0 if gpu else 4)
    args.peak_n = args.peak_n or (8192 if gpu else 1024)
    if gpu:
        torch.backends.cuda.matmul.allow_tf32 = True
    t_start = time.perf_counter()
    if args.compile and not gpu:
        print("--compile is only timed on CUDA; skipping the compiled rows")

    name = device_name(device)
    peak = matmul_peak(args.peak_n, device, 50 if gpu else 3)
    print(f"device: {name}; bf16 matmul {args.peak_n}^3: {peak:.2f} TFLOP/s")

    rows = []
    for comp in [False] + ([True] if args.compile and gpu else []):
        tr = bench_train(args, device, comp)
        if tr["flops"] is not None:
            flops = tr["flops"]
        tr["tf"] = flops / tr["sec"] / 1e12
        mode = "compiled" if comp else "eager"
        print(f"{mode}: train {tr['samples_s']:.4g} samples/s, {tr['tokens_s']:.4g} tokens/s, {tr['tf']:.3g} TFLOP/s "
              f"({100 * tr['tf'] / peak:.1f}% of peak)")
        rows.append((mode, tr))
    sm = bench_sample(args, device)
    sm["tf"] = sm["flops"] / sm["sec"] / 1e12 if sm["flops"] is not None else None
    ratio = sm["emb_s"] / sm["no_cache_emb_s"]
    print(f"sample: {sm['emb_s']:.4g} emb/s with the K/V cache, {sm['no_cache_emb_s']:.4g} without "
          f"({ratio:.1f}x)")

    params, total_steps = rows[0][1]["params"], args.codes + 1
    extrapolated = sm["no_cache_steps"] < total_steps
    lines = [
        f"`python experiments/bench/bench_ar_prior.py{' --device cuda --compile' if gpu else ''}` on **{name}** "
        f"(torch {torch.__version__}).",
        "",
        f"Shape: ARPriorTransformer width {args.width}, {args.depth} layers, {args.heads} heads, "
        f"k = {args.codes} codes in {args.buckets} buckets, {args.buckets} dot buckets, {args.text_len} caption "
        f"tokens, D = W = {args.width}: "
        f"{seq_len(args)} positions per sample, {total_steps} predicted; {params / 1e6:.1f}M parameters; bf16 "
        f"autocast, AdamW{' (fused)' if gpu else ''}. Training batch {args.batch}"
        + ("" if gpu else " (reduced from 128 for the CPU)")
        + f", {args.iters} timed steps after {args.warmup} warm-up. Model FLOPs per step (forward + backward, "
        f"FlopCounterMode): {flops / 1e12:.3f} TFLOP. Peak: bf16 matmul {args.peak_n}^3 measured in the same run = "
        f"**{peak:.3g} TFLOP/s**.",
        "",
        "| mode | train samples/s | train tokens/s | train ms/step | model TFLOP/s | % of measured bf16 peak |",
        "|---|---|---|---|---|---|",
    ]
    for mode, tr in rows:
        lines.append(f"| {mode} | {tr['samples_s']:.4g} | {tr['tokens_s']:.4g} | {1000 * tr['sec']:.4g} | "
                     f"{tr['tf']:.3g} | {100 * tr['tf'] / peak:.1f}% |")
    lines += [
        "",
        f"Sampling (eager, batch {args.sample_batch}" + ("" if gpu else ", reduced from 64 for the CPU, one thread")
        + f", {total_steps} decoding steps, guidance 1, best_of 1), both measured in this run:",
        "",
        "| sampler | embeddings/s | s per batch | note |",
        "|---|---|---|---|",
        f"| K/V cache (`ARPrior.sample`) | {sm['emb_s']:.4g} | {sm['sec']:.4g} | one prefix pass, then one token "
        "per step" + (f"; {sm['flops'] / args.sample_batch / 1e9:.1f} GFLOP per embedding, {sm['tf']:.3g} TFLOP/s"
                      if sm["tf"] is not None else "; no warm-up call on the CPU") + " |",
        f"| no cache (`use_cache=False`) | {sm['no_cache_emb_s']:.4g} | {sm['no_cache_sec']:.4g} | the whole "
        "sequence every step"
        + (f"; {sm['no_cache_steps']} of the {total_steps} steps timed, the rest extrapolated (every step costs "
           "the same)" if extrapolated else "") + " |",
        "",
        f"**The K/V cache is {ratio:.1f}x faster** (same run, same batch)."
        + (" Sampling is not compiled: the cache grows by one token each step." if args.compile and gpu else ""),
    ]
    if not gpu:
        lines += ["", f"CPU numbers are indicative only: the run took {time.perf_counter() - t_start:.0f} s on a "
                      f"shared machine (load average {' / '.join(open('/proc/loadavg').read().split()[:3])} "
                      "(1/5/15 min) at the end)."]
    body = "\n".join(lines)
    print(body)
    if str(args.out) != "-":
        write_section(args.out, SECTION, body)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
