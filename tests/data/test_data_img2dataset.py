"""img2dataset output as it is (jpg + txt + json, failed samples absent, parquet and stats beside the tars),
json filters, sidecar embeddings read in lockstep, embed on several processes, and the embedding-folder join."""
from __future__ import annotations

import multiprocessing
import os

import numpy as np
import pytest
import torch
from i2d_fixtures import write_img2dataset

from unclip_pl.data import embed as embed_mod
from unclip_pl.data.datamodule import ShardDataModule
from unclip_pl.data.decode import MissingKeyError
from unclip_pl.data.embed import embed_shards
from unclip_pl.data.pipeline import build_pipeline
from unclip_pl.data.tar_reader import SidecarMismatch, iter_tar
from unclip_pl.data.urls import expand_urls


@pytest.fixture
def i2d(tmp_path):
    return {"dir": tmp_path / "i2d", **write_img2dataset(tmp_path / "i2d", no_caption=frozenset({5}),
                                                        small=frozenset({1, 2}))}


def test_shard_globbing_ignores_parquet_and_stats(i2d):
    d = i2d["dir"]
    assert sorted(os.listdir(d))[:3] == ["00000.parquet", "00000.tar", "00000_stats.json"]
    assert expand_urls(d) == i2d["tars"] and expand_urls(f"{d}/*") == i2d["tars"]
    assert expand_urls(f"{d}/{{00000..00002}}.tar") == i2d["tars"]


def test_reads_img2dataset_layout_image_only(i2d):
    """The upsampler's needs (image only): failed samples are absent, a sample with no caption is read."""
    p = build_pipeline(i2d["dir"], needs=("image",), image_size=16, batch_size=64)
    (b,) = list(p)
    want = [k for t in i2d["tars"] for k in i2d["keys"][t]]
    assert b["key"] == want and len(want) == 3 * 8  # 2 of 10 failed per shard
    assert "000005" in b["key"] and b["image"].shape == (24, 3, 16, 16)
    assert "txt" not in b  # one sample has no caption: no txt list
    assert p.stats.samples == 24 and p.stats.bad_samples == 0


def test_caption_needed_only_by_caption_stages(i2d):
    with pytest.raises(MissingKeyError, match=r"'000005'.*00000\.tar.*'txt'"):
        list(build_pipeline(i2d["dir"], needs=("image", "txt"), image_size=16))
    p = build_pipeline(i2d["dir"], needs=("image", "txt"), image_size=16, batch_size=64, on_error="skip",
                       max_bad_fraction=0.2)
    (b,) = list(p)
    assert len(b["key"]) == 21 and "000005" not in b["key"] and b["txt"][0].startswith("a photo number")
    assert p.stats.skipped_no_txt == 3  # url 5 of each shard has no caption


def test_min_original_size_filter_reads_json(i2d, tmp_path):
    from unclip_pl.data.filters import SampleFilter

    f = SampleFilter.from_config({"min_original_size": 32})
    p = build_pipeline(i2d["dir"], needs=("image",), image_size=16, batch_size=64, sample_filter=f)
    (b,) = list(p)
    assert len(b["key"]) == 24 - 6 and not {"000001", "000002", "000011"} & set(b["key"])
    assert p.stats.filtered == 6 and p.stats.bad_samples == 0
    assert SampleFilter.from_config({"min_original_size": None}) is None
    with pytest.raises(ValueError, match="unknown filter.*min_size.*min_original_size"):
        SampleFilter.from_config({"min_size": 3})
    # shards without json members: an error naming the member, or counted as no_json
    from data_testutils import make_samples

    from unclip_pl.data.writer import write_shards

    urls = write_shards(make_samples(4), tmp_path / "plain")
    with pytest.raises(MissingKeyError, match=r"'s00000'.*no 'json' member"):
        list(build_pipeline(urls, needs=("image",), image_size=16, sample_filter=f))
    from unclip_pl.data.stats import BadDataError

    with pytest.raises(BadDataError, match=r"4 of 4 sample\(s\).*no_json 4"):
        list(build_pipeline(urls, needs=("image",), image_size=16, sample_filter=f, on_error="skip"))


