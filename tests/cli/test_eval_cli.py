"""README "Sampling and evaluation": `python eval.py checkpoints.prior=... checkpoints.decoder=...` through eval.py
in a subprocess on the session's tiny checkpoints and the small emoji set: results.json and results.md in
logs/eval/runs/<time>/; a missing checkpoint is one line on stderr."""

from __future__ import annotations

import json
import re

TIME_STAMP = re.compile(r"\d{4}-\d{2}-\d{2}_\d{2}-\d{2}-\d{2}")


def test_eval_writes_results(stages, launched):
    launched["eval"].wait().check()
    found = list((stages["root"] / "logs" / "eval" / "runs").glob("*/results.json"))
    assert len(found) == 1, found
    run_dir = found[0].parent
    assert TIME_STAMP.fullmatch(run_dir.name)
    res = json.loads(found[0].read_text())
    assert set(res["splits"]) == {"val", "train"} and res["variants"] == ["prior", "no_prior", "oracle"]
    assert res["checkpoints"]["prior"] == str(stages["prior"])
    assert res["checkpoints"]["decoder"] == str(stages["decoder"])
    for split, r in res["splits"].items():
        assert r["n"] == 4, (split, r)
        for variant in ("real", "prior", "no_prior", "oracle"):
            assert variant in r, (split, sorted(r))
        text = json.dumps(r)
        for metric in ("clip_fid", "clip_score", "top1", "top5"):
            assert f'"{metric}' in text, (split, metric)
    table = (run_dir / "results.md").read_text()
    for split in ("val", "train"):
        for variant in ("real", "prior", "no_prior", "oracle"):
            assert re.search(rf"\| {split} \| {variant} \|", table), (split, variant, table)
    assert (run_dir / "val_prior.png").is_file() and (run_dir / "train_oracle.png").is_file()



def test_eval_guidance_sweep_command(stages, launched):
    """experiments/emoji_cascade/README.md's guidance sweep (one G): the val split only, the prior and oracle
    variants, the decoder's sampler settings from the command line, and every CLIP metric once more by the judge."""
    launched["eval_guidance"].wait().check()
    (found,) = (launched["eval_guidance"].root / "logs" / "eval" / "runs").glob("*/results.json")
    res = json.loads(found.read_text())
    assert res["settings"]["decoder"]["guidance_scale"] == 1.5 and res["settings"]["decoder"]["sampler"] == "dpmpp_2m"
    assert res["settings"]["decoder"]["steps"] == 4 and res["upsample"] is False
    assert list(res["splits"]) == ["val"] and res["variants"] == ["prior", "oracle"]
    assert set(res["judges"]) == {"conditioning", "judge"} and "judge" in res["judges"]["judge"]["source"]
    prior = res["splits"]["val"]["prior"]
    assert prior["n"] == 4
    for judge in ("conditioning", "judge"):
        assert {"top5", "clip_fid", "diversity"} <= set(prior[judge]), (judge, sorted(prior[judge]))

def test_wrong_checkpoints_are_one_line(stages, in_process, emoji_root, tmp_path):
    """eval.py with a missing decoder checkpoint, or a decoder checkpoint given as the upsampler: exit 2, one line."""
    from tests.cli.test_sample_cli import one_line_error
    from tests.helpers import emoji_overrides

    missing = tmp_path / "decoder.ckpt"
    line = one_line_error(in_process("eval.py", [f"checkpoints.decoder={missing}", *emoji_overrides(emoji_root)],
                                     stages["root"]))
    assert line == f"eval.py: decoder checkpoint {missing}: file not found"
    line = one_line_error(in_process("eval.py", [f"checkpoints.decoder={stages['decoder']}",
                                                 f"checkpoints.upsamplers=[{stages['decoder']}]",
                                                 *emoji_overrides(emoji_root)], stages["root"]))
    assert line == (f"eval.py: upsampler checkpoint {stages['decoder']}: this is a checkpoint of the decoder stage, "
                    f"not of the upsampler")
