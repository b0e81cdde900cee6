"""Shared helpers of the operations tests: compose the real config plus the test-only stage (tests/ops/conf)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
OPS = Path(__file__).resolve().parent
OPS_CONF = OPS / "conf"
#: The tiny stage, its in-memory data and a CLIP stub (the stage needs none).
BASE = [f"hydra.searchpath=[file://{OPS_CONF}]", "prior=ops_tiny", "data=ops_tiny", "clip=ops_stub",
        "trainer.log_every_n_steps=1", "+trainer.enable_model_summary=false", "~callbacks.progress",
        "+trainer.enable_progress_bar=false"]


def compose_ops(overrides: list[str], output_dir: Path | str):
    """Compose ``train.yaml`` with the tiny stage; ``${hydra:...}`` resolvable; run dir = ``output_dir``."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=BASE + list(overrides), return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
        del cfg["hydra"]
    return cfg


def run_cli(args: list[str], timeout: float = 240, env: dict | None = None) -> subprocess.CompletedProcess:
    """``python train.py BASE + args`` in a subprocess (tiny stage importable), output captured."""
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": f"{OPS}{os.pathsep}{ROOT}",
                "PROJECT_ROOT": str(ROOT), **(env or {})}
    full_env.pop("WANDB_MODE", None) if env is not None and "WANDB_MODE" not in env else None
    flags = [a for a in args if a in ("-m", "--multirun")]
    args = [a for a in args if a not in flags]
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *flags, *BASE, *args], cwd=ROOT, env=full_env,
                          capture_output=True, text=True, timeout=timeout)
