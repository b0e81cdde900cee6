"""load_stage / export_weights: EMA vs trained weights, strict key checks, weights_only loading, the versioned
stage-checkpoint format (written by StageModule, checked on load; files from before the format entry still load)."""

import copy
import re

import pytest
import torch

from unclip_pl.checkpoint import FORMAT, CheckpointError, LoadedStage, export_weights, load_stage, read_checkpoint

from .conftest import PRIOR_MODEL, build, run_cfg, stage_cfg, write_lightning_ckpt


def test_load_stage_ema_and_model(tiny):
    ck = read_checkpoint(tiny["prior"])
    loaded = load_stage(tiny["prior"], which="ema")
    assert isinstance(loaded, LoadedStage) and loaded.stage == "prior" and loaded.path == str(tiny["prior"])
    assert loaded.cfg == tiny["prior_cfg"] and loaded.sample == tiny["prior_cfg"]["sample"]
    assert loaded.clip["embed_dim"] == 16
    with pytest.raises(AttributeError):
        loaded.stage = "decoder"  # frozen
    ema, trained = loaded.model, load_stage(tiny["prior"], which="model").model
    assert type(ema).__name__ == "DiffusionPrior"
    name = "net.out.weight"
    assert torch.equal(ema.state_dict()[name], ck["state_dict"][f"ema.module.{name}"])
    assert torch.equal(trained.state_dict()[name], ck["state_dict"][f"model.{name}"])
    assert not ema.training and not any(p.requires_grad for p in ema.parameters())


def test_mismatched_shape_lists_keys(tiny, tmp_path):
    model = build(PRIOR_MODEL)
    wrong = copy.deepcopy(PRIOR_MODEL)
    wrong["net"]["dim"] = 48  # the config now builds a wider net than the weights
    path = write_lightning_ckpt(tmp_path / "bad.ckpt", run_cfg(tiny["clip_path"], "prior",
                                                               stage_cfg("prior", wrong, {})), model)
    with pytest.raises(CheckpointError) as err:
        load_stage(path)
    msg = str(err.value)
    assert msg.startswith(f"{path} does not fit the model its config builds (DiffusionPrior)")
    assert re.search(r"\n  26 shape mismatch: net\.\w+: model \(48,?[\d ,]*\), checkpoint \(32,?[\d ,]*\); ", msg), msg
    assert "more)" in msg and len(msg.splitlines()) == 2  # at most 5 keys, one line per kind


def test_missing_and_unexpected_keys_listed(tiny, tmp_path):
    model = build(PRIOR_MODEL)
    path = write_lightning_ckpt(tmp_path / "k.ckpt", run_cfg(tiny["clip_path"], "prior",
                                                             stage_cfg("prior", PRIOR_MODEL, {})), model)
    ck = torch.load(path, weights_only=True)
    ck["state_dict"].pop("ema.module.net.query")
    ck["state_dict"]["ema.module.net.extra"] = torch.zeros(2)
    torch.save(ck, path)
    with pytest.raises(CheckpointError, match=r"\n  1 missing from checkpoint: net\.query\n  1 unexpected in "
                                              r"checkpoint: net\.extra$"):
        load_stage(path)


def test_export_roundtrip(tiny, tmp_path):
    out = export_weights(tiny["decoder"], tmp_path / "decoder.pt")
    small = torch.load(out, weights_only=True)
    assert set(small) == {"unclip_pl", "state_dict"} and small["unclip_pl"]["stage"] == "decoder"
    assert not any(k.startswith(("model.", "ema.")) for k in small["state_dict"])
    assert small["unclip_pl"]["format"] == FORMAT and small["unclip_pl"]["weights"] == "ema"
    a, b = load_stage(out), load_stage(tiny["decoder"])
    for k, v in a.model.state_dict().items():
        assert torch.equal(v, b.model.state_dict()[k]), k
    assert a.clip["embed_dim"] == 16 and a.sample == b.sample == tiny["decoder_cfg"]["sample"]


def test_not_a_stage_checkpoint(tmp_path):
    path = tmp_path / "x.ckpt"
    torch.save({"state_dict": {"model.w": torch.zeros(1)}}, path)
    with pytest.raises(CheckpointError, match="no 'cfg'"):
        load_stage(path)
    with pytest.raises(CheckpointError, match="not found"):
        load_stage(tmp_path / "nope.ckpt")


