"""hypervisor.kernels against the naive twins in naive.py."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hypervisor import kernels
from hypervisor.testing import naive

states = st.lists(st.integers(0, 2), min_size=0, max_size=64)


@settings(deadline=None)  # the first call may compile (after a change to kernels.py)
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


@settings(deadline=None)
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


@settings(deadline=None)
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


@settings(max_examples=200, deadline=None)
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


@st.composite
def vm_ledgers(draw):
    """One VM's P2M over ``pages`` gpfns whose entries name distinct frames (USED or LOCKED)
    and distinct swap slots, in maps that also hold other owners' entries; plus disjoint
    runs over the VM, in any order."""
    pages = draw(st.integers(1, 40))
    nframes, nslots = draw(st.integers(pages, 60)), draw(st.integers(pages, 60))
    frames = draw(st.permutations(range(nframes)))
    slots = draw(st.permutations(range(nslots)))
    state, ovm, og = [0] * nframes, [-1] * nframes, [-1] * nframes
    sstate, sovm, sog = [0] * nslots, [-1] * nslots, [-1] * nslots
    p2m = []
    for g in range(pages):
        kind = draw(st.sampled_from(["none", "frame", "locked", "slot"]))
        if kind == "none":
            p2m.append(-1)
        elif kind == "slot":
            s = slots[g]
            sstate[s], sovm[s], sog[s] = 1, 0, g
            p2m.append(-(s + 2))
        else:
            f = frames[g]
            state[f], ovm[f], og[f] = (2 if kind == "locked" else 1), 0, g
            p2m.append(f)
    for f in frames[pages:]:  # another VM's frames stay as they are
        if draw(st.booleans()):
            state[f], ovm[f], og[f] = 1, 1, 0
    cuts = sorted(draw(st.sets(st.integers(0, pages), min_size=2, max_size=10)))
    runs = [(a, b - a) for a, b in zip(cuts[::2], cuts[1::2])]
    runs = draw(st.permutations(runs))
    return p2m, runs, (state, ovm, og), (sstate, sovm, sog)


@settings(max_examples=200, deadline=None)
@given(vm_ledgers())
def test_runs_first_locked_matches_naive(led):
    p2m, runs, (state, _, _), _ = led
    got = kernels.runs_first_locked(np.array(p2m, dtype=np.int64),
                                    np.array(runs, dtype=np.int64).reshape(-1, 2),
                                    np.array(state, dtype=np.uint8))
    assert got == naive.runs_first_locked(p2m, runs, state)


@settings(max_examples=200, deadline=None)
@given(vm_ledgers())
def test_release_runs_matches_naive(led):
    p2m, runs, frame_maps, slot_maps = led
    arrs = [np.array(p2m, dtype=np.int64)]
    arrs += [np.array(a, dtype=t) for a, t in zip(frame_maps, (np.uint8, np.int32, np.int64))]
    arrs += [np.array(a, dtype=t) for a, t in zip(slot_maps, (np.uint8, np.int32, np.int64))]
    swapped = sum(1 for v in p2m if v <= -2)
    nf, slots = kernels.release_runs(arrs[0], np.array(runs, dtype=np.int64).reshape(-1, 2),
                                     *arrs[1:], max_slots=swapped)
    ref = [list(p2m), *[list(a) for a in frame_maps], *[list(a) for a in slot_maps]]
    want_nf, want_slots = naive.release_runs(ref[0], runs, *ref[1:])
    assert (nf, slots.tolist()) == (want_nf, want_slots)
    assert [a.tolist() for a in arrs] == ref


def test_release_runs_refuses_runs_outside_the_p2m():
    p2m = np.full(8, -1, dtype=np.int64)
    maps = [np.zeros(4, np.uint8), np.full(4, -1, np.int32), np.full(4, -1, np.int64)] * 2
    for bad in ([[6, 3]], [[-1, 2]], [[0, -1]]):
        with pytest.raises(ValueError, match=r"inside 0\.\.7"):
            kernels.release_runs(p2m, np.array(bad), *maps, max_slots=0)
        with pytest.raises(ValueError, match=r"inside 0\.\.7"):
            kernels.runs_first_locked(p2m, np.array(bad), maps[0])
