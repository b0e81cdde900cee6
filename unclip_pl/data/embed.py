"""Add CLIP embeddings (``img_emb.npy``, ``txt_emb.npy``) to shards: by default as a sidecar shard set beside them.

    python -m unclip_pl.data.embed 'data/mine/shard-{000000..000009}.tar' data/mine_emb --clip ViT-B-32:openai
    python -m unclip_pl.data.embed data/mine data/mine_emb --clip small          # a conf/clip/*.yaml name
    python -m unclip_pl.data.embed data/mine data/mine_emb --clip ViT-B-32 --checkpoint path/to/weights.pt
    torchrun --nproc-per-node 8 -m unclip_pl.data.embed data/i2d data/i2d_emb --clip ...   # 8 GPUs, disjoint shards

One output shard per input shard (same file name). By default a *sidecar* shard: one sample per input sample,
same keys, same order, holding only ``KEY.img_emb.npy`` (+ ``KEY.txt_emb.npy`` when the sample has a caption), or
``KEY.embed_error.txt`` when the image does not decode; the input shards are never rewritten, and the loader reads
both in lockstep (``data.embeddings=sidecar data.sidecar_urls=OUT_DIR``). ``--copy`` writes the older layout
instead: every original member plus the embeddings (a second copy of every image), corrupt images left out.
Embeddings are float16 ``(D,)`` (the loader returns float32).

Each output is written to a temporary file and renamed when complete, so a finished output is never partial and a
re-run skips it (resumable). With several processes (``--rank R --world-size N``, or ``RANK`` / ``WORLD_SIZE`` as
torchrun sets them) process R embeds input shards R, R + N, R + 2N, ... of the sorted list (disjoint sets; on a GPU
machine each uses ``cuda:LOCAL_RANK``).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from tqdm.auto import tqdm

from .decode import IMAGE_EXTS
from .sidecar import ERROR_MEMBER, shard_name
from .tar_reader import ShardError, iter_tar
from .transforms import DECODE_ERRORS, decode_image, images_to_tensor
from .urls import expand_urls
from .writer import encode_sample

log = logging.getLogger(__name__)

MODES = ("sidecar", "copy")


def _out_name(url: str) -> str:
    return shard_name(url)


@torch.no_grad()
def _encode(clip, images: list[np.ndarray], texts: list[str], device) -> tuple[np.ndarray, np.ndarray]:
    """(N_images, D) and (N_texts, D) float16 image and text embeddings (either list may be empty)."""
    img = txt = np.zeros((0, 0), np.float16)
    if images:
        x = images_to_tensor(images).to(device)
        img = clip.encode_image(x).float().cpu().numpy().astype(np.float16)
    if texts:
        tokens = clip.tokenize(texts).to(device)
        txt = clip.encode_text(tokens).emb.float().cpu().numpy().astype(np.float16)
    return img, txt


def embed_shard(url: str, out_path: str | os.PathLike, clip, batch_size: int = 256, device=None,
                progress: tqdm | None = None, mode: str = "sidecar") -> dict:
    """Embed one shard into ``out_path`` (atomic), as a sidecar shard or a full copy (``mode``, see the module
    docstring). Returns counts ``{"written", "skipped_corrupt"}`` (sidecar: corrupt images get an error member)."""
    if mode not in MODES:
        raise ValueError(f"mode={mode!r} is not one of {MODES}")
    out_path = os.fspath(out_path)
    tmp = f"{out_path}.tmp{os.getpid()}"
    size = int(clip.image_size)
    written = skipped = 0
    pending: list[tuple[dict, np.ndarray | None, str | None]] = []  # (sample, image or None, error or None)

    def flush(writer):
        nonlocal written
        if not pending:
            return
        with_image = [a for _, a, _ in pending if a is not None]
        captions = [s["txt"].decode("utf-8") for s, a, _ in pending if a is not None and "txt" in s]
        img_emb, txt_emb = _encode(clip, with_image, captions, device)
        i = t = 0
        for s, arr, error in pending:
            if mode == "copy":
                out = {k: v for k, v in s.items() if k != "__url__"}
            else:
                out = {"__key__": s["__key__"]}
            if arr is None:
                out[ERROR_MEMBER] = error
            else:
                out["img_emb.npy"] = img_emb[i]
                i += 1
                if "txt" in s:
                    out["txt_emb.npy"] = txt_emb[t]
                    t += 1
            writer.write(encode_sample(out))
        written += len(with_image)
        if progress is not None:
            progress.update(len(pending))
        pending.clear()

    try:
        with open(tmp, "wb") as f:
            writer = wds.TarWriter(f, encoder=False, mtime=0.0)
            for s in iter_tar(url):
                ext = next((e for e in IMAGE_EXTS if e in s), None)
                if mode == "copy" and ext is None:
                    raise ShardError(f"sample {s['__key__']!r} in shard {url} has no image (png|jpg|webp) member; "
                                     f"write shards with: python -m unclip_pl.data.make_shards SRC OUT_DIR")
                if ext is None:
                    pending.append((s, None, "no image member"))
                    continue
                try:
                    arr = decode_image(s[ext], size)
                except DECODE_ERRORS as e:
                    skipped += 1
                    log.warning("skipping corrupt image: shard=%s key=%s (%s: %s)", url, s["__key__"],
                                type(e).__name__, e)
                    if mode == "sidecar":
                        pending.append((s, None, f"corrupt image: {type(e).__name__}: {e}"))
                    continue
                pending.append((s, arr, None))
                if len(pending) >= batch_size:
                    flush(writer)
            flush(writer)
            writer.close()
        os.replace(tmp, out_path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return {"written": written, "skipped_corrupt": skipped}


def rank_and_world(rank: int | None = None, world_size: int | None = None) -> tuple[int, int]:
    """``(rank, world_size)``: the arguments, else ``RANK`` / ``WORLD_SIZE`` from the environment, else (0, 1)."""
    rank = int(os.environ.get("RANK", 0)) if rank is None else int(rank)
    world = int(os.environ.get("WORLD_SIZE", 1)) if world_size is None else int(world_size)
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"rank {rank} is not in [0, world size {world})")
    return rank, world


def embed_shards(urls: str | Sequence[str], out_dir: str | os.PathLike, clip, batch_size: int = 256,
                 device=None, progress: bool = True, mode: str = "sidecar", rank: int = 0,
                 world_size: int = 1) -> list[str]:
    """Embed the input shards into ``out_dir`` (same file names). Finished outputs are skipped (resumable).

    Args:
        urls: shard spec (see ``expand_urls``).
        clip: FrozenCLIP-like object: ``image_size``, ``tokenize(list[str]) -> (B, L)``,
            ``encode_image((B, 3, S, S) in [-1, 1]) -> (B, D)``, ``encode_text(tokens).emb -> (B, D)``.
        device: defaults to CUDA (``cuda:LOCAL_RANK``, modulo the GPU count) when available; the CLIP is moved
            there if it is an ``nn.Module``.
        mode: ``"sidecar"`` (embeddings only, same keys and order) or ``"copy"`` (all members plus embeddings).
        rank / world_size: this process embeds input shards ``rank, rank + world_size, ...`` only.
    Returns:
        the output shard paths of all input shards, in input order (with ``world_size > 1``, those of other
        processes may not exist yet).
    """
    urls = expand_urls(urls)
    rank, world_size = rank_and_world(rank, world_size)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    outs = [str(out_dir / _out_name(u)) for u in urls]
    if len(set(outs)) != len(outs):
        raise ValueError("input shards must have distinct file names (one output per input, same name)")
    mine = [(u, o) for i, (u, o) in enumerate(zip(urls, outs)) if i % world_size == rank]
    todo = [(u, o) for u, o in mine if not os.path.exists(o)]
    if not todo:
        return outs
    if device is None:
        device = (f"cuda:{int(os.environ.get('LOCAL_RANK', 0)) % torch.cuda.device_count()}"
                  if torch.cuda.is_available() else "cpu")
    if isinstance(clip, torch.nn.Module):
        clip = clip.to(device).eval()
    who = f" (process {rank} of {world_size})" if world_size > 1 else ""
    log.info("embedding %d of %d shard(s)%s into %s on %s, %s mode (%d already done)", len(todo), len(mine), who,
             out_dir, device, mode, len(mine) - len(todo))
    totals = {"written": 0, "skipped_corrupt": 0}
    bar = tqdm(total=None, unit="img", desc=f"embed -> {out_dir.name}", disable=not progress, leave=False)
    try:
        for i, (u, o) in enumerate(todo):
            bar.set_postfix_str(f"shard {i + 1}/{len(todo)}")
            counts = embed_shard(u, o, clip, batch_size=batch_size, device=device, progress=bar, mode=mode)
            for k in totals:
                totals[k] += counts[k]
    finally:
        bar.close()
    msg = (f"embedded {len(todo)} shard(s){who} -> {out_dir} ({mode}): {totals['written']} samples embedded, "
           f"{totals['skipped_corrupt']} skipped (corrupt image)")
    log.info(msg)
    if progress:
        print(msg, file=sys.stderr)
    return outs


def load_clip_from_arg(clip: str, checkpoint: str | None = None):
    """``--clip`` value -> FrozenCLIP: a ``conf/clip/<name>.yaml`` name, or ``model_name[:pretrained]``."""
    from unclip_pl.clip.frozen import load_clip  # owned by the CLIP package; imported lazily

    root = Path(__file__).resolve().parents[2]
    conf_dir = root / "conf"
    if (conf_dir / "clip" / f"{clip}.yaml").exists():
        from hydra import compose, initialize_config_dir
        from hydra.utils import instantiate

        os.environ.setdefault("PROJECT_ROOT", str(root))
        with initialize_config_dir(config_dir=str(conf_dir), version_base="1.3"):
            cfg = compose(config_name="train", overrides=[f"clip={clip}"]).clip
        extra = {"checkpoint": checkpoint} if checkpoint else {}
        if "loader" in cfg:  # conf/clip/*.yaml: `loader` is a load_clip call
            return instantiate(cfg.loader, **extra)
        if "_target_" in cfg:
            return instantiate(cfg, **extra)
        kwargs = {k: cfg[k] for k in ("model_name", "pretrained", "checkpoint") if k in cfg}
        return load_clip(**{**kwargs, **extra})
    model_name, _, pretrained = clip.partition(":")
    return load_clip(model_name, pretrained or None, checkpoint=checkpoint)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m unclip_pl.data.embed", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("shards", help="input shards: directory, brace pattern, glob or URL")
    p.add_argument("out_dir", help="output directory (one shard per input shard, same names)")
    p.add_argument("--clip", required=True, help="conf/clip config name, or open_clip model_name[:pretrained]")
    p.add_argument("--checkpoint", default=None, help="local CLIP weights file")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--device", default=None, help="default: cuda (cuda:LOCAL_RANK) if available, else cpu")
    p.add_argument("--copy", action="store_true",
                   help="write full copies of the input shards with the embeddings added (doubles the storage) "
                        "instead of sidecar shards")
    p.add_argument("--rank", type=int, default=None, help="this process's index (default: $RANK, else 0)")
    p.add_argument("--world-size", type=int, default=None, help="number of processes (default: $WORLD_SIZE, else 1)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        urls = expand_urls(args.shards)
        rank, world = rank_and_world(args.rank, args.world_size)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    clip = load_clip_from_arg(args.clip, args.checkpoint)
    mode = "copy" if args.copy else "sidecar"
    outs = embed_shards(urls, args.out_dir, clip, batch_size=args.batch_size, device=args.device, mode=mode,
                        rank=rank, world_size=world)
    done = sum(os.path.exists(o) for o in outs)
    print(f"{done} of {len(outs)} {mode} shard(s) in {args.out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
