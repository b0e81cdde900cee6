"""Helpers shared by the benchmark scripts: device naming, synced timing, a measured bf16 matmul peak, the priors'
random inputs and timed training step, and rewriting one ``## Section`` of this folder's README."""

from __future__ import annotations

import os
import platform
import re
import time
from pathlib import Path

import torch


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"CPU {line.split(':', 1)[1].strip()} ({torch.get_num_threads()} threads)"
    except OSError:
        pass
    return f"CPU {platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, iters: int, warmup: int, device: torch.device) -> float:
    """Mean seconds per call of fn() after warm-up, with device syncs only around the timed block."""
    for _ in range(warmup):
        fn()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    sync(device)
    return (time.perf_counter() - t0) / iters


def matmul_peak(n: int, device: torch.device, iters: int) -> float:
    """Measured bf16 matmul rate (TFLOP/s) of an n x n x n product."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    sec = timed(lambda: a @ b, iters, max(1, iters // 4), device)
    return 2 * n ** 3 / sec / 1e12


def prior_inputs(batch: int, dim: int, text_len: int, device: torch.device, seed: int = 0):
    """Random prior inputs: unit z_i and z_t (B, dim), caption token states (B, text_len, dim), an all-true mask."""
    g = torch.Generator(device=device).manual_seed(seed)
    img = torch.nn.functional.normalize(torch.randn(batch, dim, device=device, generator=g), dim=-1)
    txt = torch.nn.functional.normalize(torch.randn(batch, dim, device=device, generator=g), dim=-1)
    tok = torch.randn(batch, text_len, dim, device=device, generator=g)
    mask = torch.ones(batch, text_len, dtype=torch.bool, device=device)
    return img, txt, tok, mask


def time_train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, inputs: tuple, iters: int, warmup: int,
                    device: torch.device, count_flops: bool) -> tuple[float, int | None]:
    """Seconds per training step of ``model.loss(*inputs)["loss"]`` under bf16 autocast (backward + ``opt.step``),
    after one untimed call (compilation); and, when ``count_flops`` (eager only), the model FLOPs of one forward +
    backward counted with ``FlopCounterMode``."""
    from torch.utils.flop_counter import FlopCounterMode

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = model.loss(*inputs)["loss"]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()
    flops = None
    if count_flops:
        with FlopCounterMode(display=False) as counter:
            with torch.autocast(device.type, dtype=torch.bfloat16):
                loss = model.loss(*inputs)["loss"]
            loss.backward()
        opt.zero_grad(set_to_none=True)
        flops = counter.get_total_flops()
    return timed(step, iters, warmup, device), flops


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds of live processes (from /proc)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / tick
    return total


def loader_rates(loader, min_samples: int, count_key: str, check=None) -> tuple[float, float]:
    """(wall samples/s, samples per CPU-second of the loading processes) of a ``DataLoader`` over whole passes of at
    least ``min_samples`` (counted by ``batch[count_key]``), the first batch (start-up, worker spawn) not timed.

    CPU time is what the loading processes used (the main process with no workers, else the workers: give the
    loader ``persistent_workers=True`` so they are alive to be read), i.e. what one worker delivers with a core of
    its own, whatever else runs on the machine. ``check(batch)``, if given, runs on every batch (e.g. dtype asserts)."""
    n, t0, c0, it = 0, None, None, None
    pids: list[int] = []

    def cpu() -> float:
        return cpu_seconds(pids) if pids else time.process_time()

    while n < min_samples:
        it = iter(loader)
        for b in it:
            if check is not None:
                check(b)
            if t0 is None:
                pids = [w.pid for w in getattr(it, "_workers", [])]
                t0, c0 = time.perf_counter(), cpu()
                continue
            n += b[count_key].shape[0]
    dt, used = time.perf_counter() - t0, cpu() - c0
    del it
    return n / dt, n / used


def write_section(readme: Path, section: str, body: str) -> None:
    """Replace (or append) the ``section`` heading's block of ``readme`` with ``body``."""
    text = readme.read_text() if readme.exists() else "# Benchmarks\n"
    block = f"{section}\n\n{body.strip()}\n"
    pattern = re.compile(rf"^{re.escape(section)}\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(text):
        text = pattern.sub(lambda _: block + "\n", text, count=1).rstrip() + "\n"
    else:
        text = text.rstrip() + "\n\n" + block
    readme.write_text(text)
