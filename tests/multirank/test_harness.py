"""The harness itself: real jobs, per-rank results, variable-length uint8 allgather, hangs."""
import pytest

ALLGATHER = """
import torch, horovod.torch as hvd
hvd.init()
# rank r contributes r + 3 bytes of value (r * 37 + i) % 256: a different length per rank.
mine = torch.tensor([(hvd.rank() * 37 + i) % 256 for i in range(hvd.rank() + 3)], dtype=torch.uint8)
out = hvd.allgather(mine, name="packed")
report({"rank": hvd.rank(), "size": hvd.size(), "dtype": str(out.dtype), "bytes": out.tolist()})
"""


@pytest.mark.parametrize("np", [2, 4])
def test_variable_length_uint8_allgather_in_rank_order(mpi_job, launcher, np):
    results = mpi_job(ALLGATHER, np=np, launcher=launcher, timeout=120).ok()
    expected = [(r * 37 + i) % 256 for r in range(np) for i in range(r + 3)]
    assert [res["rank"] for res in results] == list(range(np))
    for res in results:
        assert res["size"] == np
        assert res["dtype"] == "torch.uint8"
        assert res["bytes"] == expected


def test_horovodrun_mpi_launcher(mpi_job):
    results = mpi_job(ALLGATHER, np=2, launcher="horovodrun", timeout=120).ok()
    assert [res["size"] for res in results] == [2, 2]


HANG = """
import time, torch, horovod.torch as hvd
hvd.init()
if hvd.rank() == 0:
    hvd.allreduce(torch.ones(4), name="never-matched")   # rank 1 never joins
else:
    time.sleep(600)
report({"unreachable": True})
"""


def test_hang_fails_within_timeout(mpi_job, launcher):
    job = mpi_job(HANG, np=2, launcher=launcher, timeout=20)
    assert job.timed_out
    assert job.seconds < 40
    with pytest.raises(AssertionError, match="timed out"):
        job.ok()


def test_failing_rank_reports_its_stderr(mpi_job):
    job = mpi_job("import sys\nif RANK == 1:\n    raise SystemExit('rank one says no')\n"
                  "report({})\n", np=2, timeout=60)
    assert not job.timed_out and job.returncode != 0
    with pytest.raises(AssertionError, match="rank one says no"):
        job.ok()
