"""Training under a real SLURM (the ``slurm_cluster`` of conftest.py: two nodes on this host, CPU only).

1. ``python train.py -m hydra/launcher=slurm ...`` submits through Hydra's submitit launcher: the job runs under
   SLURM, its run directory holds the checkpoint, submitit's logs are under the job id, ``run_name`` is the job id.
2. Two nodes, one job (``hydra.launcher.nodes=2``, ``trainer=ddp`` on CPU): the ranks find each other through
   Lightning's SLURM environment, read disjoint shards and end with identical weights.
3. Preemption with ``experiments/slurm/train.sbatch`` (``srun python train.py trainer=ddp ...``): SLURM's warning
   signal (``scancel --signal=USR1``) and, separately, ``scontrol requeue``: the job saves, is requeued, starts
   again in the same run directory with ``SLURM_RESTART_COUNT=1``, resumes at the saved step with the same wandb id
   (offline), reads on from the sample where it stopped and ends with the weights of an uninterrupted run.
4. A sweep with a failing job: listed as failed in ``summary.json``, and the sweep exits with code 1.

All jobs are submitted at the start (fixtures ``submitted`` and ``preempted``) and run at once; each test waits for
its own and checks what it left.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from ops_helpers import BASE, compose_ops

from tests.slurm.cluster import Cluster
from unclip_pl.checkpoint import verify_checkpoint
from unclip_pl.train import fit

pytestmark = pytest.mark.slurm

ROOT = Path(__file__).resolve().parents[2]
SBATCH = ROOT / "experiments" / "slurm" / "train.sbatch"
STEPS = 6
#: The tiny stage with the observation hooks of slurm_stage.py.
STAGE = ["prior.module._target_=slurm_stage.SlurmTinyStage"]
#: A job of the submitit launcher on this cluster: CPU only, small, 10 minutes at most.
LAUNCHER = ["hydra/launcher=slurm", "hydra.launcher.gpus_per_node=0", "hydra.launcher.tasks_per_node=1",
            "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=1", "hydra.launcher.timeout_min=10"]
CPU_DDP = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=1", "trainer.precision=32-true"]


class Submission:
    """``python train.py -m ...`` (Hydra submits to the cluster and waits for the jobs) in the background."""

    def __init__(self, cluster: Cluster, folder: Path, args: list[str], timeout: float = 400):
        folder.mkdir(parents=True, exist_ok=True)
        self.folder, self.timeout = folder, timeout
        self._out, self._err = open(folder / "launcher.out", "w"), open(folder / "launcher.err", "w")
        self.proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), "-m", *BASE, *args], cwd=folder,
                                     env={**cluster.env, "PROJECT_ROOT": str(folder)}, stdout=self._out,
                                     stderr=self._err, stdin=subprocess.DEVNULL)

    def wait(self) -> tuple[int, str]:
        """(exit code, stdout + stderr); killed after the timeout."""
        try:
            rc = self.proc.wait(timeout=self.timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait()
        self._out.close(), self._err.close()
        return rc, (self.folder / "launcher.out").read_text() + (self.folder / "launcher.err").read_text()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return _tiny_shards(tmp_path_factory.mktemp("shards"))


@pytest.fixture(scope="module")
def submitted(slurm_cluster, shards, tmp_path_factory):
    """The Hydra submissions, started at once: ``{name: (Submission, sweep dir, record dir)}``."""
    base = tmp_path_factory.mktemp("hydra_slurm")
    runs = {
        "single": [*LAUNCHER, f"trainer.max_steps={STEPS}"],
        "two_nodes": [*LAUNCHER, "hydra.launcher.nodes=2", *CPU_DDP, "trainer.max_steps=3", "data=ops_shards",
                      f"data.train_urls={shards}", "data.val_urls=null", "prior.module.ema_decay=null"],
        "failing": [*LAUNCHER, "trainer.max_steps=2", "prior.module.fail=true,false"],
    }
    out = {}
    try:
        for name, args in runs.items():
            sweep, record = base / name / "sweep", base / name / "record"
            out[name] = (Submission(slurm_cluster, base / name, [*STAGE, *args, f"hydra.sweep.dir={sweep}",
                                                                 f"prior.module.record_dir={record}"]), sweep, record)
        yield out
    finally:
        for sub, _, _ in out.values():
            sub.stop()


def _tiny_shards(folder: Path) -> Path:
    """4 shards x 8 samples (8x8 PNG + caption), keys k000..k031."""
    import io

    import numpy as np
    from PIL import Image

    from unclip_pl.data.writer import write_shards

    def png(seed: int) -> bytes:
        buf = io.BytesIO()
        Image.fromarray(np.random.default_rng(seed).integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(buf, "PNG")
        return buf.getvalue()

    write_shards(({"__key__": f"k{i:03d}", "png": png(i), "txt": f"caption {i}"} for i in range(32)), folder,
                 prefix="train", maxcount=8)
    return folder


def _job_of(sweep: Path) -> str:
    """The id submitit gave the sweep's job (an array job's id for several: its tasks are ``<id>_<i>``)."""
    ids = [p.name for p in (sweep / ".submitit").iterdir() if p.is_dir() and "_" not in p.name]
    assert len(ids) == 1, ids
    return ids[0]


def _last(run_dir: Path) -> dict:
    return verify_checkpoint(run_dir / "checkpoints" / "last.ckpt")


# ---------------------------------------------------------------------------------------------------- 3: sbatch
def _shard_data(shards: Path) -> list[str]:
    """The real ShardDataModule over the tiny shards, one batch of 4 per step, each step's keys in
    ``<run dir>/data_keys_rank<r>.txt`` (``data.log_keys``)."""
    return ["data=ops_shards", f"data.train_urls={shards}", "data.val_urls=null", "data.log_keys=true"]


def _sbatch(cluster: Cluster, folder: Path, *train_args: str) -> tuple[str, Path, Path]:
    """Submit experiments/slurm/train.sbatch (from the repository root, as the README says) with the tiny stage,
    one node, one task; returns (job id, run directory logs/train/runs/<job id>, record dir)."""
    record = folder / "record"
    job = cluster.sbatch("--nodes=1", "--ntasks-per-node=1", "--gpus-per-node=0", "--cpus-per-task=1", "--mem=1G",
                         "--time=00:10:00", f"--output={folder}/slurm-%j.out", str(SBATCH),
                         *BASE, *STAGE, *CPU_DDP, f"trainer.max_steps={STEPS}", "logger=[csv,wandb]",
                         f"paths.log_dir={folder}/logs", f"prior.module.record_dir={record}", *train_args, cwd=ROOT)
    return job, folder / "logs" / "train" / "runs" / job, record


#: How each sbatch job is told to go while it waits in its training step 2: SLURM's warning signal (what
#: ``--signal=USR1@120`` sends before the time limit, sent at once here) and a requeue of the running job.
SIGNALS = {"usr1": ["scancel", "--signal=USR1"], "requeue": ["scontrol", "requeue"]}


@pytest.fixture(scope="module")
def preempted(slurm_cluster, submitted, shards, tmp_path_factory):
    """Jobs of the sbatch script, each signalled (:data:`SIGNALS`) while it waits in training step 2 of its first
    attempt (the wait ends after 10 minutes at most): ``{name: (job id, run dir, record dir, folder)}``. Submitted
    together with the Hydra submissions, so that all of them run at once."""
    jobs = {}
    for name in SIGNALS:
        folder = tmp_path_factory.mktemp(f"sbatch_{name}")
        jobs[name] = (*_sbatch(slurm_cluster, folder, *_shard_data(shards), "+prior.module.wait_at_step=2"), folder)
    for name, (job, _, record, folder) in jobs.items():
        _wait_for_file(record / "waiting", slurm_cluster, job, folder / f"slurm-{job}.out")
        sent = slurm_cluster.client(*SIGNALS[name], job)
        assert sent.returncode == 0, sent.stderr
    return jobs


@pytest.fixture(scope="module")
def reference(shards, tmp_path_factory) -> tuple[dict[str, torch.Tensor], list[tuple[int, list[str]]]]:
    """An uninterrupted run of the same length (in this process): its state dict and ``[(step, batch keys)]``."""
    folder = tmp_path_factory.mktemp("reference")
    fit(compose_ops([*_shard_data(shards), f"trainer.max_steps={STEPS}"], folder))
    return _last(folder)["state_dict"], _keys(folder)


def _keys(run_dir: Path) -> list[tuple[int, list[str]]]:
    """``[(global step, keys of its batch), ...]`` in training order (``data.log_keys``), all attempts."""
    lines = (run_dir / "data_keys_rank0.txt").read_text().splitlines()
    return [(int(step), keys.split()) for step, keys in (line.split("\t") for line in lines)]


def _wait_for_file(path: Path, cluster: Cluster, job: str, output: Path, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        state = cluster.job(job).get("JobState")
        tail = output.read_text()[-3000:] if output.exists() else ""
        assert state in ("PENDING", "RUNNING", "CONFIGURING"), f"job {job} is {state} before {path.name}:\n{tail}"
        assert time.monotonic() < deadline, f"job {job} did not write {path} in {timeout} s"
        time.sleep(0.3)


def _wandb_run_ids(run_dir: Path) -> list[str]:
    """The ids of the offline wandb runs in the run directory (offline-run-<date>_<time>-<id>)."""
    return [re.fullmatch(r"offline-run-\d{8}_\d{6}-(\w+?)(-\d+)?", p.name).group(1)
            for p in sorted((run_dir / "wandb").glob("offline-run-*"))]


def _check_resumed(cluster: Cluster, job_info: tuple, reference: tuple) -> str:
    """The signalled job ended after one requeue, started again in the same run directory with
    SLURM_RESTART_COUNT=1 at the saved step, kept its wandb id, read on from where it stopped and matches an
    uninterrupted run. Returns the job's output."""
    ref_weights, ref_keys = reference
    job, run_dir, record, folder = job_info
    fields = cluster.wait_done(job, timeout=240)
    output = (folder / f"slurm-{job}.out").read_text()
    assert fields["JobState"] == "COMPLETED" and fields["Restarts"] == "1", (fields, output[-3000:])
    attempts = [json.loads(line) for line in (record / "attempts.jsonl").read_text().splitlines()]
    assert [(a["job"], a["restart"], a["run_dir"]) for a in attempts] == [(job, 0, str(run_dir.resolve())),
                                                                          (job, 1, str(run_dir.resolve()))]
    assert attempts[0]["step"] == 0 and attempts[1]["step"] == 3  # saved after the step it was signalled in
    assert f"job {job} on n" in output and "restart 1" in output and "Resuming from" in output
    ckpt = _last(run_dir)
    assert ckpt["global_step"] == STEPS
    wandb_id = (run_dir / "wandb_id.txt").read_text().strip()
    assert _wandb_run_ids(run_dir) == [wandb_id, wandb_id]
    # the sample keys after the restart continue the sequence (steps 3, 4, 5 read what an uninterrupted run reads)
    assert [step for step, _ in _keys(run_dir)] == list(range(STEPS))
    assert _keys(run_dir) == ref_keys
    for k in ref_weights:
        torch.testing.assert_close(ckpt["state_dict"][k], ref_weights[k], rtol=1e-5, atol=1e-6, msg=k)
    return output


