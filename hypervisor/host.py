"""The Host: the asyncio hypervisor process that owns the frame budget and the VMs.

Units: pages/frames/slots of 4096 bytes; times in seconds (UNIX time in events).

What it does (DESIGN §2–3, §5–7):

- creates the run dir, the frame ledger, the host swap file and per VM its memory
  (:class:`~hypervisor.vmmem.VmMemory`), machine channel (:mod:`hypervisor.machine`) and
  balloon device (:mod:`hypervisor.balloon`); serves ``control.sock``
  (:mod:`hypervisor.control`);
- backs EPT faults, reclaiming with a clock scan and a shootdown when no frame is free, and
  kills the VM holding most frames when host swap is full (host OOM);
- releases inflated and reported pages for real (EPT first, then punch, then the ledger);
- launches and supervises each VM's guest kernel and balloon driver processes (unless
  ``launch_vm_processes=False``, for tests whose in-test peers connect instead);
- runs the balloon policy every ``policy_interval``;
- shuts everything down on SIGINT/SIGTERM or the control ``shutdown`` call.

Every change to the ledger, the EPTs and the memfds happens under one asyncio lock
(``mm_lock``), so each operation is atomic with respect to the others and
``frames_in_use == Σ resident pages`` holds whenever the lock is free. The one wait that
is not the host's own, a reclaim's shootdown (a guest has up to ``SHOOTDOWN_TIMEOUT`` to
answer), happens with the lock released: the victims stay LOCKED in the ledger, resident
and not present in their EPT, so other VMs go on faulting and ballooning; an operation
that needs an in-flight victim page (a fault on it, a balloon batch naming it) waits on
``mm_changed`` until that reclaim has finished, then starts over.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from hypervisor import rundir
from hypervisor.balloon import BalloonBackend
from hypervisor.hostswap import HostSwap
from hypervisor.kernels import LOCKED
from hypervisor.ledger import FrameLedger, LedgerError, OutOfSwap, p2m_to_slot
from hypervisor.machine import MachineServer
from hypervisor.supervisor import HALT_GRACE, Supervisor
from hypervisor.topology import Topology, VmConfig
from hypervisor.vm import Vm, VmState
from hypervisor.vmmem import EPT_NOT_PRESENT, VmMemory
from protocol.features import Feature, StatTag

log = logging.getLogger(__name__)

#: Reclaim at least this many frames per pass (like SWAP_CLUSTER_MAX): one shootdown round
#: trip then covers many faults instead of one.
RECLAIM_BATCH = 256
#: Events kept for ``events`` without ``follow``.
EVENT_HISTORY = 10_000
#: Pages whose accessed bits are sampled per VM per interval for the ``share`` policy.
ACTIVE_SAMPLE = 100
#: Shortest accessed-bit sampling period, seconds (see Host.active_sample_period).
ACTIVE_SAMPLE_MIN_PERIOD = 1.0


class Host:
    """One hypervisor. ``await host.start()``, then ``await host.wait_stopped()``."""

    def __init__(self, topology: Topology, *, launch_vm_processes: bool = True,
                 run_dir: Path | None = None,
                 vm_command: Sequence[str] | None = None) -> None:
        self.topology = topology
        hc = topology.host
        self.name: str = hc.name
        self.launch = launch_vm_processes
        #: Seconds over which `share`'s accessed-bit sample of each VM is taken (ESX samples
        #: over 30 s; an emulator's experiments are minutes long, so a few intervals).
        self.active_sample_period = max(ACTIVE_SAMPLE_MIN_PERIOD,
                                        4 * float(topology.host.policy_interval))
        self.run_dir = Path(run_dir or hc.run_dir or rundir.default_run_dir(hc.name))
        self.ledger = FrameLedger(hc.frames, hc.swap_slots)
        self.swap: HostSwap | None = None
        self.vms: dict[str, Vm] = {}
        self._by_index: dict[int, Vm] = {}
        self.mm_lock = asyncio.Lock()
        #: Notified (under mm_lock) when a reclaim's in-flight victims are settled.
        self.mm_changed = asyncio.Condition(self.mm_lock)
        #: Per frame: the reclaim that holds it in flight (0: none). A frame freed under a
        #: reclaim (its VM stopped) and picked again by another carries the other's token.
        self._inflight = np.zeros(self.ledger.frames_total, dtype=np.int64)
        self._reclaim_seq = 0
        self.events: collections.deque[dict[str, Any]] = collections.deque(maxlen=EVENT_HISTORY)
        self.event_seq = 0
        self._subscribers: set[asyncio.Queue[dict[str, Any]]] = set()
        self._servers: list[Any] = []
        self._tasks: set[asyncio.Task[Any]] = set()
        self._stopped = asyncio.Event()
        self._stopping = False
        self._shutdown_started = False
        #: Starts, watches and stops the VM processes (hypervisor.supervisor).
        self.supervisor = Supervisor(self, list(vm_command) if vm_command
                                     else [sys.executable])
        self.control: Any = None
        self.policy_name = "none"
        self.policy: Any = None
        self.policy_history: collections.deque[Any] = collections.deque(maxlen=60)
        self.started_at = 0.0
        self.oom_kills = 0

    # ================================================================== lifetime

    async def start(self) -> None:
        """Create the run dir, the VMs and the servers; launch VM processes."""
        rundir.prepare_run_dir(self.run_dir)
        try:
            _warm_up_kernels()
            hc = self.topology.host
            self.swap = HostSwap(self.run_dir / rundir.SWAP_FILE if hc.swap_slots else None,
                                 hc.swap_slots)
            for vc in self.topology.vms:
                self._create_vm(vc)
            from hypervisor.control import ControlServer
            self.control = ControlServer(self)
            await self._listen_unix(self.run_dir / rundir.CONTROL_SOCK, self.control.serve)
            for vm in self.vms.values():
                await self._listen_machine(vm)
                await self._listen_unix(rundir.balloon_sock(self.run_dir, vm.name),
                                        self._balloon_handler(vm))
            self.set_policy(hc.policy, dict(hc.policy_params))
            self.started_at = time.time()
            self.emit("host_started", None, frames=self.ledger.frames_total,
                      swap_slots=self.ledger.swap_slots_total)
            self._spawn(self._policy_loop(), "policy")
            if self.launch:
                for vm in self.vms.values():
                    self.supervisor.start(vm)
        except BaseException:
            await self._teardown()
            raise

    def _create_vm(self, vc: VmConfig) -> Vm:
        mem = VmMemory(vc.name, vc.pages)
        led = self.ledger.add_vm(vc.name, vc.pages, mem.accessed)
        vm_ref: list[Vm] = []

        async def on_fault(pfns: np.ndarray) -> bool:
            return await self.handle_fault(vm_ref[0], pfns)

        async def release(g: np.ndarray) -> tuple[int, int]:
            return await self.release_pages(vm_ref[0], g)

        machine = MachineServer(vc.name, mem, on_fault=on_fault,
                                on_boot=lambda: self.supervisor.on_boot(vm_ref[0]),
                                on_disconnect=lambda why: self.supervisor.on_guest_gone(vm_ref[0],
                                                                        why))
        supported = Feature.from_names(vc.features)
        balloon = BalloonBackend(vc.name, vc.pages, supported=supported, ballooned=led.balloon,
                                 stats_interval=vc.stats_interval, release=release,
                                 emit=self.emit, target=vc.initial_balloon // 4096)
        vm = Vm(config=vc, mem=mem, led=led, machine=machine, balloon=balloon)
        vm_ref.append(vm)
        self.vms[vc.name] = vm
        self._by_index[led.index] = vm
        return vm

    async def _listen_unix(self, path: Path, handler: Any) -> None:
        server = await asyncio.start_unix_server(handler, path=str(path), limit=1 << 20)
        rundir.secure_socket(path)
        self._servers.append(server)

    def _balloon_handler(self, vm: Vm) -> Any:
        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            if vm.state in (VmState.DESTROYED, VmState.OOM_KILLED):
                writer.close()
                return
            await vm.balloon.serve(reader, writer)
        return handler

    async def _listen_machine(self, vm: Vm) -> None:
        path = rundir.machine_sock(self.run_dir, vm.name)
        lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        lsock.bind(str(path))
        rundir.secure_socket(path)
        lsock.listen(8)
        lsock.setblocking(False)
        self._servers.append(lsock)

        async def accept_loop() -> None:
            loop = asyncio.get_running_loop()
            while True:
                conn, _ = await loop.sock_accept(lsock)
                if vm.state in (VmState.DESTROYED, VmState.OOM_KILLED):
                    conn.close()
                    continue
                if vm.state == VmState.CRASHED and not self.launch and not vm.machine.connected:
                    # Without a supervisor, a guest connecting to a crashed VM reboots it.
                    await self.restart_vm(vm)
                    self.emit("vm_restarted", vm.name, restarts=vm.restarts)
                self._spawn(vm.machine.serve_socket(conn), f"{vm.name}-machine")

        self._spawn(accept_loop(), f"{vm.name}-accept")

    def _spawn(self, coro: Any, name: str) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("task %s failed", task.get_name(), exc_info=task.exception())

    def install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, lambda s=sig: self.request_shutdown(f"signal {s.name}"))

    def request_shutdown(self, reason: str = "requested") -> None:
        if not self._stopping:
            self._stopping = True
            self._spawn(self.shutdown(reason), "shutdown")

    async def wait_stopped(self) -> None:
        await self._stopped.wait()

    async def shutdown(self, reason: str = "requested") -> None:
        """Halt every VM, wait for its processes, kill stragglers, remove the run dir.

        Idempotent: a second caller waits for the first shutdown to finish."""
        if self._shutdown_started:
            await self._stopped.wait()
            return
        self._shutdown_started = True
        self._stopping = True
        self.emit("host_stopping", None, reason=reason)
        self.supervisor.cancel_all()
        await asyncio.gather(*(vm.machine.halt() for vm in self.vms.values()),
                             return_exceptions=True)
        await asyncio.gather(*(vm.balloon.disconnect() for vm in self.vms.values()),
                             return_exceptions=True)
        await self.supervisor.stop_all(HALT_GRACE)
        await self._teardown()

    async def _teardown(self) -> None:
        me = asyncio.current_task()
        for s in self._servers:
            s.close()
        for vm in self.vms.values():
            await vm.machine.disconnect()
        for t in list(self._tasks):
            if t is not me:
                t.cancel()
        await asyncio.sleep(0)
        await self.supervisor.stop_all(0.0)
        await self.supervisor.kill_stragglers()
        for vm in self.vms.values():
            vm.mem.close()
        if self.swap is not None:
            self.swap.close()
        rundir.remove_run_dir(self.run_dir)
        self._stopped.set()

    # ================================================================== events

    def emit(self, kind: str, vm: str | None, **fields: Any) -> dict[str, Any]:
        self.event_seq += 1
        ev = {"seq": self.event_seq, "time": time.time(), "kind": kind, "vm": vm, **fields}
        self.events.append(ev)
        for q in list(self._subscribers):
            if q.qsize() < EVENT_HISTORY:
                q.put_nowait(ev)
        log.info("event %s", ev)
        return ev

    def subscribe(self) -> asyncio.Queue[dict[str, Any]]:
        q: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._subscribers.add(q)
        return q

    def unsubscribe(self, q: asyncio.Queue[dict[str, Any]]) -> None:
        self._subscribers.discard(q)

    # ================================================================== memory

    def _in_flight(self, vm: Vm, gpfns: np.ndarray) -> bool:
        """Some of ``gpfns`` are backed by frames a reclaim holds in flight (mm_lock held;
        only in-flight victims are LOCKED while the lock is free)."""
        cur = vm.led.p2m[gpfns]
        cur = cur[cur >= 0]
        return bool(cur.size) and bool(np.any(self.ledger.state[cur] == LOCKED))

    async def handle_fault(self, vm: Vm, pfns: np.ndarray) -> bool:
        """Back the pages of an EPT fault. False when the VM died on the way (no resume)."""
        g = np.unique(pfns)
        led = vm.led  # a restart under a wait gives the VM a new one: this fault is stale
        async with self.mm_lock:
            while True:  # until nothing changed under a wait
                if vm.state in (VmState.DESTROYED, VmState.OOM_KILLED, VmState.CRASHED) or \
                        vm.led is not led or led.index not in self.ledger.vms:
                    return False
                if self._in_flight(vm, g):
                    await self.mm_changed.wait()  # its reclaim ends it: look again
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
                self.emit("balloon_violation", vm.name, pages=int(viol.size),
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

    async def _unlocked(self, aw: Any) -> Any:
        """Await ``aw`` with mm_lock released; it is held again on return (or raise)."""
        self.mm_lock.release()
        try:
            return await aw
        finally:
            cancelled = False
            while True:
                try:
                    await self.mm_lock.acquire()
                    break
                except asyncio.CancelledError:
                    cancelled = True  # the caller's `async with` must find it held
            if cancelled:
                raise asyncio.CancelledError

    async def _reclaim(self, wanted: int, faulting: Vm | None) -> None:
        """Make ``wanted`` frames free: clock scan, shootdown, swap out, punch (mm_lock held).

        DESIGN §3 order: EPT NOT_PRESENT, ``shootdown``, wait for ``shootdown_ack``, and
        only then copy to host swap and punch. When host swap cannot take the victims, the
        VM holding most frames is killed (host OOM) and the loop tries again.
        """
        while self.ledger.frames_free < wanted:
            deficit = wanted - self.ledger.frames_free
            # Batch like SWAP_CLUSTER_MAX, but never more than 1/16 of the host beyond what
            # is needed: evicting everything for one fault would only make VMs thrash.
            batch = max(deficit, min(RECLAIM_BATCH, self.ledger.frames_total // 16))
            want = min(batch, self.ledger.frames_used)
            want = min(want, self.ledger.slots_free)
            if want < deficit:
                if not self._host_oom():
                    raise LedgerError("host out of memory and no VM left to kill")
                continue
            victims = self.ledger.pick_victims(want)
            if victims.size == 0:
                if np.any(self._inflight):
                    # Every frame left is another reclaim's victim in flight: its end
                    # frees frames (or settles what to do).
                    await self.mm_changed.wait()
                    continue
                # Every frame is pinned by an operation in flight; only OOM can help.
                if not self._host_oom():
                    raise LedgerError("host out of memory: every frame is in flight")
                continue
            owners = self.ledger.owner_vm[victims]
            groups = {int(v): victims[owners == v] for v in np.unique(owners)}
            for idx, fr in groups.items():
                self._by_index[idx].mem.set_not_present(self.ledger.owner_gpfn[fr])
            self._reclaim_seq += 1
            token = self._reclaim_seq
            self._inflight[victims] = token
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
                        self._crash_locked(vm, f"shootdown failed: {res}")
                # Still ours: LOCKED with our token (a VM stopped meanwhile freed its
                # victims; a frame freed and picked again carries another token).
                live = victims[(self.ledger.state[victims] == LOCKED)
                               & (self._inflight[victims] == token)]
                self._inflight[victims[self._inflight[victims] == token]] = 0
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
                                   & (self._inflight[victims] == token)]
                    self._inflight[victims[self._inflight[victims] == token]] = 0
                    self.ledger.unlock(mine)
                    self._restore_present(mine)
                self.mm_changed.notify_all()
            assert self.swap is not None or not outs
            for so in outs:
                vm = self._by_index[so.vm]
                assert self.swap is not None
                self.swap.swap_out(vm.mem, so.gpfns, so.slots)
                vm.mem.punch(so.gpfns)
                vm.host_swap_out += int(so.gpfns.size)
                self.emit("host_swap_out", vm.name, pages=int(so.gpfns.size),
                          faulting=None if faulting is None else faulting.name)

    def _restore_present(self, frames: np.ndarray) -> None:
        for v in np.unique(self.ledger.owner_vm[frames]):
            sel = frames[self.ledger.owner_vm[frames] == v]
            self._by_index[int(v)].mem.set_present(self.ledger.owner_gpfn[sel])

    def _host_oom(self) -> bool:
        """Kill the VM holding most frames (ties: the first created). mm_lock held."""
        idx = self.ledger.largest_vm()
        if idx is None:
            return False
        vm = self._by_index[idx]
        frames, slots = vm.led.backed, vm.led.swapped
        self.oom_kills += 1
        self._free_vm_locked(vm, VmState.OOM_KILLED)
        self.emit("host_oom_kill", vm.name, frames=frames, swap_slots=slots,
                  frames_free=self.ledger.frames_free)
        return True

    def _free_vm_locked(self, vm: Vm, state: VmState) -> tuple[int, int]:
        """Stop a VM's processes and give back everything it holds (mm_lock held)."""
        vm.state = state
        for proc in (vm.kernel_proc, vm.driver_proc):
            if proc is not None and proc.returncode is None:
                try:
                    proc.kill()
                except ProcessLookupError:
                    pass
        self._spawn(vm.machine.disconnect(), f"{vm.name}-disconnect")
        self._spawn(vm.balloon.disconnect("VM stopped"), f"{vm.name}-bdisconnect")
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

    def _crash_locked(self, vm: Vm, reason: str) -> None:
        frames, slots = self._free_vm_locked(vm, VmState.CRASHED)
        self.emit("vm_crashed", vm.name, reason=reason, frames=frames, swap_slots=slots)

    async def release_pages(self, vm: Vm, gpfns: np.ndarray) -> tuple[int, int]:
        """Inflate/report: EPT NOT_PRESENT, punch the backed runs, free frames and slots."""
        async with self.mm_lock:
            while True:
                if vm.led.index not in self.ledger.vms:
                    raise LedgerError(f"VM {vm.name!r} is not running")
                gpfns = self.ledger.check_gpfns(vm.led.index, gpfns)  # before any effect
                if not self._in_flight(vm, gpfns):
                    break
                await self.mm_changed.wait()  # a reclaim holds some: let it finish
            cur = vm.led.p2m[gpfns]
            vm.mem.set_not_present(gpfns)  # first: no access can follow the release
            held = cur[cur <= -2]  # host-swapped pages of the batch: their slots free up
            backed, _frames = self.ledger.release(vm.led.index, gpfns)
            if self.swap is not None and held.size:
                self.swap.discard(p2m_to_slot(held))
            calls = vm.mem.punch(backed)
            return int(backed.size), calls

    def resident_total(self) -> int:
        return sum(vm.mem.resident_pages() for vm in self.vms.values())

    def check_conservation(self) -> None:
        """frames in use == Σ resident memfd pages, and the ledger's own invariants."""
        self.ledger.check()
        for vm in self.vms.values():
            held = vm.led.backed if vm.led.index in self.ledger.vms else 0
            res = vm.mem.resident_pages()
            assert res == held, f"{vm.name}: {res} resident pages but {held} frames held"
        assert self.ledger.frames_used == self.resident_total()

    # ================================================================== VM life
    # VM processes are supervised by hypervisor.supervisor; this is its entry point here.

    async def restart_vm(self, vm: Vm) -> None:
        """Give a crashed VM a fresh ledger entry (its memfds were punched to zero)."""
        await self.supervisor.restart_vm(vm)

    # ================================================================== targets, policy

    def set_balloon_target(self, vm: Vm, pages: int, reason: str = "manual") -> None:
        old = vm.balloon.target
        vm.balloon.set_target(pages)
        if pages != old:
            self.emit("balloon_target", vm.name, target_pages=pages, old=old, reason=reason)

    def set_policy(self, name: str, params: dict[str, Any] | None = None) -> None:
        try:
            from hypervisor.policies import load_policy
        except ImportError:  # policies not installed: only manual control
            if name != "none":
                raise ValueError(f"policy {name!r} is not available (only 'none')") from None
            self.policy, self.policy_name = None, "none"
            return
        self.policy = load_policy(name, params or {})
        self.policy_name = name

    def host_sample(self) -> Any:
        from hypervisor.policies.base import HostSample
        return HostSample(time=time.time(), frames_total=self.ledger.frames_total,
                          frames_free=self.ledger.frames_free,
                          swap_slots_total=self.ledger.swap_slots_total,
                          swap_slots_free=self.ledger.slots_free)

    def vm_sample(self, vm: Vm) -> Any:
        from hypervisor.policies.base import VmSample
        st = vm.balloon.stats
        now = time.monotonic()
        if now - vm.sample_armed_at >= self.active_sample_period:
            # The sampling period is over: count the sampled pages touched since they were
            # armed, then clear the accessed bits of ACTIVE_SAMPLE random backed pages for
            # the next period. Between, every policy round sees the last full sample.
            vm.sample_result = (
                int(vm.sample_pages.size),
                int(np.count_nonzero(vm.mem.accessed[vm.sample_pages]))
                if vm.sample_pages.size else 0,
            )
            backed = np.nonzero(vm.led.p2m >= 0)[0] if vm.led.index in self.ledger.vms \
                else np.empty(0, dtype=np.int64)
            if backed.size:
                pick = np.random.default_rng().choice(backed, min(ACTIVE_SAMPLE, backed.size),
                                                      replace=False)
                vm.mem.accessed[pick] = 0
                vm.sample_pages = pick
            else:
                vm.sample_pages = np.empty(0, dtype=np.int64)
            vm.sample_armed_at = now
        sampled, touched = vm.sample_result
        stall = vm.balloon.stall_since_sample
        vm.balloon.stall_since_sample = False
        cfg = vm.config
        memtag = st.get(int(StatTag.MEMFREE))
        avail = st.get(int(StatTag.AVAIL))
        return VmSample(
            name=vm.name, time=time.time(), memory_pages=vm.pages,
            target_pages=vm.balloon.target, balloon_pages=min(vm.balloon.actual, vm.pages),
            backed_pages=vm.led.backed if vm.led.index in self.ledger.vms else 0,
            host_swapped_pages=vm.led.swapped if vm.led.index in self.ledger.vms else 0,
            free_pages=None if memtag is None else memtag // 4096,
            available_pages=None if avail is None else avail // 4096,
            swap_in=st.get(int(StatTag.SWAP_IN), 0), swap_out=st.get(int(StatTag.SWAP_OUT), 0),
            alloc_stalls=st.get(int(StatTag.ALLOC_STALL), 0),
            major_faults=st.get(int(StatTag.MAJFLT), 0), out_of_puff=stall,
            active_sampled=sampled, active_touched=min(touched, sampled),
            min_pages=cfg.min_memory // 4096, max_pages=cfg.max_memory // 4096,
            shares=cfg.shares)

    async def _policy_loop(self) -> None:
        interval = float(self.topology.host.policy_interval)
        while True:
            await asyncio.sleep(interval)
            try:
                self.policy_step()
            except Exception:  # noqa: BLE001 - a broken policy must not stop the host
                log.exception("policy %s failed", self.policy_name)

    def policy_step(self) -> list[Any]:
        """One collect → decide → act round; returns the decisions applied."""
        running = [vm for vm in self.vms.values() if not vm.state.stopped]
        if self.policy is None or not running:
            return []
        hs = self.host_sample()
        samples = [self.vm_sample(vm) for vm in running]
        decisions = self.policy.decide(hs, samples, list(self.policy_history))
        self.policy_history.append((hs, samples))
        applied = []
        for d in decisions:
            vm = self.vms.get(d.vm)
            if vm is None:
                continue
            target = max(0, min(int(d.target_pages), vm.pages))
            if target != vm.balloon.target:
                self.set_balloon_target(vm, target, reason=d.reason)
                self.emit("policy", vm.name, policy=self.policy_name, target_pages=target,
                          reason=d.reason)
                applied.append(d)
        return applied


def _warm_up_kernels() -> None:
    """Load the Numba kernels of the balloon path now (from the on-disk cache), not on
    the first inflate, whose time users measure."""
    from protocol.warmup import warm_up

    from hypervisor import kernels

    warm_up()
    state = np.zeros(8, dtype=np.uint8)
    idx, _hint = kernels.map_alloc(state, 2, 0)
    kernels.map_count(state, 1)
    kernels.map_free(state, idx)


async def run_host(topology: Topology, **kwargs: Any) -> None:
    """Entry point body: start, wait for a signal or ``shutdown``, stop."""
    host = Host(topology, **kwargs)
    await host.start()
    handler = logging.FileHandler(host.run_dir / rundir.LOG_FILE)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger().addHandler(handler)
    host.install_signal_handlers()
    await host.wait_stopped()


