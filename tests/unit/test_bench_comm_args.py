"""bench_comm.py's contender list: options reach the method with their Python types, so that
a contender such as ef_signsgd:double_squeeze=True runs instead of being skipped."""
from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))


@pytest.fixture(scope="module")
def bench_comm():
    saved = dict(os.environ)        # its import sets Horovod's controller for its own runs
    try:
        yield importlib.import_module("bench_comm")
    finally:
        os.environ.clear()
        os.environ.update(saved)


def test_option_values_keep_their_types(bench_comm):
    (hvd, c) = bench_comm.parse_contenders(
        "hvd_fp32,ef_signsgd:double_squeeze=True:exchange=alltoall:ratio=0.01:k=3:x=False")
    assert hvd.kind == "horovod"
    assert c.method == "ef_signsgd"
    assert c.options == {"double_squeeze": True, "exchange": "alltoall", "ratio": 0.01, "k": 3,
                         "x": False}
    assert type(c.options["k"]) is int and type(c.options["double_squeeze"]) is bool


def test_a_bool_option_makes_the_method(bench_comm):
    (c,) = bench_comm.parse_contenders("ef_signsgd:double_squeeze=True:exchange=alltoall")
    assert bench_comm.unavailable(c) is None
