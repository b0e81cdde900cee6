"""make_shards from a folder and from a CSV (function and CLI)."""
from __future__ import annotations

import csv

import numpy as np
from data_testutils import png_bytes, random_image

from unclip_pl.data.make_shards import main, make_shards
from unclip_pl.data.pipeline import build_pipeline
from unclip_pl.data.tar_reader import count_samples, iter_tar
from unclip_pl.data.transforms import tensor_to_uint8


def _folder(tmp_path, n=7):
    src = tmp_path / "imgs"
    (src / "sub").mkdir(parents=True)
    for i in range(n):
        d = src / "sub" if i % 2 else src
        (d / f"im.{i}.png").write_bytes(png_bytes(random_image(i, 24, 24)))
        (d / f"im.{i}.txt").write_text(f"  picture {i}\n")
    (src / "nocap.png").write_bytes(png_bytes(random_image(99, 24, 24)))
    (src / "broken.jpg").write_bytes(b"\xff\xd8 definitely not a jpeg")
    (src / "broken.txt").write_text("broken")
    (src / "empty.png").write_bytes(png_bytes(random_image(98, 24, 24)))
    (src / "empty.txt").write_text("   ")
    (src / "notes.md").write_text("ignored")
    return src


def test_folder(tmp_path):
    src = _folder(tmp_path)
    r = make_shards(src, tmp_path / "out", maxcount=3, prefix="pics")
    assert r["written"] == 7 and r["skipped"] == 3 and len(r["urls"]) == 3
    assert r["reasons"] == {"no caption": 1, "corrupt image": 1, "empty caption": 1}
    assert "wrote 7 samples in 3 shard(s)" in r["summary"] and "no caption: 1" in r["summary"]
    samples = [s for u in r["urls"] for s in iter_tar(u)]
    keys = [s["__key__"] for s in samples]
    assert len(set(keys)) == 7 and all("." not in k.split("/")[-1] for k in keys)
    p = build_pipeline(r["urls"], needs=("image", "txt"), image_size=24, batch_size=7)
    (b,) = list(p)
    by_txt = dict(zip(b["txt"], tensor_to_uint8(b["image"])))
    for i in range(7):
        np.testing.assert_array_equal(by_txt[f"picture {i}"], random_image(i, 24, 24))


def test_csv_and_cli(tmp_path, capsys):
    imgs = tmp_path / "raw"
    imgs.mkdir()
    rows = []
    for i in range(5):
        (imgs / f"{i}.png").write_bytes(png_bytes(random_image(i, 20, 30)))
        rows.append({"path": f"raw/{i}.png", "caption": f"row {i}"})
    rows.append({"path": "raw/missing.png", "caption": "gone"})
    rows.append({"path": str(imgs / "0.png"), "caption": "absolute path, same image"})
    table = tmp_path / "pairs.csv"
    with open(table, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["path", "caption"])
        w.writeheader()
        w.writerows(rows)
    assert main([str(table), str(tmp_path / "out"), "--maxcount", "4"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("wrote 6 samples in 2 shard(s)") and "image file missing: 1" in line
    assert count_samples([str(p) for p in sorted((tmp_path / "out").glob("*.tar"))]) == 6


def test_cli_bad_source(tmp_path, capsys):
    assert main([str(tmp_path / "nothing_here"), str(tmp_path / "out")]) == 2
    assert "nothing_here" in capsys.readouterr().err


def test_parquet_without_backend_is_clear(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def fake_import(name, *a, **k):
        if name.split(".")[0] in ("pandas", "pyarrow"):
            raise ImportError(name)
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    (tmp_path / "t.parquet").write_bytes(b"PAR1")
    try:
        make_shards(tmp_path / "t.parquet", tmp_path / "out")
    except SystemExit as e:
        assert "pyarrow" in str(e) and "CSV" in str(e)
    else:
        raise AssertionError("expected a clear error")
