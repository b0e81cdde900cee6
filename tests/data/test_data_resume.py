"""The data position (unclip_pl.data.position) on the pipeline alone: a stream restarted from the tag of any batch
continues with exactly the batches an uninterrupted stream yields after it, for every training order, with and
without a shuffle buffer, on simulated ranks and on real DataLoader workers (round-robin rotation); shards read
before the stop are not opened again without a shuffle buffer; the order is a function of (seed, epoch, rank,
worker); a position saved under other settings is refused with one line."""
from __future__ import annotations

import itertools
import logging
import random

import pytest

import unclip_pl.data.tar_reader as tar_reader
from unclip_pl.data.pipeline import ShuffleBuffer, TrainOrder, build_pipeline
from unclip_pl.data.position import (
    POSITION_KEY,
    DataPosition,
    PositionedLoader,
    PositionTracker,
    restore_from_checkpoint,
    state_for_checkpoint,
    stream_seed,
)

ORDERS = [TrainOrder("pass", shuffle_buffer=0, seed=3), TrainOrder("pass", shuffle_buffer=7, seed=3),
          TrainOrder("cycled", shuffle_buffer=0, seed=3, epoch_length=60),
          TrainOrder("cycled", shuffle_buffer=7, seed=3, epoch_length=60),
          TrainOrder("resampled", shuffle_buffer=7, seed=3, epoch_length=36)]


def _pipeline(shard_dir, order, position=None, batch_size=3):
    return build_pipeline(shard_dir, needs=("txt",), batch_size=batch_size, order=order, position=position)


def _tracked(pipeline_batches, tracker: PositionTracker, n: int):
    """Consume ``n`` batches into ``tracker`` (as the datamodule does); returns their keys."""
    keys = []
    for batch in itertools.islice(pipeline_batches, n):
        tracker.observe(batch.pop(POSITION_KEY))
        keys.append(batch["key"])
    return keys


