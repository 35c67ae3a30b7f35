import shutil

import pytest
from harness import run_job
from netsimcommon import netsim_prefix  # noqa: F401  (the fixture, for the netsim tests)


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "multirank" in str(item.fspath):
            item.add_marker(pytest.mark.multirank)


@pytest.fixture
def mpi_job():
    """run_job (see tests/harness.py); fails early with a clear message when MPI is missing."""
    if shutil.which("mpirun") is None:
        pytest.fail("mpirun not found: run `make setup` (installs Open MPI)")
    return run_job


@pytest.fixture(params=["mpirun", "gloo"])
def launcher(request):
    """Multi-rank tests taking this fixture run under plain mpirun and horovodrun --gloo."""
    return request.param
