"""README "Sample with, or fine-tune from, Karlo's weights": ``python -m unclip_pl.convert from-diffusers`` on a
tiny random-weight pipeline folder with Karlo's structure (each component ``save_pretrained`` into its subfolder),
then ``sample.py`` and ``train.py prior=karlo init_from=...`` on what it wrote, and ``to-diffusers`` back; bad input
and ``init_from`` with ``ckpt_path`` are one line."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import yaml

from tests.cli.conftest import Command, script
from tests.helpers import emoji_overrides, grid_size

diffusers = pytest.importorskip("diffusers", reason="diffusers not installed (pip install -e '.[diffusers]')")

D, CTX, C = 24, 48, 32  # CLIP embedding = text width (as Karlo's 768), decoder context width, base channels
MODELS = ("prior", "text_proj", "decoder", "super_res_first", "super_res_last")
#: the stages of the tiny pipeline, as overrides of conf/prior/karlo.yaml, conf/decoder/karlo.yaml and
#: conf/upsampler/karlo_256.yaml
KARLO_PRIOR = ["prior.module.model.net.dim=24", "prior.module.model.net.depth=1", "prior.module.model.net.heads=2"]
_U = "decoder.module.model.unet"
KARLO_DECODER = ["decoder.image_size=16", f"{_U}.model_channels={C}", f"{_U}.channel_mult=[1,2]",
                 f"{_U}.num_res_blocks=1", f"{_U}.attention_resolutions=[8]", f"{_U}.num_head_channels=16",
                 f"{_U}.context_dim={CTX}", "decoder.module.num_grid_items=0"]
KARLO_UPSAMPLER = ["upsampler.image_size=32", "upsampler.low_res_size=16", "upsampler.module.num_grid_items=0",
                   *(f"upsampler.module.model.{net}.{kv}" for net in ("unet", "last_unet")
                     for kv in (f"model_channels={C}", "channel_mult=[1,2]", "num_res_blocks=1"))]


def save_tiny_pipeline(folder: Path, seed: int = 0) -> None:
    """Karlo's UnCLIPPipeline components (no CLIP encoders) at a tiny size with random weights."""
    from diffusers.pipelines.deprecated.unclip.text_proj import UnCLIPTextProjModel

    torch.manual_seed(seed)
    unet = dict(block_out_channels=(C, 2 * C), layers_per_block=1)
    comps = {
        "prior": diffusers.PriorTransformer(num_attention_heads=2, attention_head_dim=12, num_layers=1,
                                            embedding_dim=D, num_embeddings=77, additional_embeddings=4),
        "text_proj": UnCLIPTextProjModel(clip_extra_context_tokens=4, clip_embeddings_dim=D, time_embed_dim=4 * C,
                                         cross_attention_dim=CTX),
        "decoder": diffusers.UNet2DConditionModel(
            sample_size=16, in_channels=3, out_channels=6, **unet, resnet_time_scale_shift="scale_shift",
            down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
            up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
            mid_block_type="UNetMidBlock2DSimpleCrossAttn", attention_head_dim=16, cross_attention_dim=CTX,
            class_embed_type="identity"),
    }
    for name in ("super_res_first", "super_res_last"):
        comps[name] = diffusers.UNet2DModel(sample_size=32, in_channels=6, out_channels=3, **unet,
                                            down_block_types=("ResnetDownsampleBlock2D",) * 2,
                                            up_block_types=("ResnetUpsampleBlock2D",) * 2, add_attention=False)
    with torch.no_grad():
        for module in comps.values():  # zero-initialised layers made random, so every tensor counts
            for p in module.parameters():
                p.add_(torch.randn_like(p) * 0.02)
        comps["prior"].clip_std.uniform_(0.5, 1.5)
    for name, module in comps.items():
        module.save_pretrained(folder / name)
    for name, kw in (("prior_scheduler", dict(variance_type="fixed_small_log", prediction_type="sample",
                                              clip_sample=True, clip_sample_range=5.0)),
                     ("decoder_scheduler", dict(variance_type="learned_range", prediction_type="epsilon")),
                     ("super_res_scheduler", dict(variance_type="fixed_small_log", prediction_type="epsilon"))):
        diffusers.UnCLIPScheduler(**kw).save_pretrained(folder / name)
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "UnCLIPPipeline"}))


