"""Exact data resume through the real entry point and the real ShardDataModule: a run stopped by SIGTERM after step
n and resumed in the same run directory trains on exactly the sample keys an uninterrupted run trains on from step
n on (recorded with ``data.log_keys``), on 1 rank and on 2 gloo ranks, with 0 and 2 loader workers, a shuffle
buffer, gradient accumulation, validation in between and stops mid-epoch or at an epoch's last batch; within a pass
no sample repeats or goes missing. A checkpoint without a data position resumes with one line saying so."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from ops_helpers import compose_ops, run_cli
from PIL import Image

from unclip_pl.data.writer import write_shards
from unclip_pl.train import fit

N_SAMPLES, PER_SHARD, BATCH = 40, 5, 4  # 8 shards; one pass = 10 batches on one rank


def _png(seed: int) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 255, (8, 8, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("shards")
    samples = ({"__key__": f"k{i:03d}", "png": _png(i), "txt": f"caption {i}"} for i in range(N_SAMPLES))
    write_shards(samples, out, prefix="train", maxcount=PER_SHARD)
    return out


def _data(shards, workers: int, buffer: int, batch: int = BATCH) -> list[str]:
    return ["data=ops_shards", f"data.train_urls={shards}", "data.val_urls=null", f"data.batch_size={batch}",
            f"data.num_workers={workers}", f"data.shuffle_buffer={buffer}", "data.log_keys=true",
            "prior.module.ema_decay=null"]


def _steps(run, rank: int = 0) -> list[tuple[int, list[str]]]:
    """``[(global step, keys of one batch), ...]`` in training order."""
    lines = (run / f"data_keys_rank{rank}.txt").read_text().splitlines()
    return [(int(step), keys.split()) for step, keys in (line.split("\t") for line in lines)]


def _check_passes(batches: list[list[str]], per_pass: int, all_keys: set[str] | None = None) -> None:
    """Consecutive ``per_pass`` batches form one pass: no key twice, and (one rank) every key once."""
    for start in range(0, len(batches) - per_pass + 1, per_pass):
        keys = [k for b in batches[start: start + per_pass] for k in b]
        assert len(keys) == len(set(keys)), f"a key repeats within the pass starting at batch {start}"
        if all_keys is not None:
            assert set(keys) == all_keys, f"the pass starting at batch {start} misses keys"


def _resume_matches(tmp_path, overrides: list[str], stop_at: int, steps: int):
    fit(compose_ops(overrides + [f"trainer.max_steps={steps}"], tmp_path / "ref"))
    run = tmp_path / "run"
    fit(compose_ops(overrides + [f"trainer.max_steps={steps}", f"prior.module.signal_at_step={stop_at}"], run))
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == stop_at + 1
    assert "ShardDataModule" in ckpt and ckpt["ShardDataModule"]["data_position"]["ranks"][0]["workers"]
    interrupted = _steps(run)
    fit(compose_ops(overrides + [f"trainer.max_steps={steps}"], run))  # same run directory: resume: auto
    ref, got = _steps(tmp_path / "ref"), _steps(run)
    assert got[: len(interrupted)] == interrupted and got[len(interrupted)][0] == stop_at + 1
    assert got == ref  # the resumed run reads on exactly where the interrupted one stopped
    return ref


@pytest.mark.parametrize("workers,stop_at,persistent", [(0, 4, False), (2, 6, True), (2, 9, False)])
def test_resume_one_rank_continues_the_sample_sequence(tmp_path, shards, workers, stop_at, persistent):
    """Mid-epoch (steps 4 and 6 of a 10-batch pass, 2 workers: the last batch came from worker 0) and at the
    pass's last batch (step 9: the next run starts the next pass); persistent workers or not."""
    over = _data(shards, workers, buffer=6) + [f"data.persistent_workers={str(persistent).lower()}"]
    ref = _resume_matches(tmp_path, over, stop_at, steps=16)
    assert len(ref) == 16
    _check_passes([keys for _, keys in ref], per_pass=N_SAMPLES // BATCH, all_keys={f"k{i:03d}" for i in
                                                                                       range(N_SAMPLES)})


