"""The host's memory path: frames, host swap, faults, reclaim, release and host OOM.

Units: pages/frames/slots of 4096 bytes.

:class:`HostMemory` owns the :class:`~hypervisor.ledger.FrameLedger`, the
:class:`~hypervisor.hostswap.HostSwap` file, the memory lock and the state of the reclaims in
flight. The :class:`~hypervisor.host.Host` hands it its VMs (by ledger index), its event
sink and a callback that stops a VM's processes and channels; everything else here is
memory bookkeeping and the system calls that move pages.

Every change to the ledger, the EPTs and the memfds happens under one asyncio lock
(``lock``), so each operation is atomic with respect to the others and
``frames_in_use == Σ resident pages`` holds whenever the lock is free. The one wait that
is not the host's own, a reclaim's shootdown (a guest has up to ``SHOOTDOWN_TIMEOUT`` to
answer), happens with the lock released: the victims stay LOCKED in the ledger, resident
and not present in their EPT, so other VMs go on faulting and ballooning; an operation
that needs an in-flight victim page (a fault on it, a balloon batch naming it) waits on
``changed`` until that reclaim has finished, then starts over.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from hypervisor.hostswap import HostSwap
from hypervisor.kernels import LOCKED
from hypervisor.ledger import FrameLedger, LedgerError, OutOfSwap, p2m_to_slot
from hypervisor.vm import Vm, VmState
from hypervisor.vmmem import EPT_NOT_PRESENT
from protocol import pfn as P

log = logging.getLogger(__name__)

#: Reclaim at least this many frames per pass (like SWAP_CLUSTER_MAX): one shootdown round
#: trip then covers many faults instead of one.
RECLAIM_BATCH = 256

#: ``emit(kind, vm_name, **fields)``: the host's event sink.
Emit = Callable[..., Any]


def _batch_runs(runs: np.ndarray) -> np.ndarray:
    """A release batch as ascending maximal int64 runs: (k, 2) runs as given, or 1-D gpfns
    (duplicates merge). Bounds and overlaps are the ledger's to refuse."""
    a = np.asarray(runs)
    if a.ndim == 1:
        return P.coalesce_runs(P.pfns_to_runs(a.astype(np.int64)))
    return P.coalesce_runs(a)


