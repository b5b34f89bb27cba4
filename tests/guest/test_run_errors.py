"""The guest's run batches fail with protocol.pfn's RunError and the wire's codes: what the
kernel answers in its ``ack`` is the error's own code, with no mapping in between."""

from __future__ import annotations

import numpy as np
import pytest

from guest.kernels import MAX_ORDER, PG_ANON, PG_BALLOON, PG_ISOLATED
from guest.mm import BuddyAllocator
from protocol import pfn as P
from protocol.errors import ErrorCode


@pytest.fixture
def buddy() -> BuddyAllocator:
    return BuddyAllocator(4096)


def _balloon(b: BuddyAllocator, pages: int) -> np.ndarray:
    return b.alloc_many(pages, MAX_ORDER, PG_BALLOON)


@pytest.mark.parametrize("runs, code, index", [
    ([[0, 0]], ErrorCode.BAD_FIELD, 0),
    ([[4090, 10]], ErrorCode.PFN_OUT_OF_RANGE, 0),
    ([[0, 8], [4, 1]], ErrorCode.DUPLICATE_PFN, 1),
])
def test_bad_runs_carry_the_wire_code_and_change_nothing(buddy, runs, code, index) -> None:
    _balloon(buddy, 1024)
    before = buddy.state.copy()
    with pytest.raises(P.RunError) as e:
        buddy.free_runs(np.array(runs), want_state=PG_BALLOON, code=ErrorCode.NOT_BALLOONED)
    assert (e.value.code, e.value.index) == (code, index)
    assert np.array_equal(before, buddy.state)


def test_state_errors_name_the_callers_code_and_page(buddy) -> None:
    runs = _balloon(buddy, 64)
    anon = buddy.alloc_block(0, PG_ANON)
    before = buddy.state.copy()
    bad = np.array([[int(runs[0, 0]), 1], [anon, 1]])
    with pytest.raises(P.RunError) as e:
        buddy.free_runs(bad, want_state=PG_BALLOON, code=ErrorCode.NOT_BALLOONED)
    assert (e.value.code, e.value.gpfn) == (ErrorCode.NOT_BALLOONED, anon)
    with pytest.raises(P.RunError) as e:
        buddy.free_runs(runs, want_state=PG_ISOLATED)  # not isolated: not the kernel's to take
    assert e.value.code is ErrorCode.NOT_IN_USE
    assert np.array_equal(before, buddy.state)
    assert buddy.free_runs(runs, want_state=PG_BALLOON) == int(runs[:, 1].sum())