@pytest.mark.parametrize("order", ORDERS, ids=lambda o: f"{o.shards}-buf{o.shuffle_buffer}")
@pytest.mark.parametrize("rank", [0, 1])
def test_stream_restarted_from_any_batch_continues_exactly(monkeypatch, shard_dir, order, rank):
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("WORLD_SIZE", "2")
    position = DataPosition(0, shard_skip=order.shuffle_buffer <= 1)
    tracker = PositionTracker(position, {})
    tracker.begin()
    full = [b["key"] for b in _pipeline(shard_dir, order, position)]
    assert len(full) >= 6
    for cut in (1, 2, len(full) // 2, len(full) - 1):
        fresh = DataPosition(0, shard_skip=order.shuffle_buffer <= 1)
        t = PositionTracker(fresh, {})
        t.begin()
        head = _tracked(iter(_pipeline(shard_dir, order, fresh)), t, cut)
        saved = t.state_dict()  # what a checkpoint holds for this rank
        resumed = PositionTracker(DataPosition(0, shard_skip=order.shuffle_buffer <= 1), {})
        resumed.load_state_dict(saved, {})
        resumed.begin()
        tail = [b["key"] for b in _pipeline(shard_dir, order, resumed.position)]
        assert head + tail == full, f"cut at batch {cut}"


def _consuming_loader(shard_dir, order, tracker, workers=0):
    return PositionedLoader(_pipeline(shard_dir, order, tracker.position), batch_size=None, num_workers=workers,
                            tracker=tracker, consumes=lambda: True)


def test_an_epoch_ends_when_its_stream_is_used_up(shard_dir):
    order = ORDERS[1]
    tracker = PositionTracker(DataPosition(0), {})
    loader = _consuming_loader(shard_dir, order, tracker)
    epoch0 = []
    for batch in itertools.islice(loader, 4):  # the loop stops early (an epoch cut short)
        tracker.observe(batch.pop(POSITION_KEY))
        epoch0.append(batch["key"])
    assert tracker.epoch == 0 and not tracker.epoch_done
    for batch in loader:  # the next iteration continues epoch 0: a stream ends only when it is used up
        tracker.observe(batch.pop(POSITION_KEY))
        epoch0.append(batch["key"])
    assert tracker.epoch == 0 and tracker.epoch_done
    epoch1 = []
    for batch in loader:
        tracker.observe(batch.pop(POSITION_KEY))
        epoch1.append(batch["key"])
    assert tracker.epoch == 1
    flat0, flat1 = sum(epoch0, []), sum(epoch1, [])
    assert sorted(flat0) == sorted(flat1) == [f"s{i:05d}" for i in range(40)] and flat0 != flat1
    # saved after the last batch of epoch 0: the resumed stream is epoch 1
    t = PositionTracker(DataPosition(0), {})
    for batch in _consuming_loader(shard_dir, order, t):
        t.observe(batch.pop(POSITION_KEY))
    resumed = PositionTracker(DataPosition(0), {})
    resumed.load_state_dict(t.state_dict(), {})
    assert [b["key"] for b in _consuming_loader(shard_dir, order, resumed)] == epoch1 and resumed.epoch == 1


def test_a_sized_epoch_ends_after_its_batch_count(shard_dir):
    order = TrainOrder("cycled", shuffle_buffer=0, seed=2, epoch_length=24)  # 8 batches of 3 per epoch
    tracker = PositionTracker(DataPosition(0, shard_skip=True), {}, batches_per_epoch=8)
    loader = _consuming_loader(shard_dir, order, tracker)
    for batch in itertools.islice(loader, 8):  # Lightning stops a sized loader at its length
        tracker.observe(batch.pop(POSITION_KEY))
    assert tracker.epoch_done
    iter(loader)
    assert tracker.epoch == 1


def test_without_shuffle_buffer_the_shards_read_are_not_opened_again(monkeypatch, shard_dir):
    opened = []
    real = tar_reader.iter_tar

    def counting(url, *args, **kwargs):
        opened.append(url)
        return real(url, *args, **kwargs)

    monkeypatch.setattr(tar_reader, "iter_tar", counting)
    order = TrainOrder("pass", shuffle_buffer=0, seed=5)
    t = PositionTracker(DataPosition(0, shard_skip=True), {})
    t.begin()
    full_batches = list(_pipeline(shard_dir, order, t.position, batch_size=4))
    first_pass = list(opened)
    assert len(first_pass) == 8
    t = PositionTracker(DataPosition(0, shard_skip=True), {})
    t.begin()
    head = _tracked(iter(_pipeline(shard_dir, order, t.position, batch_size=4)), t, 4)  # 16 samples: 3 shards + 1
    opened.clear()
    resumed = PositionTracker(DataPosition(0, shard_skip=True), {})
    resumed.load_state_dict(t.state_dict(), {})
    resumed.begin()
    tail = [b["key"] for b in _pipeline(shard_dir, order, resumed.position, batch_size=4)]
    assert head + tail == [b["key"] for b in full_batches]
    assert opened == first_pass[3:]  # the 3 shards fully read are skipped unopened, the 4th is read on


def test_real_loader_workers_resume_with_round_robin_rotation(shard_dir):
    """2 DataLoader workers: batches come round-robin from them; stopping after an odd number of batches, the
    resumed loader (which starts with worker 0) still yields the uninterrupted sequence."""
    order = TrainOrder("pass", shuffle_buffer=6, seed=1)

    def run(cut=None, state=None):
        position = DataPosition(2, shard_skip=False)
        tracker = PositionTracker(position, {})
        if state is not None:
            tracker.load_state_dict(state, {})
        loader = PositionedLoader(_pipeline(shard_dir, order, position), batch_size=None, num_workers=2,
                                  tracker=tracker, consumes=lambda: True)
        keys = []
        for batch in loader:
            tracker.observe(batch.pop(POSITION_KEY))
            keys.append(batch["key"])
            if cut is not None and len(keys) == cut:
                break
        return keys, tracker.state_dict()

    full, _ = run()
    assert sorted(sum(full, [])) == [f"s{i:05d}" for i in range(40)]
    for cut in (3, 8):
        head, state = run(cut=cut)
        assert state["last_worker"] == (cut - 1) % 2
        tail, _ = run(state=state)
        assert head + tail == full, f"cut at batch {cut}"


def test_loader_without_a_consumer_removes_the_tags(shard_dir):
    loader = PositionedLoader(_pipeline(shard_dir, ORDERS[0]), batch_size=None, num_workers=0)
    assert all(POSITION_KEY not in b for b in loader)
    assert all(POSITION_KEY in b for b in _pipeline(shard_dir, ORDERS[0]))  # the pipeline itself tags


def test_shuffle_is_a_function_of_seed_epoch_rank_worker(monkeypatch):
    samples = [{"__key__": str(i)} for i in range(40)]

    def order(seed, epoch, rank=0, worker=0):
        position = DataPosition(0)
        position.set(epoch)
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        monkeypatch.setenv("WORKER", str(worker))
        monkeypatch.setenv("NUM_WORKERS", "2")
        position.begin()
        return [s["__key__"] for s in ShuffleBuffer(8, seed=seed, position=position)(iter(samples))]

    random.seed(123)  # the global RNG plays no part
    first = order(0, 0)
    random.seed(456)
    assert order(0, 0) == first
    assert len({tuple(first), tuple(order(1, 0)), tuple(order(0, 1)), tuple(order(0, 0, rank=1)),
                tuple(order(0, 0, worker=1))}) == 5
    assert stream_seed(0, "shuffle", 0, 0, 0) == stream_seed(0, "shuffle", 0, 0, 0) != stream_seed(0, "shuffle", 0)


def test_position_saved_under_other_settings_restarts_with_one_line(caplog):
    saved = PositionTracker(DataPosition(0), {"seed": 0, "workers": 2, "world_size": 1})
    saved.observe((0, 1, 12, 4, 3, 2))
    state = state_for_checkpoint(saved)
    assert state["ranks"][0]["workers"] == {1: [12, 4, 3, 2]} and state["settings"]["workers"] == 2
    same = PositionTracker(DataPosition(0), {"seed": 0, "workers": 2, "world_size": 1})
    assert restore_from_checkpoint(same, state, rank=0) and same.workers == {1: (12, 4, 3, 2)}
    other = PositionTracker(DataPosition(0), {"seed": 0, "workers": 4, "world_size": 1})
    with caplog.at_level(logging.WARNING, logger="unclip_pl.data.position"):
        assert not restore_from_checkpoint(other, state, rank=0)
    (line,) = [r.getMessage() for r in caplog.records]
    assert "workers: 2 -> 4" in line and "restarts from the start of the epoch" in line
    assert other.begin() == 0 and other.workers == {}
    assert not restore_from_checkpoint(PositionTracker(DataPosition(0), dict(saved.settings)), state, rank=1)
