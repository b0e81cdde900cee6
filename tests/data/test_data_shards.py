"""Shards: URL expansion, writer caps, round trip, node/worker splitting, pipeline options."""
from __future__ import annotations

import os
import tarfile

import numpy as np
import pytest
import torch
from data_testutils import make_samples, random_image

from unclip_pl.data.pipeline import TrainOrder, batches_per_worker, build_pipeline
from unclip_pl.data.tar_reader import count_samples, iter_tar
from unclip_pl.data.transforms import tensor_to_uint8
from unclip_pl.data.urls import expand_urls
from unclip_pl.data.writer import ShardWriter, write_shards


def _keys(pipeline) -> list[str]:
    return [k for b in pipeline for k in b["key"]]


def test_round_trip_values_equal(tmp_path):
    samples = make_samples(13, size=(40, 40), emb_dim=6)
    urls = write_shards(samples, tmp_path, maxcount=4)
    assert [os.path.basename(u) for u in urls] == [f"shard-00000{i}.tar" for i in range(4)]
    p = build_pipeline(urls, needs=("image", "txt", "img_emb", "txt_emb"), image_size=40, batch_size=5)
    batches = list(p)
    assert [len(b["key"]) for b in batches] == [5, 5, 3]
    b = batches[0]
    assert b["image"].dtype == torch.float32 and b["image"].shape == (5, 3, 40, 40)
    assert b["img_emb"].dtype == torch.float32 and b["img_emb"].shape == (5, 6)
    assert b["image"].min() >= -1 and b["image"].max() <= 1
    got = {k: (img, t, ie, te) for bb in batches for k, img, t, ie, te in
           zip(bb["key"], tensor_to_uint8(bb["image"]), bb["txt"], bb["img_emb"], bb["txt_emb"])}
    assert len(got) == 13
    for i in range(13):
        img, txt, ie, te = got[f"s{i:05d}"]
        np.testing.assert_array_equal(img, random_image(i, 40, 40))
        assert txt == f"caption number {i}"
        assert torch.equal(ie, torch.full((6,), float(i))) and torch.equal(te, torch.full((6,), float(-i)))
    assert p.stats.samples == 13 and p.stats.skipped_corrupt == 0


def test_resize_crop_and_only_decode_when_needed(shard_dir):
    p = build_pipeline(shard_dir, needs=("image", "txt"), image_size=16, batch_size=40)
    (b,) = list(p)
    assert b["image"].shape == (40, 3, 16, 16)
    p = build_pipeline(shard_dir, needs=("txt",), image_size=16, batch_size=40)
    (b,) = list(p)
    assert set(b) == {"key", "txt"}


def test_tokens_per_batch(shard_dir):
    calls = []

    def tok(texts):
        calls.append(len(texts))
        return torch.ones(len(texts), 7, dtype=torch.int32)

    p = build_pipeline(shard_dir, needs=("txt", "tokens"), batch_size=16, tokenizer=tok)
    bs = list(p)
    assert calls == [16, 16, 8]
    assert bs[0]["tokens"].dtype == torch.int64 and bs[0]["tokens"].shape == (16, 7)
    with pytest.raises(ValueError, match="tokenizer"):
        build_pipeline(shard_dir, needs=("tokens",))
    with pytest.raises(ValueError, match="unknown needs"):
        build_pipeline(shard_dir, needs=("pixels",))


def test_expand_urls_forms(shard_dir):
    d = str(shard_dir)
    all8 = [os.path.join(d, f"part-{i:06d}.tar") for i in range(8)]
    assert expand_urls(d) == all8
    assert expand_urls(d + "/part-{000000..000002}.tar") == all8[:3]
    assert expand_urls(d + "/part-00000[4-7].tar") == all8[4:]
    assert expand_urls([all8[0], d + "/part-000001.tar::" + all8[2]]) == all8[:3]
    assert expand_urls("pipe:cat " + d + "/part-{000000..000001}.tar") == ["pipe:cat " + u for u in all8[:2]]
    assert expand_urls("s3://bucket/x-{0..2}.tar") == [f"s3://bucket/x-{i}.tar" for i in range(3)]