class HostMemory:
    """Frames, swap slots and the operations on them (see the module docstring)."""

    def __init__(self, frames: int, swap_slots: int, *, vms: dict[int, Vm], emit: Emit,
                 stop_vm: Callable[[Vm], None]) -> None:
        self.ledger = FrameLedger(frames, swap_slots)
        self.swap: HostSwap | None = None
        #: The host's VMs by ledger index (the host keeps this dict current).
        self._by_index = vms
        self._emit = emit
        self._stop_vm = stop_vm
        self.lock = asyncio.Lock()
        #: Notified (under lock) when a reclaim's in-flight victims are settled.
        self.changed = asyncio.Condition(self.lock)
        #: Per frame: the reclaim that holds it in flight (0: none). A frame freed under a
        #: reclaim (its VM stopped) and picked again by another carries the other's token.
        self.inflight = np.zeros(self.ledger.frames_total, dtype=np.int64)
        self._reclaim_seq = 0
        self.oom_kills = 0

    # ---------------------------------------------------------------- lifetime

    def open_swap(self, path: Path | None) -> None:
        """Create the host swap file (none when the host has no slots)."""
        slots = self.ledger.swap_slots_total
        self.swap = HostSwap(path if slots else None, slots)

    def close(self) -> None:
        if self.swap is not None:
            self.swap.close()

    # ---------------------------------------------------------------- faults

    def _in_flight(self, vm: Vm, gpfns: np.ndarray) -> bool:
        """Some of ``gpfns`` are backed by frames a reclaim holds in flight (lock held;
        only in-flight victims are LOCKED while the lock is free)."""
        cur = vm.led.p2m[gpfns]
        cur = cur[cur >= 0]
        return bool(cur.size) and bool(np.any(self.ledger.state[cur] == LOCKED))

    async def handle_fault(self, vm: Vm, pfns: np.ndarray) -> bool:
        """Back the pages of an EPT fault. False when the VM died on the way (no resume)."""
        g = np.unique(pfns)
        led = vm.led  # a restart under a wait gives the VM a new one: this fault is stale
        async with self.lock:
            while True:  # until nothing changed under a wait
                if vm.state in (VmState.DESTROYED, VmState.OOM_KILLED, VmState.CRASHED) or \
                        vm.led is not led or led.index not in self.ledger.vms:
                    return False
                if self._in_flight(vm, g):
                    await self.changed.wait()  # its reclaim ends it: look again
                    continue
                need = g[vm.led.p2m[g] < 0]
                if need.size > self.ledger.frames_free:
                    await self._reclaim(int(need.size), faulting=vm)
                    continue  # the lock was let go during the shootdown: look again
                break
            vm.faults += 1
            if need.size == 0:
                # Already backed (another vCPU's exit got there first): make sure the EPT
                # says so, then just resume.
                vm.mem.set_present(g)
                return True
            viol = need[vm.led.balloon[need] != 0]
            if viol.size:
                # A guest bug: it touched pages it gave to the balloon. Back them anyway.
                vm.balloon_violations += int(viol.size)
                self._emit("balloon_violation", vm.name, pages=int(viol.size),
                           first=int(viol[0]))
            frames, slots = self.ledger.back(vm.led.index, need)
            swapped = slots >= 0
            if np.any(swapped):
                assert self.swap is not None
                self.swap.swap_in(vm.mem, need[swapped], slots[swapped])
                self.swap.discard(slots[swapped])  # the ledger freed them in back()
                vm.host_swap_in += int(swapped.sum())
            if not np.all(swapped):
                vm.mem.populate(need[~swapped])
            self.ledger.unlock(frames)
            vm.mem.set_present(g)  # every page of the fault is backed now
            vm.fault_pages += int(need.size)
            return True

    # ---------------------------------------------------------------- reclaim

    async def _unlocked(self, aw: Any) -> Any:
        """Await ``aw`` with the lock released; it is held again on return (or raise)."""
        self.lock.release()
        try:
            return await aw
        finally:
            cancelled = False
            while True:
                try:
                    await self.lock.acquire()
                    break
                except asyncio.CancelledError:
                    cancelled = True  # the caller's `async with` must find it held
            if cancelled:
                raise asyncio.CancelledError

    async def _reclaim(self, wanted: int, faulting: Vm | None) -> None:
        """Make ``wanted`` frames free: clock scan, shootdown, swap out, punch (lock held).

        Order: EPT NOT_PRESENT, ``shootdown``, wait for ``shootdown_ack``, and only then
        copy to host swap and punch. When host swap cannot take the victims, the VM holding
        most frames is killed (host OOM) and the loop tries again.
        """
        while self.ledger.frames_free < wanted:
            deficit = wanted - self.ledger.frames_free
            # Batch like SWAP_CLUSTER_MAX, but never more than 1/16 of the host beyond what
            # is needed: evicting everything for one fault would only make VMs thrash.
            batch = max(deficit, min(RECLAIM_BATCH, self.ledger.frames_total // 16))
            want = min(batch, self.ledger.frames_used)
            want = min(want, self.ledger.slots_free)
            if want < deficit:
                if not self.host_oom():
                    raise LedgerError("host out of memory and no VM left to kill")
                continue
            victims = self.ledger.pick_victims(want)
            if victims.size == 0:
                if np.any(self.inflight):
                    # Every frame left is another reclaim's victim in flight: its end
                    # frees frames (or settles what to do).
                    await self.changed.wait()
                    continue
                # Every frame is pinned by an operation in flight; only OOM can help.
                if not self.host_oom():
                    raise LedgerError("host out of memory: every frame is in flight")
                continue
            owners = self.ledger.owner_vm[victims]
            groups = {int(v): victims[owners == v] for v in np.unique(owners)}
            for idx, fr in groups.items():
                self._by_index[idx].mem.set_not_present(self.ledger.owner_gpfn[fr])
            self._reclaim_seq += 1
            token = self._reclaim_seq
            self.inflight[victims] = token
            settled = False
            try:
                # The wait is the guests', not the host's: other VMs' faults and balloon
                # batches run meanwhile (the victims stay LOCKED, resident, not present).
                results = await self._unlocked(asyncio.gather(
                    *(self._by_index[idx].machine.shootdown(int(fr.size))
                      for idx, fr in groups.items()), return_exceptions=True))
                for (idx, fr), res in zip(groups.items(), results):
                    vm = self._by_index.get(idx)
                    if isinstance(res, BaseException) and vm is not None and \
                            vm.led.index == idx and idx in self.ledger.vms:
                        # No ack (hung guest, or anything else went wrong): the guest
                        # cannot be trusted to stay off the pages, so it is stopped like a
                        # crashed VM (its frames, victims included, are freed). Never swap
                        # out unacknowledged.
                        log.error("%s", res)
                        self.crash_vm(vm, f"shootdown failed: {res}")
                # Still ours: LOCKED with our token (a VM stopped meanwhile freed its
                # victims; a frame freed and picked again carries another token).
                live = victims[(self.ledger.state[victims] == LOCKED)
                               & (self.inflight[victims] == token)]
                self.inflight[victims[self.inflight[victims] == token]] = 0
                settled = True
                try:
                    outs = self.ledger.swap_out(live)
                except OutOfSwap:
                    self.ledger.unlock(live)
                    self._restore_present(live)
                    continue
            finally:
                if not settled:  # interrupted in the wait: the victims go back as they were
                    mine = victims[(self.ledger.state[victims] == LOCKED)
                                   & (self.inflight[victims] == token)]
                    self.inflight[victims[self.inflight[victims] == token]] = 0
                    self.ledger.unlock(mine)
                    self._restore_present(mine)
                self.changed.notify_all()
            assert self.swap is not None or not outs
            for so in outs:
                vm = self._by_index[so.vm]
                assert self.swap is not None
                self.swap.swap_out(vm.mem, so.gpfns, so.slots)
                vm.mem.punch(so.gpfns)
                vm.host_swap_out += int(so.gpfns.size)
                self._emit("host_swap_out", vm.name, pages=int(so.gpfns.size),
                           faulting=None if faulting is None else faulting.name)

    def _restore_present(self, frames: np.ndarray) -> None:
        for v in np.unique(self.ledger.owner_vm[frames]):
            sel = frames[self.ledger.owner_vm[frames] == v]
            self._by_index[int(v)].mem.set_present(self.ledger.owner_gpfn[sel])

    # ---------------------------------------------------------------- stopping VMs

    def host_oom(self) -> bool:
        """Kill the VM holding most frames (ties: the first created). Lock held."""
        idx = self.ledger.largest_vm()
        if idx is None:
            return False
        vm = self._by_index[idx]
        frames, slots = vm.led.backed, vm.led.swapped
        self.oom_kills += 1
        self.free_vm(vm, VmState.OOM_KILLED)
        self._emit("host_oom_kill", vm.name, frames=frames, swap_slots=slots,
                   frames_free=self.ledger.frames_free)
        return True

    def free_vm(self, vm: Vm, state: VmState) -> tuple[int, int]:
        """Stop a VM's processes and give back everything it holds (lock held).
        Returns (frames, swap slots) freed."""
        vm.state = state
        self._stop_vm(vm)
        freed = (0, 0)
        if vm.led.index in self.ledger.vms:
            held = vm.led.p2m[vm.led.p2m <= -2]
            freed = self.ledger.remove_vm(vm.led.index)
            if self.swap is not None and held.size:
                self.swap.discard(p2m_to_slot(held))
        vm.mem.ept[:] = EPT_NOT_PRESENT
        vm.mem.punch(np.arange(vm.pages, dtype=np.int64))  # one run: the whole RAM
        vm.led.balloon[:] = 0
        return freed

    def crash_vm(self, vm: Vm, reason: str) -> None:
        """Stop ``vm`` as crashed and free its memory (lock held); emits ``vm_crashed``."""
        frames, slots = self.free_vm(vm, VmState.CRASHED)
        self._emit("vm_crashed", vm.name, reason=reason, frames=frames, swap_slots=slots)

    # ---------------------------------------------------------------- release

    async def release_pages(self, vm: Vm, runs: np.ndarray) -> tuple[int, int]:
        """Inflate/report: EPT NOT_PRESENT, punch, frames and slots freed, run by run.

        ``runs`` is a batch the balloon device accepted, as (k, 2) runs (1-D gpfns are made
        into runs). Nothing is expanded into pages: the EPT update is a slice per run, the
        punch one ``fallocate`` per contiguous run and the ledger one kernel pass over the
        batch's pages; the only allocation is the freed swap slots' list, never anything
        the size of the VM. A batch naming a page a reclaim holds in flight waits for that
        reclaim; a batch the ledger refuses changes nothing. Returns (frames freed, punch
        calls)."""
        r = _batch_runs(runs)
        async with self.lock:
            while True:
                if vm.led.index not in self.ledger.vms:
                    raise LedgerError(f"VM {vm.name!r} is not running")
                if self.ledger.first_locked(vm.led.index, r) < 0:  # checks the runs, too
                    break
                await self.changed.wait()  # a reclaim holds some: let it finish
            P.set_runs(vm.mem.ept, r, EPT_NOT_PRESENT)  # first: no access can follow
            freed, slots = self.ledger.release_runs(vm.led.index, r)
            if self.swap is not None and slots.size:
                self.swap.discard(slots)
            calls = vm.mem.punch_runs(r)
            return freed, calls

    # ---------------------------------------------------------------- checks

    def resident_total(self) -> int:
        return sum(vm.mem.resident_pages() for vm in self._by_index.values())

    def check_conservation(self) -> None:
        """frames in use == Σ resident memfd pages, and the ledger's own invariants."""
        self.ledger.check()
        for vm in self._by_index.values():
            held = vm.led.backed if vm.led.index in self.ledger.vms else 0
            res = vm.mem.resident_pages()
            assert res == held, f"{vm.name}: {res} resident pages but {held} frames held"
        assert self.ledger.frames_used == self.resident_total()
