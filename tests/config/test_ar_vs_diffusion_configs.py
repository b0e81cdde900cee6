"""The AR-vs-diffusion experiment (conf/experiment/ar_vs_diffusion/*.yaml, experiments/ar_vs_diffusion/run.sh): the
two priors differ in their prior option only, so the comparison is at equal budget, batch, data and validation."""

from __future__ import annotations

import re

from tests.config.test_experiment_configs import _compose
from tests.helpers import CONF, ROOT

FOLDER = CONF / "experiment" / "ar_vs_diffusion"
RUN_SH = ROOT / "experiments" / "ar_vs_diffusion" / "run.sh"


def _plain(cfg, key):
    from omegaconf import OmegaConf

    return OmegaConf.to_container(cfg[key], resolve=False)


def test_experiment_files():
    assert sorted(p.stem for p in FOLDER.glob("*.yaml")) == ["ar", "clip", "decoder", "diffusion", "judge"]


def test_the_experiment_has_its_own_clips():
    """The conditioning CLIP is exported to the experiment's own file, which every other stage loads (never trained
    on the fly); the judge is a CLIP of another width and seed, kept in its run directory."""
    clip = _compose(["experiment=ar_vs_diffusion/clip"])
    assert clip.stage == "clip" and clip.run_name == "clip" and clip.trainer.max_epochs == 10
    assert clip.clip.export_to == clip.clip.loader.checkpoint
    assert clip.clip.loader.checkpoint.endswith("/clip/ar_vs_diffusion-clip.pt")
    judge = _compose(["experiment=ar_vs_diffusion/judge"])
    assert (judge.stage, judge.run_name, judge.seed, judge.clip.name) == ("clip", "judge", 1, "judge")
    assert judge.clip.embed_dim != clip.clip.embed_dim and judge.clip.export_to is None
    for name in ("diffusion", "ar", "decoder"):
        cfg = _compose([f"experiment=ar_vs_diffusion/{name}"])
        assert cfg.clip.loader.checkpoint == clip.clip.loader.checkpoint and cfg.clip.autotrain is False, name


def test_the_two_priors_differ_only_in_the_prior():
    cfgs = {name: _compose([f"experiment=ar_vs_diffusion/{name}"]) for name in ("diffusion", "ar")}
    for name, cfg in cfgs.items():
        assert cfg.prior.name == "prior" and cfg.get("decoder") is None and cfg.get("upsampler") is None
        assert (cfg.task_name, cfg.run_name, cfg.seed) == ("ar_vs_diffusion", name, 0)
        assert cfg.hydra.run.dir.endswith(f"/ar_vs_diffusion/runs/{name}")
    d, a = cfgs["diffusion"], cfgs["ar"]
    assert d.prior.module.model._target_.endswith(".DiffusionPrior")
    assert a.prior.module.model._target_.endswith(".ARPrior")
    for key in ("trainer", "data", "clip", "callbacks"):
        assert _plain(d, key) == _plain(a, key), key
    assert d.trainer.max_time == "00:00:12:00" and d.data.num_workers == 0 and d.data.batch_size == 64
    net_d, net_a = d.prior.module.model.net, a.prior.module.model.net
    assert (net_d.dim, net_d.depth, net_d.heads) == (net_a.dim, net_a.depth, net_a.heads), "the same Transformer size"


def test_decoder_experiment_and_run_sh():
    cfg = _compose(["experiment=ar_vs_diffusion/decoder"])
    assert cfg.decoder.name == "decoder" and cfg.get("prior") is None and cfg.trainer.max_time == "00:00:15:00"
    script = RUN_SH.read_text()
    assert "experiment=ar_vs_diffusion/decoder" in script
    assert "for p in diffusion ar; do" in script and "python train.py experiment=ar_vs_diffusion/$p" in script
    assert "experiment=ar_vs_diffusion/clip" in script and "experiment=ar_vs_diffusion/judge" in script
    assert "trainer.max_time" not in script, "the budgets live in the experiment files"
    assert re.search(r"taskset -c", script), "each prior on one core"
