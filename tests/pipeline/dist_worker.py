"""Workers of the 2-rank gloo tests (their own small module so spawned children import little)."""

import os

import torch
import torch.distributed as dist

from unclip_pl.metrics.fid import FrechetFeatureDistance


def rank_main(rank, world, port, real, fake, out_dir):
    """Each rank adds an uneven share of the features; every rank saves the gathered FID it computed."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        metric = FrechetFeatureDistance()
        # uneven shards: rank 0 gets the first 37 real / 11 fake rows, rank 1 the rest
        cut_r, cut_f = 37, 11
        metric.update(real[:cut_r] if rank == 0 else real[cut_r:], real=True)
        metric.update(fake[:cut_f] if rank == 0 else fake[cut_f:], real=False)
        value = metric.compute()
        g_real, _ = metric.gathered()
        torch.save({"fid": value, "n_real": g_real.shape[0], "same_order": bool(torch.equal(g_real, real))},
                   os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()  # neither rank tears gloo down while the other still exchanges
    finally:
        dist.destroy_process_group()


def gather_rows_main(rank, world, port, out_dir):
    """``gather_rows`` with uneven rows (3 + 5, 0 + 4), int64 and 3-d rows, gradients and bad input; saves what
    this rank saw."""
    from unclip_pl.utils.distributed import gather_counts, gather_rows

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        n = (3, 5)[rank]
        rows = torch.arange(8 * 4, dtype=torch.float32).reshape(8, 4)[(slice(0, 3), slice(3, 8))[rank]]
        out = {"counts": gather_counts(n), "rows": gather_rows(rows)}
        out["empty_one"] = gather_rows(torch.full((4 * rank, 2), float(rank + 1)))  # rank 0 holds no rows
        out["tokens"] = gather_rows(torch.arange(n * 2 * 3).reshape(n, 2, 3) + 100 * rank)  # int64, (N, 2, 3)
        x = (rows + 0.0).requires_grad_(True)
        full = gather_rows(x, sync_grads=True)  # (8, 4)
        weights = torch.arange(8, dtype=torch.float32)[:, None]
        (full * weights).sum().backward()
        out["grad"] = x.grad
        out["no_grad"] = not gather_rows(x).requires_grad
        for name, bad in (("bad_trailing", lambda: gather_rows(torch.zeros(2, 3 + rank))),
                          ("bad_counts", lambda: gather_rows(rows, counts=[n]))):
            try:
                bad()
                out[name] = ""
            except ValueError as e:
                out[name] = str(e)
        torch.save(out, os.path.join(out_dir, f"gather_rank{rank}.pt"))
        dist.barrier()  # neither rank tears gloo down while the other still exchanges
    finally:
        dist.destroy_process_group()
