"""All-gather of per-rank rows whose count differs between ranks (validation embeddings, FID features, the
contrastive loss's negatives), written once.

``gather_rows(x (N_r, ...)) -> (sum_r N_r, ...)`` in rank order, identical on every rank; ``x`` itself when no
process group with several ranks is initialised. ``sync_grads=True`` keeps gradients through the exchange (each
rank's rows receive the sum over ranks of the gradients of their copies, as ``torch.distributed.nn.all_gather``).

Why our own: ``torch.distributed.all_gather`` and ``LightningModule.all_gather`` need the same shape on every rank
(Lightning stacks to (world, N, ...)), and torchmetrics' ``gather_all_tensors`` pads and trims but carries no
gradients, which the contrastive loss needs; one function here serves both.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    """True when torch.distributed is initialised with more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _comm_device() -> torch.device:
    """NCCL exchanges CUDA tensors (this rank's current device); every other backend CPU tensors."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _gather_shapes(shape: tuple[int, ...]) -> list[list[int]]:
    """Every rank's ``shape`` (the same number of dims on every rank), in rank order: one exchange, one host read."""
    local = torch.tensor(list(shape), dtype=torch.long, device=_comm_device())
    shapes = [torch.zeros_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(shapes, local)
    return torch.stack(shapes).tolist()


def gather_counts(n: int) -> list[int]:
    """Every rank's row count ``n``, in rank order; ``[n]`` without several ranks. A collective."""
    if not is_distributed():
        return [int(n)]
    return [s[0] for s in _gather_shapes((int(n),))]


def gather_rows(x: torch.Tensor, counts: list[int] | None = None, sync_grads: bool = False) -> torch.Tensor:
    """Concatenate ``x`` (N_r, ...) from every rank in rank order -> (sum_r N_r, ...), on x's device and dtype.

    Ranks may hold different N_r (0 included); the trailing dims must agree. ``counts``: every rank's N_r when the
    caller already has them (from :func:`gather_counts`, or a fixed size), which skips the count exchange.
    ``sync_grads``: differentiable (see the module docstring); otherwise the result carries no gradient.
    A collective: every rank must call it. Returns ``x`` unchanged without several ranks.
    """
    if x.ndim == 0:
        raise ValueError("gather_rows expects rows (N, ...), got a 0-d tensor")
    if not is_distributed():
        return x
    rank = dist.get_rank()
    if counts is None:
        shapes = _gather_shapes(tuple(x.shape))
        if any(s[1:] != list(x.shape[1:]) for s in shapes):
            raise ValueError(f"gather_rows: the ranks' trailing dims differ: shapes {shapes}")
        counts = [s[0] for s in shapes]
    counts = [int(c) for c in counts]
    if len(counts) != dist.get_world_size() or counts[rank] != x.shape[0]:
        raise ValueError(f"gather_rows: counts {counts} do not match world size {dist.get_world_size()} and "
                         f"this rank's {x.shape[0]} rows")
    n_max = max(counts)
    if n_max == 0:
        return x
    local = x.to(_comm_device()).contiguous()
    if not sync_grads:
        local = local.detach()
    if n_max > local.shape[0]:  # pad to the largest rank: all_gather needs equal shapes
        local = torch.cat([local, local.new_zeros((n_max - local.shape[0], *local.shape[1:]))])
    if sync_grads:
        import torch.distributed.nn.functional as dist_fn

        parts = list(dist_fn.all_gather(local))
    else:
        parts = [torch.empty_like(local) for _ in counts]
        dist.all_gather(parts, local)
    return torch.cat([p[:c] for p, c in zip(parts, counts)]).to(x.device)