def test_embed_writes_sidecar_and_leaves_image_shards(i2d, tmp_path, fake_clip):
    before = {t: (os.path.getmtime(t), open(t, "rb").read()) for t in i2d["tars"]}
    first = i2d["tars"][0]
    outs = embed_shards(i2d["dir"], tmp_path / "emb", fake_clip, batch_size=3, progress=False)
    assert [os.path.basename(o) for o in outs] == ["00000.tar", "00001.tar", "00002.tar"]
    assert sorted(os.listdir(tmp_path / "emb")) == ["00000.tar", "00001.tar", "00002.tar"]
    for t in i2d["tars"]:
        assert (os.path.getmtime(t), open(t, "rb").read()) == before[t]  # never rewritten
    side = list(iter_tar(outs[0]))
    assert [s["__key__"] for s in side] == i2d["keys"][first]  # same keys, same order
    for s in side:
        want = {"__key__", "__url__", "img_emb.npy"} | ({"txt_emb.npy"} if s["__key__"] != "000005" else set())
        assert set(s) == want
    p = build_pipeline(i2d["dir"], needs=("image", "img_emb"), image_size=32, batch_size=64, sidecars=outs)
    (b,) = list(p)
    assert b["key"] == [k for t in i2d["tars"] for k in i2d["keys"][t]]
    assert torch.allclose(b["img_emb"], fake_clip.encode_image(b["image"]), atol=2e-3)


def test_sidecar_records_corrupt_images_and_stays_in_lockstep(tmp_path, fake_clip):
    from data_testutils import make_samples

    from unclip_pl.data.writer import write_shards

    s = make_samples(6)
    s[2]["png"] = b"not an image"
    urls = write_shards(s, tmp_path / "in", maxcount=6)
    (out,) = embed_shards(urls, tmp_path / "emb", fake_clip, progress=False)
    side = {x["__key__"]: x for x in iter_tar(out)}
    assert list(side) == [f"s{i:05d}" for i in range(6)] and side["s00002"]["embed_error.txt"].startswith(b"corrupt")
    p = build_pipeline(urls, needs=("image", "txt", "img_emb", "txt_emb"), image_size=32, batch_size=8,
                       sidecars=tmp_path / "emb")
    (b,) = list(p)
    assert len(b["key"]) == 5 and p.stats.skipped_corrupt == 1
    ref = fake_clip.encode_text(fake_clip.tokenize(b["txt"])).emb
    assert torch.allclose(b["txt_emb"], ref, atol=2e-3)


def test_sidecar_key_mismatch_names_both_shards(i2d, tmp_path, fake_clip):
    outs = embed_shards(i2d["dir"], tmp_path / "emb", fake_clip, progress=False)
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    for i, o in enumerate(outs):  # each sidecar renamed to the next shard's name
        os.link(o, wrong / os.path.basename(outs[(i + 1) % len(outs)]))
    p = build_pipeline(i2d["dir"], needs=("image", "img_emb"), image_size=16, sidecars=wrong, on_error="skip")
    with pytest.raises(SidecarMismatch) as e:
        list(p)
    msg = str(e.value)
    assert "\n" not in msg and str(wrong / "00000.tar") in msg and i2d["tars"][0] in msg
    with pytest.raises(FileNotFoundError, match="no sidecar shard for image shard.*00002.tar"):
        build_pipeline(i2d["dir"], needs=("img_emb",), sidecars=outs[:2])


def _embed_rank(args):
    urls, out, rank = args
    from data_testutils import FakeCLIP

    embed_shards(urls, out, FakeCLIP(), progress=False, rank=rank, world_size=2)
    return rank


def test_embed_on_two_processes_disjoint_and_resumable(i2d, tmp_path, fake_clip, monkeypatch):
    out = tmp_path / "emb"
    with multiprocessing.get_context("fork").Pool(2) as pool:
        assert sorted(pool.map(_embed_rank, [(i2d["tars"], str(out), r) for r in (0, 1)])) == [0, 1]
    assert sorted(os.listdir(out)) == ["00000.tar", "00001.tar", "00002.tar"]  # no temp files, all shards
    single = embed_shards(i2d["tars"], tmp_path / "one", fake_clip, progress=False)
    for o in single:  # the same bytes as one process writes
        assert open(o, "rb").read() == open(out / os.path.basename(o), "rb").read()
    # process 1 of 2 takes shard 1 only; everything is done, so nothing is encoded again
    calls = []
    monkeypatch.setattr(embed_mod, "embed_shard", lambda u, *a, **k: calls.append(u) or {"written": 0,
                                                                                      "skipped_corrupt": 0})
    (out / "00001.tar").unlink()
    embed_shards(i2d["tars"], out, fake_clip, progress=False, rank=0, world_size=2)
    assert calls == []
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert embed_mod.rank_and_world() == (1, 2)
    embed_shards(i2d["tars"], out, fake_clip, progress=False, rank=1, world_size=2)
    assert calls == [i2d["tars"][1]]
    with pytest.raises(ValueError, match="rank 2"):
        embed_mod.rank_and_world(2, 2)


