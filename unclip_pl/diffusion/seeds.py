"""The one rule that turns a user's seed into the seed of each random stream of sampling.

Every random draw of sampling with seeds (a stage's starting noise x_T, the step noise of DDPM and DDIM with
eta > 0, each best-of-N candidate's own x_T and step noise, every upsampler's noise) comes from a
``torch.Generator`` seeded with :func:`derive_seed` of (the item's seed, the stream, the step). The stream names
the stage and the purpose (and the candidate): ``"decoder/x_T/0"``, ``"prior/noise/1"``, ``"upsampler0/noise/0"``
(:func:`stream_name`). Seeds are a hash, not arithmetic on the seed, so no two streams share a seed (for example the
first step noise is not x_T again, and seed s of one stage is not seed s' of another), and each item's noise
depends on its own seed alone, so any image of a grid regenerates from its caption and seed.
"""
from __future__ import annotations

import hashlib
from collections.abc import Sequence

#: what a stream's draws are for: the starting noise, or the step noise of the stochastic samplers
PURPOSES = ("x_T", "noise")


def derive_seed(seed: int, stream: str, step: int = 0) -> int:
    """The seed (a non-negative 63-bit int) of one stream: 8 bytes of BLAKE2b over (seed, stream, step).

    Args:
        seed: the item's seed (any int).
        stream: the stream's name, e.g. ``stream_name("decoder", "x_T")``.
        step: the sampler step the draw is for (its index in the respaced schedule); 0 for x_T.
    """
    key = f"{int(seed)}|{stream}|{int(step)}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") & (2 ** 63 - 1)


def stream_name(stage: str, purpose: str, candidate: int = 0) -> str:
    """``"<stage>/<purpose>/<candidate>"``; stage e.g. "prior", "decoder", "upsampler0"; purpose one of
    :data:`PURPOSES`; candidate the index of a best-of-N candidate (0 otherwise)."""
    if purpose not in PURPOSES:
        raise ValueError(f"unknown stream purpose {purpose!r}; valid: {', '.join(PURPOSES)}")
    if "/" in stage:
        raise ValueError(f"a stage name cannot contain '/': {stage!r}")
    return f"{stage}/{purpose}/{int(candidate)}"


def row_seeds(seeds: Sequence[int], stage: str, purpose: str, per_seed: int = 1, step: int = 0) -> list[int]:
    """The seeds of a batch's rows: row ``i * per_seed + j`` (item i, candidate j) gets
    ``derive_seed(seeds[i], stream_name(stage, purpose, j), step)``. Length ``len(seeds) * per_seed``."""
    return [derive_seed(s, stream_name(stage, purpose, j), step) for s in seeds for j in range(int(per_seed))]
