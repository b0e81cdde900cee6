"""Built-in emoji data on a small subset."""
from __future__ import annotations

import io
import json

import numpy as np
from PIL import Image

from unclip_pl.data.emoji import (
    FORMAT_VERSION,
    MAX_VAL_FAMILY,
    EmojiDataModule,
    caption_from_name,
    codepoints,
    family_key,
    match_twemoji,
    prepare_emoji,
    split_codepoints,
)
from unclip_pl.data.tar_reader import iter_tar


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
    split = split_codepoints(cps)  # the preparer's default fraction
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


def test_family_key_joins_tones_genders_and_person_forms():
    surfers = ["1f3c4", "1f3c4-1f3fb", "1f3c4-1f3ff-200d-2640-fe0f", "1f3c4-200d-2642-fe0f"]
    assert {family_key(cp) for cp in surfers} == {"1f3c4"}
    technologists = ["1f468-200d-1f4bb", "1f469-1f3fd-200d-1f4bb", "1f9d1-200d-1f4bb"]  # man / woman / person
    assert len({family_key(cp) for cp in technologists}) == 1
    families = ["1f46a", "1f468-200d-1f469-200d-1f467", "1f469-200d-1f466"]
    assert {family_key(cp) for cp in families} == {"family"}
    assert family_key("1f491") == family_key("1f469-200d-2764-fe0f-200d-1f468") == family_key(
        "1f9d1-1f3fb-200d-2764-fe0f-200d-1f9d1-1f3ff")  # couple with heart, in every form
    assert family_key("1f3c3-200d-27a1-fe0f") == family_key("1f3c3")  # "facing right" is the mirrored form
    assert family_key("2640") == "2640" and family_key("1f600") != family_key("1f603")  # no over-merging


def test_no_family_spans_both_splits():
    """The whole data set: every skin-tone / gender / person form of an emoji lands in one split."""
    cps = [cp for cp, _, _ in match_twemoji()[0]]
    split = split_codepoints(cps)
    sides: dict[str, set[str]] = {}
    for cp in cps:
        sides.setdefault(family_key(cp), set()).add(split[cp])
    assert all(len(s) == 1 for s in sides.values()), [k for k, s in sides.items() if len(s) > 1][:5]
    val = [cp for cp in cps if split[cp] == "val"]
    assert 150 <= len(val) <= 300  # about 5% of the emoji, in whole families
    assert max(sum(family_key(c) == family_key(cp) for c in val) for cp in val) <= MAX_VAL_FAMILY
    # the example of a leak the per-code-point split had: surfers of two skin tones on both sides
    assert split["1f3c4-1f3ff"] == split["1f3c4-1f3fb"] == split["1f3c4-200d-2640-fe0f"]


def test_old_split_is_prepared_again_with_the_reason(tmp_path, capsys):
    root = tmp_path / "emoji"
    urls = prepare_emoji(root, limit=20, progress=False)
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["format"] == FORMAT_VERSION and manifest["counts"]["val_families"] >= 1
    (root / "manifest.json").write_text(json.dumps({**manifest, "format": 1}))
    capsys.readouterr()
    assert prepare_emoji(root, limit=20, progress=False) == urls
    err = capsys.readouterr().err
    assert "format 1" in err and "preparing it again" in err and "split by family" in err
    assert json.loads((root / "manifest.json").read_text())["format"] == FORMAT_VERSION
