"""eval.py on tiny checkpoints and a few tiny shards; the training callback on a fake decoder module."""

import io
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from .conftest import UP, compose

import eval as eval_script  # noqa: E402  (repository root, put on sys.path by conftest)


def _png(seed: int) -> bytes:
    g = torch.Generator().manual_seed(seed)
    arr = torch.randint(0, 256, (24, 24, 3), generator=g, dtype=torch.uint8).numpy()
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from unclip_pl.data.shards import write_shards

    root = tmp_path_factory.mktemp("shards")
    caps = ["red heart", "blue car", "red heart", "green tree", "yellow sun", "cat face"]
    out = {}
    for split, n in (("train", 6), ("val", 6)):
        out[split] = write_shards([{"__key__": f"{split}{i:03d}", "png": _png(i + (100 if split == 'val' else 0)),
                                    "txt": caps[i % len(caps)]} for i in range(n)], root, prefix=split)
    return out


def test_eval_writes_results(tmp_path, tiny_pipeline, shards):
    cfg = compose(["checkpoints.decoder=unused", "max_samples=5", "batch_size=4", "diversity.captions=2",
                   "diversity.samples=2"], tmp_path, config_name="eval")
    res = eval_script.evaluate(cfg, pipe=tiny_pipeline, urls=shards)
    saved = json.loads(Path(res["json"]).read_text())
    assert set(saved["splits"]) == {"val", "train"} and saved["image_size"] == UP
    val = saved["splits"]["val"]
    assert val["n"] == 5 and val["pool_size"] == 4  # "red heart" appears twice: merged in the retrieval pool
    for variant in ("real", "prior", "no_prior", "oracle"):
        m = val[variant]
        assert 0.0 <= m["top1"] <= m["top5"] <= 1.0 and -1.0 <= m["clip_score"] <= 1.0
    for variant in ("prior", "no_prior", "oracle"):
        assert val[variant]["clip_fid"] >= 0.0
    assert val["no_prior"]["clip_fid"] != val["oracle"]["clip_fid"]  # different embeddings, different images
    assert val["prior"]["diversity"] >= 0.0 and "no_prior" in saved["variants"]
    assert (tmp_path / "results.md").read_text().count("| val |") == 4
    assert (tmp_path / "val_prior.png").is_file()


def test_eval_without_prior_skips_variant(tmp_path, tiny, shards):
    from unclip_pl.pipeline import UnCLIPPipeline

    pipe = UnCLIPPipeline.from_checkpoints(clip=tiny["clip"], decoder=str(tiny["decoder"]), device="cpu")
    cfg = compose(["checkpoints.decoder=unused", "max_samples=3", "splits=[val]", "variants=[prior,no_prior]",
                   "diversity.captions=0", "save_grids=false"], tmp_path, config_name="eval")
    res = eval_script.evaluate(cfg, pipe=pipe, urls=shards)
    assert res["variants"] == ["no_prior"] and res["image_size"] == 16


def test_eval_callback_logs_metrics(tiny):
    """The callback collects a fixed val set, decodes it with the module's eval model and computes the metrics."""
    from unclip_pl.callbacks.eval_metrics import EvalMetricsCallback
    from unclip_pl.checkpoint_io import load_stage

    class FakeModule(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = load_stage(tiny["decoder"], which="model").train()
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
