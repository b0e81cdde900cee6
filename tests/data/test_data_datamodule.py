"""ShardDataModule / EmojiDataModule take everything through the constructor (as the training entry builds them)."""
from __future__ import annotations

from pathlib import Path

import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf

from unclip_pl.data.datamodule import ShardDataModule
from unclip_pl.data.emoji import EmojiDataModule
from unclip_pl.data.pipeline import AddKey

CONF = Path(__file__).resolve().parents[2] / "conf" / "data"


def test_clip_given_to_the_constructor_tokenizes(shard_dir, fake_clip):
    dm = ShardDataModule(shard_dir, shard_dir, batch_size=4, num_workers=0, needs=("txt", "tokens"), clip=fake_clip)
    dm.setup("fit")
    b = next(iter(dm.train_dataloader()))
    assert b["tokens"].shape == (4, fake_clip.context_length)
    assert b["tokens"].tolist() == fake_clip.tokenize(b["txt"]).tolist()


def test_clip_loader_tokenizer_preferred(shard_dir, fake_clip):
    fake_clip.loader_tokenizer = lambda texts: fake_clip.tokenize(texts)[:, :3]
    dm = ShardDataModule(shard_dir, None, batch_size=4, num_workers=0, needs=("txt", "tokens"), clip=fake_clip)
    dm.setup("fit")
    assert next(iter(dm.train_dataloader()))["tokens"].shape == (4, 3)


def test_train_batch_transform_runs_on_training_batches_in_workers(shard_dir):
    dm = ShardDataModule(shard_dir, shard_dir, batch_size=4, num_workers=1, needs=("txt",), persistent_workers=False,
                         train_batch_transform=AddKey("key", "n", len))
    dm.setup("fit")
    assert all(b["n"] == len(b["key"]) for b in dm.train_dataloader())
    assert all("n" not in b for b in dm.val_dataloader())  # validation batches are as read


def test_image_size_none_means_64(shard_dir):
    assert ShardDataModule(shard_dir, None).image_size == 64
    dm = ShardDataModule(shard_dir, None, image_size=16, batch_size=4, num_workers=0)
    dm.setup("fit")
    assert next(iter(dm.train_dataloader()))["image"].shape == (4, 3, 16, 16)


@pytest.mark.parametrize("name", ["shards", "emoji"])
def test_configs_instantiate_as_the_training_entry_does(tmp_path, shard_dir, fake_clip, name):
    cfg = OmegaConf.load(CONF / f"{name}.yaml")
    assert "needs" not in cfg and cfg.image_size is None  # the stage decides both
    if name == "shards":
        cfg.train_urls = cfg.val_urls = str(shard_dir)
    else:
        cfg.root = str(tmp_path / "emoji")
    transform = AddKey("key", "n", len)
    dm = instantiate(cfg, batch_size=8, needs=("txt", "tokens"), image_size=32, tokenizer=None, clip=fake_clip,
                     train_batch_transform=transform)
    assert isinstance(dm, EmojiDataModule if name == "emoji" else ShardDataModule)
    assert (dm.batch_size, dm.needs, dm.image_size) == (8, ("txt", "tokens"), 32)
    assert dm.clip is fake_clip and dm.train_batch_transform is transform and dm.tokenizer is None
    if name == "shards":
        dm.setup("fit")
        b = next(iter(dm.train_dataloader()))
        assert b["n"] == 8 and b["tokens"].shape == (8, fake_clip.context_length)


def test_defaults_without_clip_or_transform(shard_dir):
    dm = ShardDataModule(shard_dir, None)
    assert dm.clip is None and dm.train_batch_transform is None and dm.needs == ("image", "txt")
