"""The batched reading pipeline over shards (:func:`build_pipeline`) and its ordering and batch stages.

A ``webdataset.DataPipeline``::

    shard list (once per pass | cycled | resampled) -> [shard shuffle, same on every rank] -> split_by_node
    -> split_by_worker -> tar samples -> [sample shuffle buffer] -> decode (+ key checks) -> batch
    -> [tokenise] -> [batch transform] -> count -> [epoch cap]

A training pipeline (``order`` given) is a :class:`TrainPipeline`: its order is a function of (seed, epoch, rank,
worker) and it keeps a :class:`~unclip_pl.data.position.DataPosition` (skip and count before decoding, a position
tag ``batch["__data_position__"]`` on every batch), so that a resumed run continues where it stopped
(:mod:`unclip_pl.data.position`).

Batches are dicts: ``key`` list[str] (B), ``txt`` list[str] (B) and, as requested, ``image`` float32 (B, 3, H, W)
in [-1, 1], ``tokens`` int64 (B, L), ``img_emb`` / ``txt_emb`` float32 (B, D).

Bad input: a corrupt image is skipped, counted and reported in one line; a sample without a needed member raises
:class:`~unclip_pl.data.decode.MissingKeyError`; a truncated or unreadable tar raises
:class:`~unclip_pl.data.tar_reader.ShardError`; with ``on_error="skip"`` both are skipped and counted instead, up to
``max_bad_fraction`` (:class:`~unclip_pl.data.stats.FaultPolicy`); a URL pattern matching nothing raises
``FileNotFoundError``.
"""
from __future__ import annotations

import itertools
import math
import random
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import webdataset as wds

from .decode import VALID_NEEDS, DecodeSamples, collate
from .position import DataPosition, SkipAndCount, TagPosition, batches_consumed, stream_seed
from .stats import FaultPolicy, LoaderStats, expected_shards_per_rank
from .tar_reader import TarSamples
from .urls import expand_urls

SHARD_ORDERS = ("pass", "cycled", "resampled")


@dataclass(frozen=True)
class TrainOrder:
    """How a training pipeline walks its data (evaluation pipelines take none: file order, one pass).

    Args:
        shards: ``"pass"``: one pass over the shard list per epoch, shuffled anew each pass (the same order on every
            rank), split by rank and worker. ``"cycled"``: the shard list cycled forever (the same per-pass shuffle),
            split by rank and worker, ``epoch_length`` samples per epoch: ranks read disjoint shards within a pass
            and take equal step counts (the multi-rank mode without resampling). ``"resampled"``: shards drawn with
            replacement forever by every rank and worker, ``epoch_length`` samples per epoch.
        shuffle_buffer: samples in the shuffle buffer (0 or 1: no sample shuffle).
        seed: seed of the shard order, of the resampling and of the sample shuffle (with the epoch, rank and
            worker: :func:`~unclip_pl.data.position.stream_seed`).
        epoch_length: samples per epoch over all ranks and workers; required for ``"cycled"`` and ``"resampled"``,
            optional cap for ``"pass"``.
    """

    shards: Literal["pass", "cycled", "resampled"] = "pass"
    shuffle_buffer: int = 1000
    seed: int = 0
    epoch_length: int | None = None

    def __post_init__(self):
        if self.shards not in SHARD_ORDERS:
            raise ValueError(f"TrainOrder.shards={self.shards!r} is not one of {SHARD_ORDERS}")
        if self.shards != "pass" and not self.epoch_length:
            raise ValueError(f"TrainOrder.shards={self.shards!r} reads shards forever: set epoch_length "
                             f"(samples per epoch)")


class ShuffleBuffer:
    """Pipeline stage: shuffle samples through a buffer of ``bufsize``.

    Own instead of ``wds.shuffle``: the buffer is drained at the end of the stream and whenever the ``__pass__``
    tag changes, so samples of one pass over the shard list never mix with the next (epochs stay a clean partition
    across ranks). Its RNG is ``rng`` if given, else seeded from ``(seed, epoch, rank, worker)`` of the stream
    (``position``; without one from ``seed`` alone), never the global ``random`` module (PyTorch seeds that per
    worker from a random base seed), so a resumed stream shuffles as the interrupted one did.
    """

    def __init__(self, bufsize: int, rng: random.Random | None = None, seed: int = 0,
                 position: DataPosition | None = None):
        self.bufsize, self.rng, self.seed, self.position = int(bufsize), rng, int(seed), position

    def _rng(self) -> random.Random:
        if self.rng is not None:
            return self.rng
        if self.position is None:
            return random.Random(stream_seed(self.seed, "shuffle"))
        s = self.position.current()
        return random.Random(stream_seed(self.seed, "shuffle", s.epoch, s.rank, s.worker))

    def __call__(self, src: Iterable[dict]) -> Iterator[dict]:
        rng = self._rng()
        buf: list[dict] = []
        current = None
        for sample in src:
            tag = sample.get("__pass__")
            if tag != current and buf:
                rng.shuffle(buf)
                yield from buf
                buf = []
            current = tag
            buf.append(sample)
            if len(buf) >= self.bufsize:
                i = rng.randrange(len(buf))
                buf[i], buf[-1] = buf[-1], buf[i]
                yield buf.pop()
        rng.shuffle(buf)
        yield from buf


