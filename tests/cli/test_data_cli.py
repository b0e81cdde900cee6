"""data/README.md "Your own data" (pointed to by the README's Data section), through the real module entry points
in subprocesses: make_shards from a folder of captioned images, embed them with `--clip small` (the CLIP the quick
start cached) into sidecar shards, train the prior on the shards and their sidecars with `data=shards`."""

from __future__ import annotations

import tarfile

import numpy as np

from tests.cli.test_train_cli import assert_run_dir


def members(tar_path) -> dict[str, list[str]]:
    """{sample key: [its member extensions]} of one shard."""
    out: dict[str, list[str]] = {}
    with tarfile.open(tar_path) as tf:
        for name in tf.getnames():
            key, ext = name.split(".", 1)
            out.setdefault(key, []).append(ext)
    return out


def test_make_shards(stages):
    """python -m unclip_pl.data.make_shards photos/ data/photos --maxcount 4 --maxsize 1e9 --prefix photos"""
    done = stages["side"]["make_shards"].wait().check()
    shards = sorted((stages["root"] / "data" / "photos").glob("*.tar"))
    assert [p.name for p in shards] == ["photos-000000.tar", "photos-000001.tar"]  # 7 images, at most 4 per shard
    counts = [members(p) for p in shards]
    assert [len(c) for c in counts] == [4, 3]
    assert all(sorted(exts) == ["png", "txt"] for c in counts for exts in c.values())
    assert done.stdout.strip().splitlines()[-1].startswith("wrote 7 samples in 2 shard(s)")


def test_embed(stages):
    """python -m unclip_pl.data.embed 'data/photos/photos-{000000..000001}.tar' data/photos_emb --clip small"""
    stages["side"]["embed"].wait().check()
    out = sorted((stages["root"] / "data" / "photos_emb").glob("*.tar"))
    assert [p.name for p in out] == ["photos-000000.tar", "photos-000001.tar"]
    with tarfile.open(out[0]) as tf:
        names = tf.getnames()
        key = names[0].split(".", 1)[0]
        assert {f"{key}.{ext}" for ext in ("img_emb.npy", "txt_emb.npy")} == {n for n in names if n.startswith(key)}
        assert len(names) == 2 * 4  # sidecar shards: the embeddings of each sample, no copy of its image
        import io

        emb = np.load(io.BytesIO(tf.extractfile(f"{key}.img_emb.npy").read()))
    assert emb.shape == (32,) and abs(float(np.linalg.norm(emb.astype(np.float32))) - 1.0) < 1e-2


def test_train_on_shards(stages, launched):
    """python train.py prior=diffusion data=shards data.train_urls='data/photos/*.tar' data.val_urls=data/photos
    data.embeddings=sidecar data.sidecar_urls=data/photos_emb"""
    launched["train_shards"].wait().check()
    run_dir = stages["root"] / "logs" / "train" / "runs" / "shards"
    ckpt = assert_run_dir(run_dir, "prior")
    assert ckpt["cfg"]["data"]["train_urls"] == "data/photos/*.tar"
    assert ckpt["cfg"]["data"]["sidecar_urls"] == "data/photos_emb"
    # the shards were embedded with the cached (emoji) CLIP: it is used as it is, not set aside and retrained
    assert not (run_dir / "clip_autotrain").exists()
    assert not list((stages["root"] / "data" / "cache" / "clip").glob("*.stale-*"))
