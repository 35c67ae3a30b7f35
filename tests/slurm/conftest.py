"""A real local Slurm cluster (slurm/local_cluster.sh) for the tests in this directory.

One cluster per session: two slurmd "nodes" (node1, node2, each in its own UTS namespace) on
this machine, in a fresh state directory under /tmp and on free ports, so it never meets a
system Slurm or a concurrent test run. It is always stopped at the end, also after failures.

Slurm's daemons must run as root. Missing Slurm is installed from the OS packages when we
are root; otherwise the tests are skipped, except in CI (CI=true), where they fail.
"""
from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
HELPER = ROOT / "slurm" / "local_cluster.sh"
NODES = 2
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED",
            "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def _unavailable(why: str):
    msg = f"Slurm tests need a local Slurm cluster: {why}"
    if _in_ci():
        pytest.fail(msg + " (CI=true: not skipping)", pytrace=False)
    pytest.skip(msg)


def _free_port_block(count: int) -> int:
    """First port P such that P..P+count-1 are all free on 127.0.0.1 (16817 if possible)."""
    def free(port: int) -> bool:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                return False
        return True

    for base in [16817, *range(26817, 60000, 97)]:
        if all(free(p) for p in range(base, base + count)):
            return base
    raise RuntimeError("no free port block for the local Slurm cluster")


def _clean_env() -> dict:
    """Our environment without Slurm/Open MPI settings that would leak into the jobs (e.g.
    when pytest itself runs inside a Slurm job, or under mpirun)."""
    drop = ("SLURM_", "SBATCH_", "SALLOC_", "SRUN_", "OMPI_", "PMIX_")
    return {k: v for k, v in os.environ.items() if not k.startswith(drop)}


@dataclass
class Job:
    id: str
    output: Path
    state: str = "?"
    info: str = ""

    def text(self) -> str:
        return self.output.read_text(errors="replace") if self.output.exists() else ""


@dataclass
class Cluster:
    dir: Path
    env: dict    # environment for Slurm clients and for the jobs (sbatch exports it)

    def helper(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([str(HELPER), *args], env=self.env, capture_output=True,
                              text=True, timeout=timeout, stdin=subprocess.DEVNULL)

    def sbatch(self, *args: str, env: dict | None = None, name: str = "job") -> Job:
        """`sbatch ARGS` (options, then a script or --wrap) from the repo root, with the output
        in the cluster's jobs/ directory; `env` is added to the job's environment."""
        out = self.dir / "jobs" / f"{name}-%j.out"
        proc = subprocess.run(["sbatch", "--parsable", f"--output={out}", *map(str, args)],
                              env={**self.env, **(env or {})}, cwd=ROOT, capture_output=True,
                              text=True, timeout=60, stdin=subprocess.DEVNULL)
        assert proc.returncode == 0, f"sbatch failed: {proc.stderr}\n{self.logs()}"
        job_id = proc.stdout.strip().split(";")[0]
        return Job(job_id, Path(str(out).replace("%j", job_id)))

    def show(self, job: Job) -> dict:
        proc = subprocess.run(["scontrol", "-o", "show", "job", job.id], env=self.env,
                              capture_output=True, text=True, timeout=30)
        job.info = proc.stdout.strip()
        return dict(re.findall(r"(\w+)=(\S*)", job.info))

    def wait(self, job: Job, timeout: float = 300, max_pending: float = 60) -> Job:
        """Poll until the job ends; on timeout (or if it never starts) cancel it and fail."""
        start = time.monotonic()
        while True:
            fields = self.show(job)
            job.state = fields.get("JobState", "?")
            if job.state in TERMINAL:
                return job
            waited = time.monotonic() - start
            # An idle cluster starts a job within a second; pending for long means broken.
            stuck = job.state == "PENDING" and waited > max_pending
            if stuck or waited > timeout:
                subprocess.run(["scancel", job.id], env=self.env, timeout=30)
                why = (f"still PENDING ({fields.get('Reason')}) after {waited:.0f} s" if stuck
                       else f"not finished after {timeout:.0f} s (state {job.state})")
                pytest.fail(f"job {job.id} {why}; cancelled\n{self.diagnostics(job)}",
                            pytrace=False)
            time.sleep(0.5)

    def logs(self, lines: int = 60) -> str:
        try:
            return self.helper("logs", str(lines), timeout=30).stdout
        except subprocess.TimeoutExpired:
            return "(local_cluster.sh logs timed out)"

    def diagnostics(self, job: Job) -> str:
        return "\n".join([f"--- scontrol show job {job.id}", job.info,
                          f"--- job output {job.output}", job.text() or "(empty or missing)",
                          "--- slurm logs", self.logs()])


@pytest.fixture(scope="session")
def slurm_cluster(request):
    if os.geteuid() != 0:
        _unavailable("slurmd must run as root to start jobs (run the tests as root)")
    if shutil.which("apt-get") is None and shutil.which("slurmctld") is None:
        _unavailable("Slurm is not installed and there is no apt-get to install it")
    install = subprocess.run([str(HELPER), "install"], capture_output=True, text=True,
                             timeout=900, stdin=subprocess.DEVNULL)
    if install.returncode != 0:
        pytest.fail(f"installing Slurm failed:\n{install.stdout[-3000:]}\n{install.stderr[-3000:]}",
                    pytrace=False)

    state = Path(tempfile.mkdtemp(prefix="hvd-slurm-", dir="/tmp"))
    port = _free_port_block(NODES + 1)
    env = _clean_env()
    env.update(SLURM_LOCAL_DIR=str(state), SLURM_LOCAL_NODES=str(NODES),
               SLURM_LOCAL_PORT=str(port), SLURM_CONF=str(state / "slurm.conf"),
               # Slurm's own tools (sbatch, scontrol) must be found; the venv's python too.
               PATH=os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")]))
    cluster = Cluster(state, env)
    try:
        started = cluster.helper("start", timeout=120)
        if started.returncode != 0:
            pytest.fail(f"local Slurm cluster did not start:\n{started.stderr}\n{cluster.logs()}",
                        pytrace=False)
        yield cluster
    finally:
        stopped = cluster.helper("stop", timeout=120)
        if stopped.returncode != 0:
            print(f"local_cluster.sh stop failed:\n{stopped.stderr}", file=sys.stderr)
        # keep the logs of a failed session for a post-mortem
        if request.session.testsfailed == 0:
            shutil.rmtree(state, ignore_errors=True)
        else:
            print(f"Slurm state and logs kept in {state}", file=sys.stderr)
