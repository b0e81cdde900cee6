"""An autoregressive prior checkpoint (`python train.py prior=ar`) through eval.py and `sample.py mode=conditioning`,
the real entry points in subprocesses on the session's tiny checkpoints (the ``launched`` fixture)."""

from __future__ import annotations

import json
import re

from PIL import Image

from tests.cli.test_sample_cli import DECODED
from tests.helpers import grid_size

AR_KEYS = {"guidance_scale", "temperature", "top_k", "top_p", "dot_fraction", "best_of"}


def test_eval_accepts_an_ar_prior_checkpoint(stages, launched):
    """eval.py with checkpoints.prior=<AR prior>: the prior variant is generated through it and scored like the
    diffusion prior's (results.json/results.md, the grid), with the AR prior's sampler settings and the decoder
    guidance given on the command line recorded."""
    done = launched["eval_ar"].wait().check()
    assert "Traceback" not in done.stderr
    found = list((launched["eval_ar"].root / "logs" / "eval" / "runs").glob("*/results.json"))
    assert len(found) == 1, found
    res = json.loads(found[0].read_text())
    assert res["checkpoints"]["prior"] == str(stages["prior_ar"])
    assert set(res["settings"]["prior"]) >= AR_KEYS and "steps" not in res["settings"]["prior"]
    assert res["settings"]["decoder"]["guidance_scale"] == 1.5  # the README's guidance sweep: one override
    assert list(res["splits"]) == ["val"] and res["variants"] == ["prior", "no_prior"]
    val = res["splits"]["val"]
    assert val["n"] == 4 and val["pool_size"] >= 1
    for variant in ("real", "prior", "no_prior"):
        scores = val[variant]["cond"] if "cond" in val[variant] else next(iter(
            v for v in val[variant].values() if isinstance(v, dict)))
        assert 0.0 <= scores["top1"] <= scores["top5"] <= 1.0, (variant, scores)
        assert -1.0 <= scores["clip_score"] <= 1.0
    prior_scores = [v for v in val["prior"].values() if isinstance(v, dict)]
    assert prior_scores and all(s["clip_fid"] is not None and "diversity" in s for s in prior_scores)
    table = (found[0].parent / "results.md").read_text()
    assert re.search(r"\| val \| prior \| 4 \|", table), table
    assert (found[0].parent / "val_prior.png").is_file()


def test_sample_conditioning_accepts_an_ar_prior_checkpoint(stages, launched):
    """`sample.py mode=conditioning` (the paper's figure 7) with an AR prior: three rows (caption only, the CLIP
    text embedding, the AR prior's embedding) x 2 captions, with settings.prior.top_k overriding the stored block."""
    done = launched["conditioning_ar"].wait().check()
    assert "Traceback" not in done.stderr
    found = list((launched["conditioning_ar"].root / "logs" / "sample" / "runs").glob("*/conditioning.json"))
    assert len(found) == 1, found
    rec = json.loads(found[0].read_text())
    assert rec["mode"] == "conditioning" and rec["captions"] == ["grinning face", "red heart"]
    assert len(rec["rows"]) == 3 and rec["num_images"] == 6 and rec["image_size"] == DECODED
    assert rec["checkpoints"]["prior"] == str(stages["prior_ar"])
    settings = rec["settings"]["prior"]
    assert settings["top_k"] == 4 and set(settings) >= AR_KEYS and "steps" not in settings
    with Image.open(found[0].with_suffix(".png")) as img:
        assert img.size == grid_size(6, 2, DECODED)
