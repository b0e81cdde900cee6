"""The weight EMA of every stage: warm-up decay, and the update count surviving a checkpoint round trip."""

import torch
from torch import nn

from unclip_pl.lit.base import EMA


def test_ema_follows_warmup_decay():
    model = nn.Linear(2, 2, bias=False)
    ema = EMA(model, decay=0.999)
    start = ema.module.weight.clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model)  # n = 1: decay = min(0.999, 2 / 11)
    d = 2 / 11
    torch.testing.assert_close(ema.module.weight, d * start + (1 - d) * model.weight)


def test_ema_count_continues_after_state_dict_load():
    model = nn.Linear(2, 2)
    ema = EMA(model, decay=0.9)
    for _ in range(5):
        ema.update(model)
    restored = EMA(model, decay=0.9)
    restored.update(model)  # a count before loading must not leak into the restored one
    restored.load_state_dict(ema.state_dict())
    restored.update(model)
    assert int(ema.num_updates) == 5 and int(restored.num_updates) == 6
