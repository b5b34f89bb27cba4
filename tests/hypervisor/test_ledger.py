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
        bg, fr = self.led.release(i, np.array(g, dtype=np.int64))
        assert bg.tolist() == sorted(x for x in g if self.model[i].get(x) == "frame")
        for x in g:
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
    frames2, slots = led.back(vm.index, so.gpfns)
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
