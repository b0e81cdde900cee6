"""CLIPModule: contrastive training reduces the loss, logs retrieval metrics, exports a loadable CLIP."""

from __future__ import annotations

import os

import open_clip
import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset, default_collate

from unclip_pl.clip.frozen import load_clip, trim_tokens
from unclip_pl.lit.base import warmup_cosine
from unclip_pl.lit.clip import CLIPModule

os.environ["HF_HUB_OFFLINE"] = "1"

TINY_CFG = dict(
    embed_dim=32,
    vision_cfg={"image_size": 16, "width": 32, "layers": 1, "head_width": 16, "patch_size": 8},
    text_cfg={"width": 32, "heads": 2, "layers": 1},
)
WORDS = ["red", "blue", "green", "cat", "dog", "face", "heart", "star"]


class PairSet(Dataset):
    """n random 16px images, each with a caption; captions repeat every `n_captions` samples."""

    def __init__(self, n: int = 32, n_captions: int = 24, seed: int = 0):
        import open_clip

        g = torch.Generator().manual_seed(seed)
        self.images = torch.rand(n, 3, 16, 16, generator=g) * 2 - 1
        self.txt = [f"{WORDS[i % 8]} {WORDS[(i // 8) % 8]} {i % n_captions}" for i in range(n)]
        self.tokens = open_clip.SimpleTokenizer()(self.txt)

    def __len__(self):
        return len(self.txt)

    def __getitem__(self, i):
        return {"image": self.images[i], "tokens": self.tokens[i], "txt": self.txt[i]}


def _module(tmp_path, **kw):
    from functools import partial

    return CLIPModule(model_cfg=TINY_CFG, optimizer=partial(torch.optim.AdamW, lr=2e-3, weight_decay=0.01),
                      warmup_steps=2, export_path=str(tmp_path / "clip.pt"), **kw)


def test_training_reduces_loss_logs_and_exports(tmp_path):
    torch.manual_seed(0)
    data = PairSet()
    module = _module(tmp_path)
    batch = next(iter(DataLoader(data, batch_size=32)))
    with torch.no_grad():
        before = module.model.loss(batch)["loss"].item()
    trainer = pl.Trainer(max_steps=12, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         check_val_every_n_epoch=3)
    trainer.fit(module, DataLoader(data, batch_size=16, shuffle=True), DataLoader(data, batch_size=10))
    with torch.no_grad():
        after = module.model.loss(batch)["loss"].item()
    assert after < before - 0.5, (before, after)
    m = trainer.callback_metrics
    for key in ("val/loss", "val/i2t_top1", "val/i2t_top5", "val/t2i_top1", "val/t2i_top5"):
        assert key in m, key
    assert m["val/n_samples"] == 32  # every val sample (4 steps) was gathered
    assert m["val/i2t_top5"] >= m["val/i2t_top1"]
    # the export is the frozen CLIP for later stages, identical to the trained weights
    clip = load_clip("unclip-tiny", checkpoint=tmp_path / "clip.pt", embed_dim=32, image_size=16)
    img = clip.encode_image(batch["image"])
    module.eval()
    with torch.no_grad():
        ref = module.model.encode_image(batch["image"])
    torch.testing.assert_close(img, ref, atol=1e-5, rtol=1e-5)


def test_trimmed_training_loss_equals_untrimmed(tmp_path):
    torch.manual_seed(0)
    a = _module(tmp_path, trim_text=True)
    b = _module(tmp_path, trim_text=False)
    b.model.load_state_dict(a.model.state_dict())
    batch = next(iter(DataLoader(PairSet(), batch_size=8)))
    la, lb = a.model.loss(batch)["loss"], b.model.loss(batch)["loss"]
    torch.testing.assert_close(la, lb, atol=1e-5, rtol=1e-5)


def _trimming_collate(items):
    batch = default_collate(items)
    batch["tokens"] = trim_tokens(batch["tokens"])  # what the loader's TrimmingTokenizer does in the workers
    return batch


def test_validation_with_per_batch_trimmed_tokens(tmp_path):
    """Loader-trimmed val batches have different token lengths; validation pads them back and gets the same
    retrieval metrics as untrimmed batches."""
    data = PairSet(n=24)
    data.txt[3] = "a much longer caption " * 3 + data.txt[3]
    data.tokens = open_clip.SimpleTokenizer()(data.txt)
    lengths = {b["tokens"].shape[1] for b in DataLoader(data, batch_size=8, collate_fn=_trimming_collate)}
    assert len(lengths) > 1
    metrics = []
    for collate in (_trimming_collate, default_collate):
        torch.manual_seed(0)
        module = _module(tmp_path)
        trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False)
        trainer.validate(module, DataLoader(data, batch_size=8, collate_fn=collate), verbose=False)
        metrics.append({k: float(v) for k, v in trainer.callback_metrics.items()})
    assert metrics[0]["val/n_samples"] == 24
    for key in ("val/i2t_top1", "val/i2t_top5", "val/t2i_top1", "val/t2i_top5"):
        assert metrics[0][key] == pytest.approx(metrics[1][key]), key