def test_embed_cli_sidecar_default_copy_flag_and_rank(i2d, tmp_path, fake_clip, monkeypatch):
    import unclip_pl.clip.frozen as frozen

    monkeypatch.setattr(frozen, "load_clip", lambda *a, **k: fake_clip)
    d = str(i2d["dir"])
    assert embed_mod.main([d, str(tmp_path / "s"), "--clip", "x", "--device", "cpu", "--rank", "1",
                           "--world-size", "2"]) == 0
    assert os.listdir(tmp_path / "s") == ["00001.tar"]
    assert embed_mod.main([d, str(tmp_path / "c"), "--clip", "x", "--device", "cpu", "--copy"]) == 0
    copied = {s["__key__"]: s for s in iter_tar(str(tmp_path / "c" / "00000.tar"))}
    assert {"jpg", "txt", "json", "img_emb.npy", "txt_emb.npy"} <= set(copied["000000"])
    assert "txt_emb.npy" not in copied["000005"] and "img_emb.npy" in copied["000005"]  # no caption
    assert embed_mod.main([d, str(tmp_path / "x"), "--clip", "x", "--rank", "3", "--world-size", "2"]) == 2


def test_datamodule_sidecar_mode(i2d, tmp_path, fake_clip):
    embed_shards(i2d["dir"], tmp_path / "emb", fake_clip, progress=False)
    dm = ShardDataModule(i2d["tars"][:2], i2d["tars"][2:], batch_size=64, num_workers=0, image_size=32,
                         needs=("image", "tokens", "img_emb", "txt_emb"), tokenizer=fake_clip.tokenize,
                         embeddings="sidecar", sidecar_urls=str(tmp_path / "emb"), on_error="skip",
                         max_bad_fraction=0.5, shuffle_buffer=0)
    dm.setup("fit")
    (b,) = list(dm.train_dataloader())
    assert len(b["key"]) == 14 and dm.stats["train"].skipped_no_txt == 2  # 000005, 000015: no caption
    assert torch.allclose(b["img_emb"], fake_clip.encode_image(b["image"]), atol=2e-3)
    (v,) = list(dm.val_dataloader())  # val_sidecar_urls defaults to sidecar_urls
    assert v["key"] == [k for k in i2d["keys"][i2d["tars"][2]] if k != "000025"]
    with pytest.raises(ValueError, match="sidecar_urls"):
        ShardDataModule(i2d["tars"], embeddings="sidecar")
    with pytest.raises(ValueError, match="inline.*sidecar.*folder"):
        ShardDataModule(i2d["tars"], embeddings="inside")


