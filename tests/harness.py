"""Run a Python snippet or script as a real multi-rank job and collect each rank's result.

    results = run_job(CODE, np=4, launcher="mpirun").ok()     # list of dicts, rank order

Launchers: "mpirun" (Open MPI), "horovodrun" (Horovod's launcher, MPI controller), "gloo"
(`horovodrun --gloo`) and "torchrun" (`torchrun --standalone`, for torch.distributed jobs: the
snippet calls dist.init_process_group itself). A snippet gets a small prelude: `RANK`/`SIZE`
from the launcher's environment, its stderr redirected to a per-rank file, and `report(obj)`,
which writes the rank's JSON result. The job runs in its own session under a hard timeout; on
expiry the whole process tree is killed and the test fails with every rank's stderr, so a
hang can never stall CI.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
LAUNCHERS = ("mpirun", "horovodrun", "gloo", "torchrun")

PRELUDE = '''\
import json as _json, os as _os, sys as _sys
_OUT = _os.environ["HVD_TEST_OUT"]
RANK = int(_os.environ.get("OMPI_COMM_WORLD_RANK", _os.environ.get("HOROVOD_RANK",
                          _os.environ.get("RANK", "0"))))
SIZE = int(_os.environ.get("OMPI_COMM_WORLD_SIZE", _os.environ.get("HOROVOD_SIZE",
                          _os.environ.get("WORLD_SIZE", "1"))))
_fd = _os.open(_os.path.join(_OUT, "rank-%d.stderr" % RANK),
               _os.O_WRONLY | _os.O_CREAT | _os.O_TRUNC)
_sys.stderr.flush(); _os.dup2(_fd, 2)

def report(obj):
    """Write this rank's result (any JSON-serialisable object)."""
    path = _os.path.join(_OUT, "rank-%d.json" % RANK)
    with open(path + ".tmp", "w") as f:
        _json.dump(obj, f)
    _os.replace(path + ".tmp", path)
'''


def job_env(extra: dict | None = None) -> dict:
    """Environment for a launcher: root allowed, oversubscription on, one BLAS thread per rank."""
    env = dict(os.environ)
    env.update(
        OMPI_ALLOW_RUN_AS_ROOT="1",
        OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
        OMPI_MCA_rmaps_base_oversubscribe="1",
        OMPI_MCA_hwloc_base_binding_policy="none",
        OMPI_MCA_mpi_yield_when_idle="1",
        OMP_NUM_THREADS="1",
        PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests"),
                                    env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
        PATH=os.pathsep.join([str(BIN), env.get("PATH", "")]),
        PYTHONUNBUFFERED="1",
    )
    env.update(extra or {})
    return env


def launch_command(launcher: str, np: int, argv: list[str]) -> list[str]:
    if launcher == "mpirun":
        return ["mpirun", "-np", str(np), *argv]
    if launcher == "horovodrun":
        return [str(BIN / "horovodrun"), "-np", str(np), "-H", f"localhost:{np}", "--mpi",
                "--mpi-args=--oversubscribe", *argv]
    if launcher == "gloo":
        return [str(BIN / "horovodrun"), "-np", str(np), "-H", f"localhost:{np}", "--gloo", *argv]
    if launcher == "torchrun":     # RANK / WORLD_SIZE / MASTER_ADDR in each rank's environment
        return [str(BIN / "torchrun"), "--standalone", f"--nproc-per-node={np}", "--no-python",
                *argv]
    raise ValueError(f"unknown launcher {launcher!r}; expected one of {LAUNCHERS}")


@dataclass
class JobResult:
    command: list[str]
    np: int
    returncode: int | None
    timed_out: bool
    seconds: float
    stdout: str
    stderr: str
    rank_stderr: list[str] = field(default_factory=list)
    results: list = field(default_factory=list)   # one entry per rank, None where missing

    def diagnostics(self, tail: int = 4000) -> str:
        parts = [f"command: {' '.join(self.command)}",
                 f"returncode={self.returncode} timed_out={self.timed_out} "
                 f"after {self.seconds:.1f}s",
                 "--- launcher stdout ---", self.stdout[-tail:],
                 "--- launcher stderr ---", self.stderr[-tail:]]
        for r, err in enumerate(self.rank_stderr):
            parts += [f"--- rank {r} stderr ---", err[-tail:]]
        return "\n".join(parts)

    def ok(self) -> list:
        """The per-rank results; raises AssertionError with every rank's stderr otherwise."""
        if self.timed_out:
            raise AssertionError("job timed out (hang?)\n" + self.diagnostics())
        if self.returncode != 0:
            raise AssertionError("job failed\n" + self.diagnostics())
        missing = [r for r, res in enumerate(self.results) if res is None]
        if missing:
            raise AssertionError(f"ranks {missing} reported no result\n" + self.diagnostics())
        return self.results


def _kill_tree(proc: subprocess.Popen) -> None:
    try:
        children = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        children = []
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    for child in children:   # some launchers move ranks into sessions of their own
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass


def run_job(code: str | None = None, *, script: str | Path | None = None, np: int = 2,
            launcher: str = "mpirun", timeout: float = 120, args: list[str] = (),
            env: dict | None = None, workdir: str | Path | None = None) -> JobResult:
    """Run `code` (a snippet, given the prelude) or `script` (a file, run as is) on `np` ranks."""
    if (code is None) == (script is None):
        raise ValueError("give exactly one of code= or script=")
    out = Path(tempfile.mkdtemp(prefix="hvdjob-", dir=workdir))
    if code is not None:
        target = out / "job.py"
        target.write_text(PRELUDE + textwrap.dedent(code))
    else:
        target = Path(script)
    cmd = launch_command(launcher, np, [sys.executable, str(target), *map(str, args)])
    start = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            stdin=subprocess.DEVNULL, start_new_session=True, cwd=str(out),
                            env=job_env({"HVD_TEST_OUT": str(out), **(env or {})}))
    timed_out = False
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        _kill_tree(proc)
        stdout, stderr = proc.communicate()
    seconds = time.monotonic() - start

    def read(name: str):
        p = out / name
        return p.read_text(errors="replace") if p.exists() else None

    rank_stderr = [read(f"rank-{r}.stderr") or "" for r in range(np)]
    results = []
    for r in range(np):
        text = read(f"rank-{r}.json")
        results.append(json.loads(text) if text is not None else None)
    return JobResult(cmd, np, proc.returncode, timed_out, seconds, stdout, stderr,
                     rank_stderr, results)
