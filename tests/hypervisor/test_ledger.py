"""The frame ledger against a plain dict model (stateful hypothesis test) plus edge cases."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from hypervisor.ledger import FrameLedger, LedgerError, OutOfFrames, OutOfSwap


class LedgerMachine(RuleBasedStateMachine):
    """Each rule runs on the real ledger and on a model: vm -> {gpfn: "frame" | "swap"}."""

    @initialize(frames=st.integers(1, 24), slots=st.integers(0, 24))
    def setup(self, frames, slots):
        self.led = FrameLedger(frames, slots)
        self.frames, self.slots = frames, slots
        self.model: dict[int, dict[int, str]] = {}
        self.pages: dict[int, int] = {}
        self.names = 0

    def _used(self, kind):
        return sum(1 for m in self.model.values() for v in m.values() if v == kind)

    @rule(pages=st.integers(1, 12))
    def add_vm(self, pages):
        self.names += 1
        vm = self.led.add_vm(f"vm{self.names}", pages)
        self.model[vm.index] = {}
        self.pages[vm.index] = pages

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def back(self, data):
        i = data.draw(st.sampled_from(sorted(self.model)))
        g = data.draw(st.lists(st.integers(-1, self.pages[i]), max_size=8))
        valid = (all(0 <= x < self.pages[i] for x in g) and len(set(g)) == len(g)
                 and all(self.model[i].get(x) != "frame" for x in g))
        before = self.led.state.copy()
        if not valid:
            with pytest.raises(LedgerError):
                self.led.back(i, np.array(g, dtype=np.int64))
            assert np.array_equal(before, self.led.state)
            return
        if len(g) > self.frames - self._used("frame"):
            with pytest.raises(OutOfFrames):
                self.led.back(i, np.array(g, dtype=np.int64))
            assert np.array_equal(before, self.led.state)
            return
        frames, slots = self.led.back(i, np.array(g, dtype=np.int64))
        for x, s in zip(g, slots.tolist()):
            assert (s >= 0) == (self.model[i].get(x) == "swap")
            self.model[i][x] = "frame"
        self.led.unlock(frames)

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def release(self, data):
        i = data.draw(st.sampled_from(sorted(self.model)))
        g = data.draw(st.lists(st.integers(0, self.pages[i] - 1), max_size=8, unique=True))
        bg, _ = self.led.release(i, np.array(g, dtype=np.int64))
        assert bg.tolist() == sorted(x for x in g if self.model[i].get(x) == "frame")
        for x in g:
            self.model[i].pop(x, None)

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def release_runs(self, data):
        i = data.draw(st.sampled_from(sorted(self.model)))
        runs = data.draw(st.lists(st.tuples(st.integers(0, self.pages[i]),
                                            st.integers(0, 4)), max_size=4))
        pages = [f + j for f, c in runs for j in range(c)]
        valid = (all(c > 0 and f + c <= self.pages[i] for f, c in runs)
                 and len(set(pages)) == len(pages))
        before = (self.led.state.copy(), self.led.swap_state.copy(),
                  self.led.vms[i].p2m.copy())
        arr = np.array(runs, dtype=np.int64).reshape(-1, 2)
        if not valid:
            with pytest.raises(LedgerError):
                self.led.release_runs(i, arr)
            after = (self.led.state, self.led.swap_state, self.led.vms[i].p2m)
            assert all(np.array_equal(a, b) for a, b in zip(before, after))
            return
        freed, slots = self.led.release_runs(i, arr)
        held = {x: self.model[i].get(x) for x in pages}
        assert freed == sum(1 for v in held.values() if v == "frame")
        assert slots.size == sum(1 for v in held.values() if v == "swap")
        assert sorted(slots.tolist()) == sorted(-(int(before[2][x]) + 2) for x in pages
                                                if held[x] == "swap")
        for x in pages:
            self.model[i].pop(x, None)

    @rule(want=st.integers(0, 6))
    def reclaim(self, want):
        victims = self.led.pick_victims(want)
        assert victims.size <= want
        if victims.size > self.slots - self._used("swap"):
            with pytest.raises(OutOfSwap):
                self.led.swap_out(victims)
            self.led.unlock(victims)
            return
        for so in self.led.swap_out(victims):
            for x in so.gpfns.tolist():
                assert self.model[so.vm][x] == "frame"
                self.model[so.vm][x] = "swap"

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def remove_vm(self, data):
        i = data.draw(st.sampled_from(sorted(self.model)))
        m = self.model.pop(i)
        nf, ns = self.led.remove_vm(i)
        assert nf == sum(1 for v in m.values() if v == "frame")
        assert ns == sum(1 for v in m.values() if v == "swap")

    @invariant()
    def conserved(self):
        if not hasattr(self, "led"):
            return
        self.led.check()
        assert self.led.frames_used == self._used("frame")
        assert self.led.slots_used == self._used("swap")
        assert self.led.frames_free + self.led.frames_used == self.frames


TestLedgerMachine = LedgerMachine.TestCase
TestLedgerMachine.settings = settings(max_examples=60, stateful_step_count=30, deadline=None)


def test_swapped_page_comes_back_with_its_slot():
    led = FrameLedger(2, 4)
    vm = led.add_vm("a", 4)
    frames, _ = led.back(vm.index, np.array([0, 1]))
    led.unlock(frames)
    victims = led.pick_victims(1)
    (so,) = led.swap_out(victims)
    assert led.vms[vm.index].p2m[so.gpfns[0]] <= -2
    _, slots = led.back(vm.index, so.gpfns)
    assert slots.tolist() == so.slots.tolist()
    assert led.slots_used == 0
    led.check()


def test_largest_vm_is_the_oom_victim():
    led = FrameLedger(10, 0)
    a = led.add_vm("a", 8)
    b = led.add_vm("b", 8)
    led.back(a.index, np.arange(3))
    led.back(b.index, np.arange(5))
    assert led.largest_vm() == b.index


def test_bad_batches_change_nothing():
    led = FrameLedger(4, 0)
    vm = led.add_vm("a", 4)
    for bad in ([4], [-1], [1, 1]):
        with pytest.raises(LedgerError):
            led.back(vm.index, np.array(bad))
    assert led.frames_used == 0 and np.all(vm.p2m == -1)
    with pytest.raises(LedgerError, match="no VM"):
        led.back(99, np.array([0]))


def test_release_runs_refuses_a_batch_in_flight_and_changes_nothing():
    led = FrameLedger(8, 0)
    vm = led.add_vm("a", 16)
    frames, _ = led.back(vm.index, np.arange(4, 8))
    led.unlock(frames[:2])  # gpfns 6 and 7 stay LOCKED (a fault or reclaim in flight)
    runs = np.array([[0, 6], [6, 4]])
    assert led.first_locked(vm.index, runs) == 6
    before = (led.state.copy(), vm.p2m.copy(), led.frames_used)
    with pytest.raises(LedgerError, match="page 6 of the batch is in flight"):
        led.release_runs(vm.index, runs)
    assert np.array_equal(before[0], led.state) and np.array_equal(before[1], vm.p2m)
    assert before[2] == led.frames_used
    led.unlock(frames[2:])
    assert led.first_locked(vm.index, runs) == -1
    freed, slots = led.release_runs(vm.index, runs)
    assert (freed, slots.size, led.frames_used, vm.backed) == (4, 0, 0, 0)
    led.check()


@pytest.mark.parametrize("runs, why", [
    ([[10, 7]], "beyond guest RAM"),
    ([[0, 4], [2, 1]], "repeats a page"),
    ([[3, 0]], "page count of zero"),
])
def test_release_runs_names_a_bad_batch(runs, why):
    led = FrameLedger(4, 0)
    vm = led.add_vm("a", 16)
    led.unlock(led.back(vm.index, np.arange(4))[0])
    with pytest.raises(LedgerError, match=why):
        led.release_runs(vm.index, np.array(runs))
    assert led.frames_used == 4 and vm.backed == 4


def test_batch_checks_cost_the_batch_not_the_vm():
    """A 2**22-page VM (4 GiB of guest RAM): checking or releasing a few pages allocates
    nothing near the VM's size (the P2M alone is 32 MiB; a per-VM scratch map 4 MiB)."""
    import tracemalloc

    led = FrameLedger(64, 8)
    vm = led.add_vm("big", 1 << 22)
    led.unlock(led.back(vm.index, np.array([5, 6, 1 << 21, (1 << 22) - 1]))[0])
    runs = np.array([[4, 4], [1 << 21, 3], [(1 << 22) - 1, 1]])
    led.release_runs(vm.index, runs[:1])  # warm: compile or load the kernels
    led.check_gpfns(vm.index, np.array([1, 2]))
    tracemalloc.start()
    try:
        led.check_gpfns(vm.index, np.array([9, 3, (1 << 22) - 2, 1 << 20]))
        assert led.first_locked(vm.index, runs) == -1
        freed, _ = led.release_runs(vm.index, runs)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert freed == 2 and vm.backed == 0
    assert peak < 256 * 1024, f"{peak} bytes allocated for a batch of a few pages"