def test_datamodule_joins_embedding_folder_by_key(i2d, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    keys = sorted(k for t in i2d["tars"] for k in i2d["keys"][t])
    keys.remove("000004")  # not in the folder: counted as no_img_emb
    folder = tmp_path / "emb_folder"
    for sub in ("img_emb", "text_emb", "metadata"):
        (folder / sub).mkdir(parents=True)
    img = np.stack([np.full(4, int(k), np.float16) for k in keys])
    half = len(keys) // 2
    for n, sl in ((0, slice(0, half)), (1, slice(half, None))):
        np.save(folder / "img_emb" / f"img_emb_{n}.npy", img[sl])
        np.save(folder / "text_emb" / f"text_emb_{n}.npy", -img[sl])
        pq.write_table(pa.table({"caption": [f"c {k}" for k in keys[sl]], "key": keys[sl]}),
                       folder / "metadata" / f"metadata_{n}.parquet")
    dm = ShardDataModule(i2d["tars"], None, batch_size=64, num_workers=0, image_size=16,
                         needs=("image", "img_emb", "txt_emb"), embeddings="folder",
                         embedding_folder=str(folder), on_error="skip", max_bad_fraction=0.5, shuffle_buffer=0)
    dm.setup("fit")
    (b,) = list(dm.train_dataloader())
    assert len(b["key"]) == 23 and "000004" not in b["key"] and dm.stats["train"].skipped_no_img_emb == 1
    want = torch.tensor([float(k) for k in b["key"]])
    assert torch.equal(b["img_emb"][:, 0], want) and torch.equal(b["txt_emb"][:, 3], -want)
    dm = ShardDataModule(i2d["tars"], None, num_workers=0, needs=("img_emb",), embeddings="folder",
                         embedding_folder=str(folder), shuffle_buffer=0)  # on_error=raise: one line naming both
    dm.setup("fit")
    with pytest.raises(MissingKeyError, match=r"'000004'.*00000\.tar.*not in the embedding folder .*emb_folder"):
        list(dm.train_dataloader())


# ------------------------------------------------------------------------------------ real img2dataset (slow)
def _img2dataset_bin() -> str | None:
    """``$IMG2DATASET`` (the executable, e.g. from a venv of its own: its pins differ from ours), else PATH."""
    import shutil

    exe = os.environ.get("IMG2DATASET") or shutil.which("img2dataset")
    return exe if exe and os.path.exists(exe) else None


@pytest.mark.slow
def test_real_img2dataset_output_matches_fixtures_and_trains_the_decoder(tmp_path):
    """img2dataset against a local HTTP server (127.0.0.1) serving a few PNG/JPEGs and one missing url: its output
    has the layout of :func:`write_img2dataset` (members, json fields, key format, files beside the tars), and
    embed + `train.py decoder=base` on it with sidecar embeddings runs a few steps."""
    import json
    import socket
    import subprocess
    import sys
    import tarfile
    import time

    from PIL import Image

    exe = _img2dataset_bin()
    if exe is None:
        pytest.skip("img2dataset not found: set IMG2DATASET=/path/to/img2dataset or put it on PATH")
    srv = tmp_path / "srv"
    srv.mkdir()
    rng = np.random.default_rng(0)
    names = []
    for i in range(9):
        name = f"img{i}.{'png' if i % 2 else 'jpg'}"
        Image.fromarray(rng.integers(0, 256, (40 + 4 * i, 56, 3), dtype=np.uint8)).save(srv / name)
        names.append(name)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory",
                               str(srv)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(100):  # until it accepts connections
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.1)
        base = f"http://127.0.0.1:{port}"
        rows = [f"{base}/{n},a picture number {i}" for i, n in enumerate(names)] + [f"{base}/missing.jpg,gone"]
        (tmp_path / "urls.csv").write_text("url,caption\n" + "\n".join(rows) + "\n")
        out = tmp_path / "i2d"
        done = subprocess.run([exe, "--url_list", str(tmp_path / "urls.csv"), "--input_format", "csv",
                               "--url_col", "url", "--caption_col", "caption", "--output_format", "webdataset",
                               "--output_folder", str(out), "--processes_count", "1", "--thread_count", "2",
                               "--image_size", "32", "--number_sample_per_shard", "5", "--enable_wandb", "False"],
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
    finally:
        server.kill()
        server.wait()

    assert sorted(os.listdir(out)) == ["00000.parquet", "00000.tar", "00000_stats.json", "00001.parquet",
                                       "00001.tar", "00001_stats.json"]
    fixture = write_img2dataset(tmp_path / "fixture", n_shards=1, per_shard=5)
    with tarfile.open(fixture["tars"][0]) as tf:
        want_meta = json.loads(tf.extractfile(next(n for n in tf.getnames() if n.endswith(".json"))).read())
    keys = []
    for tar in sorted(out.glob("*.tar")):
        samples = list(iter_tar(str(tar)))
        for s in samples:
            assert set(s) == {"__key__", "__url__", "jpg", "txt", "json"}
            meta = json.loads(s["json"])
            assert set(meta) == set(want_meta) and meta["status"] == "success" and meta["key"] == s["__key__"]
            assert len(s["__key__"]) == len(want_meta["key"])
        keys += [s["__key__"] for s in samples]
    stats = json.loads((out / "00001_stats.json").read_text())
    assert set(stats) == set(json.loads((tmp_path / "fixture" / "00000_stats.json").read_text()))
    assert len(keys) == 9 and stats["failed_to_download"] == 1  # the missing url is absent from the tars

    # embed into sidecar shards and train the decoder a few steps (tiny CLIP with random weights)
    from tests.cli.test_img2dataset_cli import write_tiny_clip
    from tests.helpers import tiny_clip_overrides, tiny_stage_overrides

    root = tmp_path / "root"
    write_tiny_clip(root / "data" / "cache" / "clip" / "unclip-tiny.pt")
    env = {**os.environ, "PROJECT_ROOT": str(root), "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    emb = subprocess.run([sys.executable, "-m", "unclip_pl.data.embed", str(out), str(root / "emb"), "--clip",
                          "small"], cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert emb.returncode == 0, emb.stderr[-3000:]
    train = subprocess.run([sys.executable, os.path.join(repo, "train.py"), "decoder=base", "data=shards",
                            f"data.train_urls={out}/00000.tar", f"data.val_urls={out}/00001.tar",
                            "data.embeddings=sidecar", f"data.sidecar_urls={root / 'emb'}", "data.num_workers=0",
                            "data.batch_size=2", "clip.autotrain=false", *tiny_clip_overrides(),
                            *tiny_stage_overrides("decoder"), "trainer.max_steps=3", "run_name=real_i2d"],
                           cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert train.returncode == 0, train.stderr[-3000:]
    ckpt = torch.load(root / "logs" / "train" / "runs" / "real_i2d" / "checkpoints" / "last.ckpt",
                      map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 3
