"""protocol.pfn kernels against their plain-Python twins in naive.py (hypothesis)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol import pfn as P
from protocol.errors import ErrorCode, ProtocolError
from protocol.testing import naive

LIMIT = 96
pfn_lists = st.lists(st.integers(0, 120), max_size=60)
small_runs = st.lists(st.tuples(st.integers(0, 110), st.integers(0, 12)), max_size=12)
FAST = settings(deadline=None)  # first calls load numba kernels from the cache
state_maps = st.lists(st.integers(0, 1), min_size=LIMIT, max_size=LIMIT)


def _runs(a: np.ndarray) -> list[tuple[int, int]]:
    return [(int(f), int(c)) for f, c in a.tolist()]


@FAST
@given(pfn_lists)
def test_pfns_to_runs_matches_naive(pfns):
    got = P.pfns_to_runs(np.array(pfns, dtype=np.uint32))
    assert got.dtype == np.dtype("<u8") and got.shape[1] == 2
    assert _runs(got) == naive.pfns_to_runs(pfns)
    # Bytes in wire form and Python lists give the same answer.
    assert _runs(P.pfns_to_runs(P.pfns_to_wire(pfns))) == naive.pfns_to_runs(pfns)
    assert _runs(P.pfns_to_runs(pfns)) == naive.pfns_to_runs(pfns)


@FAST
@given(pfn_lists)
def test_pfns_to_runs_int64_input(pfns):
    got = P.pfns_to_runs(np.array(pfns, dtype=np.int64))
    assert _runs(got) == naive.pfns_to_runs(pfns)


@FAST
@given(st.lists(st.tuples(st.integers(0, 2**31), st.integers(0, 20)), max_size=10))
def test_runs_to_pfns_matches_naive(runs):
    got = P.runs_to_pfns(np.array(runs, dtype=np.uint64).reshape(-1, 2))
    assert got.dtype == np.dtype("<u4")
    assert got.tolist() == naive.runs_to_pfns(runs)
    assert P.runs_total(P.runs_to_wire(runs)) == sum(c for _, c in runs)


@FAST
@given(pfn_lists)
def test_runs_roundtrip(pfns):
    runs = P.pfns_to_runs(pfns)
    assert P.runs_to_pfns(runs).tolist() == sorted(set(pfns))


@FAST
@given(st.lists(st.integers(0, 130), max_size=50), state_maps, st.booleans())
def test_check_pfns_matches_naive(pfns, state, want_clear):
    st_arr = np.array(state, dtype=np.uint8)
    scratch = np.zeros(LIMIT, dtype=np.uint8)
    res = P.check_pfns(np.array(pfns, dtype=np.uint32), LIMIT, st_arr, scratch,
                       want_clear=want_clear)
    status, index = naive.check_pfns(pfns, LIMIT, state, want_clear)
    assert res.ok == (status == naive.OK)
    assert res.index == index
    assert res.code == _code(status, want_clear)
    assert not scratch.any(), "scratch must be left zeroed"
    assert st_arr.tolist() == state, "validation must not change the state map"
    if not res.ok:
        assert res.message


@FAST
@given(small_runs, state_maps, st.booleans())
def test_check_runs_matches_naive(runs, state, want_clear):
    _check_runs_like_naive(runs, state, want_clear)


def _check_runs_like_naive(runs, state, want_clear):
    st_arr = np.array(state, dtype=np.uint8)
    scratch = np.zeros(LIMIT, dtype=np.uint8)
    res = P.check_runs(np.array(runs, dtype=np.uint64).reshape(-1, 2), LIMIT, st_arr, scratch,
                       want_clear=want_clear)
    status, index = naive.check_runs(runs, LIMIT, state, want_clear)
    assert (res.ok, res.index, res.code) == (status == naive.OK, index, _code(status, want_clear))
    assert not scratch.any(), "scratch must be left zeroed"
    assert st_arr.tolist() == state, "validation must not change the state map"


@st.composite
def disjoint_runs(draw):
    """Ascending, disjoint runs (the shape every producer emits, which takes the
    word-at-a-time path), some split so that neighbours touch."""
    bounds = sorted(set(draw(st.lists(st.integers(0, LIMIT), max_size=8))))
    out = []
    for f, end in zip(bounds[::2], bounds[1::2]):  # long runs: words of 8 pages inside
        c = end - f
        cut = draw(st.integers(0, c - 1))
        out += [(f, cut), (f + cut, c - cut)] if cut else [(f, c)]
    return out


@FAST
@given(disjoint_runs(), st.lists(st.integers(0, LIMIT - 1), max_size=3), st.booleans())
def test_check_runs_on_disjoint_runs_matches_naive(runs, wrong, want_clear):
    """The state map is right everywhere but at a few pages (anywhere in a word)."""
    state = [int(want_clear)] * LIMIT
    for w in wrong:
        state[w] ^= 1
    _check_runs_like_naive(runs, state, want_clear)


def test_check_runs_huge_count_is_out_of_range_not_overflow():
    state = np.zeros(LIMIT, dtype=np.uint8)
    scratch = np.zeros(LIMIT, dtype=np.uint8)
    runs = np.array([[5, 2**64 - 3]], dtype=np.uint64)
    res = P.check_runs(runs, LIMIT, state, scratch, want_clear=False)
    assert (res.ok, res.code, res.index) == (False, ErrorCode.PFN_OUT_OF_RANGE, 0)


def _code(status: int, want_clear: bool) -> ErrorCode | None:
    return {
        naive.OK: None,
        naive.OUT_OF_RANGE: ErrorCode.PFN_OUT_OF_RANGE,
        naive.DUPLICATE: ErrorCode.DUPLICATE_PFN,
        naive.EMPTY_RUN: ErrorCode.BAD_FIELD,
        naive.STATE: ErrorCode.NOT_BALLOONED if want_clear else ErrorCode.ALREADY_BALLOONED,
    }[status]


@FAST
@given(state_maps, small_runs, st.integers(0, 3))
def test_set_runs_matches_naive(state, runs, value):
    runs = [(f, c) for f, c in runs if f + c <= LIMIT]
    arr = np.array(state, dtype=np.uint8)
    P.set_runs(arr, np.array(runs, dtype=np.uint64).reshape(-1, 2), value)
    assert arr.tolist() == naive.set_runs(state, runs, value)


@FAST
@given(state_maps, st.lists(st.integers(0, LIMIT - 1), max_size=30), st.integers(0, 3))
def test_set_pfns_matches_naive(state, pfns, value):
    arr = np.array(state, dtype=np.uint8)
    P.set_pfns(arr, np.array(pfns, dtype=np.uint32), value)
    assert arr.tolist() == naive.set_runs(state, [(p, 1) for p in pfns], value)


@FAST
@given(st.lists(st.integers(0, 3), max_size=200))
def test_runs_of_set_and_count_match_naive(state):
    arr = np.array(state, dtype=np.uint8)
    assert _runs(P.runs_of_set(arr)) == naive.runs_of_set(state)
    assert P.count_set(arr) == sum(1 for v in state if v)


@FAST
@given(st.lists(st.tuples(st.integers(0, 1000), st.integers(0, 30)), max_size=10),
       st.integers(1, 40))
def test_split_runs_matches_naive(runs, max_pages):
    chunks = P.split_runs(np.array(runs, dtype=np.uint64).reshape(-1, 2), max_pages)
    assert [_runs(c) for c in chunks] == naive.split_runs(runs, max_pages)
    assert all(P.runs_total(c) <= max_pages for c in chunks)
    assert all(c.dtype == np.dtype("<u8") for c in chunks)


@pytest.mark.parametrize("bad", [0, -1])
def test_split_runs_rejects_nonpositive_chunk(bad):
    with pytest.raises(ValueError, match="max_pages"):
        P.split_runs(np.array([[0, 4]], dtype=np.uint64), bad)


def test_wrappers_reject_bad_shapes():
    with pytest.raises(ValueError, match="1-D"):
        P.as_pfns(np.zeros((2, 2)))
    with pytest.raises(ValueError, match="uint32"):
        P.as_pfns([-1])
    with pytest.raises(ValueError, match=r"\(k, 2\)"):
        P.as_runs(np.zeros((3, 3)))
    with pytest.raises(ValueError, match="non-negative"):
        P.as_runs([(-1, 2)])


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(0, 2**32 - 1), max_size=40))
def test_wire_views_are_little_endian(pfns):
    wire = P.pfns_to_wire(pfns)
    assert wire == b"".join(p.to_bytes(4, "little") for p in pfns)
    runs = [(p, 1) for p in pfns]
    assert P.runs_to_wire(runs) == b"".join(
        f.to_bytes(8, "little") + c.to_bytes(8, "little") for f, c in runs)


# ---- one validation family: validate_runs (no state map), RunError, coalesce_runs --------

wide_runs = st.lists(st.tuples(st.integers(0, 110), st.integers(0, 40)), max_size=12)


@FAST
@given(st.one_of(small_runs, wide_runs))
def test_validate_runs_agrees_with_check_runs(runs):
    """Without a state map, validation is check_runs on a map that never objects: same
    verdict, same run index, same code; the pages are returned in batch order as int64."""
    arr = np.array(runs, dtype=np.uint64).reshape(-1, 2)
    status, index = naive.check_runs(runs, LIMIT, [0] * LIMIT, False)
    if status == naive.OK:
        got = P.validate_runs(arr, LIMIT)
        assert got.dtype == np.int64 and got.tolist() == [list(r) for r in runs]
        return
    with pytest.raises(P.RunError) as e:
        P.validate_runs(arr, LIMIT)
    assert (e.value.code, e.value.index) == (_code(status, False), index)
    assert e.value.pfn == runs[index][0]
    assert isinstance(e.value, ProtocolError) and isinstance(e.value.code, ErrorCode)
    assert str(e.value).startswith(str(e.value.code))


@pytest.mark.parametrize("runs, code", [
    (np.zeros((2, 3), dtype=np.uint64), ErrorCode.BAD_FIELD),
    (np.array([[1.0, 2.0]]), ErrorCode.BAD_FIELD),
    (np.array([[-1, 2]]), ErrorCode.PFN_OUT_OF_RANGE),
    (np.array([[5, 2**64 - 3]], dtype=np.uint64), ErrorCode.PFN_OUT_OF_RANGE),
])
def test_validate_runs_names_shape_type_and_overflow(runs, code):
    with pytest.raises(P.RunError) as e:
        P.validate_runs(runs, LIMIT)
    assert e.value.code is code


def test_validate_runs_costs_the_batch_not_the_limit():
    """A 2**32-page limit: an O(limit) scratch map would be 4 GiB for one batch."""
    limit = 1 << 32
    runs = np.array([[limit - 10, 10], [0, 1 << 20], [1 << 31, 5]], dtype=np.uint64)
    assert P.validate_runs(runs, limit).tolist() == runs.astype(np.int64).tolist()
    with pytest.raises(P.RunError) as e:
        P.validate_runs(np.array([[1 << 31, 10], [5, 3], [(1 << 31) + 9, 1]]), limit)
    assert (e.value.code, e.value.index, e.value.pfn) == (ErrorCode.DUPLICATE_PFN, 2,
                                                           (1 << 31) + 9)


@FAST
@given(disjoint_runs(), st.randoms(use_true_random=False))
def test_coalesce_runs_is_the_maximal_ascending_form(runs, rnd):
    shuffled = list(runs)
    rnd.shuffle(shuffled)
    got = P.coalesce_runs(np.array(shuffled, dtype=np.int64).reshape(-1, 2))
    assert got.dtype == np.int64
    assert _runs(got) == naive.pfns_to_runs(naive.runs_to_pfns(runs))


def test_batch_check_error_is_the_same_family():
    state = np.ones(LIMIT, dtype=np.uint8)
    res = P.check_runs(np.array([[3, 2]], dtype=np.uint64), LIMIT, state,
                       np.zeros(LIMIT, dtype=np.uint8), want_clear=False)
    err = res.error(pfn=3)
    assert isinstance(err, P.RunError)
    assert (err.code, err.index, err.gpfn) == (ErrorCode.ALREADY_BALLOONED, 0, 3)
    assert P.BatchCheck(True).error() is None


@FAST
@given(st.lists(st.integers(0, 3), min_size=LIMIT, max_size=LIMIT), disjoint_runs(),
       st.integers(0, 3))
def test_first_page_not_in_matches_a_plain_loop(state, runs, value):
    arr = np.array(state, dtype=np.uint8)
    pages = naive.runs_to_pfns(runs)
    want = next((p for p in pages if state[p] != value), -1)
    assert P.first_page_not_in(np.array(runs, dtype=np.uint64).reshape(-1, 2), arr,
                               value) == want
    assert P.first_page_not_in(np.array(pages, dtype=np.uint32), arr, value) == want
