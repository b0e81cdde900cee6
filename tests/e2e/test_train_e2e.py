"""End to end through the real config: `train.py stage=clip`, then `train.py prior=diffusion`, `decoder=base`,
`upsampler=emoji` on a small emoji set with tiny widths, a checkpoint that reloads and samples."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.helpers import compose
from unclip_pl.train import run

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def data_overrides(emoji_root: Path) -> list[str]:
    return [f"data.root={emoji_root}", "data.limit=96", "data.val_fraction=0.25", "data.num_workers=0",
            "data.batch_size=16", "data.shuffle_buffer=32"]


def tiny_clip_overrides(ckpt: Path) -> list[str]:
    m = "clip.train.module.model_cfg"
    return [f"clip.loader.checkpoint={ckpt}", "clip.embed_dim=32", "clip.text_width=32",
            f"{m}.vision_cfg.width=32", f"{m}.vision_cfg.layers=1", f"{m}.vision_cfg.head_width=16",
            f"{m}.text_cfg.heads=2", f"{m}.text_cfg.layers=1", "clip.train.trainer.max_epochs=1",
            "clip.train.module.warmup_steps=1"]


FAST = ["trainer.log_every_n_steps=1", "trainer.check_val_every_n_epoch=1",
        "callbacks.checkpoint.every_n_train_steps=2", "logger=csv"]


@pytest.fixture(scope="module")
def tiny_clip(emoji_root, tmp_path_factory) -> Path:
    """`python train.py stage=clip` with a tiny CLIP; its exported weights serve the later stages."""
    out = tmp_path_factory.mktemp("clip_run")
    ckpt = out / "clip.pt"
    cfg = compose(["stage=clip", *data_overrides(emoji_root), *tiny_clip_overrides(ckpt), *FAST], out)
    metrics = run(cfg)
    assert ckpt.exists(), "the CLIP stage exports the frozen CLIP for later stages"
    for key in ("val/i2t_top1", "val/i2t_top5", "val/t2i_top1", "val/t2i_top5"):
        assert key in metrics and 0.0 <= metrics[key] <= 1.0
    assert (out / "csv" / "metrics.csv").read_text().count("val/i2t_top5") == 1, "retrieval logged to the CSV"
    return ckpt


def test_clip_stage_logs_retrieval_and_exports(tiny_clip):
    from unclip_pl.clip.frozen import load_clip

    clip = load_clip("unclip-tiny", checkpoint=str(tiny_clip))
    assert clip.embed_dim == 32 and not any(p.requires_grad for p in clip.parameters())


def test_prior_trains_checkpoints_reloads_and_samples(emoji_root, tiny_clip, tmp_path):
    net = "prior.module.model.net"
    cfg = compose(["prior=diffusion", *data_overrides(emoji_root), *tiny_clip_overrides(tiny_clip), *FAST,
                   f"{net}.dim=32", f"{net}.depth=1", f"{net}.heads=2", "trainer.max_epochs=1",
                   "trainer.limit_train_batches=4",
                   "prior.sample.steps=4", "prior.module.warmup_steps=1"], tmp_path)
    metrics = run(cfg)
    for key in ("val/cos_pred_true", "val/cos_text_true", "val/cos_pred_other", "val/retrieval_top5"):
        assert key in metrics, f"{key} not logged: {sorted(metrics)}"
    assert (tmp_path / "config_resolved.yaml").exists()
    last = tmp_path / "checkpoints" / "last.ckpt"
    assert last.exists()
    ckpt = torch.load(last, map_location="cpu", weights_only=True)
    assert ckpt["cfg"]["prior"]["module"]["model"]["net"]["dim"] == 32, "resolved config stored in the checkpoint"
    assert not any(k.startswith("clip.") for k in ckpt["state_dict"]), "frozen CLIP weights are not checkpointed"
    assert ckpt["global_step"] == 4

    from unclip_pl.checkpoint import load_stage
    from unclip_pl.clip.frozen import load_clip

    prior = load_stage(last).model
    clip = load_clip("unclip-tiny", checkpoint=str(tiny_clip))
    enc = clip.encode_text(clip.tokenize(["grinning face", "red heart"]))
    z = prior.sample(enc.emb, enc.tokens, enc.mask, steps=4, sampler="ddim", eta=0.0, guidance_scale=1.0, best_of=2,
                     generator=torch.Generator().manual_seed(0))
    assert z.shape == (2, 32)
    torch.testing.assert_close(z.norm(dim=-1), torch.ones(2))


def test_decoder_and_upsampler_train(emoji_root, tiny_clip, tmp_path):
    unet = "decoder.module.model.unet"
    cfg = compose(["decoder=base", *data_overrides(emoji_root), *tiny_clip_overrides(tiny_clip), *FAST,
                   "decoder.image_size=16", f"{unet}.model_channels=16", f"{unet}.channel_mult=[1,2]",
                   f"{unet}.num_res_blocks=1", f"{unet}.attention_resolutions=[8]", f"{unet}.num_head_channels=16",
                   "decoder.text_width=32", "decoder.module.model.text_encoder.layers=1",
                   "trainer.max_epochs=1", "trainer.limit_train_batches=3", "decoder.sample.steps=3",
                   "decoder.module.num_grid_items=2"],
                  tmp_path / "decoder")
    metrics = run(cfg)
    assert "val/loss" in metrics
    assert (tmp_path / "decoder" / "checkpoints" / "last.ckpt").exists()

    unet = "upsampler.module.model.unet"
    cfg = compose(["upsampler=emoji", *data_overrides(emoji_root), *FAST, "upsampler.image_size=32",
                   "upsampler.low_res_size=16", f"{unet}.model_channels=16", f"{unet}.channel_mult=[1,2]",
                   f"{unet}.num_res_blocks=1", "trainer.max_epochs=1", "trainer.limit_train_batches=3",
                   "upsampler.sample.steps=3",
                   "upsampler.module.num_grid_items=2",
                   "upsampler.module.degrade_in_loader=true"],  # low-res made by the loader (in-step: unit tests)
                  tmp_path / "upsampler")
    metrics = run(cfg)
    assert "val/loss" in metrics
    assert (tmp_path / "upsampler" / "checkpoints" / "last.ckpt").exists()


def test_clip_export_records_how_it_was_trained(tiny_clip, emoji_root, caplog):
    from unclip_pl.clip.frozen import load_clip
    from unclip_pl.clip.small import read_training_record

    record = read_training_record(tiny_clip)
    assert record["steps"] > 0 and record["epochs"] == record["recommended_epochs"] == 1
    assert not record["smoke_test"] and record["data"] == "emoji/format2/val0.25/limit96"
    assert {"i2t_top1", "i2t_top5", "t2i_top1", "t2i_top5"} <= set(record["val"])
    with caplog.at_level("INFO", logger="unclip_pl.clip.frozen"):
        load_clip("unclip-tiny", checkpoint=str(tiny_clip))
    line = [r.getMessage() for r in caplog.records if str(tiny_clip) in r.getMessage()]
    assert line and f"trained {record['steps']} steps" in line[0] and "i2t top-1" in line[0]
    assert "SMOKE" not in line[0]


def test_smoke_clip_run_leaves_the_shared_cache_alone(emoji_root, tmp_path, caplog):
    """`stage=clip trainer.max_steps=2` writes its CLIP into its run directory, marked as a smoke test; the shared
    cache file keeps its bytes; loading the smoke CLIP warns."""
    from unclip_pl.clip.frozen import load_clip
    from unclip_pl.clip.small import read_training_record

    cache = tmp_path / "cache" / "clip.pt"
    cache.parent.mkdir()
    cache.write_bytes(b"a CLIP a user trained")
    out = tmp_path / "run"
    cfg = compose(["stage=clip", *data_overrides(emoji_root), *tiny_clip_overrides(cache), *FAST,
                   "clip.train.trainer.max_epochs=3", "trainer.max_steps=2"], out)
    run(cfg)
    assert cache.read_bytes() == b"a CLIP a user trained"
    record = read_training_record(out / "clip.pt")
    assert record["smoke_test"] and record["steps"] == 2 and record["recommended_epochs"] == 3
    assert record["epochs"] == 0  # stopped inside its first epoch
    with caplog.at_level("WARNING", logger="unclip_pl.clip.frozen"):
        load_clip("unclip-tiny", checkpoint=str(out / "clip.pt"))
    assert any("smoke test" in r.getMessage() for r in caplog.records if r.levelname == "WARNING")

    # an explicit export_to fills the given file, with the same record
    cfg = compose(["stage=clip", *data_overrides(emoji_root), *tiny_clip_overrides(cache), *FAST,
                   "trainer.max_steps=1", f"clip.export_to={tmp_path / 'exported.pt'}"], tmp_path / "run2")
    run(cfg)
    assert read_training_record(tmp_path / "exported.pt")["steps"] == 1


def test_cached_clip_from_other_data_is_set_aside_and_retrained(emoji_root, tiny_clip, tmp_path):
    """A cached CLIP whose record names other data (e.g. the old emoji split) is renamed, not used, and the
    autotrained CLIP of this data takes its place."""
    from unclip_pl.clip.small import read_training_record

    cache = tmp_path / "cache" / "unclip-tiny.pt"
    cache.parent.mkdir()
    payload = torch.load(tiny_clip, map_location="cpu", weights_only=True)
    payload["training"]["data"] = "emoji/format1/val0.05/limitNone"
    torch.save(payload, cache)
    net = "prior.module.model.net"
    cfg = compose(["prior=diffusion", *data_overrides(emoji_root), *tiny_clip_overrides(cache), *FAST,
                   f"{net}.dim=32", f"{net}.depth=1", f"{net}.heads=2", "trainer.max_steps=1",
                   "prior.sample.steps=2", "prior.module.warmup_steps=1"], tmp_path / "prior")
    run(cfg)
    stale = list(cache.parent.glob("unclip-tiny.stale-*.pt"))
    assert len(stale) == 1 and read_training_record(stale[0])["data"] == "emoji/format1/val0.05/limitNone"
    assert read_training_record(cache)["data"] == "emoji/format2/val0.25/limit96"
    assert (tmp_path / "prior" / "clip_autotrain" / "clip.pt").exists()
