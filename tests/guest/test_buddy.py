"""Buddy allocator kernels against the plain-Python twin (guest/testing/naive.py).

A hypothesis state machine runs the same operations on both and compares every result and
the whole free-list layout; invariants: no overlap, free-count conservation, and complete
merging (after freeing everything only maximal blocks remain)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from guest import kernels as K
from guest.kernels import MAX_ORDER, PG_ANON, PG_BALLOON, PG_FREE, PG_ISOLATED, PG_REPORTED
from guest.mm import BuddyAllocator, RunError, validate_runs
from guest.testing.naive import NaiveBuddy


class BuddyMachine(RuleBasedStateMachine):
    """Real allocator vs naive model; tracks what is allocated to free it back later."""

    @initialize(npages=st.integers(1, 5000))
    def init(self, npages: int) -> None:
        self.npages = npages
        self.real = BuddyAllocator(npages)
        self.model = NaiveBuddy(npages)
        self.blocks: list[tuple[int, int]] = []  # allocated (gpfn, order)
        self.balloon: list[tuple[int, int]] = []  # allocated runs
        self.isolated: list[tuple[int, int]] = []

    @rule(order=st.integers(0, MAX_ORDER))
    def alloc_block(self, order: int) -> None:
        g = self.real.alloc_block(order, PG_ANON)
        assert g == self.model.alloc_block(order, PG_ANON)
        if g >= 0:
            assert g % (1 << order) == 0
            self.blocks.append((g, order))

    @precondition(lambda self: self.blocks)
    @rule(data=st.data())
    def free_block(self, data) -> None:
        i = data.draw(st.integers(0, len(self.blocks) - 1))
        g, o = self.blocks.pop(i)
        self.real.free_gpfns(np.arange(g, g + (1 << o)))
        for p in range(g, g + (1 << o)):
            self.model.free_block(p, 0)

    @rule(count=st.integers(1, 3000), max_order=st.integers(0, MAX_ORDER))
    def alloc_many(self, count: int, max_order: int) -> None:
        runs = self.real.alloc_many(count, max_order, PG_BALLOON)
        want = self.model.alloc_many(count, max_order, PG_BALLOON)
        # the real wrapper returns coalesced runs sorted by address
        assert _pages(runs) == _pages(want)
        assert (int(runs[:, 1].sum()) if len(runs) else 0) == sum(c for _, c in want)
        self.balloon.extend((int(a), int(b)) for a, b in runs)

    @precondition(lambda self: self.balloon)
    @rule(data=st.data())
    def free_balloon(self, data) -> None:
        i = data.draw(st.integers(0, len(self.balloon) - 1))
        g, c = self.balloon.pop(i)
        self.real.free_runs(np.array([[g, c]]), want_state=PG_BALLOON)
        self.model.free_range(g, c)

    @rule(min_order=st.integers(0, MAX_ORDER), max_runs=st.integers(0, 20))
    def isolate(self, min_order: int, max_runs: int) -> None:
        got = self.real.isolate_free(min_order, max_runs)
        assert [tuple(r) for r in got.tolist()] == self.model.isolate_free(min_order, max_runs)
        self.isolated.extend((int(a), int(b)) for a, b in got)

    @precondition(lambda self: self.isolated)
    @rule(data=st.data())
    def report_done(self, data) -> None:
        k = data.draw(st.integers(1, len(self.isolated)))
        done, self.isolated = self.isolated[:k], self.isolated[k:]
        self.real.free_runs(np.array(done), want_state=PG_ISOLATED)
        for g, c in done:
            self.model.free_range(g, c, putback_reported=True)

    @precondition(lambda self: self.blocks)
    @rule()
    def free_wrong_state_changes_nothing(self) -> None:
        g, o = self.blocks[0]
        before = self.real.state.copy()
        with pytest.raises(RunError) as e:
            self.real.free_runs(np.array([[g, 1 << o]]), want_state=PG_BALLOON)
        assert e.value.gpfn == g
        assert np.array_equal(before, self.real.state)

    @invariant()
    def same_as_model(self) -> None:
        assert self.real.state.tolist() == self.model.state
        real_lists = [[] for _ in range(MAX_ORDER + 1)]
        for g, o in self.real.free_blocks():
            real_lists[o].append(g)
        assert real_lists == self.model.lists

    @invariant()
    def conservation(self) -> None:
        st_ = self.real.state
        free = int(np.count_nonzero((st_ == PG_FREE) | (st_ == PG_REPORTED)))
        assert self.real.free_pages == free
        assert self.real.reported_pages == int(np.count_nonzero(st_ == PG_REPORTED))
        assert self.real.isolated_pages == int(np.count_nonzero(st_ == PG_ISOLATED))
        used = sum(1 << o for _, o in self.blocks) + sum(c for _, c in self.balloon) + sum(
            c for _, c in self.isolated)
        assert free + used == self.npages
        # free blocks do not overlap and cover exactly the free pages
        cover = np.zeros(self.npages, np.int64)
        for g, o in self.real.free_blocks():
            cover[g:g + (1 << o)] += 1
        assert cover.max(initial=0) <= 1
        assert int(cover.sum()) == free

    def teardown(self) -> None:
        # complete merging: free everything, then only maximal aligned blocks remain
        if not hasattr(self, "real"):
            return
        for g, o in self.blocks:
            self.real.free_gpfns(np.arange(g, g + (1 << o)))
        if self.balloon:
            self.real.free_runs(np.array(self.balloon), want_state=PG_BALLOON)
        if self.isolated:
            self.real.free_runs(np.array(self.isolated), want_state=PG_ISOLATED)
        assert sorted(self.real.free_blocks()) == sorted(BuddyAllocator(self.npages)
                                                         .free_blocks())
        assert self.real.free_pages == self.npages


def _pages(runs) -> list[int]:
    out: list[int] = []
    for g, c in sorted((int(a), int(b)) for a, b in runs):
        out.extend(range(g, g + c))
    return out


TestBuddyMachine = BuddyMachine.TestCase
TestBuddyMachine.settings = settings(max_examples=60, stateful_step_count=40, deadline=None,
                                     suppress_health_check=[HealthCheck.too_slow])


def test_init_layout_is_maximal_aligned_blocks() -> None:
    b = BuddyAllocator(3000)
    assert sorted(b.free_blocks()) == [(0, 10), (1024, 10), (2048, 9), (2560, 8), (2816, 7),
                               (2944, 5), (2976, 4), (2992, 3)]
    assert b.free_pages == 3000


def test_alloc_many_prefers_high_orders_and_coalesces() -> None:
    b = BuddyAllocator(1 << 14)
    runs = b.alloc_many(5000, MAX_ORDER, PG_BALLOON)
    assert runs.tolist() == [[0, 5000]]  # 4 order-10 blocks + split ones, all adjacent
    assert b.free_pages == (1 << 14) - 5000


def test_alloc_many_never_returns_pages_in_use() -> None:
    b = BuddyAllocator(4096)
    used = {b.alloc_block(0, PG_ANON) for _ in range(100)}
    runs = b.alloc_many(4096, MAX_ORDER, PG_BALLOON)
    got = set(_pages(runs))
    assert not (got & used)
    assert len(got) == 4096 - 100


@pytest.mark.parametrize("runs, code", [
    ([[0, 0]], "bad_field"),
    ([[100, 1]], "pfn_out_of_range"),
    ([[90, 20]], "pfn_out_of_range"),
    ([[2**63, 2**63]], "pfn_out_of_range"),
    ([[10, 5], [12, 1]], "duplicate_pfn"),
])
def test_validate_runs_rejects(runs, code) -> None:
    with pytest.raises(RunError) as e:
        validate_runs(np.array(runs, dtype=np.uint64), 100)
    assert e.value.code == code


@settings(deadline=None)
@given(st.data())
def test_first_not_in_state_matches_a_plain_loop(data):
    """Runs over a page-state map that is mostly one state: the first page of the runs, in
    run order, whose state differs (the word-at-a-time middle and byte head/tail agree)."""
    n = data.draw(st.integers(1, 80))
    want = data.draw(st.sampled_from([K.PG_FREE, K.PG_ANON, K.PG_BALLOON]))
    state = np.full(n, want, np.uint8)
    for p in data.draw(st.lists(st.integers(0, n - 1), max_size=3)):
        state[p] = data.draw(st.integers(0, 255).filter(lambda v: v != want))
    runs = data.draw(st.lists(st.tuples(st.integers(0, n - 1), st.integers(0, n)), max_size=6))
    runs = [(f, min(c, n - f)) for f, c in runs]
    arr = np.array(runs, dtype=np.int64).reshape(-1, 2)
    expect = next((g for f, c in runs for g in range(f, f + c) if state[g] != want), -1)
    assert K.first_not_in_state(arr, np.uint8(want), state) == expect