def test_logit_scale_clamped(tmp_path):
    module = _module(tmp_path)
    with torch.no_grad():
        module.model.clip.logit_scale.fill_(10.0)
    out = module.model.loss(next(iter(DataLoader(PairSet(), batch_size=4))))
    assert out["logit_scale"].item() == pytest.approx(100.0, rel=1e-4)


def test_warmup_cosine_schedule():
    assert warmup_cosine(0, warmup=10, total=100, min_ratio=0.1) == pytest.approx(0.1)
    assert warmup_cosine(9, warmup=10, total=100, min_ratio=0.1) == pytest.approx(1.0)
    assert warmup_cosine(100, warmup=10, total=100, min_ratio=0.1) == pytest.approx(0.1)
    assert warmup_cosine(50, warmup=10, total=None, min_ratio=0.1) == 1.0


def test_clip_stage_loader_tokenizer_trims_only_when_exact(tmp_path):
    from unclip_pl.clip.frozen import TrimmingTokenizer

    assert isinstance(_module(tmp_path).loader_tokenizer, TrimmingTokenizer)
    assert not isinstance(_module(tmp_path, trim_text=False).loader_tokenizer, TrimmingTokenizer)
    non_causal = dict(TINY_CFG, text_cfg={**TINY_CFG["text_cfg"], "no_causal_mask": True, "pool_type": "first"})
    module = CLIPModule(model_cfg=non_causal)
    assert not isinstance(module.loader_tokenizer, TrimmingTokenizer)  # padding changes its outputs


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank, world, port, *args):
    from unit.dist_contrastive_worker import rank_main

    rank_main(rank, world, port, *args)


@pytest.mark.parametrize("pad_to", [None, 8])
def test_two_rank_gather_equals_one_big_batch(tmp_path, pad_to):
    """2 gloo ranks with uneven batches (5 + 3): each rank's loss is the single-process loss of its rows against the
    whole batch, and the gathered gradients sum to the single-process ones; pad_to (no host sync) changes nothing."""
    import sys
    from pathlib import Path

    import torch.multiprocessing as mp
    import torch.nn.functional as F

    from unclip_pl.clip.contrastive import ContrastiveCLIP

    g = torch.Generator().manual_seed(0)
    img = F.normalize(torch.randn(8, 8, generator=g), dim=-1)
    txt = F.normalize(img + 0.5 * torch.randn(8, 8, generator=g), dim=-1)
    cut = 5
    tests_dir = str(Path(__file__).resolve().parents[1])
    if tests_dir not in sys.path:
        sys.path.insert(0, tests_dir)
    mp.spawn(_rank_main, args=(2, _free_port(), img, txt, cut, pad_to, str(tmp_path)), nprocs=2, join=True)

    torch.manual_seed(0)  # the same weights (logit scale) as in the workers
    ref = ContrastiveCLIP(model_cfg={"embed_dim": 8, "vision_cfg": {"image_size": 16, "width": 16, "layers": 1,
                                     "head_width": 8, "patch_size": 8},
                                     "text_cfg": {"width": 16, "heads": 2, "layers": 1}})
    i, t = img.clone().requires_grad_(True), txt.clone().requires_grad_(True)
    scale = ref.clip.logit_scale.exp().detach()
    labels = torch.arange(8)
    per_row = 0.5 * (F.cross_entropy(scale * i @ t.T, labels, reduction="none")
                     + F.cross_entropy(scale * t @ i.T, labels, reduction="none"))
    per_row.sum().backward()
    res = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    torch.testing.assert_close(res[0]["loss"], per_row[:cut].mean().detach())
    torch.testing.assert_close(res[1]["loss"], per_row[cut:].mean().detach())
    torch.testing.assert_close(torch.cat([res[0]["gi"], res[1]["gi"]]), i.grad, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(torch.cat([res[0]["gt"], res[1]["gt"]]), t.grad, atol=1e-5, rtol=1e-4)


def test_a_run_stopped_to_be_resumed_keeps_its_clip_out_of_export_to(tmp_path):
    """A signal-stopped run (the preemption callback saved it to be resumed) exports into its run directory only;
    the shared copy (export_to) is left as it was, for the resumed run to fill when it completes."""
    from unclip_pl.callbacks.preemption import PreemptionCheckpoint

    class StopLikeASignal(PreemptionCheckpoint):
        def on_train_batch_end(self, trainer, *args):
            if trainer.global_step == 2:
                self.saved_path = str(tmp_path / "last.ckpt")  # what _save_and_stop records
                trainer.should_stop = True

    shared = tmp_path / "cache" / "clip.pt"
    for callbacks, exported in (([StopLikeASignal()], False), ([], True)):
        trainer = pl.Trainer(max_steps=3, accelerator="cpu", logger=False, enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                             limit_val_batches=0, callbacks=callbacks)
        trainer.fit(_module(tmp_path, export_to=str(shared)), DataLoader(PairSet(n=16), batch_size=4))
        assert (tmp_path / "clip.pt").exists() and shared.exists() == exported