@pytest.mark.parametrize("pattern", ["nope/x-{000..003}.tar", "nope/*.tar", "nope_dir_missing"])
def test_expand_urls_nothing_matches(tmp_path, pattern):
    spec = str(tmp_path / pattern)
    with pytest.raises(FileNotFoundError, match="matches no files") as e:
        expand_urls(spec)
    assert spec in str(e.value)


def test_expand_urls_missing_member_and_empty_dir(shard_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="part-000009.tar"):
        expand_urls(str(shard_dir) + "/part-{000006..000009}.tar")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty"):
        expand_urls(str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match="matches no files"):
        build_pipeline(str(tmp_path / "missing-{0..3}.tar"))


def test_writer_caps_count_and_size(tmp_path):
    samples = make_samples(10)  # ~5.8 KB each
    with ShardWriter(tmp_path / "a", maxcount=3) as w:
        for s in samples:
            w.write(s)
    assert [count_samples([u]) for u in w.urls] == [3, 3, 3, 1]
    with ShardWriter(tmp_path / "b", maxsize=17_000) as w:  # 2 samples (2 x 7,680 bytes + 1,024) per shard
        for s in samples:
            w.write(s)
    assert len(w.urls) == 5 and all(os.path.getsize(u) <= 20_480 for u in w.urls)  # tar pads to 10 KiB records
    assert count_samples(w.urls) == 10
    assert not [f for f in os.listdir(tmp_path / "b") if ".tmp" in f]
    names = tarfile.open(w.urls[0]).getnames()
    assert names == ["s00000.png", "s00000.txt", "s00001.png", "s00001.txt"]


def test_writer_abort_leaves_no_partial_shard(tmp_path):
    with pytest.raises(RuntimeError):
        with ShardWriter(tmp_path, maxcount=100) as w:
            w.write(make_samples(1)[0])
            raise RuntimeError("boom")
    assert os.listdir(tmp_path) == []


def _simulated_keys(monkeypatch, shard_dir, rank, world, worker, workers, train):
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("WORLD_SIZE", str(world))
    monkeypatch.setenv("WORKER", str(worker))
    monkeypatch.setenv("NUM_WORKERS", str(workers))
    order = TrainOrder(shuffle_buffer=10, seed=7) if train else None
    p = build_pipeline(shard_dir, needs=("txt",), batch_size=3, order=order)
    return _keys(p)


@pytest.mark.parametrize("train", [False, True])
def test_node_and_worker_split_disjoint_and_complete(monkeypatch, shard_dir, train):
    parts = {}
    for rank in range(2):
        for worker in range(2):
            parts[rank, worker] = _simulated_keys(monkeypatch, shard_dir, rank, 2, worker, 2, train)
    allkeys = [k for ks in parts.values() for k in ks]
    assert len(allkeys) == len(set(allkeys)) == 40  # disjoint, complete
    assert all(len(ks) == 10 for ks in parts.values())  # 2 shards of 5 each
    # ranks see different shards: no shard is read by two ranks
    shard_of = lambda k: int(k[1:]) // 5  # noqa: E731
    rank_shards = [{shard_of(k) for w in range(2) for k in parts[r, w]} for r in range(2)]
    assert not rank_shards[0] & rank_shards[1]


def test_single_rank_real_dataloader_workers(shard_dir):
    from unclip_pl.data.datamodule import ShardDataModule

    dm = ShardDataModule(shard_dir, shard_dir, batch_size=4, num_workers=2, needs=("image", "txt"), image_size=8,
                         shuffle_buffer=20)
    dm.setup("fit")
    keys = [k for b in dm.train_dataloader() for k in b["key"]]
    assert sorted(keys) == [f"s{i:05d}" for i in range(40)]
    assert keys != sorted(keys)  # shuffled
    vkeys = [k for b in dm.val_dataloader() for k in b["key"]]
    assert sorted(vkeys) == sorted(keys)
    assert dm.stats["train"].samples == 40  # counted inside the workers, read here