def test_real_lightning_checkpoint_loads_weights_only(tiny, tmp_path):
    """A checkpoint written by Trainer (loops, optimizer/scheduler and callback states) loads with weights_only."""
    import pytorch_lightning as pl
    from pytorch_lightning.callbacks import ModelCheckpoint

    from unclip_pl.lit.base import StageModule

    class Tiny(StageModule):
        def training_step(self, batch, batch_idx):
            return self.model.net.out(torch.randn(2, 32)).pow(2).mean()

    cfg = run_cfg(tiny["clip_path"], "prior", stage_cfg("prior", PRIOR_MODEL, {"steps": 3}))
    module = Tiny(build(PRIOR_MODEL), warmup_steps=2, run_config=cfg)
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.zeros(4, 1)), batch_size=2)
    trainer = pl.Trainer(max_steps=2, logger=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[ModelCheckpoint(dirpath=tmp_path, save_last=True)], default_root_dir=tmp_path)
    trainer.fit(module, data)
    ck = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert ck["cfg"] == cfg and "optimizer_states" in ck
    assert ck["unclip_pl"] == {"format": FORMAT, "stage": "prior", "cfg": cfg["prior"], "model": PRIOR_MODEL,
                               "sample": {"steps": 3}, "clip": cfg["clip"]}
    loaded = load_stage(tmp_path / "last.ckpt")
    assert torch.equal(loaded.model.net.out.weight, module.ema.module.net.out.weight)
    assert loaded.sample == {"steps": 3}

    # the entry, not the run config's nesting, is what the loader reads
    ck["cfg"] = {"unrelated": True}
    torch.save(ck, tmp_path / "entry.ckpt")
    assert load_stage(tmp_path / "entry.ckpt").cfg == cfg["prior"]
    # a newer (unknown) format version: one line naming the file and the version
    ck["unclip_pl"]["format"] = FORMAT + 1
    torch.save(ck, tmp_path / "newer.ckpt")
    with pytest.raises(CheckpointError) as err:
        load_stage(tmp_path / "newer.ckpt")
    assert str(err.value).startswith(f"{tmp_path / 'newer.ckpt'}: stage-checkpoint format {FORMAT + 1} is not one")
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("kind, message", [
    ("missing", "file not found"), ("directory", "a directory, not a checkpoint file"),
    ("empty", "empty file (0 bytes)"), ("text", "not a PyTorch checkpoint file"),
    ("truncated", "truncated or corrupt"), ("clip", "a CLIP weights file"),
])
def test_unreadable_checkpoint_names_the_file(tiny, tmp_path, kind, message):
    path = {"missing": tmp_path / "nope.ckpt", "directory": tmp_path, "clip": tiny["clip_path"]}.get(
        kind, tmp_path / f"{kind}.ckpt")
    if kind == "empty":
        path.touch()
    elif kind == "text":
        path.write_text("not a checkpoint\n")
    elif kind == "truncated":
        path.write_bytes(tiny["prior"].read_bytes()[:4000])
    with pytest.raises(CheckpointError) as err:
        load_stage(path)
    assert str(err.value).startswith(f"{path}: ") and message in str(err.value)
    assert "\n" not in str(err.value)
    with pytest.raises(CheckpointError, match=rf"^prior checkpoint {re.escape(str(path))}: "):
        load_stage(path, stage="prior")


def test_expected_stage_refuses_another_stage(tiny):
    with pytest.raises(CheckpointError, match="this is a checkpoint of the prior stage, not of the decoder$"):
        load_stage(tiny["prior"], stage="decoder")
    assert load_stage(tiny["prior"], stage="prior").stage == "prior"
    from unclip_pl.pipeline import UnCLIPPipeline

    with pytest.raises(CheckpointError, match=rf"^upsampler checkpoint {re.escape(str(tiny['decoder']))}: "):
        UnCLIPPipeline.from_checkpoints(clip=tiny["clip"], decoder=str(tiny["decoder"]),
                                        upsamplers=[str(tiny["decoder"])])


def test_legacy_export_file_still_loads(tiny, tmp_path):
    """An ``unclip_pl.stage/1`` export (written before the format entry) loads; re-exporting writes the entry."""
    ck = read_checkpoint(tiny["decoder"])
    weights = {k[len("ema.module."):]: v for k, v in ck["state_dict"].items() if k.startswith("ema.module.")}
    old = tmp_path / "old.pt"
    torch.save({"format": "unclip_pl.stage/1", "stage": "decoder", "cfg": ck["cfg"]["decoder"],
                "clip": ck["cfg"]["clip"], "which": "ema", "state_dict": weights}, old)
    loaded = load_stage(old, stage="decoder")
    # version 1 had the inversion steps as a pipeline default (50): the upgraded block carries it
    assert loaded.sample == {"invert_steps": 50, **tiny["decoder_cfg"]["sample"]} and loaded.clip == ck["cfg"]["clip"]
    assert all(torch.equal(v, weights[k]) for k, v in loaded.model.state_dict().items())
    new = torch.load(export_weights(old, tmp_path / "new.pt"), weights_only=True)
    assert new["unclip_pl"]["format"] == FORMAT and new["unclip_pl"]["stage"] == "decoder"


def test_version_1_configs_are_upgraded(tiny, tmp_path):
    """Version-1 run configs repeated the sampler settings in the model config (``sample_steps``, ``sampler``,
    ``guidance_scale``, ``eta``, which the models no longer take) and named the decoder's text option
    ``text_encoder``: such a checkpoint still builds, its ``sample:`` block unchanged but for the inversion
    defaults of that version."""
    ck = read_checkpoint(tiny["decoder"])
    cfg = copy.deepcopy(ck["cfg"])
    block = cfg["decoder"]
    block["module"]["model"].update(sample_steps=9, sampler="ddpm", guidance_scale=4.0, eta=0.3)
    block["text_encoder"] = "own"
    block["sample"].pop("variation_eta")
    old = write_lightning_ckpt(tmp_path / "v1.ckpt", cfg, build(tiny["decoder_cfg"]["module"]["model"]), entry=False)
    loaded = load_stage(old, stage="decoder")
    assert type(loaded.model).__name__ == "Decoder"
    assert loaded.sample == {**tiny["decoder_cfg"]["sample"], "invert_steps": 50, "variation_eta": 0.5}
    assert loaded.cfg["text_source"] == "own" and "text_encoder" not in loaded.cfg
    assert "sample_steps" not in loaded.cfg["module"]["model"]


