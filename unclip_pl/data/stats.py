"""Loader counters shared between the main process and its DataLoader workers, and the fault policy that fills them.

:class:`LoaderStats` holds the counts (shared memory, so every worker of a rank counts into the same numbers);
:class:`FaultPolicy` decides what a bad shard or sample does (``on_error: raise | skip``), counts skipped ones per
reason and stops the run with one line when more than ``max_bad_fraction`` of the shards or samples are bad.
"""
from __future__ import annotations

import logging
import math
import multiprocessing

log = logging.getLogger(__name__)

#: Why a sample was skipped: ``skipped_<reason>`` counters. ``corrupt``: its image bytes do not decode (always
#: skipped); the others: a member the batch needs is missing (skipped only with ``on_error: skip``).
SKIP_REASONS = ("corrupt", "no_image", "no_txt", "no_img_emb", "no_txt_emb", "no_json")
ON_ERROR = ("raise", "skip")


class LoaderStats:
    """Counters shared by the main process and its DataLoader workers (shared memory).

    ``samples`` -- samples delivered in batches; ``samples_read`` -- samples read from the shards (before
    decoding and filters); ``skipped_<reason>`` -- samples skipped, per reason (:data:`SKIP_REASONS`);
    ``filtered`` -- samples dropped by the configured filters (not faults); ``shards_read`` -- shards read to
    the end; ``bad_shards`` -- shards skipped as truncated or unreadable. Readable from the main process at any
    time, as attributes or :meth:`as_dict`.
    """

    _FIELDS = ("samples", "samples_read", *(f"skipped_{r}" for r in SKIP_REASONS), "filtered", "shards_read",
               "bad_shards")

    def __init__(self):
        self._values = {f: multiprocessing.Value("q", 0) for f in self._FIELDS}

    def add(self, field: str, n: int = 1) -> None:
        v = self._values[field]
        with v.get_lock():
            v.value += n

    def __getattr__(self, name):
        values = self.__dict__.get("_values")
        if values is not None and name in values:
            return values[name].value
        raise AttributeError(name)

    @property
    def bad_samples(self) -> int:
        """Samples skipped for any reason of :data:`SKIP_REASONS` (filtered ones are not bad)."""
        return sum(self._values[f"skipped_{r}"].value for r in SKIP_REASONS)

    def as_dict(self) -> dict:
        return {f: self._values[f].value for f in self._FIELDS}

    def __getstate__(self):
        # Shared values travel only to processes being spawned (DataLoader workers, ddp_spawn); elsewhere
        # (deepcopy, pickling to disk) the copy gets fresh local counters.
        from multiprocessing import context

        if context.get_spawning_popen() is not None:
            return {"_values": self._values}
        return {"_values": None, "_snapshot": self.as_dict()}

    def __setstate__(self, state):
        if state.get("_values") is not None:
            self._values = state["_values"]
        else:
            self.__init__()
            for k, v in state.get("_snapshot", {}).items():
                if k in self._values:
                    self._values[k].value = v

    def __repr__(self):
        return f"LoaderStats({self.as_dict()})"


class BadDataError(RuntimeError):
    """More than ``max_bad_fraction`` of the shards or samples read were bad (with ``on_error: skip``)."""


