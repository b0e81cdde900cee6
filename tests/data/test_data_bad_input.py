"""Bad input: corrupt images are skipped and counted, missing members and truncated tars fail at once."""
from __future__ import annotations

import gc
import logging
import shutil

import pytest
from data_testutils import make_samples

from unclip_pl.data.datamodule import ShardDataModule
from unclip_pl.data.decode import MissingKeyError
from unclip_pl.data.pipeline import build_pipeline
from unclip_pl.data.tar_reader import ShardError
from unclip_pl.data.writer import write_shards


def _with_corrupt(tmp_path, bad: dict[int, bytes]):
    samples = make_samples(12)
    for i, data in bad.items():
        samples[i]["png"] = data
    return write_shards(samples, tmp_path / "c", maxcount=6)


def test_corrupt_image_skipped_counted_and_logged(tmp_path, caplog):
    good = make_samples(1)[0]["png"]
    urls = _with_corrupt(tmp_path, {2: b"not an image at all", 7: good[: len(good) // 2]})
    p = build_pipeline(urls, needs=("image", "txt"), image_size=16, batch_size=4)
    with caplog.at_level(logging.WARNING, logger="unclip_pl.data.decode"):
        keys = [k for b in p for k in b["key"]]
    assert len(keys) == 10 and "s00002" not in keys and "s00007" not in keys
    assert p.stats.skipped_corrupt == 2 and p.stats.samples == 10
    lines = [r.getMessage() for r in caplog.records if "corrupt image" in r.getMessage()]
    assert any("shard-000000.tar" in m and "key=s00002" in m for m in lines)
    assert any("shard-000001.tar" in m and "key=s00007" in m for m in lines)


def test_corrupt_image_not_decoded_when_images_not_needed(tmp_path):
    urls = _with_corrupt(tmp_path, {0: b"garbage"})
    p = build_pipeline(urls, needs=("txt",), batch_size=12)
    assert len(next(iter(p))["key"]) == 12 and p.stats.skipped_corrupt == 0


def test_corrupt_counted_across_dataloader_workers(tmp_path):
    urls = _with_corrupt(tmp_path, {1: b"x", 8: b"y", 9: b"z"})
    dm = ShardDataModule(urls, urls, batch_size=4, num_workers=2, image_size=16, persistent_workers=False)
    dm.setup("fit")
    n = sum(len(b["key"]) for b in dm.val_dataloader())
    assert n == 9 and dm.stats["val"].skipped_corrupt == 3


@pytest.mark.parametrize("need,member,hint", [
    ("img_emb", "img_emb.npy", "python -m unclip_pl.data.embed"),
    ("txt_emb", "txt_emb.npy", "python -m unclip_pl.data.embed"),
])
def test_missing_embedding_names_key_shard_and_command(shard_dir, need, member, hint):
    p = build_pipeline(shard_dir, needs=("txt", need), batch_size=4)
    with pytest.raises(MissingKeyError) as e:
        next(iter(p))
    msg = str(e.value)
    assert member in msg and "s00000" in msg and "part-000000.tar" in msg and hint in msg


def test_missing_caption_and_image(tmp_path):
    s = make_samples(2)
    del s[1]["txt"]
    urls = write_shards(s, tmp_path / "t")
    with pytest.raises(MissingKeyError, match=r"'s00001'.*shard-000000\.tar.*'txt'.*make_shards"):
        list(build_pipeline(urls, needs=("txt",)))
    s = make_samples(2)
    del s[0]["png"]
    urls = write_shards(s, tmp_path / "i")
    with pytest.raises(MissingKeyError, match=r"'s00000'.*png\|jpg\|webp.*make_shards"):
        list(build_pipeline(urls, needs=("image", "txt")))


def test_missing_key_in_worker_raises_not_hangs(shard_dir):
    dm = ShardDataModule(shard_dir, shard_dir, batch_size=4, num_workers=1, needs=("txt", "img_emb"),
                         persistent_workers=False)
    dm.setup("fit")
    with pytest.raises(Exception, match=r"img_emb\.npy.*unclip_pl\.data\.embed"):
        list(dm.train_dataloader())
    gc.collect()  # torch joins the failed worker with a 5 s timeout: pay it here, not in a later test


@pytest.mark.parametrize("where", ["middle", "boundary", "header"])
def test_truncated_tar_fails_with_its_name(shard_dir, tmp_path, where):
    src = shard_dir / "part-000003.tar"
    data = src.read_bytes()
    if where == "middle":
        cut = len(data) // 2
    elif where == "boundary":  # right after a complete member: tarfile alone would stop silently here
        cut = 512 + -(-len(make_samples(1, start=15)[0]["png"]) // 512) * 512
    else:
        cut = 700
    bad = tmp_path / "bad"
    shutil.copytree(shard_dir, bad)
    (bad / "part-000003.tar").write_bytes(data[:cut])
    p = build_pipeline(bad, needs=("image", "txt"), batch_size=4)
    with pytest.raises(ShardError) as e:
        list(p)
    assert str(bad / "part-000003.tar") in str(e.value) and "truncated" in str(e.value)


def test_empty_file_is_an_error(tmp_path):
    (tmp_path / "e.tar").write_bytes(b"")
    with pytest.raises(ShardError, match="e.tar"):
        list(build_pipeline(str(tmp_path / "e.tar"), needs=("txt",)))


def test_truncated_tar_in_worker_raises(shard_dir, tmp_path):
    p = shard_dir / "part-000005.tar"
    p.write_bytes(p.read_bytes()[:3000])
    dm = ShardDataModule(shard_dir, None, batch_size=4, num_workers=1, persistent_workers=False)
    dm.setup("fit")
    with pytest.raises(Exception, match="part-000005.tar"):
        list(dm.train_dataloader())
    gc.collect()
