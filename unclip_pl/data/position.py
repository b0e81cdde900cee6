"""Exact data resume: where each rank's training stream stands, saved in checkpoints and restored on resume.

The protocol, for any ``IterableDataset`` pipeline read through a ``DataLoader`` (``ShardDataModule`` follows it;
another loader can reuse these classes as they are):

1. **The order is a function.** Every (rank, loader worker) reads a stream that depends only on ``(seed, epoch,
   rank, world size, worker, number of workers)``: the shard order of pass ``k`` from ``(seed, k)``, a shuffle
   buffer's RNG from :func:`stream_seed` ``(seed, epoch, rank, worker)``, never from the global ``random`` module.
2. **Workers count what they emit.** The pipeline holds one :class:`DataPosition`. Its :meth:`DataPosition.begin`
   runs at the start of every iteration, inside the worker (:class:`~unclip_pl.data.pipeline.TrainPipeline` calls
   it), and fixes the stream (epoch, rank, worker, what to skip). :class:`SkipAndCount` (after the shuffle buffer,
   before decoding) skips the items already consumed and counts the rest; :class:`TagPosition` (after batching)
   puts ``batch[POSITION_KEY] = (epoch, worker, items, batches, shards, in_shard)`` on every batch: how far that
   worker's stream had been read when the batch was complete.
3. **The main process counts what training consumed.** The datamodule's ``on_before_batch_transfer`` hook (called
   once for every batch a training step receives, after Lightning's prefetch) pops the tag into a
   :class:`PositionTracker`: per worker, the last consumed position, and which worker gave the last batch.
4. **Checkpoint.** ``LightningDataModule.state_dict()`` returns :func:`gather_states` of the tracker (every rank's
   position; Lightning writes only rank 0's dict). ``load_state_dict()`` gives each rank its own entry back.
5. **Resume.** Before every iteration of the training loader (:class:`PositionedLoader` calls it in ``__iter__``)
   :meth:`PositionTracker.begin` writes into the shared :class:`DataPosition` the epoch (the current one until its
   stream is used up, then the next), the per-worker skips and the worker rotation. A ``DataLoader`` takes its
   batches round-robin from its workers starting with worker 0, so after a resume physical worker ``w`` plays
   *virtual* worker ``(w + offset) % W``, ``offset`` being the worker after the one that gave the last consumed
   batch. The resumed sequence of batches is then the one an uninterrupted run would have read.

Skipping is cheap: items are dropped before decoding; with no sample shuffle buffer whole shards are skipped
without being opened (``shard_skip``). With a shuffle buffer the skipped shards are read (tar bytes only, nothing
decoded), since the buffer's content depends on every sample before it.

A position holds only while world size, worker count and order settings are the same; otherwise (and for
checkpoints written without a position) the epoch restarts from its start, with one line saying so.
"""
from __future__ import annotations

import hashlib
import logging
import multiprocessing
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from torch.utils.data import DataLoader

log = logging.getLogger(__name__)

#: Batch entry carrying a worker's position (popped in the main process before the batch reaches the model).
POSITION_KEY = "__data_position__"
#: Per-worker counters: items emitted (after the shuffle buffer), batches, shards started, items of the last shard.
FIELDS = ("items", "batches", "shards", "in_shard")
STATE_VERSION = 1


