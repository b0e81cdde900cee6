"""README "Quick start" and "The other stages": `python train.py prior=diffusion | stage=clip | decoder=base |
upsampler=emoji` through train.py in subprocesses (tiny sizes), and `python train.py prior=diffusion --cfg job`.

Also "Run directories": a rerun in a run directory holding last.ckpt resumes (resume: auto), and the GPU + wandb
command where a GPU is present. Already run elsewhere through train.py, not repeated here: DDP on CPU and a multirun
sweep with a failing job (tests/ops/test_ops_distributed.py); config errors (tests/config/test_configs.py).
"""

from __future__ import annotations

import re

import pytest
import torch
import yaml

from tests.cli.conftest import STEPS, Command, script
from tests.helpers import emoji_overrides, tiny_clip_overrides, tiny_stage_overrides

TIME_STAMP = re.compile(r"\d{4}-\d{2}-\d{2}_\d{2}-\d{2}-\d{2}")


def assert_run_dir(run_dir, stage: str, steps: int | None = 2, csv: bool = True) -> dict:
    """What every training run writes: resolved config, CSV metrics, its log and last.ckpt (of ``steps`` steps;
    ``stage``: the config key naming the stage, ``prior`` / ``decoder`` / ``upsampler`` or ``stage`` for the CLIP)."""
    for name in ("config_resolved.yaml", "train.log", "checkpoints/last.ckpt") + (("csv/metrics.csv",) if csv else ()):
        assert (run_dir / name).is_file(), f"{run_dir} has no {name}: {sorted(p.name for p in run_dir.iterdir())}"
    cfg = yaml.safe_load((run_dir / "config_resolved.yaml").read_text())
    assert cfg[stage] is not None and cfg["paths"]["output_dir"] == str(run_dir)
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    if steps is not None:
        assert ckpt["global_step"] == steps
        assert ckpt["cfg"][stage]["name"] == stage
    return ckpt


def test_quick_start_trains_the_clip_then_the_prior(stages, emoji_root):
    """`python train.py prior=diffusion` on a fresh root: CLIP trained into data/cache/clip/, shards embedded,
    prior trained into logs/train/runs/<date>_<time>/."""
    from unclip_pl.clip.frozen import load_clip

    run_dir, done = stages["runs"]["prior"], stages["done"]["prior"]
    assert run_dir.parent == stages["root"] / "logs" / "train" / "runs" and TIME_STAMP.fullmatch(run_dir.name)
    ckpt = assert_run_dir(run_dir, "prior")
    assert ckpt["cfg"]["prior"]["module"]["model"]["net"]["dim"] == 32  # the tiny overrides reached the run
    assert not any(k.startswith("clip.") for k in ckpt["state_dict"])

    clip_file = stages["clip"]
    assert clip_file.is_file(), "the quick start caches the CLIP it trained in data/cache/clip/"
    assert load_clip("unclip-tiny", checkpoint=str(clip_file)).embed_dim == 32
    assert (run_dir / "clip_autotrain").is_dir()
    log = done.stdout + done.stderr
    assert str(clip_file) in log, "the CLIP step is announced with the file it fills"
    embedded = [p for p in (emoji_root / "embedded").rglob("*.tar")]
    assert embedded, "the prior's shards were embedded with the CLIP (cached under data.root/embedded)"


def test_decoder_and_upsampler_stages(stages):
    """`python train.py decoder=base` and `python train.py upsampler=emoji` (run_name= picks the directory)."""
    for stage in ("decoder", "upsampler"):
        run_dir = stages["runs"][stage]
        assert run_dir == stages["root"] / "logs" / "train" / "runs" / stage
        assert_run_dir(run_dir, stage)
    dec = torch.load(stages["decoder"], map_location="cpu", weights_only=True)
    assert dec["cfg"]["decoder"]["image_size"] == 16 and dec["cfg"]["decoder"]["sample"]["steps"] == 2
    assert any(k.startswith("ema.module.") for k in dec["state_dict"]), "EMA weights are checkpointed"


def test_clip_stage_exports_into_its_run_directory(stages):
    """`python train.py stage=clip`: retrieval logged; the CLIP written to <run dir>/clip.pt, not the shared cache."""
    from unclip_pl.clip.frozen import load_clip

    cmd = stages["side"]["clip"]
    cmd.wait().check()
    run_dir = cmd.root / "logs" / "train" / "runs" / "clip"
    assert_run_dir(run_dir, "stage", steps=None)
    assert load_clip("unclip-tiny", checkpoint=str(run_dir / "clip.pt")).embed_dim == 32
    header = (run_dir / "csv" / "metrics.csv").read_text().splitlines()[0]
    assert "val/i2t_top5" in header and "val/t2i_top1" in header
    assert not (cmd.root / "data" / "cache").exists(), "a stage=clip run leaves the shared CLIP cache alone"


def test_clip_export_to_fills_the_cache_and_the_judge_trains(stages):
    """`stage=clip clip.export_to=data/cache/clip/unclip-tiny.pt` fills the cache, with how it was trained;
    `stage=clip clip=judge seed=1 run_name=judge` writes the judge into its run directory."""
    from unclip_pl.clip.small import read_training_record

    cmd = stages["side"]["clip_export"]
    cmd.wait().check()
    cache = cmd.root / "data" / "cache" / "clip" / "unclip-tiny.pt"
    record = read_training_record(cache)
    assert record == read_training_record(cmd.root / "logs" / "train" / "runs" / "exported" / "clip.pt")
    assert record["steps"] > 0 and not record["smoke_test"] and "i2t_top5" in record["val"]

    judge = stages["side"]["judge"]
    judge.wait().check()
    run_dir = judge.root / "logs" / "train" / "runs" / "judge"
    assert yaml.safe_load((run_dir / "config_resolved.yaml").read_text())["clip"]["name"] == "judge"
    assert read_training_record(run_dir / "clip.pt")["seed"] == 1


