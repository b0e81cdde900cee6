"""The checkpoint the preemption callback writes is often the last thing a killed job leaves (``scontrol requeue``
sends SIGTERM, then SIGKILL after SLURM's KillWait): on its own it must resume to an uninterrupted run's weights,
EMA included (the module's EMA update of that step runs after the callbacks' ``on_train_batch_end``)."""

from __future__ import annotations

import torch
from ops_helpers import compose_ops

from unclip_pl.checkpoint import verify_checkpoint
from unclip_pl.train import fit

STEPS = 6
#: ModelCheckpoint writes no last.ckpt at the end of training: the one there is the preemption callback's.
ONLY_PREEMPTION_SAVE = ["callbacks.checkpoint.save_last=false"]


def test_preemption_checkpoint_alone_resumes_exactly(tmp_path):
    fit(compose_ops([f"trainer.max_steps={STEPS}"], tmp_path / "ref"))
    ref = verify_checkpoint(tmp_path / "ref" / "checkpoints" / "last.ckpt")["state_dict"]

    run = tmp_path / "run"
    fit(compose_ops([f"trainer.max_steps={STEPS}", "prior.module.signal_at_step=2", *ONLY_PREEMPTION_SAVE], run))
    saved = verify_checkpoint(run / "checkpoints" / "last.ckpt")
    assert saved["global_step"] == 3 and int(saved["state_dict"]["ema.num_updates"]) == 3

    fit(compose_ops([f"trainer.max_steps={STEPS}"], run))  # resume: auto, from the callback's checkpoint
    got = verify_checkpoint(run / "checkpoints" / "last.ckpt")
    assert got["global_step"] == STEPS
    for k in ref:
        torch.testing.assert_close(got["state_dict"][k], ref[k], rtol=1e-5, atol=1e-6, msg=k)
