"""The ``slurm_cluster`` fixture: a real SLURM cluster on this host (see ``cluster.py``), started once per session
and stopped on teardown. When SLURM is not installed or does not start, every test here is skipped with one line
saying why (``.ci/run`` installs it: ``apt-get install slurm-wlm munge``).

The test stages of tests/ops and tests/slurm are importable by name here and in the jobs (``PYTHONPATH``)."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import pytest

from tests.slurm.cluster import Cluster, ClusterError, missing_programs

HERE = Path(__file__).resolve().parent
OPS = HERE.parent / "ops"
ROOT = HERE.parents[1]
for _path in (str(OPS), str(HERE)):
    if _path not in sys.path:
        sys.path.insert(0, _path)


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """A started :class:`~tests.slurm.cluster.Cluster`; its ``env`` is the environment of the jobs: the test
    stages importable, hubs offline, wandb offline, and ``MASTER_ADDR=127.0.0.1`` (the node names ``n1``/``n2``
    resolve to no address: both nodes are this host)."""
    missing = missing_programs()
    if missing:
        pytest.skip(f"SLURM tests skipped: {', '.join(missing)} not installed (apt-get install slurm-wlm munge)")
    root = tmp_path_factory.mktemp("slurm")
    if len(str(root / "munge" / "munge.socket")) > 100:  # AF_UNIX paths: at most 108 bytes
        root = Path(tempfile.mkdtemp(prefix="unclip-slurm-"))
    cluster = Cluster(root)
    try:
        cluster.start()
    except (ClusterError, OSError) as e:
        cluster.stop()
        pytest.skip(f"SLURM tests skipped: the test cluster did not start: {e}")
    cluster.env.update(PYTHONPATH=os.pathsep.join([str(HERE), str(OPS), str(ROOT)]), HF_HUB_OFFLINE="1",
                       TRANSFORMERS_OFFLINE="1", WANDB_MODE="offline", WANDB_SILENT="true", OMP_NUM_THREADS="1",
                       PYTHONWARNINGS="ignore", MASTER_ADDR="127.0.0.1")
    cluster.env.pop("WANDB_API_KEY", None)
    yield cluster
    cluster.stop()
