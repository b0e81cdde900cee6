"""Train one unCLIP stage: `python train.py prior=diffusion` (see README.md and conf/train.yaml)."""

import os
import sys

os.environ.setdefault("PROJECT_ROOT", os.path.dirname(os.path.abspath(__file__)))

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from unclip_pl.train import DATA_ERRORS, ConfigError, data_error_line, run  # noqa: E402
from unclip_pl.utils.cli import exit_on_unknown_override  # noqa: E402
from unclip_pl.utils.task import job_wrapper, metric_value  # noqa: E402


@hydra.main(config_path="conf", config_name="train", version_base="1.3")
@job_wrapper  # in multirun (-m) a failing job is logged and returns NaN; the other jobs go on
def main(cfg: DictConfig) -> float | None:
    try:
        metrics = run(cfg)
    except ConfigError as e:
        print(f"Config error: {e}", file=sys.stderr)
        sys.exit(2)
    except DATA_ERRORS as e:  # bad shards or samples (also raised in a loader worker): one line, not a traceback
        print(f"Data error: {data_error_line(e)}", file=sys.stderr)
        sys.exit(2)
    return metric_value(metrics, cfg.optimized_metric)


if __name__ == "__main__":
    exit_on_unknown_override(__file__, "train")  # a mistyped key: the keys that exist there, not Hydra's bare error
    main()
