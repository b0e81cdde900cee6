"""The default CSV logger keeps a resumed run's earlier metrics (Lightning's own deletes metrics.csv)."""

from __future__ import annotations

import csv

from unclip_pl.utils.csv_logger import ResumableCSVLogger


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_a_second_attempt_appends_to_the_first(tmp_path):
    first = ResumableCSVLogger(tmp_path, name="csv", version="")
    first.log_metrics({"train/loss": 1.0}, step=0)
    first.log_metrics({"train/loss": 0.5}, step=1)
    first.save()
    second = ResumableCSVLogger(tmp_path, name="csv", version="")  # the resumed run, same directory
    second.log_metrics({"train/loss": 0.25, "val/loss": 0.3}, step=2)  # a new column
    second.save()
    rows = _rows(tmp_path / "csv" / "metrics.csv")
    assert [(r["step"], r["train/loss"], r["val/loss"]) for r in rows] == [("0", "1.0", ""), ("1", "0.5", ""),
                                                                          ("2", "0.25", "0.3")]


def test_the_default_logger_config_uses_it():
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.utils import instantiate

    from tests.helpers import ROOT

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=["prior=diffusion", "paths.output_dir=/tmp/unused"])
    assert isinstance(instantiate(cfg.logger.csv), ResumableCSVLogger)
