"""README "Train the decoder on img2dataset shards", through the real entry points in subprocesses: embed the
img2dataset output into sidecar shards (`python -m unclip_pl.data.embed data/i2d data/i2d_emb --clip small`), then
`python train.py decoder=base data=shards ... data.embeddings=sidecar data.sidecar_urls=data/i2d_emb`, and
`python train.py upsampler=emoji data=shards ...` on shards whose samples have no caption.

Its own PROJECT_ROOT, with a tiny CLIP written straight into the cache (random weights: the embeddings only have to
be the CLIP's, not good), so this test needs none of the session's trained stages."""

from __future__ import annotations

import tarfile

import pytest
import torch

from tests.cli.conftest import Command, script
from tests.cli.test_train_cli import assert_run_dir
from tests.data.i2d_fixtures import write_img2dataset
from tests.helpers import tiny_clip_overrides, tiny_stage_overrides


def write_tiny_clip(path) -> None:
    """The tiny CLIP of ``tiny_clip_overrides`` (embed_dim 32, 32 px), random weights, exported as training does."""
    from unclip_pl.clip import build_small_clip, export_clip
    from unclip_pl.clip.small import small_clip_config

    torch.manual_seed(0)
    cfg = dict(embed_dim=32, vision_cfg={"image_size": 32, "width": 32, "layers": 1, "head_width": 16,
                                         "patch_size": 8},
               text_cfg={"width": 32, "heads": 2, "layers": 1, "context_length": 77})
    export_clip(build_small_clip("unclip-tiny", **cfg), "unclip-tiny", small_clip_config("unclip-tiny", **cfg), path)


@pytest.fixture(scope="module")
def i2d_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("i2d_root")
    write_img2dataset(root / "data" / "i2d", n_shards=3, per_shard=10)
    write_img2dataset(root / "data" / "i2d_uncaptioned", n_shards=2, per_shard=10, no_caption=frozenset(range(10)),
                      size=64)
    write_tiny_clip(root / "data" / "cache" / "clip" / "unclip-tiny.pt")
    return root


def test_embed_then_train_decoder_on_img2dataset_shards(i2d_root):
    """python -m unclip_pl.data.embed data/i2d data/i2d_emb --clip small
    python train.py decoder=base data=shards "data.train_urls='data/i2d/{00000..00001}.tar'"
        data.val_urls=data/i2d/00002.tar data.embeddings=sidecar data.sidecar_urls=data/i2d_emb"""
    images = sorted((i2d_root / "data" / "i2d").glob("*.tar"))
    before = {p: p.read_bytes() for p in images}
    embed = Command(["-m", "unclip_pl.data.embed", "data/i2d", "data/i2d_emb", "--clip", "small"],
                    i2d_root).wait().check()
    assert "3 of 3 sidecar shard(s) in data/i2d_emb" in embed.stdout
    side = sorted((i2d_root / "data" / "i2d_emb").glob("*"))
    assert [p.name for p in side] == ["00000.tar", "00001.tar", "00002.tar"]  # no parquet, stats or temp files
    with tarfile.open(side[0]) as tf:
        exts = {n.split(".", 1)[1] for n in tf.getnames()}
        assert exts == {"img_emb.npy", "txt_emb.npy"} and len(tf.getnames()) == 2 * 8
    assert {p: p.read_bytes() for p in images} == before  # the image shards are never rewritten

    run_dir = i2d_root / "logs" / "train" / "runs" / "i2d"
    upsampler = Command([script("train.py"), "upsampler=emoji", "data=shards", "data.train_urls=data/i2d_uncaptioned",
                         "data.val_urls=data/i2d_uncaptioned", "data.num_workers=0", "data.batch_size=4",
                         *tiny_stage_overrides("upsampler"), "trainer.max_steps=2", "run_name=i2d_upsampler"],
                        i2d_root)
    Command([script("train.py"), "decoder=base", "data=shards", "data.train_urls='data/i2d/{00000..00001}.tar'",
             "data.val_urls=data/i2d/00002.tar", "data.embeddings=sidecar", "data.sidecar_urls=data/i2d_emb",
             "data.num_workers=0", "data.batch_size=4", "clip.autotrain=false", *tiny_clip_overrides(),
             *tiny_stage_overrides("decoder"), "trainer.max_steps=2", "trainer.log_every_n_steps=1",
             "run_name=i2d"], i2d_root).wait().check()
    ckpt = assert_run_dir(run_dir, "decoder")
    assert ckpt["cfg"]["data"]["embeddings"] == "sidecar" and ckpt["cfg"]["data"]["on_error"] == "skip"
    header, *rows = (run_dir / "csv" / "metrics.csv").read_text().splitlines()
    cols = header.split(",")
    assert {"data/train/samples_read", "data/train/skipped_no_img_emb", "data/train/bad_shards"} <= set(cols)
    last = [r.split(",") for r in rows if r.split(",")[cols.index("data/train/samples_read")]][-1]
    assert float(last[cols.index("data/train/samples_read")]) >= 8  # the loader read ahead of the 2 x 4 samples
    assert float(last[cols.index("data/train/skipped_no_img_emb")]) == 0

    # README: the upsamplers read images only, so img2dataset samples without a caption train them
    upsampler.wait().check()
    assert_run_dir(i2d_root / "logs" / "train" / "runs" / "i2d_upsampler", "upsampler")
