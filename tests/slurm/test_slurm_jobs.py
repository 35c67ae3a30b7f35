"""The batch scripts in slurm/ as a user submits them, on a real local Slurm cluster.

Each job trains examples/train_digits.py (train_torchrun.sbatch: its DDP twin,
examples/train_digits_ddp.py, under torchrun) for a couple of epochs; the test reads the job's
output file: the "== hosts:" block (one "TASK: HOSTNAME" line per task, printed by the
script with srun) and rank 0's RESULT line.
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slurm

SCRIPTS = ["train.sbatch", "train_srun.sbatch", "train_torchrun.sbatch"]
JOB_TIMEOUT = 300     # seconds; a 2-epoch run takes ~10-30 s on 2 busy cores
MIN_RATIO = 10        # 1-bit signs: ~24x fewer bytes than fp32 on this model


def job_env(cluster, **extra) -> dict:
    env = {
        "METHOD": "signum", "EPOCHS": "2", "RUN_DIR": str(cluster.dir / "runs"),
        "VENV": sys.prefix,   # the venv running the tests, wherever it is
        # The fake nodes share the machine's cores; Open MPI would pin each node's rank 0 to
        # core 0, i.e. both ranks onto one core.
        "OMPI_MCA_hwloc_base_binding_policy": "none",
        # Our ranks may outnumber free cores (other tests run at the same time): yield
        # instead of spinning while waiting in a collective.
        "OMPI_MCA_mpi_yield_when_idle": "1",
    }
    env.update(extra)
    return env


def parse_output(text: str):
    """(hostnames per task, RESULT fields) from a job's output file."""
    hosts = {}
    in_hosts = False
    for line in text.splitlines():
        if line.startswith("== hosts:"):
            in_hosts = True
        elif in_hosts and re.fullmatch(r"\d+: \S+", line.strip()):
            task, host = line.strip().split(": ")
            hosts[int(task)] = host
        elif line.startswith("=="):
            in_hosts = False
    results = [line for line in text.splitlines() if line.startswith("RESULT ")]
    fields = dict(kv.split("=", 1) for kv in results[-1].split()[1:]) if results else {}
    return hosts, fields


def run_training(cluster, script: str, *sbatch_options: str):
    job = cluster.sbatch(*sbatch_options, ROOT / "slurm" / script, env=job_env(cluster),
                         name=script.replace(".sbatch", ""))
    cluster.wait(job, timeout=JOB_TIMEOUT)
    text = job.text()
    if job.state != "COMPLETED":
        pytest.fail(f"job {job.id} ended {job.state}\n{cluster.diagnostics(job)}", pytrace=False)
    hosts, result = parse_output(text)
    if not result:
        pytest.fail(f"no RESULT line in the output\n{cluster.diagnostics(job)}", pytrace=False)
    return job, hosts, result


def check_result(cluster, job, result):
    context = f"\n{cluster.diagnostics(job)}"
    assert result["method"] == "signum", context
    assert int(result["ranks"]) == 2, "training did not run on the 2 requested ranks" + context
    assert float(result["compression_ratio"]) > MIN_RATIO, "compression not active" + context
    assert result["ranks_identical"] == "True", "ranks diverged" + context
    metrics = json.loads((cluster.dir / "runs" / f"train_digits-signum-job{job.id}.json")
                         .read_text())
    assert metrics["ranks"] == 2 and metrics["epochs"] == 2


def test_cluster_runs_trivial_two_node_job(slurm_cluster):
    """The cluster itself, in about a second: one task on each node, distinct hostnames."""
    job = slurm_cluster.sbatch("-N", "2", "--ntasks-per-node=1",
                               "--wrap=echo '== hosts:'; srun --label hostname | sort -n",
                               name="hostname")
    slurm_cluster.wait(job, timeout=60)
    hosts, _ = parse_output(job.text())
    assert job.state == "COMPLETED", slurm_cluster.diagnostics(job)
    assert sorted(hosts.values()) == ["node1", "node2"], slurm_cluster.diagnostics(job)


@pytest.mark.parametrize("script", SCRIPTS)
def test_single_node_two_tasks(slurm_cluster, script):
    """The scripts' own defaults (1 node, 2 tasks per node), method signum."""
    job, hosts, result = run_training(slurm_cluster, script)
    assert len(hosts) == 2 and len(set(hosts.values())) == 1, slurm_cluster.diagnostics(job)
    check_result(slurm_cluster, job, result)


@pytest.mark.parametrize("script", SCRIPTS)
def test_two_nodes_one_task_each(slurm_cluster, script):
    """A 2-node allocation (two slurmd with distinct hostnames on this machine): one rank per
    node, so the gradient exchange crosses "nodes" (TCP instead of shared memory)."""
    job, hosts, result = run_training(slurm_cluster, script, "--nodes=2", "--ntasks-per-node=1")
    assert sorted(hosts.values()) == ["node1", "node2"], (
        "the tasks did not run on 2 distinct hosts\n" + slurm_cluster.diagnostics(job))
    check_result(slurm_cluster, job, result)
