"""Loader counters shared between the main process and its DataLoader workers."""
from __future__ import annotations

import multiprocessing


class LoaderStats:
    """Counters shared by the main process and its DataLoader workers (shared memory).

    ``stats.skipped_corrupt`` -- images skipped because their bytes did not decode;
    ``stats.samples`` -- samples delivered in batches. Readable from the main process at any time.
    """

    _FIELDS = ("samples", "skipped_corrupt")

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
                self._values[k].value = v

    def __repr__(self):
        return f"LoaderStats({self.as_dict()})"


__all__ = ["LoaderStats"]
