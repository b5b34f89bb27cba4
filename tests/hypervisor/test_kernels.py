"""hypervisor.kernels against the naive twins in naive.py."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hypervisor import kernels
from hypervisor.testing import naive

states = st.lists(st.integers(0, 2), min_size=0, max_size=64)


@given(states, st.integers(0, 80), st.integers(0, 200), st.sampled_from([1, 2]))
def test_map_alloc_matches_naive(state, n, hint, mark):
    arr = np.array(state, dtype=np.uint8)
    ref = list(state)
    got, h = kernels.map_alloc(arr, n, hint, mark)
    want, wh = naive.map_alloc(ref, n, hint, mark)
    assert got.tolist() == want
    assert arr.tolist() == ref
    if want:
        assert h == wh
    # Allocation never hands out more than is free, nor the same entry twice.
    assert len(set(want)) == len(want) == min(n, state.count(0))


@given(states, st.lists(st.integers(-3, 70), max_size=20))
def test_map_free_matches_naive(state, idx):
    arr = np.array(state, dtype=np.uint8)
    ref = list(state)
    ok = naive.map_free(ref, idx)
    if ok:
        kernels.map_free(arr, np.array(idx, dtype=np.int64))
    else:
        with pytest.raises(ValueError, match="nothing freed"):
            kernels.map_free(arr, np.array(idx, dtype=np.int64))
    # A refused batch leaves the map exactly as it was.
    assert arr.tolist() == ref


@given(states, st.integers(0, 2))
def test_map_count_matches_naive(state, v):
    assert kernels.map_count(np.array(state, dtype=np.uint8), v) == naive.map_count(state, v)


@st.composite
def ledgers(draw):
    nvm = draw(st.integers(1, 3))
    pages = [draw(st.integers(1, 16)) for _ in range(nvm)]
    nframes = draw(st.integers(1, 40))
    state, ovm, og = [], [], []
    for _ in range(nframes):
        s = draw(st.integers(0, 2))
        state.append(s)
        if s:
            v = draw(st.integers(0, nvm - 1))
            ovm.append(v)
            og.append(draw(st.integers(0, pages[v] - 1)))
        else:
            ovm.append(-1)
            og.append(-1)
    acc = [[draw(st.integers(0, 1)) for _ in range(p)] for p in pages]
    return state, ovm, og, acc


@settings(max_examples=200)
@given(ledgers(), st.integers(0, 100), st.integers(0, 50))
def test_clock_scan_matches_naive(led, hand, want):
    state, ovm, og, acc = led
    arr = np.array(state, dtype=np.uint8)
    accs = [np.array(a, dtype=np.uint8) for a in acc]
    got, h = kernels.clock_scan(arr, np.array(ovm, dtype=np.int32), np.array(og, dtype=np.int64),
                                kernels.make_accessed_list(accs), hand, want)
    ref_state, ref_acc = list(state), [list(a) for a in acc]
    want_v, wh = naive.clock_scan(ref_state, ovm, og, ref_acc, hand, want)
    assert got.tolist() == want_v
    assert h == wh
    assert arr.tolist() == ref_state
    assert [a.tolist() for a in accs] == ref_acc
    # Victims were USED, are now LOCKED, never duplicated.
    assert all(state[v] == 1 for v in want_v) and len(set(want_v)) == len(want_v)


def test_clock_gives_second_chance():
    state = np.ones(4, dtype=np.uint8)
    acc = np.array([1, 0, 1, 0], dtype=np.uint8)
    v, hand = kernels.clock_scan(state, np.zeros(4, np.int32), np.arange(4, dtype=np.int64),
                                 kernels.make_accessed_list([acc]), 0, 2)
    assert v.tolist() == [1, 3]
    assert acc.tolist() == [0, 0, 0, 0]  # the skipped pages lost their accessed bit
    v2, _ = kernels.clock_scan(state, np.zeros(4, np.int32), np.arange(4, dtype=np.int64),
                               kernels.make_accessed_list([acc]), hand, 2)
    assert v2.tolist() == [0, 2]


def test_bad_arguments_are_named():
    with pytest.raises(TypeError, match="uint8"):
        kernels.map_alloc(np.zeros(3, dtype=np.int64), 1)
    with pytest.raises(ValueError, match="negative"):
        kernels.map_alloc(np.zeros(3, dtype=np.uint8), -1)
    with pytest.raises(ValueError, match="out of range"):
        kernels.map_free(np.ones(3, dtype=np.uint8), np.array([5]))
