"""Benchmark of the decoder and an upsampler: training and sampling throughput at fixed reference shapes.

Reference shapes:
- decoder: 64x64 U-Net, 192 channels, mults 1,2,3,4, 2 res blocks, attention at 32,16,8 (the lower three levels),
  64-channel heads, D = 768 CLIP embedding (4 CLIP tokens), 77 caption tokens of width 768 given as precomputed
  states (the frozen-CLIP text source: the caption encoder is not part of the timed model), batch 128, bf16 autocast
  (fp32 master weights, AdamW). Reports images/s, model TFLOP/s (FLOPs counted with
  torch.utils.flop_counter.FlopCounterMode on one forward+backward), the percentage of a bf16 matmul peak measured in
  the same run, and peak GPU memory.
- decoder sampling: DDIM 50 steps at batch 64 with classifier-free guidance (cond + uncond batched: 2x64 per step).
- upsampler training: the 256->1024 paper shape (192 ch, mults 1,1,2,2,4,4, 2 res blocks, no attention) on its
  256x256 training crops, batch 16.

    python experiments/bench/bench_decoder.py                          # CPU: reduced sizes (stated in the table)
    python experiments/bench/bench_decoder.py --device cuda --compile  # GPU: eager and torch.compile rows

Writes a markdown table into the "## Decoder and upsamplers" section of experiments/bench/README.md (``--out``).
"""

from __future__ import annotations

import argparse
import re
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from benchlib import device_name, matmul_peak, timed, write_section  # this folder (scripts run as files)
from torch.utils.flop_counter import FlopCounterMode

from unclip_pl.diffusion import GaussianDiffusion, get_betas
from unclip_pl.models.decoder import Decoder
from unclip_pl.models.upsampler import Upsampler
from unclip_pl.nets.unet import UNet

SECTION = "## Decoder and upsamplers"
HERE = Path(__file__).resolve().parent


def reset_peak(device):
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.max_memory_allocated(device) / 2 ** 30:.1f}"
    return "n/a"


def build_decoder(args, device) -> Decoder:
    unet = UNet(model_channels=args.channels, channel_mult=(1, 2, 3, 4), num_res_blocks=2,
                attention_resolutions=(32, 16, 8), image_size=args.size, num_head_channels=64, clip_dim=args.width,
                num_clip_tokens=4, context_dim=args.width, pool_context=True)
    model = Decoder(unet, GaussianDiffusion(get_betas("cosine", 1000)), text_encoder=None)
    return model.to(device).to(memory_format=torch.channels_last)


