"""README "Sampling": `python sample.py mode=...` through sample.py in subprocesses, on the session's tiny
checkpoints (`stages`): every mode writes its PNG grid and JSON of settings into logs/sample/runs/<time>/ (or, for
the modes run as one multirun, logs/sample/multiruns/<time>/<job>/); a wrong checkpoint is one line on stderr."""

from __future__ import annotations

import json
import re

import pytest
from PIL import Image

from tests.cli.conftest import SWEPT_MODES
from tests.helpers import grid_size

TIME_STAMP = re.compile(r"\d{4}-\d{2}-\d{2}_\d{2}-\d{2}-\d{2}")
FINAL, DECODED = 32, 16  # image side after the upsampler / out of the decoder (tests/helpers.tiny_stage_overrides)


def run_output(stages, name: str):
    """The PNG grid and JSON record ``<name>.png/.json`` of a single (not multirun) sample.py run, found in its run
    directory logs/sample/runs/<date>_<time>/."""
    pngs = list((stages["root"] / "logs" / "sample" / "runs").glob(f"*/{name}.png"))
    assert len(pngs) == 1, pngs
    run_dir = pngs[0].parent
    assert TIME_STAMP.fullmatch(run_dir.name) and (run_dir / "sample.log").is_file()
    return Image.open(pngs[0]), json.loads((run_dir / f"{name}.json").read_text())


def test_text_to_image(stages, launched):
    """python sample.py mode=text prompt="grinning face" n=4 checkpoints.prior=... checkpoints.decoder=...
    checkpoints.upsamplers=[...]: one row of 4 upsampled images, each with seed 0 + i."""
    launched["text"].wait().check()
    img, rec = run_output(stages, "text")
    assert img.size == grid_size(4, 4, FINAL)
    assert rec["captions"] == ["grinning face"] and rec["seeds"] == [0, 1, 2, 3] and rec["use_prior"] is True
    assert rec["num_images"] == 4 and rec["image_size"] == FINAL
    assert rec["checkpoints"]["decoder"] == str(stages["decoder"])
    assert rec["checkpoints"]["upsamplers"] == [str(stages["upsampler"])]
    assert rec["settings"]["decoder"]["steps"] == 2, "the sampler defaults to the checkpoint's sample: block"


def test_variations_from_inversion(stages, launched):
    """python sample.py mode=variations image=face.png invert=true checkpoints.decoder=...: the input image and
    4 variations at the decoder's size, sampled from the image's DDIM inversion with eta > 0."""
    launched["variations_inverted"].wait().check()
    img, rec = run_output(stages, "variations")
    assert img.size == grid_size(5, 5, DECODED)
    assert rec["invert"] is True and rec["eta"] > 0 and rec["image"] == "face.png"
    assert rec["checkpoints"]["prior"] is None and rec["checkpoints"]["upsamplers"] == []


@pytest.fixture(scope="module")
def swept(stages, launched):
    """The multirun over the other modes: {mode: (PNG image, JSON record)}."""
    done = launched["modes"].wait().check()
    sweeps = list((stages["root"] / "logs" / "sample" / "multiruns").iterdir())
    assert len(sweeps) == 1 and TIME_STAMP.fullmatch(sweeps[0].name)
    out = {}
    for job, mode in enumerate(SWEPT_MODES):  # Hydra numbers the jobs in the order of the sweep
        job_dir = sweeps[0] / str(job)
        assert (job_dir / f"{mode}.png").is_file(), f"{mode}: {sorted(p.name for p in job_dir.iterdir())}\n" \
                                                    f"{done.stderr[-2000:]}"
        out[mode] = Image.open(job_dir / f"{mode}.png"), json.loads((job_dir / f"{mode}.json").read_text())
    return out


# mode -> (images in the grid, images per row) for prompt=[2 captions] n=2 k=3 thetas=[0,0.5] scales=[1,3]
LAYOUT = {
    "variations": (1 + 2, 3),      # input image (generated from the first caption) + n variations
    "interpolate": (2 + 3, 5),     # image, k slerp points, image_b
    "textdiff": (1 + 2, 3),        # input image + one decode per theta
    "conditioning": (3 * 2, 2),    # 3 rows (caption only / CLIP text emb / prior emb) x 2 captions
    "guidance": (2 * 2, 2),        # one row of n per guidance scale
    "probe": (1 + 2, 3),           # input image + n variations
}