def test_train_shard_order_same_on_all_ranks_and_changes_per_pass(shard_dir):
    p = build_pipeline(shard_dir, needs=("txt",), batch_size=40, order=TrainOrder(shuffle_buffer=0, seed=3))
    first, second = _keys(p), _keys(p)
    assert sorted(first) == sorted(second) and first != second
    q = build_pipeline(shard_dir, needs=("txt",), batch_size=40, order=TrainOrder(shuffle_buffer=0, seed=3))
    assert _keys(q) == first


def test_resampled_epoch_length(monkeypatch, shard_dir):
    p = build_pipeline(shard_dir, needs=("txt",), batch_size=4, order=TrainOrder("resampled", epoch_length=30))
    bs = list(p)
    assert len(bs) == 8 and all(len(b["key"]) == 4 for b in bs)  # ceil(30 / 4) batches, drawn with replacement
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert len(list(p)) == batches_per_worker(30, 4, 2, 1) == 4
    with pytest.raises(ValueError, match="epoch_length"):
        build_pipeline(shard_dir, order=TrainOrder("resampled"))


@pytest.mark.parametrize("n_shards", [8, 5])
def test_multi_rank_training_disjoint_and_equal_steps(monkeypatch, tmp_path, n_shards):
    """resampled=False on 2 ranks: shards cycled and split by node; equal step counts, disjoint in a pass."""
    from unclip_pl.data.datamodule import ShardDataModule

    urls = write_shards(make_samples(40), tmp_path / "s", maxcount=40 // n_shards)
    monkeypatch.setenv("WORLD_SIZE", "2")
    per_rank = []
    for rank in range(2):
        monkeypatch.setenv("RANK", str(rank))
        dm = ShardDataModule(urls, None, batch_size=4, num_workers=0, needs=("txt",), shuffle_buffer=8)
        dm.setup("fit")
        loader = dm.train_dataloader()
        epochs = [[k for b in loader for k in b["key"]] for _ in range(2)]
        assert len(loader) == 5 and all(len(e) == 20 for e in epochs)  # 40 samples / (2 ranks x batch 4)
        assert epochs[0] != epochs[1]  # a new shard order each epoch
        per_rank.append(epochs)
    for e in range(2):
        a, b = set(per_rank[0][e]), set(per_rank[1][e])
        if n_shards == 8:  # shards divide evenly: a partition of the data
            assert not a & b and len(a | b) == 40
        else:  # 5 shards: one rank wraps into the next pass for its last shard
            assert len(a & b) <= 40 // n_shards


def test_iter_tar_groups_members(shard_dir):
    samples = list(iter_tar(str(shard_dir / "part-000001.tar")))
    assert [s["__key__"] for s in samples] == [f"s{i:05d}" for i in range(5, 10)]
    assert set(samples[0]) == {"__key__", "__url__", "png", "txt"}


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT])
@pytest.mark.parametrize("mode", ["w", "w:gz", "w:bz2"])
def test_tar_formats_long_names_and_compression(tmp_path, fmt, mode):
    """Shards written by other tools: long (pax/GNU) names, sub-folders, gzip and bzip2 compression."""
    import io

    src = make_samples(3)
    path = tmp_path / ("x.tar" + {"w": "", "w:gz": ".gz", "w:bz2": ".bz2"}[mode])
    long_dir = "d" * 120
    with tarfile.open(path, mode, format=fmt) as tar:
        for s in src:
            for ext in ("png", "txt"):
                data = s[ext] if isinstance(s[ext], bytes) else s[ext].encode()
                ti = tarfile.TarInfo(f"{long_dir}/{s['__key__']}.{ext}")
                ti.size = len(data)
                tar.addfile(ti, io.BytesIO(data))
    got = list(iter_tar(str(path)))
    assert [g["__key__"] for g in got] == [f"{long_dir}/{s['__key__']}" for s in src]
    assert [g["png"] for g in got] == [s["png"] for s in src]
