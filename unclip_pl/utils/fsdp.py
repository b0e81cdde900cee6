"""FSDP helpers usable from Hydra configs (``conf/trainer/fsdp.yaml``)."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable

from hydra.utils import get_object
from torch import nn


def classes(names: Iterable[str]) -> set[type[nn.Module]]:
    """Resolve dotted class names (e.g. ``unclip_pl.nets.unet.ResBlock``) into the set of module classes that
    ``FSDPStrategy(auto_wrap_policy=..., activation_checkpointing_policy=...)`` accepts."""
    out = set()
    for name in names:
        cls = get_object(name)
        if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
            raise TypeError(f"{name} is not an nn.Module class")
        out.add(cls)
    return out


def size_policy(min_num_params: float = 1e7) -> Callable:
    """Wrap every submodule holding at least ``min_num_params`` parameters in its own FSDP unit (architecture
    independent: U-Net resolution levels and transformer blocks of the paper-size models qualify)."""
    from torch.distributed.fsdp.wrap import size_based_auto_wrap_policy

    return functools.partial(size_based_auto_wrap_policy, min_num_params=int(min_num_params))