class RepeatedShardList(torch.utils.data.IterableDataset):
    """Shard list cycled forever: pass ``k`` is a permutation seeded by ``(seed, k)``, identical on every rank.

    Own instead of ``wds.ResampledShards`` (which draws with replacement, differently per rank): followed by
    ``split_by_node``/``split_by_worker`` and an :class:`EpochCap`, ranks read disjoint shards within a pass and all
    take the same number of steps. Each iteration (epoch) starts a new pass.
    """

    def __init__(self, urls: Sequence[str], seed: int = 0, shuffle: bool = True):
        super().__init__()
        self.urls, self.seed, self.shuffle, self.epoch = list(urls), int(seed), shuffle, -1

    def __iter__(self) -> Iterator[dict]:
        self.epoch += 1
        k = self.epoch
        while True:
            for u in pass_order(self.urls, self.seed, k) if self.shuffle else self.urls:
                yield {"url": u, "pass": k}
            k += 1


def pass_order(urls: Sequence[str], seed: int, k: int) -> list[str]:
    """The shard order of pass ``k``: a permutation seeded by ``(seed, k)``, the same in every process."""
    order = list(urls)
    random.Random(stream_seed(seed, "pass", k)).shuffle(order)
    return order


class ShardOrder(torch.utils.data.IterableDataset):
    """Source of a training pipeline: the ``{"url", "pass"}`` shard items of this rank and worker for the epoch of
    ``position``, a function of (seed, epoch, rank, worker) only.

    ``"pass"``: pass ``epoch`` (:func:`pass_order`); ``"cycled"``: passes ``epoch, epoch + 1, ...`` forever; both
    split by rank and then by worker as ``split_by_node``/``split_by_worker`` do. ``"resampled"``: shards drawn with
    replacement by an RNG seeded from ``(seed, epoch, rank, worker)``. On resume without a sample shuffle the
    shards already read are skipped unopened (:meth:`DataPosition.shards_to_skip`).
    """

    def __init__(self, urls: Sequence[str], order: TrainOrder, position: DataPosition):
        super().__init__()
        self.urls, self.order, self.position = list(urls), order, position

    def _items(self) -> Iterator[dict]:
        s, seed = self.position.current(), self.order.seed
        if self.order.shards == "resampled":
            rng = random.Random(stream_seed(seed, "resampled", s.epoch, s.rank, s.worker))
            while True:
                yield {"url": rng.choice(self.urls), "pass": s.epoch}
        passes = itertools.count(s.epoch) if self.order.shards == "cycled" else [s.epoch]
        items = ({"url": u, "pass": k} for k in passes
                 for u in (pass_order(self.urls, seed, k) if len(self.urls) > 1 else self.urls))
        yield from itertools.islice(itertools.islice(items, s.rank, None, s.world), s.worker, None, s.workers)

    def __iter__(self) -> Iterator[dict]:
        stream, skip = self.position.current(), self.position.shards_to_skip()
        for i, item in enumerate(self._items()):
            stream.shard_started()
            if i >= skip:
                yield item


class TrainPipeline(wds.DataPipeline):
    """A ``DataPipeline`` that begins its :class:`~unclip_pl.data.position.DataPosition` at the start of every
    iteration (inside the reading process), before any stage runs."""

    position: DataPosition

    def iterator1(self):
        self.position.begin()
        return super().iterator1()


def batches_per_worker(epoch_length: int, batch_size: int, world_size: int, num_workers: int) -> int:
    """Batches each (rank, worker) yields so that all of them together give about ``epoch_length`` samples."""
    return max(1, math.ceil(epoch_length / (batch_size * max(1, world_size) * max(1, num_workers))))


