"""A real SLURM cluster on this host for the tests: munged, slurmctld and two slurmd (node names ``n1``, ``n2``,
both on 127.0.0.1), started as child processes in a temporary directory and stopped by process id.

Everything the cluster needs lives in that directory: the munge key and socket, ``slurm.conf``, state, spool, pid
and log files. The daemons listen on free ports of 127.0.0.1. The settings work in a container without cgroups
(``proctrack/linuxproc``, ``task/none``, no accounting database: ``sacct`` is unavailable, ``scontrol show job``
tells a job's state). ``cred_expire`` is short, so a requeued job starts again after seconds instead of minutes.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

#: The programs the cluster needs (Debian: slurm-wlm, munge).
PROGRAMS = ("munged", "slurmctld", "slurmd", "sbatch", "srun", "scontrol", "scancel", "squeue", "sinfo")
NODES = ("n1", "n2")


class ClusterError(RuntimeError):
    """The cluster could not be started (the message is one line: what failed, and the log line that says why)."""


def search_path() -> str:
    """``PATH`` with the system folders of the daemons added (a user's ``PATH`` often lacks ``/usr/sbin``)."""
    parts = os.environ.get("PATH", "").split(os.pathsep)
    return os.pathsep.join(parts + [d for d in ("/usr/sbin", "/sbin") if d not in parts])


def missing_programs() -> list[str]:
    return [p for p in PROGRAMS if shutil.which(p, path=search_path()) is None]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def slurm_version() -> str:
    out = subprocess.run([shutil.which("slurmd", path=search_path()), "-V"], capture_output=True, text=True,
                         timeout=10)
    return out.stdout.strip() or out.stderr.strip()


def slurm_conf(root: Path, ports: dict[str, int], cpus: int = 2, memory_mb: int = 8000) -> str:
    """``slurm.conf`` of a cluster of :data:`NODES` on 127.0.0.1 (``ports``: slurmctld and one per node)."""
    host = socket.gethostname().split(".")[0]
    nodes = "\n".join(f"NodeName={n} NodeHostname={host} NodeAddr=127.0.0.1 Port={ports[n]} CPUs={cpus} "
                      f"RealMemory={memory_mb} State=UNKNOWN" for n in NODES)
    return f"""\
ClusterName=unclip-test
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ports['slurmctld']}
SlurmUser={_user()}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={root}/munge/munge.socket,cred_expire=5
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool/%n
SlurmctldPidFile={root}/run/slurmctld.pid
SlurmdPidFile={root}/run/slurmd-%n.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd-%n.log
TmpFS={root}/tmp
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SwitchType=switch/none
MpiDefault=none
PropagateResourceLimits=NONE
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/builtin
ReturnToService=2
SlurmdTimeout=60
InactiveLimit=0
KillWait=5
MinJobAge=600
MailProg=/bin/true
{nodes}
PartitionName=debug Nodes={','.join(NODES)} Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
"""


def _user() -> str:
    import pwd

    return pwd.getpwuid(os.getuid()).pw_name


class Cluster:
    """The running cluster: ``env`` is the environment of its clients and jobs (``SLURM_CONF`` set, any outer
    SLURM job's variables removed, this interpreter's folder first on ``PATH``)."""

    def __init__(self, root: Path):
        self.root = root
        self.conf = root / "slurm.conf"
        self.procs: dict[str, subprocess.Popen] = {}
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_"))}
        env.update(SLURM_CONF=str(self.conf), PATH=f"{Path(sys.executable).parent}{os.pathsep}{search_path()}")
        self.env = env
        self.version = slurm_version()

    # ------------------------------------------------------------------ start / stop
    def start(self, timeout: float = 60) -> Cluster:
        for sub in ("munge", "state", "run", "log", "tmp", *(f"spool/{n}" for n in NODES)):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        (self.root / "munge").chmod(0o700)
        key = self.root / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        ports = {"slurmctld": free_port(), **{n: free_port() for n in NODES}}
        self.conf.write_text(slurm_conf(self.root, ports))
        m = self.root / "munge"
        self._spawn("munged", ["munged", "--foreground", "--force", f"--key-file={key}",
                               f"--socket={m}/munge.socket", f"--pid-file={m}/munged.pid",
                               f"--seed-file={m}/munged.seed", f"--log-file={m}/munged.log", "--origin=127.0.0.1"])
        self._wait(lambda: (m / "munge.socket").exists(), 15, "munged did not create its socket")
        self._spawn("slurmctld", ["slurmctld", "-D", "-i"])
        self._wait(lambda: self.client("scontrol", "ping").returncode == 0, timeout, "slurmctld does not answer")
        for n in NODES:
            self._spawn(f"slurmd-{n}", ["slurmd", "-D", "-N", n])
        self._wait(lambda: self.node_states() == {n: "idle" for n in NODES}, timeout,
                   "the nodes did not become idle")
        return self

    def _spawn(self, name: str, args: list[str]) -> None:
        log = open(self.root / "log" / f"{name}.out", "w")
        self.procs[name] = subprocess.Popen(args, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, cwd=self.root)
        log.close()

    def _wait(self, ready: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise ClusterError(f"{what}: {name} exited with code {proc.returncode} "
                                       f"({self._last_error(name)})")
            if ready():
                return
            time.sleep(0.3)
        raise ClusterError(f"{what} within {timeout:.0f} s ({'; '.join(self._last_error(n) for n in self.procs)})")

    def _last_error(self, name: str) -> str:
        lines = []
        for path in (self.root / "log" / f"{name}.out", self.root / "log" / f"{name}.log"):
            if path.exists():
                lines += path.read_text(errors="replace").splitlines()
        errors = [ln for ln in lines if "error" in ln.lower() or "fatal" in ln.lower()]
        return f"{name}: {(errors or lines or ['no output'])[-1].strip()}"

    def stop(self) -> None:
        """Cancel every job, wait (bounded) until none is left, then stop the daemons this cluster started."""
        if self.procs.get("slurmctld") and self.procs["slurmctld"].poll() is None:
            self.client("scancel", f"--user={_user()}", timeout=15)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                out = self.client("squeue", "-h", "-o", "%A", timeout=15)
                if out.returncode or not out.stdout.strip():
                    break
                time.sleep(0.5)
        for name in [*(f"slurmd-{n}" for n in NODES), "slurmctld", "munged"]:
            proc = self.procs.pop(name, None)
            if proc is None or proc.poll() is not None:
                continue
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=15)

    # ------------------------------------------------------------------ clients
    def client(self, *args: str, timeout: float = 30, **kwargs) -> subprocess.CompletedProcess:
        """Run a SLURM client command (``sbatch``, ``scontrol``, ...) against this cluster."""
        try:
            return subprocess.run(list(args), env=kwargs.pop("env", self.env), capture_output=True, text=True,
                                  timeout=timeout, **kwargs)
        except subprocess.TimeoutExpired as e:
            return subprocess.CompletedProcess(list(args), 124, "", f"timed out after {timeout} s: {e}")

    def node_states(self) -> dict[str, str]:
        out = self.client("sinfo", "-h", "-N", "-o", "%N %t", timeout=10)
        return dict(line.split() for line in out.stdout.splitlines() if len(line.split()) == 2)

    def sbatch(self, *args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> str:
        """Submit a batch job; returns its id."""
        out = self.client("sbatch", "--parsable", *args, env=env or self.env, cwd=cwd)
        if out.returncode:
            raise RuntimeError(f"sbatch {' '.join(args)} failed: {out.stderr.strip()}")
        return out.stdout.strip().split(";")[0]

    def job(self, job_id: str) -> dict[str, str]:
        """``scontrol show job``'s fields of a job (JobState, Restarts, ExitCode, ...); {} when unknown."""
        out = self.client("scontrol", "show", "job", "-o", str(job_id), timeout=15)
        if out.returncode:
            return {}
        fields = {}
        for token in out.stdout.split():
            key, sep, value = token.partition("=")
            if sep and key not in fields:
                fields[key] = value
        return fields

    def wait_job(self, job_id: str, until: Callable[[dict[str, str]], bool], timeout: float, what: str) -> dict:
        """Poll the job until ``until(fields)``; a ``TimeoutError`` naming ``what`` and the last state otherwise."""
        deadline, fields = time.monotonic() + timeout, {}
        while time.monotonic() < deadline:
            fields = self.job(job_id)
            if fields and until(fields):
                return fields
            time.sleep(0.5)
        raise TimeoutError(f"job {job_id}: {what} not reached in {timeout:.0f} s (last: JobState="
                           f"{fields.get('JobState')} Restarts={fields.get('Restarts')} Reason={fields.get('Reason')})")

    def wait_done(self, job_id: str, timeout: float = 180) -> dict[str, str]:
        """Wait until the job has ended (any final state)."""
        final = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}
        return self.wait_job(job_id, lambda f: f.get("JobState") in final, timeout, "the end")
