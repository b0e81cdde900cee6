"""LightningDataModule over webdataset shards."""
from __future__ import annotations

import hashlib
import logging
import math
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from .decode import VALID_NEEDS
from .pipeline import TrainOrder, batches_per_worker, build_pipeline
from .position import (
    POSITION_KEY,
    DataPosition,
    PositionedLoader,
    PositionTracker,
    restore_from_checkpoint,
    state_for_checkpoint,
)
from .stats import LoaderStats
from .tar_reader import count_samples
from .urls import expand_urls, is_remote

log = logging.getLogger(__name__)

EMB_NEEDS = {"img_emb", "txt_emb"}
EMBEDDING_SOURCES = ("inline", "sidecar", "folder")


def _source_id(urls: list[str]) -> str:
    """Short hash of the shard list (plus size and mtime of local files)."""
    h = hashlib.sha1()
    for u in urls:
        h.update(u.encode())
        if not is_remote(u) and os.path.exists(u):
            st = os.stat(u)
            h.update(f":{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:10]


def _env_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


DEFAULT_BATCH_SIZE = 64  # per device, when neither data.batch_size nor the stage recommends one
DEFAULT_IMAGE_SIZE = 64  # when image_size is None


class ShardDataModule(pl.LightningDataModule):
    """Train/val batches from webdataset shards.

    Batches are dicts: ``key`` list[str] (B), ``txt`` list[str] (B) and, as ``needs`` asks, ``image`` float32
    (B, 3, image_size, image_size) in [-1, 1], ``tokens`` int64 (B, L), ``img_emb`` / ``txt_emb`` float32 (B, D),
    plus whatever ``train_batch_transform`` adds to training batches.

    Args:
        train_urls / val_urls: shard specs (brace patterns, globs, lists, directories, ``pipe:``/fsspec URLs).
        batch_size / val_batch_size: samples per batch (``None``: 64; val defaults to ``batch_size``).
        num_workers: DataLoader workers (capped at the number of shards each rank reads).
        image_size: output image side (shorter-side resize + crop); ``None``: 64.
        needs: batch keys to deliver, subset of {"image", "txt", "tokens", "img_emb", "txt_emb"} (the training
            entry passes the stage's).
        tokenizer: ``list[str] -> LongTensor (B, L)`` for ``tokens``. If None and ``clip`` is given,
            ``clip.loader_tokenizer`` (else ``clip.tokenize``) is used.
        clip: a FrozenCLIP (or None): tokenizes captions when no ``tokenizer`` is given, and embeds the shards
            into ``embed_cache_dir`` when ``needs`` has img_emb/txt_emb.
        train_batch_transform: picklable ``dict -> dict`` run on every training batch in the loader workers (e.g.
            the upsampler's low-res corruption, :class:`~unclip_pl.data.pipeline.AddKey`); None: batches as read.
        shuffle_buffer: sample shuffle buffer (train only).
        resampled / epoch_length: draw training shards with replacement, ``epoch_length`` samples per epoch over
            all ranks. With more than one rank and ``resampled=False`` the training shard list is cycled (a new
            shuffle per pass, identical on every rank) and split across ranks and workers, with ``epoch_length``
            (default: the number of training samples, counted from the tar headers) capping each epoch, so
            ranks read disjoint shards and all run the same number of steps.
        random_crop: random (train) instead of centre crops.
        seed: seed of the training order (shard order, shuffle buffer, resampling), with the epoch, rank and worker.
        log_keys: append the keys of every training batch to ``<trainer.default_root_dir>/data_keys_rank<r>.txt``,
            one line per batch: ``<global step><TAB><key> <key> ...`` (off by default; for checking resumes).

    Exact resume: ``state_dict()`` (saved by Lightning in every checkpoint) holds the training data position of
    every rank (epoch, seed and order settings, how far each loader worker has read, see
    :mod:`unclip_pl.data.position`); ``load_state_dict()`` makes a resumed run continue the same sample sequence.
        embed_cache_dir: if set, and ``needs`` has img_emb/txt_emb, and ``clip`` is given (and ``embeddings`` is
            "inline"), shards are embedded once into sidecar shards under
            ``embed_cache_dir/<clip.fingerprint>/{train,val}-<source id>-sidecar`` and read beside them.
        embeddings: where ``img_emb``/``txt_emb`` come from: ``"inline"`` (members of the shards, or the embed
            cache), ``"sidecar"`` (a sidecar shard set, ``sidecar_urls``, read in lockstep) or ``"folder"`` (an
            embedding folder, ``embedding_folder`` (+ ``metadata_folder``), joined by key).
        sidecar_urls / val_sidecar_urls: shard specs of the sidecar shards (matched to the image shards by file
            name; ``val_sidecar_urls`` None: ``sidecar_urls``).
        embedding_folder / metadata_folder: clip-retrieval / LAION embedding folder joined by ``key``.
        on_error: ``"raise"`` (a bad shard or a sample missing a needed member stops the run) or ``"skip"``
            (skipped, counted per reason in ``stats``, one warning per shard / reason); see
            :class:`~unclip_pl.data.stats.FaultPolicy`.
        max_bad_fraction: with ``"skip"``, the run fails with one line when more than this fraction of the shards
            or samples read is bad.
        filters: sample filters on img2dataset's json metadata, e.g. ``{"min_original_size": 256}`` (see
            :class:`~unclip_pl.data.filters.SampleFilter`); dropped samples are counted in ``stats.filtered``.
    Attributes:
        stats: ``{"train": LoaderStats, "val": LoaderStats}`` (samples delivered and read, skipped per reason,
            filtered, shards read and skipped).
    """

    def __init__(self, train_urls: str | Sequence[str] | None = None, val_urls: str | Sequence[str] | None = None,
                 batch_size: int | None = None, val_batch_size: int | None = None, num_workers: int = 2,
                 image_size: int | None = None, needs: Iterable[str] = ("image", "txt"),
                 tokenizer: Callable | None = None, clip=None,
                 train_batch_transform: Callable[[dict], dict] | None = None, shuffle_buffer: int = 1000,
                 resampled: bool = False, epoch_length: int | None = None, random_crop: bool = False,
                 pin_memory: bool | None = None, persistent_workers: bool = True, seed: int = 0,
                 log_keys: bool = False,
                 embed_cache_dir: str | None = None, embed_batch_size: int = 256, embeddings: str = "inline",
                 sidecar_urls: str | Sequence[str] | None = None, val_sidecar_urls: str | Sequence[str] | None = None,
                 embedding_folder: str | None = None, metadata_folder: str | None = None, on_error: str = "raise",
                 max_bad_fraction: float = 0.1, filters: dict | None = None):
        super().__init__()
        self.train_urls, self.val_urls = train_urls, val_urls
        self.batch_size = int(batch_size or DEFAULT_BATCH_SIZE)
        self.val_batch_size = int(val_batch_size or self.batch_size)
        self.num_workers = int(num_workers)
        self.image_size = int(DEFAULT_IMAGE_SIZE if image_size is None else image_size)
        self.needs = tuple(needs)
        self.tokenizer = tokenizer
        self.clip = clip
        self.train_batch_transform = train_batch_transform
        self.shuffle_buffer = int(shuffle_buffer)
        self.resampled, self.epoch_length = bool(resampled), epoch_length
        self.random_crop = bool(random_crop)
        self.pin_memory = pin_memory
        self.persistent_workers = bool(persistent_workers)
        self.seed = int(seed)
        self.embed_cache_dir = embed_cache_dir
        self.embed_batch_size = int(embed_batch_size)
        if embeddings not in EMBEDDING_SOURCES:
            raise ValueError(f"data.embeddings={embeddings!r} is not one of {EMBEDDING_SOURCES}")
        if embeddings == "sidecar" and sidecar_urls is None:
            raise ValueError("data.embeddings=sidecar needs data.sidecar_urls (the embed command's output)")
        if embeddings == "folder" and embedding_folder is None:
            raise ValueError("data.embeddings=folder needs data.embedding_folder (img_emb/, text_emb/, metadata/)")
        self.embeddings = embeddings
        self.sidecar_urls = {"train": sidecar_urls, "val": val_sidecar_urls or sidecar_urls}
        self.embedding_folder, self.metadata_folder = embedding_folder, metadata_folder
        self.faults = dict(on_error=on_error, max_bad_fraction=float(max_bad_fraction))
        from .filters import SampleFilter

        self.sample_filter = SampleFilter.from_config(filters)
        self._folder = None
        self.stats = {"train": LoaderStats(), "val": LoaderStats()}
        self.log_keys = bool(log_keys)
        self._tracker: PositionTracker | None = None
        self._pending_position: dict | None = None
        self._noted_restart = False
        self.train_dataset = self.val_dataset = None
        self._train_workers = self._val_workers = 0

    # -- helpers ---------------------------------------------------------------------------------------------
    @property
    def data_id(self) -> str:
        """A short id of the training data (its shard spec), recorded in what is trained on it (the CLIP export),
        so a cached CLIP trained on other data is not reused by ``clip.autotrain``."""
        spec = self.train_urls if isinstance(self.train_urls, str) else list(self.train_urls or [])
        return "shards/" + hashlib.sha1(repr(spec).encode()).hexdigest()[:12]

    @property
    def world_size(self) -> int:
        trainer = getattr(self, "trainer", None)
        return int(trainer.world_size) if trainer is not None else _env_world_size()

    def _check_needs(self) -> set[str]:
        needs = set(self.needs)
        unknown = needs - VALID_NEEDS
        if unknown:
            raise ValueError(f"data needs {sorted(unknown)} are unknown; valid: {sorted(VALID_NEEDS)}")
        return needs

    def _embedding_wanted(self) -> bool:
        return (bool(self._check_needs() & EMB_NEEDS) and self.embed_cache_dir is not None and self.clip is not None
                and self.embeddings == "inline")

    def embedded_dir(self, split: str, urls: list[str]) -> Path:
        """``embed_cache_dir/<clip fingerprint>/<split>-<id of the source shards>-sidecar`` (the id changes when
        the source shards are rewritten, so a stale cache is never read)."""
        return Path(self.embed_cache_dir) / str(self.clip.fingerprint) / f"{split}-{_source_id(urls)}-sidecar"

    def _embedding_sources(self, split: str, urls: list[str]) -> dict:
        """Pipeline arguments for the embeddings of ``split``: ``sidecars`` (a shard spec) or
        ``embedding_folder``; empty when they are members of the shards (or not needed)."""
        if not (self._check_needs() & EMB_NEEDS):
            return {}
        if self.embeddings == "sidecar":
            return {"sidecars": self.sidecar_urls[split]}
        if self.embeddings == "folder":
            if self._folder is None:
                from .embedding_folder import EmbeddingFolder

                self._folder = EmbeddingFolder(self.embedding_folder, self.metadata_folder,
                                               text="txt_emb" in self._check_needs())
            return {"embedding_folder": self._folder}
        if self._embedding_wanted():
            return {"sidecars": str(self.embedded_dir(split, urls))}
        return {}

    def _source_urls(self, split: str):
        return self.train_urls if split == "train" else self.val_urls

    def _urls(self, split: str) -> list[str] | None:
        """Shard URLs to read for ``split``; runs (or reuses) the embedding cache when configured."""
        spec = self._source_urls(split)
        if spec is None:
            return None
        urls = expand_urls(spec)
        if self._embedding_wanted():
            from .embed import embed_shards

            out = self.embedded_dir(split, urls)
            log.info("embedding %s shards with CLIP %s into %s (cached sidecar shards)", split,
                     self.clip.fingerprint, out)
            embed_shards(urls, out, self.clip, batch_size=self.embed_batch_size, mode="sidecar")
        return urls

    def _workers_for(self, urls: list[str], resampled: bool) -> int:
        if self.num_workers <= 0:
            return 0
        if resampled:
            return self.num_workers
        return max(1, min(self.num_workers, math.ceil(len(urls) / max(1, self.world_size))))

    # -- Lightning hooks -------------------------------------------------------------------------------------
    def prepare_data(self) -> None:
        """Rank 0 only: fill the embedding cache if one is configured."""
        if self._embedding_wanted():
            for split in ("train", "val"):
                self._urls(split)

    def setup(self, stage: str | None = None) -> None:
        needs = self._check_needs()
        tokenizer = self.tokenizer
        if "tokens" in needs and tokenizer is None and self.clip is not None:
            tokenizer = getattr(self.clip, "loader_tokenizer", None) or self.clip.tokenize
        common = dict(needs=needs, image_size=self.image_size, tokenizer=tokenizer, sample_filter=self.sample_filter,
                      **self.faults)
        if stage in (None, "fit") and self.train_urls is not None:
            urls = self._urls("train")
            shards, epoch_length = ("resampled" if self.resampled else "pass"), self.epoch_length
            if self.world_size > 1 and not self.resampled:
                if epoch_length is None:
                    if any(is_remote(u) for u in urls):
                        raise ValueError("training on several ranks needs equal step counts: set "
                                         "data.epoch_length=<samples per epoch> (or data.resampled=true)")
                    epoch_length = count_samples(urls, skip_bad=self.faults["on_error"] == "skip")
                shards = "cycled"
                log.info("world size %d: training shards are cycled and split across ranks, %d samples per epoch",
                         self.world_size, epoch_length)
            order = TrainOrder(shards=shards, shuffle_buffer=self.shuffle_buffer, seed=self.seed,
                               epoch_length=epoch_length)
            position = self._make_position(order, urls)
            self.train_dataset = build_pipeline(
                urls, batch_size=self.batch_size, order=order, random_crop=self.random_crop, position=position,
                batch_transform=self.train_batch_transform, stats=self.stats["train"], **common,
                **self._embedding_sources("train", urls))
            self._train_workers = self._workers_for(urls, self.resampled)
            if shards != "pass":
                n = batches_per_worker(epoch_length, self.batch_size, self.world_size, self._train_workers)
                self.train_dataset.with_length(n * max(1, self._train_workers), silent=True)
        if stage in (None, "fit", "validate") and self.val_urls is not None:
            urls = self._urls("val")
            self.val_dataset = build_pipeline(urls, batch_size=self.val_batch_size, stats=self.stats["val"],
                                              **common, **self._embedding_sources("val", urls))
            self._val_workers = self._workers_for(urls, False)

    def _loader(self, dataset, workers: int, tracker: PositionTracker | None = None) -> DataLoader:
        """A plain DataLoader over the (already batching) pipeline: ``batch_size=None``."""
        pin = torch.cuda.is_available() if self.pin_memory is None else self.pin_memory
        return PositionedLoader(dataset, batch_size=None, shuffle=False, num_workers=workers, pin_memory=pin,
                             persistent_workers=self.persistent_workers and workers > 0,
                             prefetch_factor=4 if workers > 0 else None, tracker=tracker,
                             consumes=self._consumes_tags)

    def train_dataloader(self):
        if self.train_dataset is None:
            self.setup("fit")
        if self.train_dataset is None:
            raise ValueError("no train_urls configured for this data module")
        return self._loader(self.train_dataset, self._train_workers, tracker=self._tracker)

    def val_dataloader(self):
        if self.val_dataset is None:
            self.setup("validate")
        if self.val_dataset is None:
            return []
        return self._loader(self.val_dataset, self._val_workers)

    # -- exact data resume (see unclip_pl.data.position) ------------------------------------------------------
    def _make_position(self, order: TrainOrder, urls: list[str]) -> DataPosition:
        """The training pipeline's shared position and its tracker; what the order depends on is recorded with
        every saved position, which a resumed run uses only if it is the same."""
        workers = self._workers_for(urls, self.resampled)
        position = DataPosition(workers, shard_skip=order.shuffle_buffer <= 1)
        settings = {"shards": order.shards, "seed": order.seed, "shuffle_buffer": order.shuffle_buffer,
                    "epoch_length": order.epoch_length, "batch_size": self.batch_size,
                    "world_size": self.world_size, "workers": max(1, workers),
                    "source": hashlib.sha1("\n".join(urls).encode()).hexdigest()[:12]}
        per_epoch = None
        if order.shards != "pass":  # a sized loader: Lightning stops each epoch at its length
            per_epoch = max(1, workers) * batches_per_worker(order.epoch_length, self.batch_size, self.world_size,
                                                             workers)
        self._tracker = PositionTracker(position, settings, batches_per_epoch=per_epoch)
        if self._pending_position is not None:
            self.load_state_dict({"data_position": self._pending_position})
        return position

    def _rank(self) -> int:
        trainer = getattr(self, "trainer", None)
        return int(trainer.global_rank) if trainer is not None else int(os.environ.get("RANK", "0"))

    def _consumes_tags(self) -> bool:
        """Whether the training batches' position tags are recorded (under a trainer, by
        :meth:`on_before_batch_transfer`); called as each iteration of the training loader starts."""
        trainer = getattr(self, "trainer", None)
        resumed = trainer is not None and getattr(trainer, "ckpt_path", None)
        if resumed and self._tracker.restored is None and not self._noted_restart and self._rank() == 0:
            log.info("%s holds no data position (saved before checkpoints recorded it): the data order restarts "
                     "from the start of epoch 0", trainer.ckpt_path)
        self._noted_restart = True
        return trainer is not None

    def state_dict(self) -> dict:
        """``{"data_position": ...}``: every rank's training data position (collective with several ranks: Lightning
        calls it on all ranks when it saves); empty before the training pipeline exists."""
        if self._tracker is None:
            return {}
        return {"data_position": state_for_checkpoint(self._tracker)}

    def load_state_dict(self, state_dict: dict) -> None:
        """Continue from a saved data position (applied when the training pipeline is set up)."""
        state = (state_dict or {}).get("data_position")
        if state is None:
            return
        if self._tracker is None:
            self._pending_position = state
            return
        self._pending_position = None
        restore_from_checkpoint(self._tracker, state, self._rank(), what=f"{type(self).__name__}: the data")

    def on_before_batch_transfer(self, batch, dataloader_idx: int):
        """Every batch a step receives, in order: a training batch's position tag is popped and recorded (and its
        keys written with ``log_keys``)."""
        if isinstance(batch, dict) and POSITION_KEY in batch:
            tag = batch.pop(POSITION_KEY)
            trainer = getattr(self, "trainer", None)
            if self._tracker is not None and trainer is not None and trainer.training:
                self._tracker.observe(tag)
                if self.log_keys:
                    path = Path(trainer.default_root_dir) / f"data_keys_rank{trainer.global_rank}.txt"
                    with open(path, "a") as f:
                        f.write(f"{trainer.global_step}\t{' '.join(batch['key'])}\n")
        return batch

    def teardown(self, stage: str | None = None) -> None:
        for split, s in self.stats.items():
            counts = {k: v for k, v in s.as_dict().items() if v and (k.startswith("skipped_") or
                                                                      k in ("filtered", "bad_shards"))}
            if counts:
                log.warning("%s loader: %s in total (%d samples delivered)", split,
                            ", ".join(f"{k} {v}" for k, v in counts.items()), s.samples)
