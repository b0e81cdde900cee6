"""The emoji decoders' defaults (conf/decoder/base.yaml, base_cliptext.yaml), as composed: a tiny decoder built from
them (v prediction), trained with the optimiser and the warm-up they set, overfits one batch; the paper's shape keeps
its own rate and eps prediction."""
import functools

import pytest
import torch
from hydra.utils import instantiate

from tests.helpers import compose, tiny_clip_overrides, tiny_stage_overrides
from unclip_pl.lit.base import warmup_cosine

B, S = 4, 16


def tiny_overrides(decoder: str) -> list[str]:
    """The real decoder config at the tiny test size, keeping its optimiser and its warm-up."""
    shape = [o for o in tiny_stage_overrides("decoder") if "warmup_steps" not in o]
    if decoder == "base_cliptext":
        shape = [o for o in shape if "text_encoder" not in o and "text_width" not in o]
    return [f"decoder={decoder}", "stage=decoder"] + tiny_clip_overrides() + shape


def one_batch(text_width: int, own_text: bool, clip_dim: int):
    g = torch.Generator().manual_seed(0)
    images = torch.rand(B, 3, S, S, generator=g) * 2 - 1
    emb = torch.nn.functional.normalize(torch.randn(B, clip_dim, generator=g), dim=-1)
    if own_text:
        return images, emb, {"tokens": torch.randint(1, 1000, (B, 12), generator=g)}
    states, mask = torch.randn(B, 9, text_width, generator=g), torch.ones(B, 9, dtype=torch.bool)
    return images, emb, {"text": (states, mask)}


@pytest.mark.parametrize("decoder", ["base", "base_cliptext"])
def test_tiny_decoder_with_the_defaults_overfits_one_batch(decoder, tmp_path):
    """Through the config's own optimiser, learning rate and warm-up (the whole warm-up and twice as many steps again):
    the loss at fixed (t, noise) falls at least 5x."""
    cfg = compose(tiny_overrides(decoder), tmp_path)
    module = cfg.decoder.module
    torch.manual_seed(0)
    model = instantiate(module.model, _convert_="partial")
    images, emb, cond = one_batch(int(cfg.decoder.text_width), decoder == "base", int(cfg.clip.embed_dim))
    # the defaults keep the training-time dropout of both conditions; evaluate without it
    model.clip_drop_prob, model.text_drop_prob = 0.0, 0.0

    def eval_loss() -> float:
        with torch.no_grad():
            return model.loss(images, emb, generator=torch.Generator().manual_seed(123), **cond)["loss"].item()

    opt = instantiate(module.optimizer)(model.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, functools.partial(
        warmup_cosine, warmup=int(module.warmup_steps), total=None, min_ratio=1.0))
    before = eval_loss()
    for _ in range(3 * max(int(module.warmup_steps), 20)):
        opt.zero_grad()
        model.loss(images, emb, **cond)["loss"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
    after = eval_loss()
    assert after < before / 5, (before, after)


def test_the_paper_shape_keeps_the_papers_rate_and_target(tmp_path):
    """decoder=paper inherits base's structure, not its short-run learning rate or its v prediction."""
    paper = compose(["decoder=paper", "stage=decoder"], tmp_path).decoder.module
    for name in ("base", "base_cliptext"):
        base = compose([f"decoder={name}", "stage=decoder"], tmp_path).decoder.module
        assert base.model.diffusion.target == "v" and base.optimizer.lr != paper.optimizer.lr
    assert paper.optimizer.lr == pytest.approx(1.2e-4) and paper.model.diffusion.target == "eps"
