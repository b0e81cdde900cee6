"""eval.py on tiny checkpoints and a few tiny shards; the training callback on a fake decoder module."""

import io
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

import eval as eval_script  # noqa: E402  (repository root, put on sys.path by conftest)

from .conftest import UP, compose


def _png(seed: int) -> bytes:
    g = torch.Generator().manual_seed(seed)
    arr = torch.randint(0, 256, (24, 24, 3), generator=g, dtype=torch.uint8).numpy()
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


CAPS = ["red heart", "blue car", "red heart", "green tree", "yellow sun", "cat face"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """train: 24 samples in 6 shards of 4; val: 6 samples in 2 shards of 3."""
    from unclip_pl.data.writer import write_shards

    root = tmp_path_factory.mktemp("shards")
    out = {}
    for split, n, per_shard in (("train", 24, 4), ("val", 6, 3)):
        out[split] = write_shards([{"__key__": f"{split}{i:03d}", "png": _png(i + (100 if split == 'val' else 0)),
                                    "txt": CAPS[i % len(CAPS)]} for i in range(n)], root, prefix=split,
                                  maxcount=per_shard)
    return out


@pytest.fixture(scope="module")
def judge_clip(tmp_path_factory):
    """A second tiny random CLIP (other weights, other width), exported like the conditioning one."""
    from unclip_pl.clip import build_small_clip, export_clip
    from unclip_pl.clip.small import small_clip_config

    torch.manual_seed(1)
    overrides = dict(embed_dim=8, vision_cfg={"image_size": 16, "width": 32, "layers": 1, "head_width": 16,
                                              "patch_size": 8},
                     text_cfg={"width": 32, "heads": 2, "layers": 1, "context_length": 77})
    model = build_small_clip("unclip-tiny", **overrides)
    return export_clip(model, "unclip-tiny", small_clip_config("unclip-tiny", **overrides),
                       tmp_path_factory.mktemp("judge") / "judge_clip.pt")


def test_subset_is_seeded_and_spans_shards(shards):
    train = shards["train"]
    assert len(train) == 6
    a = eval_script.read_split(train, 16, 6, seed=0)
    first_six = [f"train{i:03d}" for i in range(6)]
    assert len(a.keys) == 6 and a.keys != first_six  # not the first N in shard order
    assert len(set(a.shards)) >= 3 and a.split_size == 24 and a.describe()["kind"] == "random"
    assert a.keys == sorted(a.keys)  # returned in shard order
    b = eval_script.read_split(train, 16, 6, seed=0)
    assert b.keys == a.keys and torch.equal(a.images, b.images)  # same seed, same images
    assert eval_script.read_split(train, 16, 6, seed=1).keys != a.keys
    every = eval_script.read_split(train, 16, None, seed=0)
    assert every.keys == [f"train{i:03d}" for i in range(24)] and every.describe()["kind"] == "all"
    assert every.images.shape == (24, 3, 16, 16) and every.captions == [CAPS[i % 6] for i in range(24)]
    assert eval_script.read_split(train, 16, 100, seed=0).keys == every.keys  # a cap above the size: all of it


def test_subset_is_uniform_over_the_stream():
    counts = [0] * 20
    for seed in range(400):
        chosen, n = eval_script.seeded_subset(range(20), 5, seed)
        assert n == 20 and len(chosen) == 5 and chosen == sorted(set(chosen))
        for c in chosen:
            counts[c] += 1
    assert min(counts) > 50 and max(counts) < 150  # each item ~100 times: no bias to the first ones


def test_max_samples_config_forms(tmp_path):
    cfg = compose(["checkpoints.decoder=unused"], tmp_path, config_name="eval")
    assert eval_script.split_cap(cfg.max_samples, "val") is None  # the whole val split by default
    assert eval_script.split_cap(cfg.max_samples, "train") == cfg.max_samples.train
    cfg = compose(["checkpoints.decoder=unused", "max_samples=7"], tmp_path, config_name="eval")
    assert eval_script.split_cap(cfg.max_samples, "val") == eval_script.split_cap(cfg.max_samples, "train") == 7
    with pytest.raises(eval_script.EvalError, match="positive integer"):
        eval_script.split_cap({"train": 0}, "train")


def test_eval_writes_results_for_both_judges(tmp_path, tiny_pipeline, shards, judge_clip):
    cfg = compose(["checkpoints.decoder=unused", "max_samples.train=5", "batch_size=4", "diversity.captions=2",
                   "diversity.samples=2", f"judge={judge_clip}"], tmp_path, config_name="eval")
    res = eval_script.evaluate(cfg, pipe=tiny_pipeline, urls=shards)
    saved = json.loads(Path(res["json"]).read_text())
    assert set(saved["splits"]) == {"val", "train"} and saved["image_size"] == UP
    assert set(saved["judges"]) == {"conditioning", "judge"}
    assert saved["judges"]["judge"]["fingerprint"] != saved["judges"]["conditioning"]["fingerprint"]
    assert str(judge_clip) in saved["judges"]["judge"]["source"]
    for split, cap in (("val", None), ("train", 5)):
        data = eval_script.read_split(shards[split], UP, cap, seed=int(cfg.seed))
        res_split = saved["splits"][split]
        assert res_split["n"] == len(data.captions) and res_split["pool_size"] == len(set(data.captions))
        assert res_split["subset"]["kind"] == ("all" if cap is None else "random")
        for variant in ("real", "prior", "no_prior", "oracle"):
            for judge in ("conditioning", "judge"):
                m = res_split[variant][judge]
                assert m["pool_size"] == res_split["pool_size"] and m["n"] == res_split["n"]
                assert 0.0 <= m["top1"] <= m["top5"] <= 1.0 and -1.0 <= m["clip_score"] <= 1.0
    val = saved["splits"]["val"]
    assert val["n"] == 6 and val["subset"]["shards_total"] == 2  # the whole val split by default
    for variant in ("prior", "no_prior", "oracle"):
        cond, judge = val[variant]["conditioning"], val[variant]["judge"]
        assert cond["clip_fid"] >= 0.0 and judge["clip_fid"] >= 0.0
        assert cond["clip_fid"] != judge["clip_fid"] and cond["clip_score"] != judge["clip_score"]
    assert val["no_prior"]["conditioning"]["clip_fid"] != val["oracle"]["conditioning"]["clip_fid"]
    for judge in ("conditioning", "judge"):
        assert val["prior"][judge]["diversity"] >= 0.0
    assert val["prior"]["conditioning"]["diversity"] != val["prior"]["judge"]["diversity"]
    md = (tmp_path / "results.md").read_text()
    assert md.count("| val |") == 4 and md.count("| train |") == 4
    header = next(line for line in md.splitlines() if line.startswith("| split |"))
    for c in ("clip_fid", "clip_score", "top1", "top5", "diversity"):
        assert f"cond {c}" in header and f"judge {c}" in header
    assert "judge_clip.pt" in md and "no separate judge" not in md
    assert f"retrieval ranks among the {val['pool_size']} distinct captions" in md
    assert (tmp_path / "val_prior.png").is_file()


def test_eval_without_prior_or_judge(tmp_path, tiny, shards):
    from unclip_pl.pipeline import UnCLIPPipeline

    pipe = UnCLIPPipeline.from_checkpoints(clip=tiny["clip"], decoder=str(tiny["decoder"]), device="cpu")
    cfg = compose(["checkpoints.decoder=unused", "max_samples=3", "splits=[val]", "variants=[prior,no_prior]",
                   "diversity.captions=0", "save_grids=false"], tmp_path, config_name="eval")
    res = eval_script.evaluate(cfg, pipe=pipe, urls=shards)
    assert res["variants"] == ["no_prior"] and res["image_size"] == 16
    assert set(res["judges"]) == {"conditioning"} and set(res["splits"]["val"]["no_prior"]) >= {"conditioning"}
    assert "judge" not in res["splits"]["val"]["no_prior"]
    md = (tmp_path / "results.md").read_text()
    assert "no separate judge (`judge: null`)" in md and "judge clip_score" not in md and "cond clip_score" in md


def test_bad_judge_is_one_clear_error(tmp_path, tiny):
    from unclip_pl.metrics.judge import load_judge

    with pytest.raises(eval_script.EvalError, match="no such file"):
        eval_script.load_judges(compose(["checkpoints.decoder=unused", f"judge={tmp_path / 'nope.pt'}"], tmp_path,
                                        config_name="eval"), type("P", (), {"clip": tiny["clip"], "device": "cpu"}))
    plain = tmp_path / "state_dict.pt"
    torch.save(tiny["clip"].model.state_dict(), plain)
    with pytest.raises(ValueError, match="not an exported CLIP file.*model_name"):
        load_judge(str(plain))
    block = {"_target_": "unclip_pl.clip.frozen.load_clip", "model_name": "unclip-tiny",
             "checkpoint": str(tiny["clip_path"])}
    judge = load_judge(block)
    assert judge.fingerprint == tiny["clip"].fingerprint and str(tiny["clip_path"]) in judge.source


def test_eval_callback_logs_metrics(tiny):
    """The callback collects a fixed val set, decodes it with the module's eval model and computes the metrics."""
    from unclip_pl.callbacks.eval_metrics import EvalMetricsCallback
    from unclip_pl.checkpoint import load_stage
    from unclip_pl.sample_settings import DecoderSettings

    class FakeModule(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = load_stage(tiny["decoder"], which="model").model.train()
            self.sample_settings = DecoderSettings.from_block(tiny["decoder_cfg"]["sample"])
            self.clip = tiny["clip"]
            self._trainer = None

        @property
        def eval_model(self):
            return self.model

        @property
        def device(self):
            return torch.device("cpu")

    class FakeTrainer:
        global_step = 10
        loggers = []
        is_global_zero = True

    module, trainer = FakeModule(), FakeTrainer()
    cb = EvalMetricsCallback(every_n_steps=5, num_samples=4, steps=2, grid_items=0)
    z = torch.nn.functional.normalize(torch.randn(3, 16), dim=-1)
    batch = {"image": torch.rand(3, 3, 16, 16) * 2 - 1, "img_emb": z, "txt": ["a", "b", "a"]}
    cb.on_validation_batch_end(trainer, module, None, batch, 0)
    cb.on_validation_batch_end(trainer, module, None, batch, 1)
    assert len(cb.items["txt"]) == 4
    metrics = cb.evaluate(trainer, module, log_metrics=False)
    assert set(metrics) == {"eval/clip_fid", "eval/clip_score", "eval/top1", "eval/top5"}
    assert metrics["eval/clip_fid"] >= 0 and module.model.training  # the training flag is restored