@pytest.mark.parametrize("mode", SWEPT_MODES)
def test_mode(swept, mode):
    img, rec = swept[mode]
    n, nrow = LAYOUT[mode]
    assert rec["mode"] == mode and rec["num_images"] == n and rec["image_size"] == FINAL
    assert img.size == grid_size(n, nrow, FINAL)
    if mode in ("variations", "interpolate", "textdiff", "probe"):
        assert rec["image"] == {"generated_from": "grinning face", "seed": 10_000}
    if mode == "interpolate":
        assert rec["image_b"] == {"generated_from": "red heart", "seed": 10_001} and rec["k"] == 3
    if mode == "textdiff":
        assert (rec["caption"], rec["new_caption"], rec["thetas"]) == ("grinning face", "red heart", [0.0, 0.5])
    if mode == "conditioning":
        assert len(rec["rows"]) == 3 and rec["captions"] == ["grinning face", "red heart"]
    if mode == "guidance":
        assert rec["scales"] == [1.0, 3.0] and rec["z_i"] == "prior samples"
    if mode == "probe":
        probs = rec["probs"]
        assert set(probs) == {"a grinning face", "a red heart", "a car"}
        assert abs(sum(probs.values()) - 1.0) < 1e-3 and rec["top_label"] == max(probs, key=probs.get)


def one_line_error(done) -> str:
    """A usage error: exit code 2 and exactly one line on stderr (no traceback, no log lines); returns it."""
    assert done.returncode == 2, (done.returncode, done.stderr[-3000:])
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, done.stderr
    return lines[0]


@pytest.mark.parametrize("given_as, key, reason", [
    ("decoder", "prior", "this is a checkpoint of the prior stage, not of the decoder"),
    ("prior", "decoder", "this is a checkpoint of the decoder stage, not of the prior"),
    ("upsampler", "decoder", "this is a checkpoint of the decoder stage, not of the upsampler"),
    ("decoder", "clip", "a CLIP weights file, not a prior/decoder/upsampler checkpoint"),
    ("decoder", "missing", "file not found"),
    ("prior", "directory", "a directory, not a checkpoint file"),
    ("upsampler", "png", "not a PyTorch checkpoint file"),
    ("decoder", "empty", "empty file (0 bytes)"),
    ("prior", "truncated", "not a PyTorch checkpoint file, or a truncated or corrupt one"),
])
def test_wrong_checkpoint_is_one_line(stages, inputs, in_process, tmp_path, given_as, key, reason):
    """A checkpoint of another stage, a CLIP, a missing file, a folder, an image, an empty or truncated file given
    to sample.py as a stage's checkpoint: exit 2 and one line on stderr naming the stage and the path."""
    bad = {"clip": stages["clip"], "missing": tmp_path / "nowhere.ckpt", "directory": tmp_path,
           "png": inputs / "face.png", "empty": tmp_path / "empty.ckpt", "truncated": tmp_path / "cut.ckpt"}
    (tmp_path / "empty.ckpt").touch()
    (tmp_path / "cut.ckpt").write_bytes(stages["decoder"].read_bytes()[:5000])
    path = bad.get(key) or stages[key]
    ck = {"prior": None, "decoder": stages["decoder"], "upsampler": None, given_as: path}
    args = ["mode=text", "prompt=x", f"checkpoints.decoder={ck['decoder']}"]
    args += [f"checkpoints.prior={ck['prior']}"] if ck["prior"] else []
    args += [f"checkpoints.upsamplers=[{ck['upsampler']}]"] if ck["upsampler"] else []
    line = one_line_error(in_process("sample.py", args, stages["root"]))
    assert line.startswith(f"sample.py: {given_as} checkpoint {path}: ") and reason in line, line


def test_wrong_checkpoint_in_a_new_interpreter(stages, launched):
    """The same through a new `python sample.py` process: nothing else reaches stderr."""
    line = one_line_error(launched["wrong_stage"].wait())
    assert line == (f"sample.py: decoder checkpoint {stages['prior']}: this is a checkpoint of the prior stage, "
                    f"not of the decoder")


def test_decoder_whose_clip_is_gone_is_one_line(stages, in_process, tmp_path):
    """A decoder checkpoint copied without the CLIP file its config points to: one line naming both files."""
    import torch

    ckpt = torch.load(stages["decoder"], map_location="cpu", weights_only=True)
    gone = tmp_path / "moved" / "unclip-tiny.pt"
    ckpt["cfg"]["clip"]["loader"]["checkpoint"] = str(gone)
    torch.save(ckpt, tmp_path / "decoder.ckpt")
    args = ["mode=text", "prompt=x", f"checkpoints.decoder={tmp_path}/decoder.ckpt"]
    line = one_line_error(in_process("sample.py", args, stages["root"]))
    assert line.startswith(f"sample.py: the CLIP of the decoder checkpoint {tmp_path}/decoder.ckpt: ")
    assert f"CLIP checkpoint not found: {gone}" in line