def stream_seed(*parts: Any) -> int:
    """A 63-bit seed from ``parts`` (e.g. ``seed, epoch, rank, worker``), the same in every process and run
    (Python's ``hash`` of a tuple of strings is salted per process)."""
    digest = hashlib.blake2b(repr(tuple(parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


def worker_info() -> tuple[int, int, int, int]:
    """``(rank, world_size, worker, num_workers)`` of the calling process (webdataset's reading of the environment,
    ``torch.distributed`` and the DataLoader worker info)."""
    import webdataset as wds

    return wds.utils.pytorch_worker_info()


class _Stream:
    """Worker-local state of one iteration: who reads, from where, and the running counters."""

    def __init__(self, epoch: int, rank: int, world: int, worker: int, workers: int, skip: tuple[int, ...]):
        self.epoch, self.rank, self.world, self.worker, self.workers = epoch, rank, world, worker, workers
        self.skip = dict(zip(FIELDS, skip))
        self.items, self.batches = self.skip["items"], self.skip["batches"]
        self.shards, self.in_shard, self._shard_seen = 0, 0, -1

    def position(self) -> tuple[int, ...]:
        return (self.epoch, self.worker, self.items, self.batches, self.shards, self.in_shard)

    def shard_started(self) -> None:
        """The source hands out its next shard (skipped ones included)."""
        self.shards += 1


class DataPosition:
    """Where the training stream of this rank starts, shared by the main process and its loader workers.

    The main process sets it (:meth:`set`, through :meth:`PositionTracker.begin`) before each iteration of the
    loader; inside each worker :meth:`begin` reads it once per iteration. Until :meth:`set` is called the position
    is *undriven*: every iteration starts the next epoch from its start (a pipeline iterated on its own).

    Args:
        workers: loader workers this position describes (0 or 1: the main process reads).
        shard_skip: skip whole shards on resume (only exact without a sample shuffle buffer).
    """

    def __init__(self, workers: int = 0, shard_skip: bool = False):
        self.workers = max(1, int(workers))
        self.shard_skip = bool(shard_skip)
        self._epoch = multiprocessing.Value("q", -1)
        self._offset = multiprocessing.Value("q", 0)
        self._skips = multiprocessing.Array("q", len(FIELDS) * self.workers)
        self._auto_epoch = -1
        self.stream: _Stream | None = None

    # -- main process -----------------------------------------------------------------------------------------
    def set(self, epoch: int, offset: int = 0, skips: dict[int, tuple[int, ...]] | None = None) -> None:
        """Start the next iteration at ``epoch``, worker rotation ``offset``, skipping ``skips[worker]``
        (``FIELDS`` counts, per virtual worker) items."""
        with self._skips.get_lock():
            self._epoch.value, self._offset.value = int(epoch), int(offset) % self.workers
            for w in range(self.workers):
                values = (skips or {}).get(w, (0,) * len(FIELDS))
                for i, v in enumerate(values):
                    self._skips[w * len(FIELDS) + i] = int(v)

    # -- inside the worker ------------------------------------------------------------------------------------
    def begin(self) -> _Stream:
        """Fix this iteration's stream (call at the start of every iteration, in the reading process)."""
        rank, world, worker, workers = worker_info()
        with self._skips.get_lock():
            epoch, offset = self._epoch.value, self._offset.value
            skips = list(self._skips)
        if epoch < 0:  # undriven: a new epoch per iteration, nothing skipped
            self._auto_epoch += 1
            epoch, offset, skips = self._auto_epoch, 0, [0] * len(skips)
        if workers != self.workers:  # the loader runs another worker count than described: no skips, no rotation
            offset, skips = 0, [0] * len(skips)
        virtual = (worker + offset) % workers
        skip = tuple(skips[virtual * len(FIELDS): (virtual + 1) * len(FIELDS)]) if virtual < self.workers else (
            (0,) * len(FIELDS))
        self.stream = _Stream(epoch, rank, world, virtual, workers, skip)
        return self.stream

    def current(self) -> _Stream:
        if self.stream is None:
            return self.begin()
        return self.stream

    def shards_to_skip(self) -> int:
        """Whole shards the source drops unopened (shard skipping only): all before the last one read."""
        s = self.current()
        return max(0, s.skip["shards"] - 1) if self.shard_skip else 0

    def __getstate__(self):
        # Shared values travel only to processes being spawned (loader workers, ddp_spawn); a copy made elsewhere
        # (deepcopy, pickling to disk) gets fresh, undriven values.
        from multiprocessing import context

        state = dict(self.__dict__)
        if context.get_spawning_popen() is None:
            state.update(_epoch=None, _offset=None, _skips=None)
        state["stream"] = None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        if self._epoch is None:
            self._epoch = multiprocessing.Value("q", -1)
            self._offset = multiprocessing.Value("q", 0)
            self._skips = multiprocessing.Array("q", len(FIELDS) * self.workers)


class SkipAndCount:
    """Pipeline stage on items (raw samples, before decoding): drops those the resumed stream already consumed and
    counts the rest into the position. Place it after any sample shuffle and before any stage that may drop items
    (decoding), with nothing reading ahead between it and the batching."""

    def __init__(self, position: DataPosition):
        self.position = position

    def __call__(self, src: Iterable[dict]) -> Iterator[dict]:
        s = self.position.current()
        if self.position.shard_skip:  # the source skipped the shards before the last one read, unopened
            drop, drop_in_first_shard = 0, s.skip["in_shard"]
        else:
            drop, drop_in_first_shard = s.skip["items"], 0
            s.items = 0
        for item in src:
            if s.shards != s._shard_seen:
                s._shard_seen, s.in_shard = s.shards, 0
            s.in_shard += 1
            if drop > 0:
                drop -= 1
                s.items += 1
                continue
            if drop_in_first_shard > 0:
                drop_in_first_shard -= 1  # items of the first shard consumed before; already counted in skip
                continue
            s.items += 1
            yield item


class TagPosition:
    """Pipeline stage on batches: counts them and adds ``batch[POSITION_KEY]`` (see the module docstring)."""

    def __init__(self, position: DataPosition):
        self.position = position

    def __call__(self, src: Iterable[dict]) -> Iterator[dict]:
        s = self.position.current()
        for batch in src:
            s.batches += 1
            batch[POSITION_KEY] = s.position()
            yield batch


def batches_consumed(position: DataPosition) -> int:
    """Batches this worker's stream already delivered before a resume (an epoch cap subtracts them)."""
    return position.current().skip["batches"]


class PositionTracker:
    """Main-process record of what training consumed, per virtual worker, in the current epoch.

    An epoch ends when its stream is used up: the loader ran out (:meth:`end_of_stream`) and every batch it gave
    was consumed, or ``batches_per_epoch`` batches were consumed (a sized loader, which Lightning stops at its
    length). Lightning's own epoch count is not used: it counts an epoch stopped early (a preemption) as done.

    Args:
        position: the shared :class:`DataPosition` of the training pipeline.
        settings: what the order depends on besides the position (seed, world size, workers, shard list, ...);
            a saved position is used only when they are equal.
        batches_per_epoch: batches of one epoch of this rank when fixed (cycled or resampled shards), else None.
    """

    def __init__(self, position: DataPosition, settings: dict[str, Any], batches_per_epoch: int | None = None):
        self.position, self.settings = position, dict(settings)
        self.batches_per_epoch = batches_per_epoch
        self.epoch: int | None = None
        self.workers: dict[int, tuple[int, ...]] = {}
        self.last_worker: int | None = None
        self.epoch_done = False
        self.restored: bool | None = None  # None: nothing loaded; True: loaded and usable; False: loaded, unusable
        self._consumed = 0  # batches consumed in the current iteration of the loader
        self._produced: int | None = None  # batches that iteration gave in all, once it ran out

    def observe(self, tag: tuple[int, ...]) -> None:
        """Record a consumed batch's position tag."""
        epoch, worker, *counts = (int(v) for v in tag)
        if epoch != self.epoch:
            self.epoch, self.workers = epoch, {}
        self.workers[worker] = tuple(counts)
        self.last_worker = worker
        self._consumed += 1
        done_by_count = self.batches_per_epoch is not None and (
            sum(c[FIELDS.index("batches")] for c in self.workers.values()) >= self.batches_per_epoch)
        self.epoch_done = done_by_count or (self._produced is not None and self._consumed >= self._produced)

    def end_of_stream(self, produced: int, consumed: bool = True) -> None:
        """The loader's iteration ran out after ``produced`` batches (``consumed``: the caller records them with
        :meth:`observe`; if not, the epoch counts as done now)."""
        self._produced = produced
        if not consumed or self._consumed >= produced:
            self.epoch_done = True

    def begin(self) -> int:
        """Set the shared position for an iteration of the loader and return its epoch: the current epoch, after
        the batches consumed so far (the restored position, or epoch 0), or the next epoch once it is done."""
        if self.epoch is None:
            epoch = 0
        else:
            epoch = self.epoch + 1 if self.epoch_done else self.epoch
        if epoch != self.epoch:
            self.epoch, self.workers, self.last_worker, self.epoch_done = epoch, {}, None, False
        self._consumed, self._produced = 0, None
        offset = 0 if self.last_worker is None else self.last_worker + 1
        self.position.set(epoch, offset, self.workers)
        return epoch

    def state_dict(self) -> dict[str, Any]:
        """This rank's position: epoch, per-worker counters, last worker, whether the epoch is done."""
        return {"epoch": self.epoch, "workers": {int(w): list(c) for w, c in self.workers.items()},
                "last_worker": self.last_worker, "epoch_done": self.epoch_done}

    def load_state_dict(self, rank_state: dict[str, Any] | None, settings: dict[str, Any] | None) -> list[str]:
        """Continue from a saved rank state; returns the settings that differ (then nothing is restored)."""
        differ = sorted(k for k in set(self.settings) | set(settings or {})
                        if (settings or {}).get(k) != self.settings.get(k))
        if rank_state is None or differ:
            self.restored = False
            return differ or ["rank"]
        self.epoch = rank_state["epoch"]
        self.workers = {int(w): tuple(int(v) for v in c) for w, c in rank_state["workers"].items()}
        self.last_worker, self.epoch_done = rank_state["last_worker"], bool(rank_state["epoch_done"])
        self.restored = True
        return []


def gather_states(local: dict[str, Any]) -> list[dict[str, Any]]:
    """Every rank's ``local`` dict, in rank order (``[local]`` without a process group). Collective: call it on
    all ranks at once, as Lightning does when it saves a checkpoint."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return [local]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, local)
    return out


def state_for_checkpoint(tracker: PositionTracker) -> dict[str, Any]:
    """The datamodule's ``state_dict()``: format version, order settings and every rank's position."""
    return {"version": STATE_VERSION, "settings": dict(tracker.settings), "ranks": gather_states(tracker.state_dict())}


def restore_from_checkpoint(tracker: PositionTracker, state: dict[str, Any], rank: int, what: str = "data") -> bool:
    """The datamodule's ``load_state_dict()``: give this rank its saved position; one line when it cannot be used."""
    ranks = state.get("ranks") or []
    if state.get("version") != STATE_VERSION:
        differ = ["version"]
    else:
        differ = tracker.load_state_dict(ranks[rank] if rank < len(ranks) else None, state.get("settings"))
    if differ:
        saved = state.get("settings") or {}
        detail = ", ".join(f"{k}: {saved.get(k)!r} -> {tracker.settings.get(k)!r}" for k in differ if k in
                           set(saved) | set(tracker.settings)) or ", ".join(differ)
        log.warning("%s position in the checkpoint does not fit this run (%s): the data order restarts from the "
                    "start of the epoch", what, detail)
        return False
    return True


class PositionedLoader(DataLoader):
    """A ``DataLoader`` that tells a :class:`PositionTracker` when an iteration starts (before the workers start or
    resume reading: :meth:`PositionTracker.begin` sets the :class:`DataPosition` they read) and when it runs out.

    ``consumes()`` says whether the caller consumes the position tags (a datamodule under a trainer pops them in
    ``on_before_batch_transfer`` and records them); when it does not, or there is none, the loader removes them
    from the batches and an iteration that runs out ends its epoch."""

    def __init__(self, *args, tracker: PositionTracker | None = None, consumes: Callable[[], bool] | None = None,
                 **kwargs):
        super().__init__(*args, **kwargs)
        self.tracker, self.consumes = tracker, consumes

    def __iter__(self):
        if self.tracker is None:
            return _Batches(super().__iter__(), None, False)
        consumed = bool(self.consumes()) if self.consumes is not None else False
        self.tracker.begin()  # before the workers (re)start reading
        return _Batches(super().__iter__(), self.tracker, consumed)


class _Batches:
    """The loader's iterator, counting the batches it gives and reporting when it runs out."""

    def __init__(self, it, tracker: PositionTracker | None, consumed: bool):
        self.it, self.tracker, self.consumed, self.produced = it, tracker, consumed, 0

    def __iter__(self):
        return self

    def __next__(self):
        try:
            batch = next(self.it)
        except StopIteration:
            if self.tracker is not None:
                self.tracker.end_of_stream(self.produced, self.consumed)
            raise
        self.produced += 1
        if not self.consumed and isinstance(batch, dict):
            batch.pop(POSITION_KEY, None)
        return batch

    def __getattr__(self, name):  # e.g. the workers' shutdown of a DataLoader iterator
        if name == "it":
            raise AttributeError(name)
        return getattr(self.it, name)


__all__ = ["POSITION_KEY", "FIELDS", "stream_seed", "worker_info", "DataPosition", "SkipAndCount", "TagPosition",
           "batches_consumed", "PositionTracker", "gather_states", "state_for_checkpoint",
           "restore_from_checkpoint", "PositionedLoader"]
