"""load_stage / export_weights: EMA vs trained weights, strict shape checks listing keys, weights_only loading."""

import copy
import re

import pytest
import torch

from unclip_pl.checkpoint_io import CheckpointError, export_weights, load_stage, read_checkpoint

from .conftest import PRIOR_MODEL, build, run_cfg, stage_cfg, write_lightning_ckpt


def test_load_stage_ema_and_model(tiny):
    ck = read_checkpoint(tiny["prior"])
    ema = load_stage(tiny["prior"], which="ema")
    trained = load_stage(tiny["prior"], which="model")
    assert type(ema).__name__ == "DiffusionPrior" and ema.stage_name == "prior"
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
    assert "shape mismatch net.x_proj.weight: model expects (48, 16), checkpoint has (32, 16)" in msg
    assert msg.count("shape mismatch") > 3


def test_missing_and_unexpected_keys_listed(tiny, tmp_path):
    model = build(PRIOR_MODEL)
    path = write_lightning_ckpt(tmp_path / "k.ckpt", run_cfg(tiny["clip_path"], "prior",
                                                             stage_cfg("prior", PRIOR_MODEL, {})), model)
    ck = torch.load(path, weights_only=True)
    ck["state_dict"].pop("ema.module.net.query")
    ck["state_dict"]["ema.module.net.extra"] = torch.zeros(2)
    torch.save(ck, path)
    with pytest.raises(CheckpointError, match=r"missing from checkpoint: net\.query[\s\S]*unexpected in "
                                              r"checkpoint: net\.extra"):
        load_stage(path)


def test_export_roundtrip(tiny, tmp_path):
    out = export_weights(tiny["decoder"], tmp_path / "decoder.pt")
    small = torch.load(out, weights_only=True)
    assert set(small) >= {"cfg", "state_dict", "stage"} and small["stage"] == "decoder"
    assert not any(k.startswith(("model.", "ema.")) for k in small["state_dict"])
    a, b = load_stage(out), load_stage(tiny["decoder"])
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k
    assert a.clip_cfg["embed_dim"] == 16


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

    module = Tiny(build(PRIOR_MODEL), warmup_steps=2)
    module.run_config = run_cfg(tiny["clip_path"], "prior", stage_cfg("prior", PRIOR_MODEL, {}))
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.zeros(4, 1)), batch_size=2)
    trainer = pl.Trainer(max_steps=2, logger=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[ModelCheckpoint(dirpath=tmp_path, save_last=True)], default_root_dir=tmp_path)
    trainer.fit(module, data)
    ck = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert "cfg" in ck and "optimizer_states" in ck
    model = load_stage(tmp_path / "last.ckpt")
    assert torch.equal(model.net.out.weight, module.ema.module.net.out.weight)


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
    assert load_stage(tiny["prior"], stage="prior").stage_name == "prior"
    from unclip_pl.pipeline import UnCLIPPipeline

    with pytest.raises(CheckpointError, match=rf"^upsampler checkpoint {re.escape(str(tiny['decoder']))}: "):
        UnCLIPPipeline.from_checkpoints(clip=tiny["clip"], decoder=str(tiny["decoder"]),
                                        upsamplers=[str(tiny["decoder"])])
