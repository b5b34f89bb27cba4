"""The host's memory path: frames, host swap, faults, reclaim, release and host OOM.

Units: pages/frames/slots of 4096 bytes.

:class:`HostMemory` owns the :class:`~hypervisor.ledger.FrameLedger`, the
:class:`~hypervisor.hostswap.HostSwap` file, the memory lock and the state of the reclaims in
flight. The :class:`~hypervisor.host.Host` hands it its VMs (by ledger index), its event
sink, its task spawner and a callback that stops a VM's processes and channels; everything
else here is memory bookkeeping and the system calls that move pages.

Every change to the ledger, the EPTs and the memfds happens under one asyncio lock
(``lock``), and nothing awaits while holding it but a wait on ``changed`` (which lets it
go) and a release's punches on worker threads (which keep it), so each operation is atomic
with respect to the others and ``frames_in_use == Σ resident pages`` holds whenever the
lock is free.

The one wait that is not the host's own, a reclaim's shootdown (a guest has up to
``SHOOTDOWN_TIMEOUT`` to answer), runs in a task per VM: the victims stay LOCKED in the
ledger, resident and not present in their EPT, and are settled when *their* VM acks; a
later reclaim picks no victims of a VM whose shootdown is outstanding. An operation that
needs an in-flight victim page (a fault on it, a balloon batch naming it) waits on
``changed`` until that VM's settlement, then starts over.

Write-then-commit: a victim's P2M points at a swap slot only after its bytes are in the
swap file and its RAM page is punched. A failed system call leaves what it did not finish
as it was (resident, present, the VM's), gives reserved slots back and is reported as an
event naming the call and the errno (``host_swap_error``, ``host_memory_error``).
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import errno
import logging
import os
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hypervisor.hostswap import HostSwap, noncontiguous, paired_runs
from hypervisor.kernels import LOCKED
from hypervisor.ledger import FrameLedger, LedgerError, OutOfSwap, VmLedger, p2m_to_slot
from hypervisor.pathologies import crossed
from hypervisor.vm import Vm, VmState
from hypervisor.vmmem import PunchFailed
from protocol import pfn as P
from protocol.constants import EPT_NOT_PRESENT

log = logging.getLogger(__name__)

#: Reclaim at least this many frames per pass (like SWAP_CLUSTER_MAX): one shootdown round
#: trip then covers many faults instead of one.
RECLAIM_BATCH = 256
#: Seconds a reclaim waits for its shootdown acks before it takes what is missing from
#: other VMs (a guest answers in well under a millisecond unless it is hung or stopped).
SLOW_ACK = 0.1
#: ... however slow acks are all round.
MAX_PATIENCE = 2.0
#: Swap writes failing in a row (other than a full disk) before the host stops adding slots.
MAX_SWAP_WRITE_ERRORS = 3
#: Attempts at punching a stopped VM's RAM before the failure is reported.
FREE_PUNCH_TRIES = 3
#: A release batch of at least this many pages (16 MiB: milliseconds of punching) is
#: punched on a worker thread, the event loop serving meanwhile; smaller ones inline (a
#: thread hand-off would cost more than it frees).
OFFLOAD_PAGES = 4096
#: Worker threads punching at once (each a different VM's memfd).
PUNCH_THREADS = max(1, min(4, os.cpu_count() or 1))
#: Errors that mean the swap file's disk has no room left.
_DISK_FULL = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)

#: ``emit(kind, vm_name, **fields)``: the host's event sink.
Emit = Callable[..., Any]
#: ``spawn(coroutine, name)``: start a task the host cancels at teardown.
Spawn = Callable[[Coroutine[Any, Any, Any], str], Any]


def _own_task(coro: Coroutine[Any, Any, Any], name: str) -> Any:
    task = asyncio.create_task(coro, name=name)
    _TASKS.add(task)
    task.add_done_callback(_TASKS.discard)
    return task


_TASKS: set[asyncio.Task[Any]] = set()


def _batch_runs(runs: np.ndarray) -> np.ndarray:
    """A release batch as ascending maximal int64 runs: (k, 2) runs as given, or 1-D gpfns
    (duplicates merge). Bounds and overlaps are the ledger's to refuse."""
    a = np.asarray(runs)
    if a.ndim == 1:
        return P.coalesce_runs(P.pfns_to_runs(a.astype(np.int64)))
    return P.coalesce_runs(a)


