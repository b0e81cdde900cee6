"""The fault policy (data.on_error: raise | skip, data.max_bad_fraction): bad shards and samples skipped with one
warning and counted per reason, a clear one-line failure past the bad fraction, counts logged as metrics."""
from __future__ import annotations

import gc
import logging
import shutil
from types import SimpleNamespace

import pytest
from data_testutils import make_samples
from i2d_fixtures import truncate, write_img2dataset

from unclip_pl.callbacks.loader_stats import LoaderStatsMonitor
from unclip_pl.data.datamodule import ShardDataModule
from unclip_pl.data.decode import MissingKeyError
from unclip_pl.data.pipeline import build_pipeline
from unclip_pl.data.stats import BadDataError, FaultPolicy, LoaderStats
from unclip_pl.data.tar_reader import ShardError
from unclip_pl.data.writer import write_shards


@pytest.fixture
def ten_shards(tmp_path):
    """10 img2dataset shards x 8 samples (2 of 10 urls failed in each)."""
    return write_img2dataset(tmp_path / "i2d", n_shards=10)


def test_truncated_shard_raises_by_default(ten_shards):
    truncate(ten_shards["tars"][4])
    with pytest.raises(ShardError, match="truncated.*00004.tar"):
        list(build_pipeline(ten_shards["tars"], needs=("image",), image_size=16))


def test_truncated_shard_skipped_with_one_warning(ten_shards, caplog):
    bad = ten_shards["tars"][4]
    truncate(bad, keep=0.3)
    p = build_pipeline(ten_shards["tars"], needs=("image", "txt"), image_size=16, batch_size=100,
                       on_error="skip", max_bad_fraction=0.1)
    with caplog.at_level(logging.WARNING):
        (b,) = list(p)
    lines = [r.getMessage() for r in caplog.records if "unreadable shard" in r.getMessage()]
    assert len(lines) == 1 and bad in lines[0] and "\n" not in lines[0]
    good = [k for t in ten_shards["tars"] if t != bad for k in ten_shards["keys"][t]]
    assert set(good) <= set(b["key"]) and len(b["key"]) < 80  # the samples read before the cut are kept
    assert p.stats.bad_shards == 1 and p.stats.shards_read == 9


def test_too_many_bad_shards_fail_in_one_line(ten_shards, tmp_path):
    for t in ten_shards["tars"][:2]:
        truncate(t, keep=0.01)
    p = build_pipeline(ten_shards["tars"], needs=("image",), image_size=16, on_error="skip", max_bad_fraction=0.1)
    with pytest.raises(BadDataError) as e:
        list(p)
    msg = str(e.value)
    assert "\n" not in msg and "2 of" in msg and "max_bad_fraction=0.1" in msg and "00000.tar" in msg
    # a wrong path: every "shard" unreadable, the run stops at the second one instead of training on nothing
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    for i in range(50):
        (wrong / f"{i:05d}.tar").write_bytes(b"this is not a tar file" * 30)
    p = build_pipeline(wrong, needs=("image",), image_size=16, on_error="skip", max_bad_fraction=0.05)
    with pytest.raises(BadDataError, match="could not be read"):
        list(p)
    assert p.stats.bad_shards == 3  # 3 > 0.05 x 50 shards


def test_missing_members_skipped_and_counted_per_reason(tmp_path, caplog):
    s = make_samples(40, emb_dim=4)
    for i in (3, 9, 30):
        del s[i]["img_emb.npy"]
    del s[12]["txt"]
    del s[20]["png"]
    urls = write_shards(s, tmp_path / "m", maxcount=10)
    needs = ("image", "tokens", "img_emb", "txt_emb")
    tok = lambda texts: [[1]] * len(texts)  # noqa: E731
    with pytest.raises(MissingKeyError, match="'s00003'.*img_emb.npy"):
        list(build_pipeline(urls, needs=needs, image_size=16, tokenizer=tok))
    p = build_pipeline(urls, needs=needs, image_size=16, tokenizer=tok, batch_size=64, on_error="skip",
                       max_bad_fraction=0.2)
    with caplog.at_level(logging.WARNING, logger="unclip_pl.data.stats"):
        (b,) = list(p)
    assert len(b["key"]) == 35 and not {"s00003", "s00009", "s00012", "s00020", "s00030"} & set(b["key"])
    st = p.stats
    assert (st.skipped_no_img_emb, st.skipped_no_txt, st.skipped_no_image, st.samples_read) == (3, 1, 1, 40)
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == 3 and sum("no_img_emb" in m for m in warned) == 1  # one line per reason
    # more than max_bad_fraction of the samples: one line naming the worst reason and the command that fixes it
    p = build_pipeline(urls, needs=needs, image_size=16, tokenizer=tok, on_error="skip", max_bad_fraction=0.05)
    with pytest.raises(BadDataError) as e:
        list(p)
    msg = str(e.value)
    assert "\n" not in msg and "5 of 40" in msg and "no_img_emb 3" in msg and "unclip_pl.data.embed" in msg