def one_line_error(done) -> str:
    """A usage error: exit code 2 and exactly one line on stderr; returns it."""
    assert done.returncode == 2, (done.returncode, done.stderr[-3000:])
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, done.stderr
    return lines[0]


def _weights(folder: Path, sub: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(folder / sub / "diffusion_pytorch_model.safetensors")


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """``{"root", "pipe", "out", "done"}``: the tiny pipeline folder and ``from-diffusers`` run on it."""
    root = tmp_path_factory.mktemp("karlo_root")
    pipe = root / "karlo-v1-alpha"
    save_tiny_pipeline(pipe)
    done = Command(["-m", "unclip_pl.convert", "from-diffusers", "karlo-v1-alpha", "karlo"], root).wait().check()
    # README: ... and back (started now, so that it runs beside the commands of the tests before its own)
    back = Command(["-m", "unclip_pl.convert", "to-diffusers", "karlo", "back"], root)
    yield {"root": root, "pipe": pipe, "out": root / "karlo", "done": done, "back": back}
    back.stop()


@pytest.fixture(scope="module")
def tiny_clip(converted) -> Path:
    """A random tiny CLIP with Karlo's proportions (embedding width = text width = D)."""
    from unclip_pl.clip import build_small_clip, export_clip
    from unclip_pl.clip.small import small_clip_config

    over = dict(embed_dim=D, vision_cfg={"image_size": 32, "width": 32, "layers": 1, "head_width": 16,
                                         "patch_size": 8},
                text_cfg={"width": D, "heads": 2, "layers": 1, "context_length": 77})
    torch.manual_seed(0)
    return export_clip(build_small_clip("unclip-tiny", **over), "unclip-tiny", small_clip_config("unclip-tiny", **over),
                       converted["root"] / "clip.pt")


def test_from_diffusers_writes_one_weights_file_per_stage(converted):
    from unclip_pl.checkpoint import load_stage

    out = converted["out"]
    assert sorted(p.name for p in out.iterdir()) == ["decoder.pt", "prior.pt", "sample_settings.yaml",
                                                     "upsampler_32.pt"]
    stages = {name: load_stage(out / name) for name in ("prior.pt", "decoder.pt", "upsampler_32.pt")}
    assert [s.stage for s in stages.values()] == ["prior", "decoder", "upsampler"]
    settings = yaml.safe_load((out / "sample_settings.yaml").read_text())
    # UnCLIPPipeline's defaults and schedulers, in the stages' sample: form
    assert settings["prior"] == stages["prior.pt"].sample == {"steps": 25, "sampler": "ddpm", "eta": 0.0,
                                                              "guidance_scale": 4.0, "best_of": 1}
    assert settings["decoder"]["steps"] == 25 and settings["decoder"]["guidance_scale"] == 8.0
    assert settings["upsamplers"] == [stages["upsampler_32.pt"].sample] and settings["upsamplers"][0]["steps"] == 7
    prior = stages["prior.pt"].model
    assert prior.clip_sample_range == 5.0 and prior.normalization == "standardize" and not prior.needs_fit
    assert stages["prior.pt"].clip["loader"]["model_name"] == "ViT-L-14-quickgelu"
    assert all(f"wrote karlo/{n}" in converted["done"].stdout for n in ("prior.pt", "decoder.pt", "upsampler_32.pt"))


def test_sample_and_init_from_on_the_converted_files(converted, tiny_clip, emoji_root, in_process):
    """README: sample.py with the three files, and train.py prior=karlo init_from=karlo/prior.pt (a learning rate
    of 0, so the run's weights and EMA must still be the converted ones after its steps)."""
    from unclip_pl.checkpoint import read_checkpoint, resolve_checkpoint

    root = converted["root"]
    clip = (f"{{_target_: unclip_pl.clip.frozen.load_clip, model_name: unclip-tiny, checkpoint: {tiny_clip}, "
            f"normalize: false}}")  # CLIP's raw projections, as the converted Karlo prior reads
    sample = Command([script("sample.py"), "mode=text", "prompt=red heart", "n=2", "checkpoints.prior=karlo/prior.pt",
                      "checkpoints.decoder=karlo/decoder.pt", "checkpoints.upsamplers=[karlo/upsampler_32.pt]",
                      f"clip={clip}", "settings.prior.steps=3", "settings.decoder.steps=3",
                      "settings.upsamplers=[{steps: 2}]"], root)
    clip_args = [f"clip.loader.checkpoint={tiny_clip}", f"clip.embed_dim={D}", f"clip.text_width={D}",
                 "clip.image_size=32", "clip.autotrain=false", "+clip.loader.normalize=false"]
    train = Command([script("train.py"), "prior=karlo", *KARLO_PRIOR, "init_from=karlo/prior.pt", *clip_args,
                     *emoji_overrides(emoji_root), "prior.module.optimizer.lr=0.0", "prior.module.warmup_steps=0",
                     "prior.sample.steps=2", "trainer.max_steps=2", "run_name=finetune"], root)
    stages = {stage: Command([script("train.py"), f"{stage}={option}", *overrides, f"init_from=karlo/{file}",
                              *clip_args, *emoji_overrides(emoji_root), f"{stage}.module.optimizer.lr=0.0",
                              f"{stage}.module.warmup_steps=0", f"{stage}.sample.steps=2", "trainer.max_steps=1",
                              f"run_name={stage}_finetune"], root)
              for stage, option, overrides, file in (("decoder", "karlo", KARLO_DECODER, "decoder.pt"),
                                                     ("upsampler", "karlo_256", KARLO_UPSAMPLER, "upsampler_32.pt"))}
    sample.wait().check()
    from PIL import Image

    (run,) = (root / "logs" / "sample" / "runs").iterdir()
    meta = json.loads((run / "text.json").read_text())
    assert meta["checkpoints"]["decoder"] == "karlo/decoder.pt" and meta["image_size"] == 32
    assert meta["num_images"] == 2 and meta["captions"] == ["red heart"]
    assert Image.open(run / "text.png").size == grid_size(2, 2, 32)  # one row of the two 32 px images

    done = train.wait().check()
    assert "init_from: loaded" in done.stdout + done.stderr
    ckpt = read_checkpoint(root / "logs" / "train" / "runs" / "finetune" / "checkpoints" / "last.ckpt")
    assert ckpt["global_step"] == 2
    _, init, _ = resolve_checkpoint(read_checkpoint(converted["out"] / "prior.pt"))
    for prefix in ("model.", "ema.module."):
        for k, v in init.items():
            assert torch.equal(ckpt["state_dict"][prefix + k], v), prefix + k
    assert int(ckpt["state_dict"]["ema.num_updates"]) == 2  # the EMA restarted at the loaded weights
    # README: train.py decoder=karlo / upsampler=karlo_256 init_from=... (one step each)
    for stage, cmd in stages.items():
        assert "init_from: loaded" in cmd.wait().check().stdout + cmd.wait().stderr, stage
        ckpt = read_checkpoint(root / "logs" / "train" / "runs" / f"{stage}_finetune" / "checkpoints" / "last.ckpt")
        _, init, _ = resolve_checkpoint(read_checkpoint(converted["out"] / f"{stage}.pt" if stage == "decoder"
                                                        else converted["out"] / "upsampler_32.pt"))
        for k, v in init.items():
            assert torch.equal(ckpt["state_dict"]["model." + k], v), f"{stage} model.{k}"
            assert torch.equal(ckpt["state_dict"]["ema.module." + k], v), f"{stage} ema.module.{k}"

    # README: the fine-tuned runs' checkpoints back to diffusers (at lr 0 still exactly the original components)
    runs = root / "logs" / "train" / "runs"
    done = Command(["-m", "unclip_pl.convert", "to-diffusers", "karlo", "back_ft",
                    "--prior", runs / "finetune" / "checkpoints" / "last.ckpt",
                    "--decoder", runs / "decoder_finetune" / "checkpoints" / "last.ckpt",
                    "--upsampler", runs / "upsampler_finetune" / "checkpoints" / "last.ckpt"], root).wait().check()
    for sub in MODELS:
        want, got = _weights(converted["pipe"], sub), _weights(root / "back_ft", sub)
        assert set(want) == set(got) and all(torch.equal(want[k], got[k]) for k in want), sub

    # without a local CLIP file, offline: the files' CLIP (clip=vit_l14) cannot be downloaded, in one line
    line = one_line_error(in_process("sample.py", ["mode=text", "prompt=x", "n=1", "use_prior=false",
                                                   f"checkpoints.decoder={converted['out'] / 'decoder.pt'}"], root))
    assert "ViT-L-14-quickgelu/openai" in line and "clip=" in line

    # init_from together with a checkpoint to resume: one line saying which is for what
    last = root / "logs" / "train" / "runs" / "finetune" / "checkpoints" / "last.ckpt"
    line = one_line_error(in_process("train.py", ["prior=karlo", *KARLO_PRIOR, "init_from=karlo/prior.pt",
                                                  f"ckpt_path={last}", *clip_args, *emoji_overrides(emoji_root)],
                                     root))
    assert "init_from=karlo/prior.pt and ckpt_path=" in line and "resumes a run" in line


def test_to_diffusers_gives_back_every_tensor(converted):
    back = converted["root"] / "back"
    done = converted["back"].wait().check()
    assert all(f"wrote back/{sub}" in done.stdout for sub in MODELS)
    for sub in MODELS:
        want, got = _weights(converted["pipe"], sub), _weights(back, sub)
        assert set(want) == set(got), sub
        assert all(torch.equal(want[k], got[k]) for k in want), sub
    for sub in ("prior_scheduler", "decoder_scheduler", "super_res_scheduler"):
        a, b = (json.loads((f / sub / "scheduler_config.json").read_text()) for f in (converted["pipe"], back))
        assert {k: v for k, v in a.items() if not k.startswith("_")} == {k: v for k, v in b.items()
                                                                          if not k.startswith("_")}, sub


@pytest.mark.parametrize("case", ["not_a_folder", "no_index", "missing_component"])
def test_bad_pipeline_folder_is_one_line(case, tmp_path, capsys):
    from unclip_pl.convert.__main__ import main

    pipe = tmp_path / "pipe"
    if case == "no_index":
        pipe.mkdir()
        (pipe / "prior").mkdir()
    elif case == "missing_component":
        save_tiny_pipeline(pipe)
        for f in (pipe / "super_res_last").iterdir():
            f.unlink()
        (pipe / "super_res_last").rmdir()
    assert main(["from-diffusers", str(pipe), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ")
    assert {"not_a_folder": "not a folder", "no_index": "no model_index.json",
            "missing_component": "super_res_last/ component is missing"}[case] in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("module, reason", [
    ("diffusers", 'the converter needs diffusers: pip install -e ".[diffusers]"'),
    ("unclip_pl.convert.unet", "unclip_pl.convert.unet cannot be imported")])
def test_missing_module_is_one_line(module, reason, tmp_path, capsys, monkeypatch):
    import importlib

    from unclip_pl.convert.__main__ import main

    save_tiny_pipeline(tmp_path / "pipe")
    monkeypatch.setitem(sys.modules, module, None)  # importing it raises ImportError
    parent, _, name = module.rpartition(".")
    if parent:
        monkeypatch.delattr(importlib.import_module(parent), name, raising=False)
    assert main(["from-diffusers", str(tmp_path / "pipe"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and reason in err
    assert not (tmp_path / "out").exists()
