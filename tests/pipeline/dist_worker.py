"""Worker of the 2-rank gloo test (its own small module so spawned children import little)."""

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
    finally:
        dist.destroy_process_group()
