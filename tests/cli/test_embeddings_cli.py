"""README "Train the prior on LAION embeddings": `python train.py prior=diffusion data=embeddings
data.embedding_folder=... data.metadata_folder=...` through train.py in a subprocess, on a tiny folder in the real
layout (float16 npy, parquet metadata with caption/url/key) made with the tiny CLIP's width; then the same run
resumed, continuing its data position; a CLIP of another width is one line."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.cli.conftest import Command, script
from tests.cli.test_train_cli import assert_run_dir
from tests.data.embedding_testutils import write_embedding_folder
from tests.helpers import tiny_clip_overrides, tiny_stage_overrides

D = 32  # the width of tiny_clip_overrides()


@pytest.fixture(scope="module")
def laion_like(tmp_path_factory):
    """``root`` (PROJECT_ROOT), a tiny random CLIP exported at D, and ``emb/`` + ``meta/``: 3 files x 8 rows of
    unit-norm float16 embeddings (the last file is val)."""
    from unclip_pl.clip import build_small_clip, export_clip
    from unclip_pl.clip.small import small_clip_config

    root = tmp_path_factory.mktemp("embeddings_root")
    torch.manual_seed(0)
    overrides = dict(embed_dim=D, vision_cfg={"image_size": 32, "width": 32, "layers": 1, "head_width": 16,
                                              "patch_size": 8},
                     text_cfg={"width": 32, "heads": 2, "layers": 1, "context_length": 77})
    clip_path = export_clip(build_small_clip("unclip-tiny", **overrides), "unclip-tiny",
                            small_clip_config("unclip-tiny", **overrides), root / "clip.pt")
    write_embedding_folder(root / "emb", [8, 8, 8], dim=D, metadata_folder=root / "meta")
    rng = np.random.default_rng(0)
    for part in ("img_emb", "text_emb"):  # real-looking values: unit-norm rows
        for path in sorted((root / "emb" / part).glob("*.npy")):
            x = rng.standard_normal((8, D))
            np.save(path, (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16))
    return {"root": root, "clip": clip_path}


def _args(laion_like, *extra):
    return [script("train.py"), "prior=diffusion", "data=embeddings", "data.embedding_folder=emb",
            "data.metadata_folder=meta", "data.num_workers=0", "data.batch_size=4",
            *tiny_clip_overrides(laion_like["clip"]), *tiny_stage_overrides("prior"),
            "trainer.check_val_every_n_epoch=1", "run_name=laion", *extra]


def test_prior_trains_on_an_embedding_folder_and_resumes_its_data_position(laion_like):
    root = laion_like["root"]
    done = Command(_args(laion_like, "trainer.max_steps=6"), root).wait().check()  # 16 train rows: 4 steps a pass
    out = done.stdout + done.stderr
    assert "split=files: val = the last 1 file(s) (2); train 16 rows, val 8 rows" in out
    run_dir = root / "logs" / "train" / "runs" / "laion"
    ckpt = assert_run_dir(run_dir, "prior", steps=6)
    state = ckpt["EmbeddingDataModule"]
    assert {k: state[k] for k in ("pass", "samples", "samples_per_rank")} == {"pass": 1, "samples": 8,
                                                                             "samples_per_rank": 8}
    rows = [line.split(",") for line in (run_dir / "csv" / "metrics.csv").read_text().splitlines()]
    col = rows[0].index("val/loss")  # validated on the held-out file after each pass
    assert [float(r[col]) for r in rows[1:] if r[col]] and all(np.isfinite(float(r[col])) for r in rows[1:] if r[col])
    # README "Run directories": the same run_name with a longer run continues, here from its data position
    done = Command(_args(laion_like, "trainer.max_steps=9"), root).wait().check()
    assert "data position from the checkpoint: pass 1, 8 samples consumed" in done.stdout + done.stderr
    state = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu",
                       weights_only=True)["EmbeddingDataModule"]
    assert (state["pass"], state["samples"]) == (2, 4)  # steps 7, 8 end pass 1; step 9 is the first of pass 2


def test_embeddings_of_another_width_than_the_clip_is_one_line(laion_like, in_process, tmp_path):
    write_embedding_folder(tmp_path / "emb768", [8, 8], dim=768)
    done = in_process("train.py", ["prior=diffusion", "data=embeddings", f"data.embedding_folder={tmp_path}/emb768",
                                   *tiny_clip_overrides(laion_like["clip"]), *tiny_stage_overrides("prior"),
                                   "data.num_workers=0", "trainer.max_steps=1"], tmp_path)
    assert done.returncode == 2
    lines = [ln for ln in done.stderr.splitlines() if ln.startswith("Config error:")]
    assert len(lines) == 1 and "holds 768-d CLIP embeddings but this run's CLIP (unclip-tiny) is 32-d" in lines[0]
    assert "clip=vit_l14" in lines[0]
