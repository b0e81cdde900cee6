"""Where the data package keeps its own stage instead of webdataset's, each test shows the difference; plus the
training-order options (:class:`TrainOrder`)."""
from __future__ import annotations

import itertools
import os
import random
from pathlib import Path

import pytest
import webdataset as wds
from data_testutils import make_samples

from unclip_pl.data.pipeline import EpochCap, MapBatches, RepeatedShardList, ShuffleBuffer, TrainOrder, build_pipeline
from unclip_pl.data.tar_reader import ShardError, iter_tar
from unclip_pl.data.writer import ShardWriter, write_shards


def _keys(pipeline) -> list[str]:
    return [k for b in pipeline for k in b["key"]]


def test_tar_cut_at_member_boundary_raises_where_webdataset_stops_silently(tmp_path):
    (url,) = write_shards(make_samples(5), tmp_path, maxcount=5)
    data = Path(url).read_bytes()
    member = 512 + -(-len(make_samples(1)[0]["png"]) // 512) * 512
    cut = tmp_path / "cut.tar"
    cut.write_bytes(data[: member + 1024])  # the first sample's png and txt members, then nothing
    assert [s["__key__"] for s in wds.tarfile_to_samples()([{"url": str(cut)}])] == ["s00000"]
    with pytest.raises(ShardError, match=r"truncated.*cut\.tar"):
        list(iter_tar(str(cut)))


def test_shuffle_buffer_never_mixes_passes_unlike_wds_shuffle():
    samples = [{"__key__": f"{p}-{i}", "__pass__": p} for p in range(3) for i in range(50)]
    out = list(ShuffleBuffer(20)(iter(samples)))
    passes = [s["__pass__"] for s in out]
    assert passes == sorted(passes) and sorted(s["__key__"] for s in out) == sorted(s["__key__"] for s in samples)
    assert [s["__key__"] for s in out] != [s["__key__"] for s in samples]  # shuffled within each pass
    mixed = [s["__pass__"] for s in wds.shuffle(20, initial=20, rng=random.Random(0))(iter(samples))]
    assert mixed != sorted(mixed)  # webdataset's buffer lets the next pass overtake the current one


def test_cycled_shard_order_is_the_same_on_every_rank_unlike_resampled(monkeypatch):
    urls = [f"s{i}.tar" for i in range(8)]
    orders = {}
    for rank in range(2):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        cycled = [d["url"] for d in itertools.islice(iter(RepeatedShardList(urls, seed=3)), 16)]
        resampled = [d["url"] for d in itertools.islice(iter(wds.ResampledShards(urls, seed=3)), 16)]
        orders[rank] = cycled, resampled
    assert orders[0][0] == orders[1][0]  # split_by_node then hands each rank disjoint shards of one pass
    assert sorted(orders[0][0][:8]) == urls and orders[0][0][:8] != orders[0][0][8:]  # a permutation per pass
    assert orders[0][1] != orders[1][1]  # resampling draws differently per rank


def test_epoch_cap_ends_with_a_short_pass_where_with_epoch_repeats(shard_dir):
    capped = build_pipeline(shard_dir, needs=("txt",), batch_size=4,
                            order=TrainOrder(shuffle_buffer=0, epoch_length=400))
    assert len(_keys(capped)) == 40  # one pass: the cap only shortens
    repeated = build_pipeline(shard_dir, needs=("txt",), batch_size=4).with_epoch(100)
    assert len(_keys(repeated)) == 400  # with_epoch restarts the pipeline to reach its count


def test_epoch_cap_reads_world_size_when_iterated(monkeypatch):
    cap = EpochCap(epoch_length=40, batch_size=4)
    assert len(list(cap(iter(range(100))))) == 10
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert len(list(cap(iter(range(100))))) == 5  # same object, now on one of two ranks


def test_map_batches_adds_no_key_unlike_wds_map():
    batch = {"key": ["a"], "txt": ["x"]}
    assert set(next(MapBatches(dict)(iter([dict(batch)])))) == {"key", "txt"}
    assert "__key__" in next(iter(wds.map(dict)(iter([dict(batch)]))))


def test_writer_leaves_no_partial_shard_unlike_wds_shard_writer(tmp_path):
    sample = make_samples(1)[0]
    with pytest.raises(RuntimeError):
        with wds.ShardWriter(str(tmp_path / "wds-%06d.tar"), maxcount=10, verbose=0) as w:
            w.write({"__key__": sample["__key__"], "png": sample["png"], "txt": sample["txt"]})
            raise RuntimeError("interrupted")
    assert os.listdir(tmp_path) == ["wds-000000.tar"]  # a partial shard under its final name
    with pytest.raises(RuntimeError):
        with ShardWriter(tmp_path / "own", maxcount=10) as w:
            w.write(sample)
            raise RuntimeError("interrupted")
    assert os.listdir(tmp_path / "own") == []


def test_train_order_checks_its_options():
    with pytest.raises(ValueError, match=r"'shuffled' is not one of \('pass', 'cycled', 'resampled'\)"):
        TrainOrder("shuffled")
    for shards in ("cycled", "resampled"):
        with pytest.raises(ValueError, match=rf"shards='{shards}' reads shards forever: set epoch_length"):
            TrainOrder(shards)
    assert TrainOrder().shards == "pass" and TrainOrder(epoch_length=8).epoch_length == 8


def test_order_must_be_a_train_order(shard_dir):
    with pytest.raises(TypeError, match="order must be a TrainOrder or None, got dict"):
        build_pipeline(shard_dir, order={"shards": "pass"})


def test_evaluation_reads_file_order_and_training_shuffles(shard_dir):
    assert _keys(build_pipeline(shard_dir, needs=("txt",), batch_size=7)) == [f"s{i:05d}" for i in range(40)]
    train = _keys(build_pipeline(shard_dir, needs=("txt",), batch_size=7, order=TrainOrder(shuffle_buffer=10)))
    assert sorted(train) == [f"s{i:05d}" for i in range(40)] and train != sorted(train)


def test_cycled_ranks_read_disjoint_shards_with_equal_steps(monkeypatch, shard_dir):
    monkeypatch.setenv("WORLD_SIZE", "2")
    per_rank = []
    for rank in range(2):
        monkeypatch.setenv("RANK", str(rank))
        p = build_pipeline(shard_dir, needs=("txt",), batch_size=4,
                           order=TrainOrder("cycled", shuffle_buffer=0, seed=1, epoch_length=40))
        per_rank.append(_keys(p))
    assert [len(k) for k in per_rank] == [20, 20]
    assert not set(per_rank[0]) & set(per_rank[1]) and len(set(per_rank[0]) | set(per_rank[1])) == 40
