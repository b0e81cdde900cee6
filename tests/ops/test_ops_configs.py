"""The ops config options compose: SLURM/local launchers, the optuna sweeper (config only), DDP/FSDP trainers."""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate
from ops_helpers import BASE, ROOT


def _compose(overrides):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(config_name="train", overrides=BASE + overrides, return_hydra_config=True)


def test_slurm_and_local_launchers_compose():
    cfg = _compose(["hydra/launcher=slurm", "hydra.launcher.partition=gpu", "hydra.launcher.account=proj",
                    "hydra.launcher.nodes=2", "hydra.launcher.gpus_per_node=4"])
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert (launcher.partition, launcher.account, launcher.nodes, launcher.tasks_per_node) == ("gpu", "proj", 2, 4)
    assert launcher.timeout_min > 0 and launcher.mem_gb > 0 and launcher.cpus_per_task > 0
    assert _compose(["hydra/launcher=local"]).hydra.launcher._target_.endswith("LocalLauncher")


def test_optuna_sweeper_config_composes():
    assert _compose(["hydra/sweeper=optuna"]).hydra.sweeper._target_.endswith("OptunaSweeper")


@pytest.mark.parametrize("trainer, strategy", [("ddp", "DDPStrategy"), ("fsdp", "FSDPStrategy")])
def test_distributed_trainers_build_their_strategy(trainer, strategy):
    cfg = _compose([f"trainer={trainer}"])
    assert type(instantiate(cfg.trainer.strategy)).__name__ == strategy
    assert cfg.trainer.num_nodes == 1 and cfg.trainer.use_distributed_sampler is False