def test_resume_with_accumulation_and_validation_in_between(tmp_path, shards):
    extra = [f"data.val_urls={shards}", "trainer.accumulate_grad_batches=2", "trainer.val_check_interval=3",
             "trainer.check_val_every_n_epoch=null", "trainer.limit_val_batches=2"]
    ref = _resume_matches(tmp_path, _data(shards, 2, buffer=6) + extra, stop_at=3, steps=7)
    assert [step for step, _ in ref] == [s for s in range(7) for _ in range(2)]  # 2 batches per optimiser step
    _check_passes([keys for _, keys in ref], per_pass=N_SAMPLES // BATCH)
    for name in ("ref", "run"):
        header, *rows = (tmp_path / name / "csv" / "metrics.csv").read_text().splitlines()
        col = header.split(",").index("val/loss")
        assert any(row.split(",")[col] for row in rows), f"{name}: no validation ran"


def test_resume_without_shuffle_buffer_skips_whole_shards(tmp_path, shards):
    """No sample shuffle: the shards read before the stop are skipped unopened, and the sequence is the same."""
    ref = _resume_matches(tmp_path, _data(shards, 0, buffer=0), stop_at=5, steps=9)
    assert len(ref) == 9


def test_resume_resampled_shards(tmp_path, shards):
    """data.resampled: shards drawn with replacement by a seeded RNG per (epoch, rank, worker), 6 steps per epoch."""
    over = _data(shards, 2, buffer=6) + ["data.resampled=true", "data.epoch_length=24"]
    ref = _resume_matches(tmp_path, over, stop_at=7, steps=10)
    assert len(ref) == 10


def test_checkpoint_without_data_position_restarts_the_epoch_with_one_line(tmp_path, shards, caplog):
    run = tmp_path / "run"
    over = _data(shards, 0, buffer=6)
    fit(compose_ops(over + ["trainer.max_steps=6", "prior.module.signal_at_step=2"], run))
    path = run / "checkpoints" / "last.ckpt"
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    del ckpt["ShardDataModule"]  # as written before checkpoints held a data position
    torch.save(ckpt, path)
    with caplog.at_level("INFO", logger="unclip_pl.data.datamodule"):
        fit(compose_ops(over + ["trainer.max_steps=6"], run))
    lines = [r.getMessage() for r in caplog.records if "holds no data position" in r.getMessage()]
    assert len(lines) == 1 and "restarts from the start of epoch 0" in lines[0]
    steps = _steps(run)
    assert [s for s, _ in steps] == [0, 1, 2, 3, 4, 5] and steps[3][1] == steps[0][1]  # the pass read anew


@pytest.mark.parametrize("workers,batch", [(0, BATCH), pytest.param(2, 5, marks=pytest.mark.slow)])
def test_resume_two_gloo_ranks_continues_each_ranks_sequence(tmp_path, shards, workers, batch):
    """2 CPU DDP processes (cycled shards split by rank), SIGTERM after step 2 on both, resumed: each rank's keys
    equal those of an uninterrupted 2-rank run; the ranks never share a key within a pass (with 2 workers a batch
    of 5: each worker's 2 shards of a pass make whole batches, so an epoch is exactly one pass)."""
    base = [f"paths.log_dir={tmp_path}", "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
            "trainer.precision=32-true", "trainer.max_steps=7", *_data(shards, workers, buffer=6, batch=batch)]
    for name, extra in (("ref", []), ("run", ["prior.module.signal_at_step=2"]), ("run", [])):
        out = run_cli(base + [f"run_name={name}", *extra], timeout=300)
        assert out.returncode == 0, (out.stdout[-2000:], out.stderr[-4000:])
    runs = tmp_path / "train" / "runs"
    for rank in (0, 1):
        assert _steps(runs / "run", rank) == _steps(runs / "ref", rank), f"rank {rank}"
    per_pass = N_SAMPLES // (2 * batch)  # steps per pass on each of the 2 ranks
    both = [_steps(runs / "ref", r) for r in (0, 1)]
    for start in range(0, 7 - per_pass + 1, per_pass):
        keys = [k for r in (0, 1) for _, b in both[r][start: start + per_pass] for k in b]
        assert len(keys) == len(set(keys)) == N_SAMPLES