class FaultPolicy:
    """What a bad shard or sample does, and the counts (into ``stats``).

    With ``on_error="raise"`` the first bad shard or missing member raises (a corrupt image is still skipped and
    counted, as always). With ``"skip"`` a truncated or unreadable shard is skipped with one warning naming it
    (samples already read from it are kept; counted every pass, warned once per worker), a sample missing a needed
    member is skipped and counted per reason (one warning per reason and worker, then counts only), and
    :class:`BadDataError` stops the run when

    - bad shards > ``max_bad_fraction`` x max(shards seen, ``expected_shards``), or
    - bad samples > ``max_bad_fraction`` x max(samples read, ``min_samples``),

    checked at every bad event and again when a worker's stream ends (then with the samples actually read), so a
    wrong path or a forgotten ``embed`` fails within the first shards instead of training on nothing.
    ``expected_shards``: the shards one rank reads per pass (the denominator until that many were seen).
    """

    def __init__(self, stats: LoaderStats, on_error: str = "raise", max_bad_fraction: float = 0.1,
                 expected_shards: int = 1, min_samples: int = 100):
        if on_error not in ON_ERROR:
            raise ValueError(f"data.on_error={on_error!r} is not one of {ON_ERROR}")
        if not 0.0 <= float(max_bad_fraction) <= 1.0:
            raise ValueError(f"data.max_bad_fraction={max_bad_fraction} is not in [0, 1]")
        self.stats, self.on_error = stats, on_error
        self.max_bad_fraction = float(max_bad_fraction)
        self.expected_shards, self.min_samples = max(1, int(expected_shards)), max(1, int(min_samples))
        self._warned: set[str] = set()
        self._first: dict[str, str] = {}  # reason -> first message (named in BadDataError)

    @property
    def skip(self) -> bool:
        return self.on_error == "skip"

    def __getstate__(self):  # the warned set is per worker
        state = dict(self.__dict__)
        state["_warned"], state["_first"] = set(), {}
        return state

    def bad_shard(self, url: str, error: Exception) -> None:
        """A shard failed to read: raise ``error`` (``raise``), or count it, warn once, check the fraction."""
        if not self.skip:
            raise error
        self.stats.add("bad_shards")
        self._first.setdefault("shard", str(error))
        if f"shard:{url}" not in self._warned:  # once per shard and process, not again every pass
            self._warned.add(f"shard:{url}")
            log.warning("skipping unreadable shard %s (data.on_error=skip): %s", url, error)
        self.check()

    def shard_done(self) -> None:
        self.stats.add("shards_read")

    def bad_sample(self, reason: str, message: str, error: Exception | None = None) -> None:
        """A sample is unusable for ``reason`` (:data:`SKIP_REASONS`): raise ``error`` (``raise``, when given),
        else count it, warn on the first of its reason in this worker, check the fraction."""
        if error is not None and not self.skip:
            raise error
        self.stats.add(f"skipped_{reason}")
        self._first.setdefault(reason, message)
        if reason not in self._warned:
            self._warned.add(reason)
            log.warning("skipping sample: %s (further samples skipped for %s are counted as skipped_%s, "
                        "not logged)", message, reason, reason)
        self.check()

    def check(self, final: bool = False) -> None:
        """Raise :class:`BadDataError` when the bad fraction is exceeded (see the class docstring); ``final``:
        the worker's stream ended, so the samples read so far are the denominator."""
        if not self.skip:
            return
        s, frac = self.stats, self.max_bad_fraction
        bad_shards, shards = s.bad_shards, s.bad_shards + s.shards_read
        if bad_shards and bad_shards > frac * max(shards, 0 if final else self.expected_shards):
            raise BadDataError(
                f"data: {bad_shards} of {shards} shard(s) read could not be read, more than data.max_bad_fraction="
                f"{frac:g} (first: {self._first.get('shard', '?')}); check the shard paths")
        bad, read = s.bad_samples, s.samples_read
        if bad and bad > frac * max(read, 1 if final else self.min_samples):
            reasons = {r: getattr(s, f"skipped_{r}") for r in SKIP_REASONS}
            worst = max(reasons, key=reasons.get)
            counts = ", ".join(f"{r} {n}" for r, n in reasons.items() if n)
            first = self._first.get(worst) or next(iter(self._first.values()), "?")
            raise BadDataError(f"data: {bad} of {read} sample(s) read were skipped ({counts}), more than "
                               f"data.max_bad_fraction={frac:g}; first {worst}: {first}")


def expected_shards_per_rank(num_shards: int, world_size: int) -> int:
    return max(1, math.ceil(num_shards / max(1, world_size)))


__all__ = ["SKIP_REASONS", "ON_ERROR", "LoaderStats", "BadDataError", "FaultPolicy", "expected_shards_per_rank"]