def test_sbatch_usr1_saves_requeues_and_resumes(slurm_cluster, preempted, reference):
    """SLURM's warning signal: the job saves and requeues itself (the preemption callback's ``scontrol requeue``)."""
    output = _check_resumed(slurm_cluster, preempted["usr1"], reference)
    assert "Received SIGUSR1: saved" in output and "(requeueing)" in output


def test_scontrol_requeue_saves_and_resumes(slurm_cluster, preempted, reference):
    """``scontrol requeue`` of the running job (SIGTERM to its tasks, SIGKILL after KillWait): it saves first."""
    output = _check_resumed(slurm_cluster, preempted["requeue"], reference)
    assert "Received SIGTERM: saved" in output and "unless SLURM requeues the job; to resume, run:" in output


# ---------------------------------------------------------------------------------------------------- 1, 2, 5: Hydra
def test_hydra_slurm_launcher_runs_the_job(submitted, slurm_cluster):
    sub, sweep, record = submitted["single"]
    rc, output = sub.wait()
    assert rc == 0, output[-4000:]
    job = _job_of(sweep)  # an array job of one task: <array id>_0
    fields = slurm_cluster.wait_done(job, timeout=60)  # submitit returns on the result file, before SLURM's end
    assert fields["JobState"] == "COMPLETED", fields
    run_dir = sweep / "0"
    assert _last(run_dir)["global_step"] == STEPS
    assert json.loads((run_dir / "job_status.json").read_text())["status"] == "COMPLETED"
    assert (sweep / ".submitit" / job / f"{job}_0_log.out").exists()  # submitit's logs, under the job id
    assert "Training stage 'prior'" in (run_dir / "train.log").read_text()
    # run_name is the SLURM job id (an array task has a job id of its own)
    resolved = (run_dir / "config_resolved.yaml").read_text()
    assert re.search(rf"^run_name: '?{fields['JobId']}'?$", resolved, re.M), resolved[:500]
    (attempt,) = [json.loads(line) for line in (record / "attempts.jsonl").read_text().splitlines()]
    assert attempt["job"] == fields["JobId"] and attempt["restart"] == 0


