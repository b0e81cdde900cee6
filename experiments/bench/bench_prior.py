"""Benchmark of the diffusion prior: training step and sampling throughput at a fixed reference shape.

Reference shape: PriorTransformer width 768, 12 layers, 12 heads, 77 caption tokens (D = W = 768), batch 512,
bf16 autocast (fp32 master weights, AdamW). Reports samples/s and model TFLOP/s (FLOPs counted with
torch.utils.flop_counter.FlopCounterMode on one forward+backward), a bf16 matmul peak measured in the same run and the
percentage of it; sampling throughput for 64 DDIM steps at batch 256, best_of 1, in embeddings/s.

    python experiments/bench/bench_prior.py                          # CPU: reduced batch/iterations (stated)
    python experiments/bench/bench_prior.py --device cuda --compile  # GPU: eager and torch.compile rows

Writes a markdown table into the "## Diffusion prior" section of experiments/bench/README.md (``--out``).
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
    time_train_step,
    timed,
    write_section,
)
from torch.utils.flop_counter import FlopCounterMode

from unclip_pl.models.prior import DiffusionPrior
from unclip_pl.nets.prior import PriorTransformer

SECTION = "## Diffusion prior"
HERE = Path(__file__).resolve().parent


def build(args, device: torch.device) -> DiffusionPrior:
    net = PriorTransformer(embed_dim=args.width, text_width=args.width, dim=args.width, depth=args.depth,
                           heads=args.heads, max_text_len=args.text_len)
    return DiffusionPrior(net).to(device)


def bench_train(args, device: torch.device, compile_net: bool) -> dict:
    torch.manual_seed(0)
    model = build(args, device)
    fused = device.type == "cuda"
    opt = torch.optim.AdamW(model.parameters(), lr=1.1e-4, betas=(0.9, 0.96), eps=1e-6, weight_decay=6e-2,
                            fused=fused)
    if compile_net:
        model.net = torch.compile(model.net)
    inputs = prior_inputs(args.batch, args.width, args.text_len, device)
    sec, flops = time_train_step(model, opt, inputs, args.iters, args.warmup, device, count_flops=not compile_net)
    n_params = sum(p.numel() for p in model.parameters())
    return {"sec": sec, "samples_s": args.batch / sec, "flops": flops, "params": n_params}


def bench_sample(args, device: torch.device, compile_net: bool) -> dict:
    torch.manual_seed(0)
    model = build(args, device).eval()
    if compile_net:
        model.net.forward_cached = torch.compile(model.net.forward_cached)
    _, txt, tok, mask = prior_inputs(args.sample_batch, args.width, args.text_len, device, seed=1)

    def run():
        with torch.autocast(device.type, dtype=torch.bfloat16):
            model.sample(txt, tok, mask, steps=args.sample_steps, sampler="ddim", eta=0.0, guidance_scale=1.0,
                         best_of=1)

    sec = timed(run, args.sample_iters, 1 if device.type == "cuda" else 0, device)
    flops = None
    if not compile_net:  # one counted call (FlopCounterMode cannot see inside compiled graphs)
        with FlopCounterMode(display=False) as counter:
            run()
        flops = counter.get_total_flops()
    return {"sec": sec, "emb_s": args.sample_batch / sec, "flops": flops}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--compile", action="store_true", help="also time torch.compile (CUDA only)")
    p.add_argument("--width", type=int, default=768)
    p.add_argument("--depth", type=int, default=12)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--text-len", type=int, default=77)
    p.add_argument("--batch", type=int, default=None, help="training batch (default 512 on GPU, 2 on CPU)")
    p.add_argument("--iters", type=int, default=None)
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--sample-batch", type=int, default=None, help="default 256 on GPU, 4 on CPU")
    p.add_argument("--sample-steps", type=int, default=64)
    p.add_argument("--sample-iters", type=int, default=None)
    p.add_argument("--peak-n", type=int, default=None, help="matmul size (default 8192 on GPU, 1024 on CPU)")
    p.add_argument("--out", type=Path, default=HERE / "README.md", help="README to write the table into ('-': none)")
    args = p.parse_args()

    device = torch.device(args.device)
    gpu = device.type == "cuda"
    args.batch = args.batch or (512 if gpu else 2)
    args.iters = args.iters or (20 if gpu else 1)
    args.warmup = args.warmup if args.warmup is not None else (5 if gpu else 0)
    args.sample_batch = args.sample_batch or (256 if gpu else 4)
    args.sample_iters = args.sample_iters or (5 if gpu else 1)
    args.peak_n = args.peak_n or (8192 if gpu else 1024)
    if gpu:
        torch.backends.cuda.matmul.allow_tf32 = True
    t_start = time.perf_counter()
    if args.compile and not gpu:
        print("--compile is only timed on CUDA; skipping the compiled rows")

    name = device_name(device)
    peak = matmul_peak(args.peak_n, device, 50 if gpu else 3)
    print(f"device: {name}; bf16 matmul {args.peak_n}^3: {peak:.2f} TFLOP/s")

    modes = [False] + ([True] if args.compile and gpu else [])
    rows = []
    for comp in modes:
        tr = bench_train(args, device, comp)
        if tr["flops"] is not None:
            flops = tr["flops"]
        tf = flops / tr["sec"] / 1e12
        sm = bench_sample(args, device, comp)
        if sm["flops"] is not None:
            sample_flops = sm["flops"]
        sm["tf"] = sample_flops / sm["sec"] / 1e12
        mode = "compiled" if comp else "eager"
        print(f"{mode}: train {tr['samples_s']:.4g} samples/s, {tf:.3g} TFLOP/s ({100 * tf / peak:.1f}% of peak); "
              f"sample {sm['emb_s']:.4g} emb/s, {sm['tf']:.3g} TFLOP/s")
        rows.append((mode, tr, tf, sm))

    params = rows[0][1]["params"]
    lines = [
        f"`python experiments/bench/bench_prior.py{' --device cuda --compile' if gpu else ''}` on **{name}** "
        f"(torch {torch.__version__}).",
        "",
        f"Shape: PriorTransformer width {args.width}, {args.depth} layers, {args.heads} heads, {args.text_len} caption "
        f"tokens (+4), D = W = {args.width}, {params / 1e6:.1f}M parameters; bf16 autocast, AdamW"
        f"{' (fused)' if gpu else ''}. Training batch {args.batch}"
        + ("" if gpu else " (reduced from 512 for the CPU)")
        + f", {args.iters} timed steps after {args.warmup} warm-up. Model FLOPs per step (forward + backward, "
        f"FlopCounterMode): {flops / 1e12:.3f} TFLOP. Sampling: {args.sample_steps} DDIM steps, batch "
        f"{args.sample_batch}" + ("" if gpu else " (reduced from 256 for the CPU, no warm-up)")
        + ", best_of 1, cached caption prefix. Peak: bf16 matmul "
        f"{args.peak_n}^3 measured in the same run = **{peak:.3g} TFLOP/s**.",
        "",
        f"Sampling FLOPs (counted once, eager): {sample_flops / args.sample_batch / 1e9:.1f} GFLOP per embedding "
        f"for {args.sample_steps} steps.",
        "",
        "| mode | train samples/s | train ms/step | model TFLOP/s | % of measured bf16 peak | sampling emb/s "
        "| sampling TFLOP/s (% of peak) |",
        "|---|---|---|---|---|---|---|",
    ]
    for mode, tr, tf, sm in rows:
        lines.append(f"| {mode} | {tr['samples_s']:.4g} | {1000 * tr['sec']:.4g} | {tf:.3g} | {100 * tf / peak:.1f}% | "
                     f"{sm['emb_s']:.4g} | {sm['tf']:.3g} ({100 * sm['tf'] / peak:.1f}%) |")
    prefix, n = args.text_len + 1, args.sample_steps  # caption tokens + z_t; 3 tokens depend on the step
    lines += ["", "Sampling runs the caption/z_t prefix once per caption and then only the 3 step-dependent tokens per "
                  f"step (K/V cache, exact because the mask is causal), so {n} steps cost about {n} x 3 + {prefix} "
                  f"token-passes instead of {n} x {prefix + 3}."]
    if not gpu:
        lines += ["", "CPU numbers are indicative only: the run took "
                      f"{time.perf_counter() - t_start:.0f} s on a shared "
                      f"machine (load average {open('/proc/loadavg').read().split()[0]} at the end)."]
    body = "\n".join(lines)
    print(body)
    if str(args.out) != "-":
        write_section(args.out, SECTION, body)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