class EpochCap:
    """Pipeline stage: stop after ``epoch_length`` samples in total over all ranks and workers (batch granularity).

    Own instead of ``with_epoch`` (a fixed per-worker count that restarts a pipeline ending early): world size and
    worker count are read at iteration time, inside the worker, and a finite pass ends where it ends. With a
    ``position``, the batches a resumed stream already delivered count towards the cap.
    """

    def __init__(self, epoch_length: int, batch_size: int, position: DataPosition | None = None):
        self.epoch_length, self.batch_size, self.position = int(epoch_length), int(batch_size), position

    def __call__(self, src: Iterable[dict]) -> Iterator[dict]:
        _rank, world, _worker, workers = wds.utils.pytorch_worker_info()
        n = batches_per_worker(self.epoch_length, self.batch_size, world, workers)
        if self.position is not None:
            n -= batches_consumed(self.position)
        for i, batch in enumerate(src):
            if i >= n:
                break
            yield batch


class Batched:
    """Pipeline stage: samples -> batches of ``batch_size`` (the last one smaller), collated with ``collate``.

    Own instead of ``wds.batched``, which pulls the next sample before it yields a full batch: here a batch is
    yielded as soon as it is full, so the items counted upstream (:class:`~unclip_pl.data.position.SkipAndCount`)
    are exactly those in the batches delivered so far.
    """

    def __init__(self, batch_size: int, collation_fn: Callable[[list[dict]], dict] = collate):
        self.batch_size, self.collation_fn = int(batch_size), collation_fn

    def __call__(self, src: Iterable[dict]) -> Iterator[dict]:
        batch: list[dict] = []
        for sample in src:
            batch.append(sample)
            if len(batch) >= self.batch_size:
                yield self.collation_fn(batch)
                batch = []
        if batch:
            yield self.collation_fn(batch)


class MapBatches:
    """Pipeline stage applying ``fn`` to every item (own: ``wds.map`` adds a ``__key__`` entry to dict batches)."""

    def __init__(self, fn: Callable[[dict], dict]):
        self.fn = fn

    def __call__(self, src: Iterable[dict]) -> Iterator[dict]:
        for item in src:
            yield self.fn(item)


class Tokenize:
    """Batch function: adds ``tokens`` int64 (B, L) from ``txt`` with the given tokenizer."""

    def __init__(self, tokenizer: Callable[[list[str]], torch.Tensor]):
        self.tokenizer = tokenizer

    def __call__(self, batch: dict) -> dict:
        tokens = self.tokenizer(batch["txt"])
        batch["tokens"] = torch.as_tensor(tokens, dtype=torch.long)
        return batch


class AddKey:
    """Batch function: ``batch[dst] = fn(batch[src])``, in the loader workers (``fn`` must pickle).
    E.g. the upsampler's low-res corruption: ``AddKey("image", "low_res", upsampler.low_res_maker)``."""

    def __init__(self, src: str, dst: str, fn: Callable[[Any], Any]):
        self.src, self.dst, self.fn = src, dst, fn

    def __call__(self, batch: dict) -> dict:
        batch[self.dst] = self.fn(batch[self.src])
        return batch


class CountSamples:
    """Batch function: counts the delivered samples into ``stats.samples``."""

    def __init__(self, stats: LoaderStats):
        self.stats = stats

    def __call__(self, batch: dict) -> dict:
        self.stats.add("samples", len(batch["key"]))
        return batch


def _shard_stages(url_list: list[str], order: TrainOrder | None, position: DataPosition | None = None) -> list:
    if order is None:
        return [wds.SimpleShardList(url_list), wds.split_by_node, wds.split_by_worker]
    return [ShardOrder(url_list, order, position)]


