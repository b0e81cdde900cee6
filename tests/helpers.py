"""Test helpers: Hydra composition of the real configs, as `train.py` composes them."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"



def compose(overrides: list[str], output_dir: Path | str, config_name: str = "train"):
    """Compose the real config with ``overrides`` as `train.py` would, with ``${hydra:...}`` resolvable."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = hydra_compose(config_name=config_name, overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
        del cfg["hydra"]
    return cfg


# ------------------------------------------------------------------------------------ tiny sizes of the real configs
# Overrides that shrink the real stage configs (conf/clip/small.yaml, conf/prior/diffusion.yaml, conf/decoder/base.yaml,
# conf/upsampler/emoji.yaml) to seconds on a CPU, for runs in-process (compose) or through the entry points.
def emoji_overrides(emoji_root: Path | str) -> list[str]:
    """The small emoji set of the ``emoji_root`` fixture (96 emoji, a quarter of them val), no loader workers."""
    return [f"data.root={emoji_root}", "data.limit=96", "data.val_fraction=0.25", "data.num_workers=0",
            "data.batch_size=16", "data.shuffle_buffer=32"]


def tiny_clip_overrides(checkpoint: Path | str | None = None) -> list[str]:
    """A 1-layer, width-32 CLIP on 32 px images (1 epoch when trained); ``checkpoint``: its weights file."""
    m = "clip.train.module.model_cfg"
    return ([f"clip.loader.checkpoint={checkpoint}"] if checkpoint else []) + [
        "clip.embed_dim=32", "clip.text_width=32", "clip.image_size=32", f"{m}.vision_cfg.width=32",
        f"{m}.vision_cfg.layers=1", f"{m}.vision_cfg.head_width=16", f"{m}.text_cfg.heads=2", f"{m}.text_cfg.layers=1",
        "clip.train.trainer.max_epochs=1", "clip.train.module.warmup_steps=1"]


def tiny_stage_overrides(stage: str, steps: int = 2) -> list[str]:
    """``prior`` / ``decoder`` (16 px) / ``upsampler`` (16 -> 32 px): one block, 16 channels, ``steps`` sampling
    steps by default in the checkpoint's ``sample:`` block."""
    if stage == "prior":
        net = "prior.module.model.net"
        return [f"{net}.dim=32", f"{net}.depth=1", f"{net}.heads=2", f"prior.sample.steps={steps}",
                "prior.module.warmup_steps=1"]
    if stage == "decoder":
        unet = "decoder.module.model.unet"
        return ["decoder.image_size=16", f"{unet}.model_channels=16", f"{unet}.channel_mult=[1,2]",
                f"{unet}.num_res_blocks=1", f"{unet}.attention_resolutions=[8]", f"{unet}.num_head_channels=16",
                "decoder.text_width=32", "decoder.module.model.text_encoder.layers=1", f"decoder.sample.steps={steps}",
                "decoder.module.num_grid_items=2", "decoder.module.warmup_steps=1"]
    if stage == "upsampler":
        unet = "upsampler.module.model.unet"
        return ["upsampler.image_size=32", "upsampler.low_res_size=16", f"{unet}.model_channels=16",
                f"{unet}.channel_mult=[1,2]", f"{unet}.num_res_blocks=1", f"upsampler.sample.steps={steps}",
                "upsampler.module.num_grid_items=2", "upsampler.module.warmup_steps=1"]
    raise ValueError(f"unknown stage {stage!r}")


def tiny_ar_overrides() -> list[str]:
    """``prior=ar`` at a tiny size: one block of width 32, 8 principal components in 16 buckets, 8 dot buckets."""
    net = "prior.module.model.net"
    return [f"{net}.dim=32", f"{net}.depth=1", f"{net}.heads=2", "prior.num_components=8", "prior.num_buckets=16",
            "prior.num_dot_buckets=8", "prior.module.codec_batches=4", "prior.module.warmup_steps=1"]


def grid_size(n: int, nrow: int, side: int, pad: int = 2) -> tuple[int, int]:
    """(width, height) of torchvision's ``make_grid`` (sample.py's PNG grids) for ``n`` images of side x side."""
    cols = min(nrow, n)
    rows = -(-n // nrow)
    return cols * (side + pad) + pad, rows * (side + pad) + pad


# ------------------------------------------------------------------------------------ earlier code, for bit-for-bit
def module_from_git(rev: str, path: str, name: str, out_dir: Path):
    """Import ``path`` (a module file of this repository) as it was at commit ``rev``, under the module name
    ``name``: tests compare a network or model with its earlier version to show a new option leaves the old
    function unchanged. Skips the test (one line) when git or the commit is not available."""
    import importlib.util
    import subprocess
    import sys

    import pytest

    try:
        src = subprocess.run(["git", "show", f"{rev}:{path}"], cwd=ROOT, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        pytest.skip(f"git is not available to read the earlier {path}")
    if src.returncode != 0:
        pytest.skip(f"commit {rev[:10]} is not in this checkout's history")
    file = Path(out_dir) / f"{name}.py"
    file.write_text(src.stdout)
    spec = importlib.util.spec_from_file_location(name, file)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def randomize_weights(model, std: float = 0.05):
    """Re-initialise every weight of ``model`` (the zero-initialised output layers included; norms kept) from
    N(0, std^2), seeded, so that every path of a network carries signal in a test. Returns the model."""
    import torch

    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or (p.ndim == 1 and name.endswith("weight")):
                continue
            p.normal_(0, std)
    return model
