"""numfiles' arithmetic: the ceiling that leaves exactly N descriptor numbers free."""

from __future__ import annotations

import resource

import pytest

from containerfs.subsys import numfiles
from containerfs.subsys.numfiles import Clamp, ProcFacts, ceiling


@pytest.mark.parametrize(
    ("fds", "extra", "expected"),
    [
        ((), 0, 0),
        ((), 3, 3),
        ((0, 1, 2), 0, 3),
        ((0, 1, 2), 2, 5),
        ((0, 1, 2, 255), 2, 5),  # a high fd (bash's 255) stays, and does not count as free
        ((0, 2, 4), 0, 1),
        ((0, 2, 4), 1, 3),
        ((0, 2, 4), 2, 5),
        ((0, 1, 2, 3, 4), 0, 5),
    ],
)
def test_ceiling_leaves_exactly_extra_numbers_free(fds, extra, expected):
    limit = ceiling(fds, extra)
    assert limit == expected
    assert limit - sum(1 for fd in fds if fd < limit) == extra
    # the process can hold at most its fds plus extra
    assert limit + sum(1 for fd in fds if fd >= limit) == len(fds) + extra


def test_a_process_lowering_its_own_hard_limit_keeps_it():
    clamp = Clamp(1, original=(1024, 4096), applied=(50, 50))
    seen = ProcFacts(1, (0, 1, 2), (20, 40))
    assert numfiles._own_original(clamp, seen) == (40, 40)
    seen = ProcFacts(1, (0, 1, 2), (50, 50))
    assert numfiles._own_original(clamp, seen) == (1024, 4096)


def test_infinite_limits_are_capped_not_compared():
    assert numfiles._cap(resource.RLIM_INFINITY, 10) == 10
    assert numfiles._cap(5, 10) == 5