class _Payload:
    ran = False

    def __reduce__(self):
        return (_mark_ran, ())


def _mark_ran():
    _Payload.ran = True
    return "ran"


def test_loading_is_weights_only(tiny, tmp_path):
    """A pickled object in a checkpoint is refused, never run: by load_stage, verify_checkpoint and Lightning's
    resume path (AtomicCheckpointIO.load_checkpoint asks for weights_only=True when Lightning leaves it None)."""
    from unclip_pl.checkpoint import AtomicCheckpointIO, verify_checkpoint

    ck = read_checkpoint(tiny["prior"])
    ck["evil"] = _Payload()
    path = tmp_path / "evil.ckpt"
    torch.save(ck, path)
    with pytest.raises(CheckpointError, match="refuses"):
        load_stage(path)
    with pytest.raises(CheckpointError, match="refuses"):
        verify_checkpoint(path)
    with pytest.raises(Exception, match="Weights only load failed"):
        AtomicCheckpointIO().load_checkpoint(path)  # what trainer.fit(ckpt_path=...) calls, weights_only=None
    assert not _Payload.ran
    assert AtomicCheckpointIO().load_checkpoint(tiny["prior"])["global_step"] == 7


def test_one_error_class_and_one_key_wording(tiny, tmp_path):
    """The stage loader, the resume fit-check and the CLIP loader word a key mismatch the same way."""
    from unclip_pl.checkpoint import check_fits, verify_checkpoint
    from unclip_pl.clip.frozen import CLIPLoadError, load_clip

    with pytest.raises(CheckpointError):
        verify_checkpoint(tmp_path / "nope.ckpt")
    ck = read_checkpoint(tiny["prior"])
    ck["state_dict"]["ema.module.net.extra"] = torch.zeros(2)
    torch.save(ck, tmp_path / "extra.ckpt")
    with pytest.raises(CheckpointError) as stage_err:
        load_stage(tmp_path / "extra.ckpt")
    module = torch.nn.Module()
    module.ema = torch.nn.Module()
    module.ema.module = build(PRIOR_MODEL)
    with pytest.raises(CheckpointError) as fit_err:
        check_fits(module, {"state_dict": {k: v for k, v in ck["state_dict"].items() if k.startswith("ema.module")}},
                   "x.ckpt", "prior.module")
    from unclip_pl.clip.small import build_small_clip

    clip_sd = build_small_clip().state_dict()
    clip_sd["extra.weight"] = torch.zeros(1)
    torch.save(clip_sd, tmp_path / "clip_sd.pt")
    with pytest.raises(CLIPLoadError) as clip_err:
        load_clip("unclip-tiny", checkpoint=tmp_path / "clip_sd.pt")
    for err, key in ((stage_err, "net.extra"), (fit_err, "ema.module.net.extra"), (clip_err, "extra.weight")):
        assert re.search(r" does not fit .* \(trained with another config\?\):\n  1 unexpected in checkpoint: "
                         + re.escape(key) + "$", str(err.value)), str(err.value)


def test_relative_clip_path_found_from_another_directory(tiny, tmp_path, monkeypatch):
    """A decoder trained with a relative ``clip.loader.checkpoint`` samples from any working directory: the CLIP is
    looked for under the folders above the checkpoint (the training directory); a file found nowhere still fails
    with the loader's one-line error naming it."""
    import shutil

    from unclip_pl.checkpoint import stage_entry
    from unclip_pl.pipeline import load_pipeline_clip

    project = tmp_path / "project"
    (project / "clips").mkdir(parents=True)
    shutil.copy(tiny["clip_path"], project / "clips" / "clip.pt")
    run = project / "logs" / "run" / "checkpoints"
    run.mkdir(parents=True)
    ckpt = torch.load(tiny["decoder"], weights_only=False)
    for name, clip_file in (("found", "clips/clip.pt"), ("missing", "clips/other.pt")):
        ckpt["cfg"]["clip"]["loader"]["checkpoint"] = clip_file
        ckpt["unclip_pl"] = stage_entry(ckpt["cfg"])
        torch.save(ckpt, run / f"{name}.ckpt")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)

    clip = load_pipeline_clip(None, load_stage(run / "found.ckpt", stage="decoder"))
    assert torch.equal(clip.encode_text(["a red heart"]).emb, tiny["clip"].encode_text(["a red heart"]).emb)
    with pytest.raises(CheckpointError, match=r"clips/other\.pt"):
        load_pipeline_clip(None, load_stage(run / "missing.ckpt", stage="decoder"))
