"""Helpers shared by the benchmark scripts: device naming, synced timing, a measured bf16 matmul peak, and
rewriting one ``## Section`` of this folder's README."""

from __future__ import annotations

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
