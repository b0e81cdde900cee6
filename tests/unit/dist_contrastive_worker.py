"""Worker of the 2-rank gloo test of the contrastive feature gather (a small module: spawned children import little)."""

import os

import torch
import torch.distributed as dist

from unclip_pl.clip.contrastive import ContrastiveCLIP


def rank_main(rank, world, port, img, txt, cut, pad_to, out_dir):
    """Rank 0 holds rows [:cut], rank 1 the rest; saves its loss and the gradients of (loss * local rows)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        model = ContrastiveCLIP(model_cfg={"embed_dim": 8, "vision_cfg": {"image_size": 16, "width": 16, "layers": 1,
                                           "head_width": 8, "patch_size": 8},
                                           "text_cfg": {"width": 16, "heads": 2, "layers": 1}})
        rows = slice(0, cut) if rank == 0 else slice(cut, None)
        i = img[rows].clone().requires_grad_(True)
        t = txt[rows].clone().requires_grad_(True)
        out = model.contrastive_loss(i, t, pad_to=pad_to)
        (out["loss"] * i.shape[0]).backward()
        torch.save({"loss": out["loss"].detach(), "gi": i.grad, "gt": t.grad},
                   os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()  # neither rank tears gloo down while the other still exchanges
    finally:
        dist.destroy_process_group()