def test_print_config(stages):
    """`python train.py prior=diffusion --cfg job` prints the composed job config and trains nothing."""
    done = stages["side"]["cfg_job"].wait().check()
    cfg = yaml.safe_load(done.stdout)
    assert cfg["task_name"] == "train" and cfg["prior"]["name"] == "prior"
    assert cfg["prior"]["module"]["model"]["net"]["dim"] == 256  # conf/prior/diffusion.yaml, no overrides
    assert "decoder" not in cfg or cfg["decoder"] is None
    stamped = {p for p in (stages["root"] / "logs" / "train" / "runs").iterdir() if TIME_STAMP.fullmatch(p.name)}
    assert stamped == {stages["runs"]["prior"]}, "--cfg job creates no run directory"


def test_rerun_in_the_same_run_directory_resumes(stages, launched):
    """`run_name=NAME` again with a longer run: continues from last.ckpt (global step 2 -> 3), announced."""
    done = launched["resume"].wait().check()
    run_dir = stages["root"] / "logs" / "train" / "runs" / "resumed"
    assert "Resuming from" in done.stdout + done.stderr and str(run_dir / "checkpoints" / "last.ckpt") in (
        done.stdout + done.stderr)
    assert_run_dir(run_dir, "upsampler", steps=3)


def test_emoji_cascade_stage_experiment(stages, launched):
    """`python train.py experiment=emoji_cascade/prior trainer.max_time=00:00:15:00`: the experiment picks the stage,
    its run directory (logs/emoji_cascade/runs/prior) and budget, and the command line overrides the budget."""
    launched["experiment"].wait().check()
    run_dir = stages["root"] / "logs" / "emoji_cascade" / "runs" / "prior"
    for name in ("config_resolved.yaml", "emoji_cascade.log", "checkpoints/last.ckpt"):  # log named by its task
        assert (run_dir / name).is_file(), name
    assert not (run_dir / "clip_autotrain").exists(), "the cached CLIP is used"
    cfg = yaml.safe_load((run_dir / "config_resolved.yaml").read_text())
    assert cfg["trainer"]["max_time"] == "00:00:15:00" and cfg["tags"] == ["emoji_cascade"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the README's GPU command needs a GPU")
def test_gpu_and_wandb(stages, emoji_root):
    """`python train.py prior=diffusion trainer=gpu logger=wandb` (bf16; wandb offline without an API key)."""
    root = stages["root"]
    Command([script("train.py"), "prior=diffusion", "trainer=gpu", "logger=wandb", *emoji_overrides(emoji_root),
             *tiny_clip_overrides(), *tiny_stage_overrides("prior"), STEPS, "run_name=gpu"], root).wait().check()
    run_dir = root / "logs" / "train" / "runs" / "gpu"
    assert_run_dir(run_dir, "prior", csv=False)
    assert (run_dir / "wandb_id.txt").is_file() and (run_dir / "wandb").is_dir()


def test_ar_prior_trains_its_codec_and_samples_through_sample_py(stages, launched):
    """`python train.py prior=ar`: the PCA codec is fitted at fit start (logged) and saved in the checkpoint;
    `sample.py mode=text checkpoints.prior=<AR prior>` samples with it, `settings.prior.temperature` overriding the
    stored block."""
    import json

    run_dir = stages["runs"]["prior_ar"]
    assert_run_dir(run_dir, "prior")
    ckpt = torch.load(stages["prior_ar"], map_location="cpu", weights_only=True)
    assert bool(ckpt["state_dict"]["model.codec.fitted"]) and bool(ckpt["state_dict"]["ema.module.codec.fitted"])
    assert ckpt["state_dict"]["model.codec.components"].shape == (8, 32)
    assert "codec/explained_variance" in (run_dir / "csv" / "metrics.csv").read_text().splitlines()[0]
    done = launched["text_ar"].wait().check()
    assert "Traceback" not in done.stderr
    runs = list((launched["text_ar"].root / "logs" / "sample" / "runs").glob("*/text.json"))
    assert len(runs) == 1 and (runs[0].parent / "text.png").is_file()
    settings = json.loads(runs[0].read_text())["settings"]["prior"]
    assert settings["temperature"] == 0.8 and settings["dot_fraction"] == 0.5 and "steps" not in settings


def test_resumed_ar_prior_keeps_its_codec(stages, launched):
    """Rerunning `prior=ar` in its run directory resumes (step 2 -> 3) without fitting the codec again: the codes
    a trained model predicts keep their meaning."""
    done = launched["resume_ar"].wait().check()
    assert "Resuming from" in done.stdout + done.stderr
    assert "fitted the PCA codec" not in done.stdout + done.stderr
    run_dir = stages["root"] / "logs" / "train" / "runs" / "prior_ar_resumed"
    before = torch.load(stages["prior_ar"], map_location="cpu", weights_only=True)["state_dict"]
    after = assert_run_dir(run_dir, "prior", steps=3)["state_dict"]
    for name in ("model.codec.components", "model.codec.buckets.edges", "ema.module.codec.mean"):
        assert torch.equal(before[name], after[name]), name
