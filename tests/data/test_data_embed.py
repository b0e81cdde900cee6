"""embed_shards with a fake CLIP: members kept, embeddings added, atomic, resumable; datamodule embed cache."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from data_testutils import make_samples

from unclip_pl.data import embed as embed_mod
from unclip_pl.data.datamodule import ShardDataModule
from unclip_pl.data.embed import embed_shards
from unclip_pl.data.pipeline import build_pipeline
from unclip_pl.data.tar_reader import iter_tar
from unclip_pl.data.writer import write_shards


@pytest.fixture
def two_shards(tmp_path):
    s = make_samples(9)
    s[4]["png"] = b"corrupt"
    return write_shards(s, tmp_path / "in", maxcount=5)


def test_embed_two_shards(two_shards, tmp_path, fake_clip):
    outs = embed_shards(two_shards, tmp_path / "out", fake_clip, batch_size=3, progress=False, mode="copy")
    assert [os.path.basename(o) for o in outs] == ["shard-000000.tar", "shard-000001.tar"]
    assert sorted(os.listdir(tmp_path / "out")) == ["shard-000000.tar", "shard-000001.tar"]  # no temp files left
    ins = {s["__key__"]: s for u in two_shards for s in iter_tar(u)}
    got = [s for o in outs for s in iter_tar(o)]
    assert len(got) == 8 and "s00004" not in {s["__key__"] for s in got}  # corrupt image skipped
    for s in got:
        assert set(s) == {"__key__", "__url__", "png", "txt", "img_emb.npy", "txt_emb.npy"}
        assert s["png"] == ins[s["__key__"]]["png"] and s["txt"] == ins[s["__key__"]]["txt"]
    p = build_pipeline(outs, needs=("image", "txt", "img_emb", "txt_emb"), image_size=32, batch_size=8)
    (b,) = list(p)
    assert b["img_emb"].dtype == torch.float32 and b["img_emb"].shape == (8, 8)
    assert torch.allclose(b["img_emb"].norm(dim=-1), torch.ones(8), atol=2e-3)
    ref_img = fake_clip.encode_image(b["image"])
    ref_txt = fake_clip.encode_text(fake_clip.tokenize(b["txt"])).emb
    assert torch.allclose(b["img_emb"], ref_img, atol=2e-3) and torch.allclose(b["txt_emb"], ref_txt, atol=2e-3)


def test_resume_skips_finished_and_failure_leaves_no_partial(two_shards, tmp_path, fake_clip, monkeypatch):
    out = tmp_path / "out"
    first = embed_shards(two_shards[:1], out, fake_clip, progress=False)
    mtime = os.path.getmtime(first[0])
    calls = []
    real = embed_mod.embed_shard

    def failing_second(url, out_path, *a, **k):
        calls.append(os.path.basename(url))
        if len(calls) == 1:
            raise RuntimeError("interrupted")
        return real(url, out_path, *a, **k)

    monkeypatch.setattr(embed_mod, "embed_shard", failing_second)
    with pytest.raises(RuntimeError):
        embed_shards(two_shards, out, fake_clip, progress=False)
    assert calls == ["shard-000001.tar"]  # shard 0 was finished: skipped
    assert sorted(os.listdir(out)) == ["shard-000000.tar"]
    monkeypatch.setattr(embed_mod, "embed_shard", real)

    def crash_encode(*a, **k):
        raise RuntimeError("crash mid-shard")

    monkeypatch.setattr(embed_mod, "_encode", crash_encode)
    with pytest.raises(RuntimeError, match="mid-shard"):
        embed_shards(two_shards, out, fake_clip, progress=False)
    assert sorted(os.listdir(out)) == ["shard-000000.tar"]  # the temp file of the failed shard is gone
    monkeypatch.undo()
    outs = embed_shards(two_shards, out, fake_clip, progress=False)
    assert os.path.getmtime(first[0]) == mtime and len(outs) == 2
    before = fake_clip.image_calls
    embed_shards(two_shards, out, fake_clip, progress=False)  # everything done: nothing encoded
    assert fake_clip.image_calls == before


def test_datamodule_embeds_once_into_cache(tmp_path, fake_clip):
    urls = write_shards(make_samples(10), tmp_path / "src", maxcount=5)
    dm = ShardDataModule(urls, urls[:1], batch_size=4, num_workers=0, needs=("tokens", "img_emb", "txt_emb"),
                         embed_cache_dir=str(tmp_path / "cache"), clip=fake_clip)
    dm.prepare_data()
    calls = fake_clip.image_calls
    dm.setup("fit")
    assert fake_clip.image_calls == calls  # cached: setup did not re-embed
    b = next(iter(dm.train_dataloader()))
    assert set(b) == {"key", "txt", "tokens", "img_emb", "txt_emb"}
    assert b["tokens"].shape == (4, 16) and b["img_emb"].shape == (4, 8)
    dirs = sorted(p.name.split("-")[0] for p in (tmp_path / "cache" / "fake0001").iterdir())
    assert dirs == ["train", "val"]
    assert np.isfinite(b["txt_emb"].numpy()).all()


def test_cli_with_clip_argument(two_shards, tmp_path, fake_clip, monkeypatch, capsys):
    import unclip_pl.clip.frozen as frozen

    calls = []

    def fake_load_clip(model_name, pretrained=None, checkpoint=None, **kw):
        calls.append((model_name, pretrained, checkpoint))
        return fake_clip

    monkeypatch.setattr(frozen, "load_clip", fake_load_clip)
    in_dir = os.path.dirname(two_shards[0])
    assert embed_mod.main([in_dir, str(tmp_path / "o1"), "--clip", "ViT-B-32:openai", "--device", "cpu"]) == 0
    assert calls[-1] == ("ViT-B-32", "openai", None)
    assert len(os.listdir(tmp_path / "o1")) == 2
    # a conf/clip/<name>.yaml name goes through the config's loader
    assert embed_mod.main([in_dir, str(tmp_path / "o2"), "--clip", "small", "--checkpoint", "w.pt"]) == 0
    assert calls[-1][2] == "w.pt" and calls[-1][0]
    assert embed_mod.main([str(tmp_path / "none-{0..2}.tar"), str(tmp_path / "o3"), "--clip", "x"]) == 2
    assert "none-{0..2}.tar" in capsys.readouterr().err
