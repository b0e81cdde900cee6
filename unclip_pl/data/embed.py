"""Add CLIP embeddings (``img_emb.npy``, ``txt_emb.npy``) to shards.

    python -m unclip_pl.data.embed 'data/mine/shard-{000000..000009}.tar' data/mine_emb --clip ViT-B-32:openai
    python -m unclip_pl.data.embed data/mine data/mine_emb --clip small          # a conf/clip/*.yaml name
    python -m unclip_pl.data.embed data/mine data/mine_emb --clip ViT-B-32 --checkpoint path/to/weights.pt

One output shard per input shard (same file name) holding every original member plus the two embeddings
(float16 ``(D,)``; the loader returns float32). Each output is written to a temporary file and renamed when
complete, so a finished output is never partial and a re-run skips it (resumable). Samples whose image does not
decode are left out and counted.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import webdataset as wds
from tqdm.auto import tqdm

from .decode import IMAGE_EXTS
from .tar_reader import ShardError, iter_tar
from .transforms import DECODE_ERRORS, decode_image, images_to_tensor
from .urls import expand_urls
from .writer import encode_sample

log = logging.getLogger(__name__)


def _out_name(url: str) -> str:
    name = url.rstrip("/").rsplit("/", 1)[-1]
    for ext in (".tar.gz", ".tgz"):
        if name.endswith(ext):
            name = name[: -len(ext)] + ".tar"
    return name if name.endswith(".tar") else name + ".tar"


@torch.no_grad()
def _encode(clip, images: list[np.ndarray], texts: list[str], device) -> tuple[np.ndarray, np.ndarray]:
    """(B, D) float16 image and text embeddings."""
    x = images_to_tensor(images).to(device)
    img = clip.encode_image(x)
    tokens = clip.tokenize(texts).to(device)
    txt = clip.encode_text(tokens).emb
    return img.float().cpu().numpy().astype(np.float16), txt.float().cpu().numpy().astype(np.float16)


def embed_shard(url: str, out_path: str | os.PathLike, clip, batch_size: int = 256, device=None,
                progress: tqdm | None = None) -> dict:
    """Embed one shard into ``out_path`` (atomic). Returns counts ``{"written", "skipped_corrupt"}``."""
    out_path = os.fspath(out_path)
    tmp = f"{out_path}.tmp{os.getpid()}"
    size = int(clip.image_size)
    written = skipped = 0
    pending: list[tuple[dict, np.ndarray]] = []

    def flush(writer):
        nonlocal written
        if not pending:
            return
        img_emb, txt_emb = _encode(clip, [a for _, a in pending], [s["txt"].decode("utf-8") for s, _ in pending],
                                   device)
        for (s, _), ie, te in zip(pending, img_emb, txt_emb):
            sample = {k: v for k, v in s.items() if k != "__url__"}
            sample["img_emb.npy"], sample["txt_emb.npy"] = ie, te
            writer.write(encode_sample(sample))
        written += len(pending)
        if progress is not None:
            progress.update(len(pending))
        pending.clear()

    try:
        with open(tmp, "wb") as f:
            writer = wds.TarWriter(f, encoder=False, mtime=0.0)
            for s in iter_tar(url):
                ext = next((e for e in IMAGE_EXTS if e in s), None)
                if ext is None or "txt" not in s:
                    missing = "txt" if "txt" not in s else "png|jpg|webp"
                    raise ShardError(f"sample {s['__key__']!r} in shard {url} has no {missing!r} member; "
                                     f"write shards with: python -m unclip_pl.data.make_shards SRC OUT_DIR")
                try:
                    arr = decode_image(s[ext], size)
                except DECODE_ERRORS as e:
                    skipped += 1
                    log.warning("skipping corrupt image: shard=%s key=%s (%s: %s)", url, s["__key__"],
                                type(e).__name__, e)
                    continue
                pending.append((s, arr))
                if len(pending) >= batch_size:
                    flush(writer)
            flush(writer)
            writer.close()
        os.replace(tmp, out_path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return {"written": written, "skipped_corrupt": skipped}


def embed_shards(urls: str | Sequence[str], out_dir: str | os.PathLike, clip, batch_size: int = 256,
                 device=None, progress: bool = True) -> list[str]:
    """Embed every input shard into ``out_dir`` (same file names). Finished outputs are skipped (resumable).

    Args:
        urls: shard spec (see ``expand_urls``).
        clip: FrozenCLIP-like object: ``image_size``, ``tokenize(list[str]) -> (B, L)``,
            ``encode_image((B, 3, S, S) in [-1, 1]) -> (B, D)``, ``encode_text(tokens).emb -> (B, D)``.
        device: defaults to CUDA when available; the CLIP is moved there if it is an ``nn.Module``.
    Returns:
        output shard paths, in input order.
    """
    urls = expand_urls(urls)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    outs = [str(out_dir / _out_name(u)) for u in urls]
    if len(set(outs)) != len(outs):
        raise ValueError("input shards must have distinct file names (one output per input, same name)")
    todo = [(u, o) for u, o in zip(urls, outs) if not os.path.exists(o)]
    if not todo:
        return outs
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if isinstance(clip, torch.nn.Module):
        clip = clip.to(device).eval()
    log.info("embedding %d of %d shard(s) into %s on %s (%d already done)", len(todo), len(urls), out_dir, device,
             len(urls) - len(todo))
    totals = {"written": 0, "skipped_corrupt": 0}
    bar = tqdm(total=None, unit="img", desc=f"embed -> {out_dir.name}", disable=not progress, leave=False)
    try:
        for i, (u, o) in enumerate(todo):
            bar.set_postfix_str(f"shard {i + 1}/{len(todo)}")
            counts = embed_shard(u, o, clip, batch_size=batch_size, device=device, progress=bar)
            for k in totals:
                totals[k] += counts[k]
    finally:
        bar.close()
    msg = (f"embedded {len(todo)} shard(s) -> {out_dir}: {totals['written']} samples written, "
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
    p.add_argument("--device", default=None, help="default: cuda if available else cpu")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        urls = expand_urls(args.shards)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    clip = load_clip_from_arg(args.clip, args.checkpoint)
    outs = embed_shards(urls, args.out_dir, clip, batch_size=args.batch_size, device=args.device)
    print(f"{len(outs)} embedded shard(s) in {args.out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
