"""The host frame ledger: who holds which host frame and which host swap slot.

Units: pages of 4096 bytes. A *frame* is one host page of the budget ``host.memory / 4096``;
a *slot* is one page of the host swap file; a *gpfn* is a guest page number.

The ledger is pure bookkeeping (no file descriptors, no IO), so it can be checked against a
plain model with hypothesis. ``hypervisor.vmmem`` and the host perform the side effects in
the reclaim order of docs/architecture.md ("Reclaim"); the ledger only moves numbers.

Per frame: a state byte (``kernels.FREE``/``USED``/``LOCKED``) and the reverse map
(``owner_vm``, ``owner_gpfn``). Per swap slot: a state byte and the same reverse map. Per VM:
the P2M, one ``int64`` per gpfn, encoded as

- ``P2M_NONE`` (-1): not backed (zero page, ballooned, or never touched);
- ``frame >= 0``: backed by that host frame (the page is PRESENT and resident);
- ``<= -2``: host-swapped to slot ``-(value + 2)``.

and a balloon byte map (1 = in the balloon). Every operation validates its whole batch before
changing anything: a rejected batch leaves the ledger exactly as it was.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

from hypervisor import kernels
from protocol import pfn as P

P2M_NONE = -1


def slot_to_p2m(slots: np.ndarray) -> np.ndarray:
    """Encode swap slots as P2M entries."""
    return -(np.asarray(slots, dtype=np.int64) + 2)


def p2m_to_slot(values: np.ndarray) -> np.ndarray:
    """Decode P2M entries known to be swapped into swap slots."""
    return -(np.asarray(values, dtype=np.int64) + 2)


class LedgerError(Exception):
    """A ledger operation was refused; the ledger is unchanged."""


class OutOfFrames(LedgerError):
    def __init__(self, wanted: int, free: int) -> None:
        super().__init__(f"need {wanted} host frames, only {free} free")
        self.wanted = wanted
        self.free = free


class OutOfSwap(LedgerError):
    def __init__(self, wanted: int, free: int) -> None:
        super().__init__(f"need {wanted} host swap slots, only {free} free")
        self.wanted = wanted
        self.free = free


@dataclass
class VmLedger:
    """The per-VM half of the ledger."""

    index: int
    name: str
    pages: int
    p2m: np.ndarray
    balloon: np.ndarray
    accessed: np.ndarray
    backed: int = 0
    swapped: int = 0
    counters: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class SwapOut:
    """Pages of one VM moved to host swap: copy ``gpfns`` (in this order) to ``slots``."""

    vm: int
    gpfns: np.ndarray
    slots: np.ndarray
    frames: np.ndarray


class FrameLedger:
    """Frames, swap slots, reverse maps and per-VM P2Ms (see the module docstring)."""

    def __init__(self, frames: int, swap_slots: int) -> None:
        if frames <= 0:
            raise ValueError(f"a host needs at least one frame, got {frames}")
        if swap_slots < 0:
            raise ValueError(f"swap slots must be >= 0, got {swap_slots}")
        self.frames_total = int(frames)
        self.swap_slots_total = int(swap_slots)
        self.state = np.zeros(frames, dtype=np.uint8)
        self.owner_vm = np.full(frames, -1, dtype=np.int32)
        self.owner_gpfn = np.full(frames, -1, dtype=np.int64)
        self.swap_state = np.zeros(swap_slots, dtype=np.uint8)
        self.swap_owner_vm = np.full(swap_slots, -1, dtype=np.int32)
        self.swap_owner_gpfn = np.full(swap_slots, -1, dtype=np.int64)
        self.frames_used = 0
        self.slots_used = 0
        self._alloc_hint = 0
        self._slot_hint = 0
        self.clock_hand = 0
        self.vms: dict[int, VmLedger] = {}
        self._next_index = 0
        self._accessed_slots: list[np.ndarray] = []
        self._accessed_list = kernels.make_accessed_list([np.zeros(1, dtype=np.uint8)])

    # ---- VMs ---------------------------------------------------------------------------

    def add_vm(self, name: str, pages: int, accessed: np.ndarray | None = None) -> VmLedger:
        """Register a VM of ``pages`` guest pages; ``accessed`` is its shared accessed array."""
        if pages <= 0:
            raise ValueError(f"VM {name!r} needs at least one page, got {pages}")
        if accessed is None:
            accessed = np.zeros(pages, dtype=np.uint8)
        if accessed.dtype != np.uint8 or accessed.shape != (pages,):
            raise ValueError(f"accessed array of VM {name!r} must be uint8[{pages}]")
        index = self._next_index
        self._next_index += 1
        vm = VmLedger(
            index=index,
            name=name,
            pages=int(pages),
            p2m=np.full(pages, P2M_NONE, dtype=np.int64),
            balloon=np.zeros(pages, dtype=np.uint8),
            accessed=accessed,
        )
        self.vms[index] = vm
        self._accessed_slots.append(accessed)
        self._rebuild_accessed()
        return vm

    def remove_vm(self, index: int) -> tuple[int, int]:
        """Drop a VM: free all its frames and slots. Returns (frames freed, slots freed)."""
        vm = self._vm(index)
        frames = np.nonzero(self.owner_vm == index)[0]
        slots = np.nonzero(self.swap_owner_vm == index)[0]
        if frames.size:
            kernels.map_free(self.state, frames)
            self.owner_vm[frames] = -1
            self.owner_gpfn[frames] = -1
        if slots.size:
            kernels.map_free(self.swap_state, slots)
            self.swap_owner_vm[slots] = -1
            self.swap_owner_gpfn[slots] = -1
        self.frames_used -= int(frames.size)
        self.slots_used -= int(slots.size)
        vm.p2m[:] = P2M_NONE
        vm.backed = vm.swapped = 0
        del self.vms[index]
        # Keep the index slot so other VMs' indices stay valid; point it at a dummy array.
        self._accessed_slots[index] = np.zeros(1, dtype=np.uint8)
        self._rebuild_accessed()
        return int(frames.size), int(slots.size)

    def _rebuild_accessed(self) -> None:
        self._accessed_list = kernels.make_accessed_list(
            self._accessed_slots or [np.zeros(1, dtype=np.uint8)]
        )

    def _vm(self, index: int) -> VmLedger:
        try:
            return self.vms[index]
        except KeyError:
            raise LedgerError(f"no VM with index {index}") from None

    def check_gpfns(self, index: int, gpfns: np.ndarray) -> np.ndarray:
        """Validate a batch (range, duplicates) for VM ``index``; returns it as int64."""
        return self._gpfns(self._vm(index), gpfns)

    def _gpfns(self, vm: VmLedger, gpfns: np.ndarray) -> np.ndarray:
        g = np.asarray(gpfns)
        if g.ndim != 1:
            raise LedgerError("gpfns must be a 1-d array")
        g = g.astype(np.int64, copy=False)
        if g.size:
            lo, hi = int(g.min()), int(g.max())
            if lo < 0 or hi >= vm.pages:
                bad = lo if lo < 0 else hi
                raise LedgerError(
                    f"gpfn {bad} is outside VM {vm.name!r} (0..{vm.pages - 1})"
                )
            # O(batch): one pass when sorted (the usual case), a sort otherwise; a batch
            # with a repeat has fewer pages in its runs than entries.
            if P.runs_total(P.pfns_to_runs(g)) != g.size:
                raise LedgerError(f"duplicate gpfns in one batch for VM {vm.name!r}")
        return g

    def _runs(self, vm: VmLedger, runs: np.ndarray) -> np.ndarray:
        """A run batch's shape, bounds and disjointness, in O(runs) for ascending runs (the
        pages' states are the caller's: the balloon device checked them); int64 (k, 2)."""
        try:
            return P.validate_runs(runs, vm.pages)
        except P.RunError as e:
            raise LedgerError(f"VM {vm.name!r}: {e.message}") from None

    # ---- counts ------------------------------------------------------------------------

    @property
    def frames_free(self) -> int:
        return self.frames_total - self.frames_used

    @property
    def slots_free(self) -> int:
        return self.swap_slots_total - self.slots_used

    # ---- backing -----------------------------------------------------------------------

    def back(self, index: int, gpfns: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Give each of ``gpfns`` (not backed now) a frame, LOCKED until ``unlock``.

        Returns (frames, slots) aligned with ``gpfns``; ``slots[i]`` is the host swap slot
        the page's bytes must be copied back from, or -1 for a page that starts as zeros.
        The slots are already free in the ledger: copy before anything else allocates.
        Raises OutOfFrames (nothing changed) when there are not enough free frames.
        """
        vm = self._vm(index)
        g = self._gpfns(vm, gpfns)
        cur = vm.p2m[g]
        if np.any(cur >= 0):
            bad = int(g[np.argmax(cur >= 0)])
            raise LedgerError(f"gpfn {bad} of VM {vm.name!r} is already backed")
        if g.size > self.frames_free:
            raise OutOfFrames(int(g.size), self.frames_free)
        frames, self._alloc_hint = kernels.map_alloc(
            self.state, int(g.size), self._alloc_hint, int(kernels.LOCKED)
        )
        assert frames.size == g.size  # guaranteed by the frames_free check
        swapped = cur <= -2
        slots = np.where(swapped, p2m_to_slot(cur), -1)
        if np.any(swapped):
            s = slots[swapped]
            kernels.map_free(self.swap_state, s)
            self.swap_owner_vm[s] = -1
            self.swap_owner_gpfn[s] = -1
            self.slots_used -= int(s.size)
            vm.swapped -= int(s.size)
        self.owner_vm[frames] = index
        self.owner_gpfn[frames] = g
        vm.p2m[g] = frames
        self.frames_used += int(g.size)
        vm.backed += int(g.size)
        return frames, slots

    def unlock(self, frames: np.ndarray) -> None:
        """LOCKED -> USED (the frames become reclaimable)."""
        f = np.asarray(frames, dtype=np.int64)
        if f.size and np.any(self.state[f] == kernels.FREE):
            raise LedgerError("cannot unlock a free frame")
        self.state[f] = kernels.USED

    def release(self, index: int, gpfns: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Drop the backing of ``gpfns``: frames and swap slots they hold become free.

        Pages with no backing are fine (nothing to do). Returns (gpfns that were backed, in
        ascending order, and their frames); the caller punches those pages. LOCKED frames
        (in flight) are refused. The balloon path uses :meth:`release_runs`.
        """
        vm = self._vm(index)
        g = self._gpfns(vm, gpfns)
        runs = P.pfns_to_runs(g).astype(np.int64)
        self._refuse_in_flight(vm, runs)
        cur = vm.p2m[g]
        backed = cur >= 0
        bg, frames = g[backed], cur[backed]
        self._release_runs(vm, runs)
        order = np.argsort(bg, kind="stable")
        return bg[order], frames[order]

    def first_locked(self, index: int, runs: np.ndarray) -> int:
        """The first gpfn of ``runs`` backed by a LOCKED frame (a reclaim's victim in
        flight, while the host's lock is free), or -1. O(pages of the runs)."""
        vm = self._vm(index)
        return kernels.runs_first_locked(vm.p2m, self._runs(vm, runs), self.state)

    def release_runs(self, index: int, runs: np.ndarray) -> tuple[int, np.ndarray]:
        """Drop the backing of every page of ``runs`` (disjoint runs of VM ``index``):
        the frames and host swap slots they hold become free, their P2M entries NONE.

        Pages with no backing are fine. All or nothing: runs outside the VM, overlapping
        runs or a page in flight (LOCKED) are refused with nothing changed. One pass over
        the batch's pages, no page arrays: the only allocation is the freed slots'. Returns
        (frames freed, the freed swap slots), the caller punches the runs and discards the
        slots.
        """
        vm = self._vm(index)
        r = self._runs(vm, runs)
        self._refuse_in_flight(vm, r)
        return self._release_runs(vm, r)

    def _refuse_in_flight(self, vm: VmLedger, runs: np.ndarray) -> None:
        bad = kernels.runs_first_locked(vm.p2m, runs, self.state)
        if bad >= 0:
            raise LedgerError(f"VM {vm.name!r}: page {bad} of the batch is in flight")

    def _release_runs(self, vm: VmLedger, runs: np.ndarray) -> tuple[int, np.ndarray]:
        freed, slots = kernels.release_runs(
            vm.p2m, runs, self.state, self.owner_vm, self.owner_gpfn, self.swap_state,
            self.swap_owner_vm, self.swap_owner_gpfn, max_slots=vm.swapped)
        self.frames_used -= freed
        self.slots_used -= int(slots.size)
        vm.backed -= freed
        vm.swapped -= int(slots.size)
        return freed, slots

    # ---- reclaim -----------------------------------------------------------------------

    def pick_victims(self, want: int, exclude: Iterable[int] = ()) -> np.ndarray:
        """Clock-scan for up to ``want`` victim frames; they come back LOCKED.

        Frames of the VMs in ``exclude`` (ledger indices) are never picked (nor is their
        accessed bit cleared)."""
        ex = np.fromiter(exclude, dtype=np.int32)
        hide = np.empty(0, dtype=np.int64)
        if ex.size:
            hide = np.nonzero((self.state == kernels.USED) & np.isin(self.owner_vm, ex))[0]
            self.state[hide] = kernels.LOCKED
        try:
            victims, self.clock_hand = kernels.clock_scan(
                self.state, self.owner_vm, self.owner_gpfn, self._accessed_list,
                self.clock_hand, int(want),
            )
        finally:
            self.state[hide] = kernels.USED
        return victims

    def reserve_slots(self, count: int, limit: int | None = None) -> np.ndarray:
        """Take ``count`` free swap slots for a copy that has not happened yet.

        Reserved slots are LOCKED and owned by no VM until :meth:`swap_out` commits them or
        :meth:`cancel_slots` gives them back. ``limit`` caps the slots in use (reserved
        ones included) below the file's size. Raises OutOfSwap (nothing changed)."""
        free = self.slots_free if limit is None else min(self.slots_free,
                                                         max(0, limit - self.slots_used))
        if count > free:
            raise OutOfSwap(int(count), free)
        slots, self._slot_hint = kernels.map_alloc(
            self.swap_state, int(count), self._slot_hint, int(kernels.LOCKED)
        )
        self.slots_used += int(slots.size)
        return slots

    def cancel_slots(self, slots: np.ndarray) -> None:
        """Give back reserved slots (their copy failed or was not needed)."""
        s = np.asarray(slots, dtype=np.int64)
        if s.size == 0:
            return
        if np.any(self.swap_state[s] != kernels.LOCKED):
            raise LedgerError("only reserved (LOCKED) slots can be cancelled")
        kernels.map_free(self.swap_state, s)
        self.slots_used -= int(s.size)

    def swap_out(self, frames: np.ndarray, slots: np.ndarray | None = None) -> list[SwapOut]:
        """Move LOCKED victim ``frames`` to host swap slots and free the frames.

        With ``slots`` (aligned with ``frames``, reserved by :meth:`reserve_slots`) this
        commits a copy already made: call it only after the bytes are in those slots.
        Without, it allocates the slots itself. Returns one ``SwapOut`` per VM, gpfns
        ascending. Raises OutOfSwap (nothing changed) when there are not enough free slots.
        """
        f = np.asarray(frames, dtype=np.int64)
        if f.size == 0:
            return []
        if np.any(self.state[f] != kernels.LOCKED):
            raise LedgerError("only LOCKED victim frames can be swapped out")
        if slots is None:
            slots = self.reserve_slots(int(f.size))
        else:
            slots = np.asarray(slots, dtype=np.int64)
            if slots.shape != f.shape or np.any(self.swap_state[slots] != kernels.LOCKED):
                raise LedgerError("swap_out needs one reserved slot per frame")
        self.swap_state[slots] = kernels.USED
        vms = self.owner_vm[f]
        gp = self.owner_gpfn[f]
        self.swap_owner_vm[slots] = vms
        self.swap_owner_gpfn[slots] = gp
        out: list[SwapOut] = []
        for v in np.unique(vms):
            sel = vms == v
            order = np.argsort(gp[sel], kind="stable")
            vg, vs, vf = gp[sel][order], slots[sel][order], f[sel][order]
            vm = self.vms[int(v)]
            vm.p2m[vg] = slot_to_p2m(vs)
            vm.backed -= int(vg.size)
            vm.swapped += int(vg.size)
            out.append(SwapOut(vm=int(v), gpfns=vg, slots=vs, frames=vf))
        kernels.map_free(self.state, f)
        self.owner_vm[f] = -1
        self.owner_gpfn[f] = -1
        self.frames_used -= int(f.size)
        return out

    # ---- queries -----------------------------------------------------------------------

    def vm_by_name(self, name: str) -> VmLedger:
        for vm in self.vms.values():
            if vm.name == name:
                return vm
        raise LedgerError(f"no VM named {name!r}")

    def largest_vm(self) -> int | None:
        """Index of the VM holding most frames (ties: the lowest index), None when none."""
        best: tuple[int, int] | None = None
        for vm in self.vms.values():
            if best is None or vm.backed > best[0]:
                best = (vm.backed, vm.index)
        return None if best is None else best[1]

    def check(self) -> None:
        """Assert every internal invariant (used by tests and debug builds)."""
        used = self.state != kernels.FREE
        assert int(used.sum()) == self.frames_used, "frame count drift"
        assert int((self.swap_state != kernels.FREE).sum()) == self.slots_used, "slot drift"
        assert np.all(self.owner_vm[~used] == -1)
        for vm in self.vms.values():
            mine = np.nonzero(self.owner_vm == vm.index)[0]
            assert mine.size == vm.backed, f"{vm.name}: backed count drift"
            assert np.all(vm.p2m[self.owner_gpfn[mine]] == mine), f"{vm.name}: rmap/P2M"
            assert int((vm.p2m >= 0).sum()) == vm.backed
            sw = np.nonzero(self.swap_owner_vm == vm.index)[0]
            assert sw.size == vm.swapped, f"{vm.name}: swapped count drift"
            assert np.all(vm.p2m[self.swap_owner_gpfn[sw]] == slot_to_p2m(sw))
            assert int((vm.p2m <= -2).sum()) == vm.swapped
        assert sum(vm.backed for vm in self.vms.values()) == self.frames_used
        reserved = int((self.swap_state == kernels.LOCKED).sum())
        assert reserved == 0, f"{reserved} swap slots reserved for a copy never committed"
        assert sum(vm.swapped for vm in self.vms.values()) == self.slots_used
