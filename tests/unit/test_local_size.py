"""HVD_SIGNSGD_LOCAL_SIZE as read on one rank (exchange.parse_local_size): never raises, so
that Engine.validate can report a bad value on every rank (tests/multirank/
test_hierarchical_errors.py runs it in real jobs)."""
import pytest

from hvd_signsgd.exchange import parse_local_size


@pytest.mark.parametrize("text,n,want", [(None, 4, None), ("", 4, None), (" ", 4, None),
                                         ("2", 4, 2), (" 4 ", 4, 4), ("1", 3, 1)])
def test_good_values(text, n, want):
    assert parse_local_size(text, n) == (want, None)


@pytest.mark.parametrize("text,n", [("abc", 4), ("0", 4), ("-2", 4), ("3", 4), ("2.5", 4),
                                    ("8", 4), ("2", 5)])
def test_bad_values_are_a_problem_not_an_exception(text, n):
    size, problem = parse_local_size(text, n)
    assert size is None
    assert f"HVD_SIGNSGD_LOCAL_SIZE={text!r}" in problem and f"the {n} ranks" in problem