@dataclass(eq=False)
class _Release:
    """One balloon batch waiting to be released, and its caller's answer."""

    vm: Vm
    runs: np.ndarray
    done: asyncio.Future[tuple[int, int]]


def _punch(rel: _Release) -> int | PunchFailed:
    """Punch a batch's runs (on a worker thread or inline): the call count, or the failure
    (returned, so that every batch of a round is settled)."""
    try:
        return rel.vm.mem.punch_runs(rel.runs)
    except PunchFailed as e:
        return e


@dataclass(eq=False)
class _Group:
    """One VM's victims of one reclaim pass and the shootdown that guards them."""

    vm: Vm
    idx: int
    frames: np.ndarray
    token: int
    task: asyncio.Task[None]
    faulting: Vm | None
    sent: float  # time.monotonic() of the shootdown
    #: ``[pages, write I/Os]`` the fault that started the reclaim waits for (or None).
    waited: list[int] | None = None
    settled: bool = False


class HostMemory:
    """Frames, swap slots and the operations on them (see the module docstring)."""

    def __init__(self, frames: int, swap_slots: int, *, vms: dict[int, Vm], emit: Emit,
                 stop_vm: Callable[[Vm], None], spawn: Spawn | None = None) -> None:
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
        self._spawn = spawn or _own_task
        #: Shootdowns outstanding per VM (ledger index): such a VM gives no more victims.
        self._shooting: collections.Counter[int] = collections.Counter()
        #: At most this many slots in use, once a swap write of this reclaim found the disk
        #: full.
        self.swap_limit: int | None = None
        self._write_errors = 0
        #: Moving average of shootdown ack latency, seconds.
        self.ack_latency = 0.0
        self.oom_kills = 0
        #: Host swap reads (pages) and those not contiguous with the page read before them
        #: in the same fault (all VMs; each VM keeps its own too).
        self.swap_reads = 0
        self.swap_reads_noncontig = 0
        #: Balloon batches waiting to be released, their releaser task, and whether it
        #: waits on ``changed`` (for a reclaim holding pages of every batch left).
        self._releases: list[_Release] = []
        self._releaser: asyncio.Task[None] | None = None
        self._releaser_waiting = False
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        #: Release rounds (one hold of the lock each) and the batches they released.
        self.release_rounds = 0
        self.release_batches = 0

    # ---------------------------------------------------------------- lifetime

    def open_swap(self, path: Path | None) -> None:
        """Create the host swap file (none when the host has no slots)."""
        slots = self.ledger.swap_slots_total
        self.swap = HostSwap(path if slots else None, slots)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        if self.swap is not None:
            self.swap.close()

    # ---------------------------------------------------------------- errors

    def _report(self, kind: str, vm: Vm | None, op: str, point: str, err: OSError,
                pages: int) -> None:
        """One event naming a failed system call and what it cost."""
        name = errno.errorcode.get(err.errno or 0, str(err.errno))
        log.error("%s: %s failed (%s): %s", vm.name if vm else "host", point, name, err)
        self._emit(kind, vm.name if vm else None, op=op, point=point, error=name,
                   message=str(err), pages=pages)

    def _discard(self, vm: Vm | None, slots: np.ndarray) -> None:
        """Give freed slots' disk blocks back; a failure costs disk space, never data."""
        if self.swap is None or not len(slots):
            return
        try:
            self.swap.discard(slots)
        except OSError as e:
            self._report("host_swap_error", vm, "discard", "hostswap.punch", e, len(slots))

    def _swap_write_failed(self, vm: Vm, err: OSError, pages: int) -> None:
        self._report("host_swap_error", vm, "swap_out", "hostswap.write", err, pages)
        self._write_errors += 1
        if err.errno in _DISK_FULL or self._write_errors >= MAX_SWAP_WRITE_ERRORS:
            # The file's disk is full (or keeps failing): for the rest of this reclaim no
            # more slots than are in use now, so it falls back to host OOM.
            self.swap_limit = self.ledger.slots_used
            self._emit("host_swap_limited", vm.name, slots=self.swap_limit,
                       error=errno.errorcode.get(err.errno or 0, str(err.errno)))

    def slots_usable(self) -> int:
        """Free slots the reclaim may fill (fewer than free after a write failed)."""
        free = self.ledger.slots_free
        if self.swap_limit is not None:
            free = min(free, max(0, self.swap_limit - self.ledger.slots_used))
        return free

    # ---------------------------------------------------------------- faults

    def _in_flight(self, vm: Vm, gpfns: np.ndarray) -> bool:
        """Some of ``gpfns`` are backed by frames a reclaim holds in flight (lock held;
        only in-flight victims are LOCKED while the lock is free)."""
        cur = vm.led.p2m[gpfns]
        cur = cur[cur >= 0]
        return bool(cur.size) and bool(np.any(self.ledger.state[cur] == LOCKED))

    async def handle_fault(self, vm: Vm, pfns: np.ndarray,
                           read_back: list[np.ndarray] | None = None,
                           evicted: list[int] | None = None) -> bool:
        """Back the pages of an EPT fault. False when the VM died on the way (no resume).
        The pages read back from host swap are appended to ``read_back`` (for ``resume``);
        ``evicted`` (``[pages, ios]``) gains the host swap writes of the reclaims the fault
        waited for (``resume``'s ``evicted``: the guest charges them to the faulting task).

        A page host-swapped out comes back with the bytes of its slot, read before anything
        changes; when that read (or making the pages resident) fails, the VM cannot be
        given its bytes, so it is crashed (``vm_crashed``, then ``on_crash``) after a
        ``host_swap_error``/``host_memory_error`` event naming the call. No other VM notices.
        """
        g = np.unique(pfns)
        led = vm.led  # a restart under a wait gives the VM a new one: this fault is stale
        async with self.lock:
            return await self._back_fault(vm, g, led, read_back, evicted)

    async def _back_fault(self, vm: Vm, g: np.ndarray, led: VmLedger,
                          read_back: list[np.ndarray] | None,
                          evicted: list[int] | None) -> bool:
        """:meth:`handle_fault`'s body (lock held)."""
        while True:  # until nothing changed under a wait
            if vm.state in (VmState.DESTROYED, VmState.OOM_KILLED, VmState.CRASHED) or \
                    vm.led is not led or led.index not in self.ledger.vms:
                return False
            if self._in_flight(vm, g):
                await self.changed.wait()  # its reclaim ends it: look again
                continue
            need = g[vm.led.p2m[g] < 0]
            if need.size > self.ledger.frames_free:
                await self._reclaim(int(need.size), faulting=vm, waited=evicted)
                continue  # the lock was let go while shootdowns ran: look again
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
        cur = led.p2m[need]
        swapped = cur <= -2
        runs: list[tuple[int, bytes]] = []
        if np.any(swapped):
            assert self.swap is not None
            try:  # every byte read before the ledger changes
                slots = p2m_to_slot(cur[swapped])
                runs = self.swap.read(need[swapped], slots)
            except OSError as e:
                self._report("host_swap_error", vm, "swap_in", "hostswap.read", e,
                             int(swapped.sum()))
                self.crash_vm(vm, f"host swap read failed: {e}")
                return False
        frames, slots = self.ledger.back(led.index, need)
        try:
            if runs:
                point = "memfd.write"
                assert self.swap is not None
                self.swap.install(vm.mem, runs)
            if not np.all(swapped):
                point = "memfd.populate"
                vm.mem.populate(need[~swapped])
        except OSError as e:
            # The pages cannot be made resident: the VM's memory is incomplete.
            self._report("host_memory_error", vm, "fault", point, e, int(need.size))
            self._discard(vm, slots[swapped])
            self.crash_vm(vm, f"backing a fault failed: {e}")
            return False
        self.ledger.unlock(frames)
        self._discard(vm, slots[swapped])  # the ledger freed them in back()
        vm.host_swap_in += int(swapped.sum())
        if np.any(swapped):
            # Sequentiality: pages of one fault, in gpfn order, whose slot does not
            # follow the previous page's (a seek on a disk).
            jumps = noncontiguous(slots)
            if crossed(vm.host_swap_reads_noncontig, vm.host_swap_reads_noncontig + jumps):
                self._emit("pathology", vm.name, counter="host_swap_reads_noncontig",
                           pages=vm.host_swap_reads_noncontig + jumps, source="host",
                           reads=vm.host_swap_in)
            vm.host_swap_reads_noncontig += jumps
            self.swap_reads_noncontig += jumps
            self.swap_reads += int(swapped.sum())
            if read_back is not None:
                read_back.append(need[swapped])
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

    async def _reclaim(self, wanted: int, faulting: Vm | None,
                       waited: list[int] | None = None) -> None:
        """Make ``wanted`` frames free (lock held; let go while shootdowns run).

        A pass clock-scans for victims among the VMs with no shootdown outstanding, clears
        their EPT entries and sends one shootdown per VM. Each VM's victims are settled
        (copied to host swap, punched, freed) as *that* VM's ack arrives, and the frames
        they free are this reclaim's (it holds the lock from the settlement to its check).
        A VM that has not answered within :meth:`patience` holds only its own victims: the
        next pass excludes it and takes what is missing from the others (the faulting VM
        included); its victims are settled in the background when its ack arrives (or the
        VM is crashed at ``SHOOTDOWN_TIMEOUT``). When host swap cannot take what is
        missing, the VM holding most frames is killed (host OOM) and the loop tries again.
        """
        pending: list[_Group] = []
        patient = True  # wait SLOW_ACK for our own shootdowns before looking elsewhere
        # A full swap disk seen by an earlier reclaim may have room again (slots freed,
        # files removed): each reclaim tries the swap file afresh.
        self.swap_limit = None
        self._write_errors = 0
        try:
            while self.ledger.frames_free < wanted:
                if faulting is not None and faulting.state.stopped:
                    return  # killed meanwhile (host OOM): its fault is over
                if pending and patient:
                    if not await self._settle_some(pending, self.patience()):
                        patient = False  # slow guests: take what is missing elsewhere
                    continue
                deficit = wanted - self.ledger.frames_free
                # A first pass batches like SWAP_CLUSTER_MAX, but never more than 1/16 of
                # the host beyond what is needed: evicting everything for one fault would
                # only make VMs thrash. A pass past slow guests takes only what is missing.
                want = deficit if pending else \
                    max(deficit, min(RECLAIM_BATCH, self.ledger.frames_total // 16))
                want = min(want, self.ledger.frames_used, self.slots_usable())
                if want < deficit:
                    if not self.host_oom():
                        raise LedgerError("host out of memory and no VM left to kill")
                    continue
                busy = [idx for idx, n in self._shooting.items() if n]
                victims = self.ledger.pick_victims(want, exclude=busy)
                if victims.size:
                    pending.extend(self._shoot(victims, faulting, waited))
                    patient = True
                elif pending:
                    await self._settle_some(pending, None)  # only slow guests hold frames
                elif busy:
                    await self.changed.wait()  # frames wait on other reclaims' shootdowns
                elif not self.host_oom():
                    # Every frame is pinned by an operation in flight; only OOM can help.
                    raise LedgerError("host out of memory: every frame is in flight")
        finally:
            for g in pending:  # done without them: they settle when their ack arrives
                self._spawn(self._settle_later(g), f"{g.vm.name}-settle")

    def patience(self) -> float:
        """Seconds to wait for a shootdown ack before looking elsewhere: ``SLOW_ACK``, or
        more when acks are slow all round (a loaded machine, not a hung guest)."""
        return min(max(SLOW_ACK, 20 * self.ack_latency), MAX_PATIENCE)

    async def _settle_some(self, pending: list[_Group], timeout: float | None) -> bool:
        """Wait (lock released) up to ``timeout`` for some of ``pending`` to be answered
        and settle those. False when none was."""
        await self._unlocked(asyncio.wait([g.task for g in pending], timeout=timeout,
                                          return_when=asyncio.FIRST_COMPLETED))
        done = [g for g in pending if g.task.done()]
        for g in done:
            pending.remove(g)
            self._settle(g)
        return bool(done)

    def _shoot(self, victims: np.ndarray, faulting: Vm | None,
               waited: list[int] | None = None) -> list[_Group]:
        """Clear the victims' EPT entries and send one shootdown per VM (lock held)."""
        owners = self.ledger.owner_vm[victims]
        self._reclaim_seq += 1
        token = self._reclaim_seq
        self.inflight[victims] = token
        groups = []
        for v in np.unique(owners).tolist():
            fr = victims[owners == v]
            vm = self._by_index[v]
            gp = self.ledger.owner_gpfn[fr]
            vm.mem.set_not_present(gp)
            self._shooting[v] += 1
            task = self._spawn(vm.machine.shootdown(int(fr.size), gp),
                               f"{vm.name}-shootdown")
            groups.append(_Group(vm, v, fr, token, task, faulting, time.monotonic(), waited))
        return groups

    async def _settle_later(self, g: _Group) -> None:
        """Settle a group whose reclaim is over once its shootdown has ended."""
        try:
            await asyncio.wait([g.task])
            async with self.lock:
                self._settle(g)
        except asyncio.CancelledError:
            # Host teardown: the victims go back as they were. Nothing holds the lock
            # across an await but a condition wait, so this runs atomically.
            g.task.cancel()
            self._settle(g, revert=True)
            raise

    def _settle(self, g: _Group, revert: bool = False) -> None:
        """After ``g``'s shootdown ended (lock held): swap its victims out on an ack; crash
        its VM when there was none (the guest cannot be trusted to stay off the pages;
        never swap out unacknowledged); put them back when it was cancelled."""
        if g.settled:
            return
        g.settled = True
        self._shooting[g.idx] -= 1
        if self._shooting[g.idx] <= 0:
            del self._shooting[g.idx]
        vm = g.vm
        if revert or g.task.cancelled():
            mine = self._take(g.frames, g.token)
            self.ledger.unlock(mine)
            self._restore_present(mine)
        else:
            err = g.task.exception()
            if err is None:
                lat = time.monotonic() - g.sent
                self.ack_latency = 0.8 * self.ack_latency + 0.2 * lat
            if err is not None and vm.led.index == g.idx and g.idx in self.ledger.vms:
                log.error("%s", err)
                self.crash_vm(vm, f"shootdown failed: {err}")
            live = self._take(g.frames, g.token)
            if live.size:
                self._swap_out(vm, live, g.faulting, g.waited)
        if not revert:  # (a revert runs at teardown, without the lock)
            self.changed.notify_all()

    def _take(self, frames: np.ndarray, token: int) -> np.ndarray:
        """The victims still ours: LOCKED with our token (a VM stopped meanwhile freed its
        victims; a frame freed and picked again carries another token)."""
        ours = self.inflight[frames] == token
        live: np.ndarray = frames[(self.ledger.state[frames] == LOCKED) & ours]
        self.inflight[frames[ours]] = 0
        return live

    def _swap_out(self, vm: Vm, frames: np.ndarray, faulting: Vm | None,
                  waited: list[int] | None = None) -> None:
        """Write-then-commit: per run, copy to the slots, punch the RAM, and only then
        point the P2M at the slots. Whatever is not done when a call fails stays resident,
        present and the VM's; its reserved slots go back (lock held)."""
        gp = self.ledger.owner_gpfn[frames]
        order = np.argsort(gp, kind="stable")
        gp, frames = gp[order], frames[order]
        try:
            slots = self.ledger.reserve_slots(int(frames.size), self.swap_limit)
        except OutOfSwap:
            self.ledger.unlock(frames)
            vm.mem.set_present(gp)
            return
        assert self.swap is not None  # slots exist only with a swap file
        done = ios = 0
        failed: tuple[str, OSError] | None = None
        for g, s, n in paired_runs(gp, slots):
            point = "memfd.read"
            try:
                data = vm.mem.read_pages(g, n)
                point = "hostswap.write"
                self.swap.write(data, s)
                ios += 1
                point = "memfd.punch"
                vm.mem.punch(np.arange(g, g + n, dtype=np.int64))
            except OSError as e:
                failed = (point, e)
                break
            done += n
        if done:
            self.ledger.swap_out(frames[:done], slots[:done])
            vm.host_swap_out += done
            if waited is not None:  # the fault that asked waits for these writes
                waited[0] += done
                waited[1] += ios
            self._write_errors = 0
            self._emit("host_swap_out", vm.name, pages=done,
                       faulting=None if faulting is None else faulting.name)
        if failed is None:
            return
        rest = slice(done, None)
        self.ledger.cancel_slots(slots[rest])
        self.ledger.unlock(frames[rest])
        vm.mem.set_present(gp[rest])
        self._discard(vm, slots[rest])  # a partial write may have taken blocks
        point, err = failed
        if point == "hostswap.write":
            self._swap_write_failed(vm, err, int(frames.size) - done)
        else:
            self._report("host_memory_error", vm, "swap_out", point, err,
                         int(frames.size) - done)

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
            self._discard(vm, p2m_to_slot(held))
        vm.mem.ept[:] = EPT_NOT_PRESENT
        everything = np.arange(vm.pages, dtype=np.int64)  # one run: the whole RAM
        for _attempt in range(FREE_PUNCH_TRIES):  # each failure is reported, then retried
            try:
                vm.mem.punch(everything)
                break
            except OSError as e:
                self._report("host_memory_error", vm, "free", "memfd.punch", e, vm.pages)
        vm.led.balloon[:] = 0
        self.changed.notify_all()
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
        calls).

        Batches of several VMs that wait at the same time are released together, under
        one hold of the lock: each VM's punches of at least :data:`OFFLOAD_PAGES` run on a
        worker thread of their own (one file per VM, so they proceed in parallel in the
        kernel), while the event loop goes on serving everything that does not need the
        lock. The caller being cancelled never stops a release half-way.

        When a punch fails part-way, the runs already punched are freed (they were the
        guest's free pages: nothing is lost), the others stay backed and present, a
        ``host_memory_error`` names the call and the batch is refused."""
        rel = _Release(vm, _batch_runs(runs), asyncio.get_running_loop().create_future())
        # Read by whoever awaits it; consumed here too, so a caller cancelled meanwhile
        # leaves no "exception never retrieved" behind.
        rel.done.add_done_callback(lambda f: f.cancelled() or f.exception())
        self._releases.append(rel)
        if self._releaser is None or self._releaser.done():
            self._releaser = self._spawn(self._run_releases(), "release")
        elif self._releaser_waiting:
            async with self.lock:  # the releaser waits on `changed`: wake it for this one
                self.changed.notify_all()
        return await asyncio.shield(rel.done)

    async def _run_releases(self) -> None:
        """Release every queued batch (see :meth:`release_pages`), one batch per VM per
        round, until none is left."""
        try:
            while self._releases:
                # The lock is let go between rounds: faults and reclaims queued for it get
                # their turn (the lock is FIFO) while batches keep arriving.
                async with self.lock:
                    ready = self._ready_releases()
                    if ready:
                        await self._release_round(ready)
                    elif self._releases:  # a reclaim holds pages of each: wait for it
                        self._releaser_waiting = True
                        try:
                            await self.changed.wait()
                        finally:
                            self._releaser_waiting = False
        except BaseException as e:
            # Cancelled (the host is stopping) or a bug: nobody will release what is still
            # queued, and its callers must not wait for ever.
            why = "the host is stopping" if isinstance(e, asyncio.CancelledError) else \
                f"the releaser failed: {e!r}"
            for rel in self._releases:
                if not rel.done.done():
                    rel.done.set_exception(LedgerError(why))
            self._releases = []
            raise

    @property
    def releases_queued(self) -> int:
        """Balloon batches waiting for their release round."""
        return len(self._releases)

    def _ready_releases(self) -> list[_Release]:
        """Take from the queue the batches that can be released now (lock held): the
        first of each VM's, when its runs are valid and no page of them is in flight. A
        batch the ledger refuses is answered at once."""
        ready: list[_Release] = []
        later: list[_Release] = []
        seen: set[int] = set()  # VMs with a batch taken or kept back in this pass
        for rel in self._releases:
            if id(rel.vm) in seen:
                later.append(rel)  # a VM's batches are released in order, one per round
                continue
            seen.add(id(rel.vm))
            led = rel.vm.led.index
            try:
                if led not in self.ledger.vms:
                    raise LedgerError(f"VM {rel.vm.name!r} is not running")
                # first_locked checks the runs, too
                (ready if self.ledger.first_locked(led, rel.runs) < 0 else later).append(rel)
            except LedgerError as e:
                rel.done.set_exception(e)
        self._releases = later
        return ready

    async def _release_round(self, ready: list[_Release]) -> None:
        """Punch and free ``ready`` (lock held, runs checked, at most one per VM)."""
        loop = asyncio.get_running_loop()
        self.release_rounds += 1
        self.release_batches += len(ready)
        for rel in ready:
            P.set_runs(rel.vm.mem.ept, rel.runs, EPT_NOT_PRESENT)  # first: no access can follow
        punched: list[asyncio.Future[Any] | None] = [None] * len(ready)
        for i, rel in enumerate(ready):
            if int(rel.runs[:, 1].sum()) >= OFFLOAD_PAGES:
                try:
                    punched[i] = loop.run_in_executor(self._punchers(), _punch, rel)
                except RuntimeError as e:  # no thread could be started: punch it here
                    log.warning("%s: punching on the event loop: %s", rel.vm.name, e)
        results = [fut if fut is not None else _punch(rel) for fut, rel in zip(punched, ready)]
        offloaded = [f for f in punched if f is not None]
        # The ledger must follow the memfds whatever happens to this task: wait out the
        # threads even when cancelled, then settle every batch, then let a cancel through.
        cancelled = False
        while offloaded and not all(f.done() for f in offloaded):
            try:
                await asyncio.shield(asyncio.wait(offloaded))
            except asyncio.CancelledError:
                cancelled = True
        for rel, res in zip(ready, results):
            try:
                out = res.result() if isinstance(res, asyncio.Future) else res
                self._settle_release(rel, out)
            except Exception as e:  # a bug, not a failed system call (that is PunchFailed)
                log.exception("%s: releasing a batch failed", rel.vm.name)
                if not rel.done.done():
                    rel.done.set_exception(e)
        self.changed.notify_all()
        if cancelled:
            raise asyncio.CancelledError

    def _settle_release(self, rel: _Release, out: int | PunchFailed) -> None:
        """Free what a batch's punch released; answer its caller."""
        vm, r = rel.vm, rel.runs
        if isinstance(out, PunchFailed):
            done = int(np.searchsorted(np.cumsum(r[:, 1]), out.punched.size, side="right"))
            _, slots = self.ledger.release_runs(vm.led.index, r[:done])
            self._discard(vm, slots)
            rest = P.runs_to_pfns(r[done:]).astype(np.int64)  # the error path only
            kept = rest[vm.led.p2m[rest] >= 0]
            vm.mem.set_present(kept)
            self._report("host_memory_error", vm, "release", "memfd.punch", out,
                         int(kept.size))
            rel.done.set_exception(
                LedgerError(f"VM {vm.name!r}: releasing pages failed: {out}"))
            return
        freed, slots = self.ledger.release_runs(vm.led.index, r)
        self._discard(vm, slots)
        rel.done.set_result((freed, out))

    def _punchers(self) -> concurrent.futures.ThreadPoolExecutor:
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(
                max_workers=PUNCH_THREADS, thread_name_prefix="punch")
        return self._pool

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
