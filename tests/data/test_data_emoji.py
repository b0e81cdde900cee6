"""Built-in emoji data on a small subset."""
from __future__ import annotations

import io
import json

import numpy as np
from PIL import Image

from unclip_pl.data.emoji import (EmojiDataModule, caption_from_name, codepoints, match_twemoji, prepare_emoji,
                                  split_codepoints)
from unclip_pl.data.shards import iter_tar


def test_caption_and_codepoints():
    assert caption_from_name(":A_button_(blood_type):") == "a button (blood type)"
    assert caption_from_name(":grinning_face_with_big_eyes:") == "grinning face with big eyes"
    assert codepoints("\U0001F600") == "1f600"
    assert codepoints("\u2764\ufe0f") == "2764-fe0f"


def test_matching_handles_fe0f_and_skin_tones():
    matched, unmatched = match_twemoji()
    caps = {cp: c for cp, _, c in matched}
    assert len(matched) > 3500 and len(unmatched) < 100
    assert caps["1f603"] == "grinning face with big eyes"
    assert caps["2764"] == "red heart"  # file has no fe0f, the emoji package's sequence does
    assert "skin tone" in caps["1f44b-1f3fd"]  # waving hand: medium skin tone
    assert all(c for c in caps.values())


def test_prepare_subset(tmp_path, capsys):
    root = tmp_path / "emoji"
    urls = prepare_emoji(root, limit=40)
    err = capsys.readouterr().err
    assert "Preparing the built-in emoji dataset" in err and "CC-BY 4.0" in err
    assert "matched 40" in err and "train" in err and "val" in err
    samples = {s: [x for u in urls[s] for x in iter_tar(u)] for s in ("train", "val")}
    assert len(samples["train"]) + len(samples["val"]) == 40 and samples["val"]
    for x in samples["train"] + samples["val"]:
        assert x["txt"].decode().strip()
        im = Image.open(io.BytesIO(x["png"]))
        assert im.mode == "RGB" and im.size == (72, 72)
        arr = np.asarray(im)
        assert (arr[0, 0] == 255).all() and (arr[-1, -1] == 255).all()  # transparent corners became white
    # deterministic split: same assignment from the hash, and the manifest is reused
    cps = [x["__key__"][1:] for s in ("train", "val") for x in samples[s]]
    split = split_codepoints(cps, 0.05)
    assert all(split[x["__key__"][1:]] == s for s in ("train", "val") for x in samples[s])
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["counts"]["matched"] == 40
    mtime = (root / "manifest.json").stat().st_mtime_ns
    assert prepare_emoji(root, limit=40) == urls
    assert (root / "manifest.json").stat().st_mtime_ns == mtime and "Preparing" not in capsys.readouterr().err


def test_partial_preparation_is_redone(tmp_path):
    root = tmp_path / "emoji"
    urls = prepare_emoji(root, limit=20, progress=False)
    (root / "manifest.json").unlink()  # as if interrupted before the manifest was written
    (root / "train-000000.tar").write_bytes(b"half")
    assert prepare_emoji(root, limit=20, progress=False) == urls
    assert len(list(iter_tar(urls["train"][0]))) > 0


def test_datamodule_prepares_on_first_use(tmp_path):
    dm = EmojiDataModule(root=str(tmp_path / "emoji"), limit=40, batch_size=8, num_workers=0, image_size=32)
    dm.prepare_data()
    dm.setup("fit")
    b = next(iter(dm.train_dataloader()))
    assert b["image"].shape == (8, 3, 32, 32) and len(b["txt"]) == 8
    assert b["image"].max() == 1.0  # white background
    n_val = sum(len(b["key"]) for b in dm.val_dataloader())
    assert n_val >= 1