def build_pipeline(urls: str | Sequence[str], needs: Iterable[str] = ("image", "txt"), image_size: int = 64,
                   batch_size: int = 32, order: TrainOrder | None = None, random_crop: bool = False,
                   tokenizer: Callable | None = None, batch_transform: Callable[[dict], dict] | None = None,
                   stats: LoaderStats | None = None, sidecars: str | Sequence[str] | None = None,
                   on_error: str = "raise", max_bad_fraction: float = 0.1,
                   sample_filter: Callable[[dict], bool] | None = None,
                   embedding_folder=None, position: DataPosition | None = None) -> wds.DataPipeline:
    """Build the batched reading pipeline (an ``IterableDataset`` of batches; use ``batch_size=None`` in loaders).

    Args:
        urls: shard spec (see :func:`~unclip_pl.data.urls.expand_urls`).
        needs: subset of {"image", "txt", "tokens", "img_emb", "txt_emb"}; images are decoded only if "image".
        image_size: output side; images are resized (shorter side) then centre (or random) cropped.
        batch_size: samples per batch (the last batch of a finite pass may be smaller).
        order: training order (shard and sample shuffles, cycling or resampling, epoch length), see
            :class:`TrainOrder`; None (evaluation): every shard once in file order, split by rank and worker.
        random_crop: random instead of centre crops (a training augmentation: pass it for training only).
        tokenizer: callable ``list[str] -> LongTensor (B, L)``; required when "tokens" is needed.
        batch_transform: picklable ``dict -> dict`` applied to every batch in the workers (e.g. :class:`AddKey`).
        stats: :class:`LoaderStats` to count into (a new one if None; available as ``pipeline.stats``).
        sidecars: shard spec of a sidecar shard set (see :mod:`~unclip_pl.data.sidecar`), read in lockstep with the
            shards: their members (embeddings) join the samples; None: the shards alone.
        on_error / max_bad_fraction: ``"raise"``: a bad shard or a sample missing a needed member raises;
            ``"skip"``: skipped and counted, failing past ``max_bad_fraction`` (see
            :class:`~unclip_pl.data.stats.FaultPolicy`).
        sample_filter: ``raw sample -> keep?`` (e.g. :class:`~unclip_pl.data.filters.SampleFilter`).
        embedding_folder: an :class:`~unclip_pl.data.embedding_folder.EmbeddingFolder` whose embeddings join the
            samples by key (see :class:`~unclip_pl.data.sidecar.JoinEmbeddingFolder`); None: none.
        position: training only: the :class:`~unclip_pl.data.position.DataPosition` the main process drives (epoch,
            skips on resume); None: a new one, undriven (each iteration starts the next epoch). Training batches
            carry ``batch["__data_position__"]``.
    Returns:
        ``wds.DataPipeline`` yielding dicts ``key`` (list[str]), ``txt`` (list[str]), and as needed ``image``
        float32 (B, 3, H, W) in [-1, 1], ``tokens`` int64 (B, L), ``img_emb``/``txt_emb`` float32 (B, D);
        ``pipeline.urls`` is the expanded shard list; for training a :class:`TrainPipeline` (``.position``).
    """
    needs = set(needs)
    unknown = needs - VALID_NEEDS
    if unknown:
        raise ValueError(f"unknown needs {sorted(unknown)}; valid: {sorted(VALID_NEEDS)}")
    if "tokens" in needs and tokenizer is None:
        raise ValueError("needs contains 'tokens' but no tokenizer was given (pass e.g. clip.tokenize)")
    if order is not None and not isinstance(order, TrainOrder):
        raise TypeError(f"order must be a TrainOrder or None, got {type(order).__name__}")
    url_list = expand_urls(urls)
    stats = stats if stats is not None else LoaderStats()

    _rank, world, _worker, _workers = wds.utils.pytorch_worker_info()
    faults = FaultPolicy(stats, on_error, max_bad_fraction, expected_shards_per_rank(len(url_list), world))
    if sidecars is not None:
        from .sidecar import pair_sidecars

        sidecars = pair_sidecars(url_list, sidecars)

    if order is not None and position is None:
        position = DataPosition(0, shard_skip=order.shuffle_buffer <= 1)
    stages = _shard_stages(url_list, order, position)
    stages.append(TarSamples(sidecars, faults))
    if order is not None and order.shuffle_buffer > 1:
        stages.append(ShuffleBuffer(order.shuffle_buffer, seed=order.seed, position=position))
    if order is not None:
        stages.append(SkipAndCount(position))
    if embedding_folder is not None:
        from .sidecar import JoinEmbeddingFolder

        stages.append(JoinEmbeddingFolder(embedding_folder, [n for n in ("img_emb", "txt_emb") if n in needs]))
    stages.append(DecodeSamples(needs, image_size, random_crop, stats, faults, sample_filter))
    stages.append(Batched(batch_size))
    if "tokens" in needs:
        stages.append(MapBatches(Tokenize(tokenizer)))
    if batch_transform is not None:
        stages.append(MapBatches(batch_transform))
    stages.append(MapBatches(CountSamples(stats)))
    if order is not None:
        stages.append(TagPosition(position))
    if order is not None and order.epoch_length:
        stages.append(EpochCap(order.epoch_length, batch_size, position))
    if order is None:
        pipeline = wds.DataPipeline(*stages)
    else:
        pipeline = TrainPipeline(*stages)
        pipeline.position = position
    pipeline.stats = stats
    pipeline.urls = url_list
    return pipeline


__all__ = ["SHARD_ORDERS", "TrainOrder", "ShuffleBuffer", "RepeatedShardList", "pass_order", "ShardOrder",
           "TrainPipeline", "batches_per_worker", "EpochCap", "Batched", "MapBatches", "Tokenize", "AddKey",
           "CountSamples", "build_pipeline"]