def test_hydra_slurm_two_nodes_ddp(submitted, slurm_cluster):
    sub, sweep, record = submitted["two_nodes"]
    rc, output = sub.wait()
    assert rc == 0, output[-4000:]
    fields = slurm_cluster.wait_done(_job_of(sweep), timeout=60)  # the tasks may still be exiting: see above
    assert fields["JobState"] == "COMPLETED" and fields["NumNodes"] == "2" and fields["NodeList"] == "n[1-2]", fields
    log = (sweep / "0" / "train.log").read_text()
    assert "global batch 8 = 4 per device x 1 device(s) x 2 node(s)" in log, log[-2000:]
    keys = [(record / f"keys_rank{r}.txt").read_text().split() for r in (0, 1)]
    assert len(keys[0]) == len(keys[1]) == 3 * 4  # 3 steps x batch 4 on each rank
    assert not set(keys[0]) & set(keys[1]), "the two ranks trained on the same samples"
    weights = [torch.load(record / f"weights_rank{r}.pt") for r in (0, 1)]
    assert weights[0]["step"] == weights[1]["step"] == 3
    for k, v in weights[0]["weights"].items():
        assert torch.equal(v, weights[1]["weights"][k]), k


def test_hydra_slurm_sweep_with_a_failing_job_exits_nonzero(submitted):
    sub, sweep, _ = submitted["failing"]
    rc, output = sub.wait()
    job = _job_of(sweep)
    assert rc == 1, output[-4000:]
    summary = json.loads((sweep / "summary.json").read_text())
    assert summary["failed"] == 1 and [j["status"] for j in summary["jobs"]] == ["FAILED", "COMPLETED"]
    assert "deliberate failure" in (sweep / ".submitit" / f"{job}_0" / f"{job}_0_0_log.err").read_text()
    assert "job 0 FAILED" in output and "Exiting with code 1: 1 sweep job(s) failed" in output
    assert (sweep / "1" / "checkpoints" / "last.ckpt").exists()


def test_cluster_is_on_loopback(slurm_cluster):
    """The controller and both nodes listen on 127.0.0.1: no test talks to another address."""
    nodes = slurm_cluster.client("scontrol", "show", "node", "-o").stdout.splitlines()
    assert len(nodes) == 2 and all(" NodeAddr=127.0.0.1 " in f" {n} " for n in nodes), nodes
    config = slurm_cluster.client("scontrol", "show", "config").stdout
    assert re.search(r"^SlurmctldHost\[0\]\s*=\s*\S+\(127\.0\.0\.1\)$", config, re.M), config[:2000]
