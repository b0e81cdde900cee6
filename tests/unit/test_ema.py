"""The weight EMA of every stage: warm-up decay, the update count surviving a checkpoint round trip, and one update
per optimiser step (not per micro-batch) in a real fit."""

import pytest
import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from unclip_pl.lit.base import EMA, StageModule


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


# ---------------------------------------------------------------------------------------------------------- in fit
class _Tiny(StageModule):
    """A linear regression stage; records the weights after every real optimiser step."""

    def __init__(self, manual: bool = False, accumulate: int = 1):
        torch.manual_seed(0)
        super().__init__(nn.Linear(3, 2), optimizer=lambda groups: torch.optim.SGD(groups, lr=0.1), ema_decay=0.95)
        self.automatic_optimization = not manual
        self.accumulate = accumulate
        self.initial = {k: v.clone() for k, v in self.model.state_dict().items()}
        self.after_steps: list[dict[str, torch.Tensor]] = []

    def compute_loss(self, batch):
        x, y = batch
        return {"loss": (self.model(x) - y).pow(2).mean()}

    def _record(self):
        self.after_steps.append({k: v.detach().clone() for k, v in self.model.state_dict().items()})

    def training_step(self, batch, batch_idx):
        loss = self.compute_loss(batch)["loss"]
        if self.automatic_optimization:
            return loss
        opt = self.optimizers()
        self.manual_backward(loss / self.accumulate)
        if (batch_idx + 1) % self.accumulate == 0:
            opt.step()
            opt.zero_grad()
            self._record()

    def optimizer_step(self, *args, **kwargs):  # automatic optimisation only
        super().optimizer_step(*args, **kwargs)
        self._record()


def _reference_ema(module: _Tiny, decay: float) -> dict[str, torch.Tensor]:
    ema = {k: v.clone() for k, v in module.initial.items()}
    for n, weights in enumerate(module.after_steps, start=1):
        d = min(decay, (1 + n) / (10 + n))
        ema = {k: d * ema[k] + (1 - d) * weights[k] for k in ema}
    return ema


@pytest.mark.parametrize("manual,batches,steps", [(False, 8, 4), (False, 5, 3), (True, 8, 4)])
def test_ema_updates_once_per_optimiser_step_with_accumulation(manual, batches, steps):
    """accumulate_grad_batches=2: one EMA update per optimiser step (also the epoch's last, partial window), and the
    EMA equals a reference averaged over the weights after each optimiser step."""
    g = torch.Generator().manual_seed(1)
    data = TensorDataset(torch.randn(batches * 4, 3, generator=g), torch.randn(batches * 4, 2, generator=g))
    module = _Tiny(manual=manual, accumulate=2)
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         **({} if manual else {"accumulate_grad_batches": 2, "gradient_clip_val": 1.0}))
    trainer.fit(module, DataLoader(data, batch_size=4))
    assert trainer.global_step == steps and len(module.after_steps) == steps
    assert int(module.ema.num_updates) == steps
    ref = _reference_ema(module, 0.95)
    for k, v in module.ema.module.state_dict().items():
        torch.testing.assert_close(v, ref[k], msg=k)