def decoder_inputs(batch, args, device, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    images = torch.rand(batch, 3, args.size, args.size, device=device, generator=g) * 2 - 1
    emb = F.normalize(torch.randn(batch, args.width, device=device, generator=g), dim=-1)
    states = torch.randn(batch, args.text_len, args.width, device=device, generator=g)
    mask = torch.ones(batch, args.text_len, dtype=torch.bool, device=device)
    mask[:, args.text_len // 2:] = False          # realistic padding: half the caption slots are empty
    return images.contiguous(memory_format=torch.channels_last), emb, (states, mask)


def train_bench(model, loss_fn, params, args, device, compile_net) -> dict:
    opt = torch.optim.AdamW(params, lr=1.2e-4, fused=device.type == "cuda")
    if compile_net:
        model.unet = torch.compile(model.unet)

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = loss_fn()["loss"]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    reset_peak(device)
    step()  # first call (allocation, compilation) outside the timing
    flops = None
    if not compile_net:
        with FlopCounterMode(display=False) as counter:
            with torch.autocast(device.type, dtype=torch.bfloat16):
                loss = loss_fn()["loss"]
            loss.backward()
        opt.zero_grad(set_to_none=True)
        flops = counter.get_total_flops()
    sec = timed(step, args.iters, args.warmup, device)
    return {"sec": sec, "flops": flops, "mem": peak_gib(device)}


def bench_decoder_train(args, device, compile_net) -> dict:
    torch.manual_seed(0)
    model = build_decoder(args, device)
    images, emb, text = decoder_inputs(args.batch, args, device)
    out = train_bench(model, lambda: model.loss(images, emb, text=text), model.parameters(), args, device,
                      compile_net)
    out["params"] = sum(p.numel() for p in model.parameters())
    out["img_s"] = args.batch / out["sec"]
    return out


def bench_decoder_sample(args, device, compile_net) -> dict:
    torch.manual_seed(0)
    model = build_decoder(args, device).eval()
    if compile_net:
        model.unet = torch.compile(model.unet)
    _, emb, text = decoder_inputs(args.sample_batch, args, device, seed=1)

    def run():
        with torch.autocast(device.type, dtype=torch.bfloat16):
            model.sample(emb, text=text, steps=args.sample_steps, sampler="ddim", eta=0.0, guidance_scale=3.0,
                         generator=torch.Generator(device=device).manual_seed(0))

    reset_peak(device)
    sec = timed(run, args.sample_iters, 1 if device.type == "cuda" else 0, device)
    flops = None
    if not compile_net:  # one counted call (FlopCounterMode cannot see inside compiled graphs)
        with FlopCounterMode(display=False) as counter:
            run()
        flops = counter.get_total_flops()
    return {"sec": sec, "img_s": args.sample_batch / sec, "mem": peak_gib(device), "flops": flops}


def bench_upsampler_train(args, device, compile_net) -> dict:
    torch.manual_seed(0)
    unet = UNet(model_channels=192, channel_mult=(1, 1, 2, 2, 4, 4), num_res_blocks=2, attention_resolutions=[],
                image_size=4 * args.up_size, low_res_channels=3)
    model = Upsampler(unet, GaussianDiffusion(get_betas("linear", 1000)), low_res_size=args.up_size,
                      crop_size=args.up_size).to(device).to(memory_format=torch.channels_last)
    g = torch.Generator(device=device).manual_seed(2)
    crops = (torch.rand(args.up_batch, 3, args.up_size, args.up_size, device=device, generator=g) * 2 - 1)
    crops = crops.contiguous(memory_format=torch.channels_last)
    low = F.interpolate(crops, scale_factor=0.25, mode="bilinear", antialias=True)
    up = F.interpolate(low, size=crops.shape[-2:], mode="bilinear")

    def loss_fn():  # the model-side work of Upsampler.loss on already-cut crops (crop/degradation excluded)
        t = model.diffusion.sample_timesteps(args.up_batch, device)
        terms = model.diffusion.training_losses(model.unet, crops, t, model_kwargs={"low_res": up})
        return {k: v.mean() for k, v in terms.items()}

    out = train_bench(model, loss_fn, model.parameters(), args, device, compile_net)
    out["params"] = sum(p.numel() for p in model.parameters())
    out["img_s"] = args.up_batch / out["sec"]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--compile", action="store_true", help="also time torch.compile (CUDA only)")
    p.add_argument("--channels", type=int, default=192)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--width", type=int, default=768, help="CLIP embedding D and caption state width")
    p.add_argument("--text-len", type=int, default=77)
    p.add_argument("--batch", type=int, default=None, help="decoder training batch (default 128 GPU, 1 CPU)")
    p.add_argument("--iters", type=int, default=None)
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--sample-batch", type=int, default=None, help="default 64 on GPU, 1 on CPU")
    p.add_argument("--sample-steps", type=int, default=None, help="DDIM steps (default 50 GPU, 5 CPU)")
    p.add_argument("--sample-iters", type=int, default=None)
    p.add_argument("--up-size", type=int, default=None, help="upsampler crop side (default 256 GPU, 64 CPU)")
    p.add_argument("--up-batch", type=int, default=None, help="default 16 on GPU, 1 on CPU")
    p.add_argument("--peak-n", type=int, default=None, help="matmul size (default 8192 on GPU, 1024 on CPU)")
    p.add_argument("--out", type=Path, default=HERE / "README.md", help="README to write the table into ('-': none)")
    args = p.parse_args()

    device = torch.device(args.device)
    gpu = device.type == "cuda"
    args.batch = args.batch or (128 if gpu else 1)
    args.iters = args.iters or (10 if gpu else 2)
    args.warmup = args.warmup if args.warmup is not None else (3 if gpu else 0)
    args.sample_batch = args.sample_batch or (64 if gpu else 1)
    args.sample_steps = args.sample_steps or (50 if gpu else 5)
    args.sample_iters = args.sample_iters or (2 if gpu else 1)
    args.up_size = args.up_size or (256 if gpu else 64)
    args.up_batch = args.up_batch or (16 if gpu else 1)
    args.peak_n = args.peak_n or (8192 if gpu else 1024)
    if gpu:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    t_start = time.perf_counter()
    if args.compile and not gpu:
        print("--compile is only timed on CUDA; skipping the compiled rows")

    name = device_name(device)
    peak = matmul_peak(args.peak_n, device, 50 if gpu else 20)
    print(f"device: {name}; bf16 matmul {args.peak_n}^3: {peak:.2f} TFLOP/s", flush=True)

    rows = []
    flops = {}
    for comp in [False] + ([True] if args.compile and gpu else []):
        mode = "compiled" if comp else "eager"
        dt = bench_decoder_train(args, device, comp)
        flops["dec"] = dt["flops"] or flops.get("dec")
        tf = flops["dec"] / dt["sec"] / 1e12
        print(f"{mode} decoder train: {dt['img_s']:.4g} img/s, {tf:.3g} TFLOP/s ({100 * tf / peak:.1f}%), "
              f"peak {dt['mem']} GiB", flush=True)
        rows.append(f"| {mode} | decoder train, batch {args.batch} | {dt['img_s']:.4g} | {dt['sec'] * 1e3:.0f} ms/step "
                    f"| {tf:.3g} | {100 * tf / peak:.1f}% | {dt['mem']} |")
        ds = bench_decoder_sample(args, device, comp)
        flops["sample"] = ds["flops"] or flops.get("sample")
        tfs = flops["sample"] / ds["sec"] / 1e12
        per50 = ds["img_s"] * args.sample_steps / 50
        print(f"{mode} decoder DDIM-{args.sample_steps} sample: {ds['img_s']:.4g} img/s "
              f"(= {per50:.3g} img/s at 50 steps), {tfs:.3g} TFLOP/s ({100 * tfs / peak:.1f}%), "
              f"peak {ds['mem']} GiB", flush=True)
        rows.append(f"| {mode} | decoder DDIM-{args.sample_steps} sampling + guidance, batch {args.sample_batch} "
                    f"| {ds['img_s']:.4g}" + ("" if args.sample_steps == 50 else f" ({per50:.3g} at 50 steps)")
                    + f" | {ds['sec']:.2f} s/batch | {tfs:.3g} | {100 * tfs / peak:.1f}% | {ds['mem']} |")
        ut = bench_upsampler_train(args, device, comp)
        flops["up"] = ut["flops"] or flops.get("up")
        tfu = flops["up"] / ut["sec"] / 1e12
        print(f"{mode} upsampler train {args.up_size}px: {ut['img_s']:.4g} img/s, {tfu:.3g} TFLOP/s "
              f"({100 * tfu / peak:.1f}%), peak {ut['mem']} GiB", flush=True)
        rows.append(f"| {mode} | upsampler train {args.up_size}x{args.up_size} crops, batch {args.up_batch} "
                    f"| {ut['img_s']:.4g} | {ut['sec'] * 1e3:.0f} ms/step | {tfu:.3g} | {100 * tfu / peak:.1f}% "
                    f"| {ut['mem']} |")
        dec_params, up_params = dt["params"], ut["params"]

    peak_end = matmul_peak(args.peak_n, device, 50 if gpu else 20)
    if peak_end > peak:  # a shared machine: use the better of the two measurements, recompute the percentages
        rows = [re.sub(r"\| ([0-9.]+)% \|", lambda m: f"| {float(m.group(1)) * peak / peak_end:.1f}% |", r)
                for r in rows]
        peak = peak_end
    elapsed = time.perf_counter() - t_start
    load = " / ".join(f"{x:.1f}" for x in __import__("os").getloadavg())
    reduced = "" if gpu else (" **Reduced for the CPU** (reference: decoder batch 128, sampling batch 64 with 50 "
                              "steps, upsampler 256x256 crops batch 16): the sizes are in the rows.")
    sample50 = flops["sample"] / args.sample_batch / args.sample_steps * 50  # FLOPs per image at 50 steps
    lines = [
        f"`python experiments/bench/bench_decoder.py{' --device cuda --compile' if gpu else ''}` on **{name}** "
        f"(torch {torch.__version__}).",
        "",
        f"Decoder shape: U-Net {args.channels} ch, mults 1,2,3,4, 2 res blocks, attention at 32,16,8 (64-ch heads), "
        f"{args.size}x{args.size}, CLIP D = {args.width} (+4 context tokens), {args.text_len} caption tokens of width "
        f"{args.width} (precomputed states); {dec_params / 1e6:.1f}M parameters. Upsampler: 256->1024 paper shape "
        f"(192 ch, mults 1,1,2,2,4,4, 2 res blocks, no attention), {up_params / 1e6:.1f}M parameters. bf16 autocast, "
        f"channels_last, AdamW{' (fused)' if gpu else ''}; {args.iters} timed steps after {args.warmup} warm-up."
        + reduced,
        f"FLOPs per training step (forward + backward, FlopCounterMode): decoder {flops['dec'] / 1e12:.3g} TFLOP "
        f"({flops['dec'] / args.batch / 1e9:.0f} GFLOP/image), upsampler {flops['up'] / 1e12:.3g} TFLOP. "
        f"Guided sampling (cond + uncond batched): {flops['sample'] / args.sample_batch / args.sample_steps / 1e9:.0f} "
        f"GFLOP per image and step, so DDIM-50 costs {sample50 / 1e12:.1f} TFLOP per image and cannot exceed "
        f"**{peak * 1e12 / sample50:.3g} images/s** at the measured peak. "
        f"Peak: bf16 matmul {args.peak_n}^3 measured in the same run (best of start and end) = **{peak:.3g} TFLOP/s**.",
        "",
        "| mode | what | images/s | time | model TFLOP/s | % of measured bf16 peak | peak GPU memory (GiB) |",
        "|---|---|---|---|---|---|---|",
        *rows,
        "",
        f"Run took {elapsed:.0f} s; load average at the end {load} (1/5/15 min)"
        + ("." if gpu else " on a shared 2-core machine: CPU numbers are indicative only. Targets on one "
                           "H100/H200 (see GPU check below): decoder training >= 35% of the bf16 matmul peak, "
                           "DDIM-50 sampling >= 70 images/s."),
        "",
        "The reference shape is often quoted at about 185M parameters; this U-Net has more because, as in ADM, the up "
        "path has one more residual block per level than the down path, the time embedding drives a scale and a "
        "shift in every residual block, and every attention layer projects the caption and CLIP context into its own "
        "keys and values.",
    ]
    body = "\n".join(lines)
    print(body)
    if str(args.out) != "-":
        write_section(args.out, SECTION, body)


if __name__ == "__main__":
    main()