def test_forgotten_embeddings_fail_early(tmp_path):
    """Shards without embeddings read with on_error=skip: fails within the first samples, not after a pass."""
    urls = write_shards(make_samples(300), tmp_path / "n", maxcount=100)
    p = build_pipeline(urls, needs=("txt", "img_emb"), batch_size=4, on_error="skip", max_bad_fraction=0.05)
    with pytest.raises(BadDataError, match="no_img_emb"):
        list(p)
    assert p.stats.samples_read == 6 and p.stats.samples == 0  # 6 > 0.05 x 100 (the minimum denominator)


def test_skip_counts_shared_across_workers(ten_shards):
    tars = ten_shards["tars"]
    truncate(tars[7], keep=0.01)
    dm = ShardDataModule(tars, tars, batch_size=8, num_workers=2, image_size=16, needs=("image", "txt"),
                         on_error="skip", max_bad_fraction=0.2, persistent_workers=False)
    dm.setup("fit")
    n = sum(len(b["key"]) for b in dm.val_dataloader())
    assert n == 72 and dm.stats["val"].bad_shards == 1 and dm.stats["val"].shards_read == 9
    gc.collect()


def test_policy_arguments_checked():
    with pytest.raises(ValueError, match="on_error='ignore'"):
        FaultPolicy(LoaderStats(), "ignore")
    with pytest.raises(ValueError, match="max_bad_fraction=2"):
        FaultPolicy(LoaderStats(), "skip", 2)


def test_counts_logged_as_metrics(tmp_path):
    stats = {"train": LoaderStats(), "val": LoaderStats()}
    stats["train"].add("skipped_no_txt", 3)
    stats["train"].add("bad_shards")
    stats["val"].add("skipped_corrupt", 2)
    logged = []
    module = SimpleNamespace(log_dict=lambda d, **kw: logged.append((d, kw)))
    trainer = SimpleNamespace(datamodule=SimpleNamespace(stats=stats), log_every_n_steps=2, sanity_checking=False)
    cb = LoaderStatsMonitor()
    cb.on_train_batch_end(trainer, module, None, None, 0)
    assert logged == []  # not a logging step
    cb.on_train_batch_end(trainer, module, None, None, 1)
    cb.on_validation_epoch_end(trainer, module)
    (train, kw), (val, _) = logged
    assert train["data/train/skipped_no_txt"] == 3.0 and train["data/train/bad_shards"] == 1.0 and kw["on_step"]
    assert val["data/val/skipped_corrupt"] == 2.0 and set(val) == {f"data/val/{k}" for k in stats["val"].as_dict()}
    trainer.datamodule = SimpleNamespace()  # a data module without counters logs nothing
    cb.on_train_batch_end(trainer, module, None, None, 1)
    assert len(logged) == 2


def test_defaults_raise_for_emoji_skip_for_shards():
    from tests.helpers import compose

    assert compose(["prior=diffusion"], "/tmp/x").data.on_error == "raise"
    cfg = compose(["prior=diffusion", "data=shards", "data.train_urls=a", "data.val_urls=b"], "/tmp/x")
    assert cfg.data.on_error == "skip" and cfg.data.max_bad_fraction == 0.05 and cfg.data.embeddings == "inline"
    assert "loader_stats" in cfg.callbacks


def test_copy_of_dir_reads_like_the_original(ten_shards, tmp_path):
    """The .parquet and _stats.json files travel with the shards and never reach the reader."""
    dst = tmp_path / "copy"
    shutil.copytree(ten_shards["tars"][0].rsplit("/", 1)[0], dst)
    p = build_pipeline(dst, needs=("image",), image_size=16, batch_size=100, on_error="skip")
    (b,) = list(p)
    assert len(b["key"]) == 80 and p.stats.bad_shards == 0 and p.stats.shards_read == 10


def test_sample_count_of_several_ranks_follows_the_policy(ten_shards, caplog):
    """With several ranks the epoch length is counted from the tar headers: a truncated shard raises, or with
    on_error=skip counts the samples before the cut (what the loader will read), with one warning."""
    from unclip_pl.data.tar_reader import count_samples

    truncate(ten_shards["tars"][2], keep=0.5)
    with pytest.raises(ShardError, match="00002.tar"):
        count_samples(ten_shards["tars"])
    with caplog.at_level(logging.WARNING):
        n = count_samples(ten_shards["tars"], skip_bad=True)
    assert 72 <= n < 80 and sum("00002.tar" in r.getMessage() for r in caplog.records) == 1


def test_bad_shard_warned_once_counted_every_pass(ten_shards, caplog):
    from unclip_pl.data.pipeline import TrainOrder

    truncate(ten_shards["tars"][1], keep=0.01)
    p = build_pipeline(ten_shards["tars"], needs=("image",), image_size=16, batch_size=100, on_error="skip",
                       max_bad_fraction=0.2, order=TrainOrder(shuffle_buffer=0))
    with caplog.at_level(logging.WARNING, logger="unclip_pl.data.stats"):
        for _ in range(3):  # three epochs
            assert sum(len(b["key"]) for b in p) == 72
    assert p.stats.bad_shards == 3 and len(caplog.records) == 1 and "00001.tar" in caplog.records[0].getMessage()
