"""The Host: the asyncio hypervisor process that owns the frame budget and the VMs.

Units: pages/frames/slots of 4096 bytes; times in seconds (UNIX time in events).

What it does (docs/architecture.md, "The host"):

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
import os
import signal
import socket
import sys
import time
from collections.abc import Coroutine, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from hypervisor import rundir
from hypervisor.balloon import BalloonBackend
from hypervisor.hostswap import HostSwap
from hypervisor.ledger import FrameLedger
from hypervisor.machine import Backed, MachineServer
from hypervisor.memory import HostMemory
from hypervisor.policies import load_policy
from hypervisor.policies.base import Decision, HostSample, Policy, VmSample
from hypervisor.schedule import ScheduleEntry
from hypervisor.supervisor import HALT_GRACE, Supervisor
from hypervisor.topology import Topology, VmConfig
from hypervisor.vm import Vm, VmState
from hypervisor.vmmem import VmMemory
from protocol.aio import Listener, stream_handler
from protocol.constants import PAGE_SIZE
from protocol.features import Feature, StatTag

log = logging.getLogger(__name__)

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
                 vm_command: Sequence[str] | None = None, fork_server: bool = False) -> None:
        self.topology = topology
        hc = topology.host
        self.name: str = hc.name
        self.launch = launch_vm_processes
        #: Seconds over which `share`'s accessed-bit sample of each VM is taken (ESX samples
        #: over 30 s; an emulator's experiments are minutes long, so a few intervals).
        self.active_sample_period = max(ACTIVE_SAMPLE_MIN_PERIOD,
                                        4 * float(topology.host.policy_interval))
        self.run_dir = Path(run_dir or hc.run_dir or rundir.default_run_dir(hc.name))
        self.vms: dict[str, Vm] = {}
        self._by_index: dict[int, Vm] = {}
        self.memory = HostMemory(hc.frames, hc.swap_slots, vms=self._by_index, emit=self.emit,
                                 stop_vm=self._stop_vm, spawn=self.spawn)
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
                                     else [sys.executable], fork_server=fork_server)
        self.control: Any = None
        self.qmp: Any = None  # hypervisor.qmp.QmpServer once started
        self.metrics_server: Any = None  # hypervisor.metrics.MetricsServer when enabled
        self.policy_name = "none"
        self.policy: Policy | None = None
        self.policy_history: collections.deque[tuple[HostSample, list[VmSample]]] = (
            collections.deque(maxlen=60))
        #: Policy rounds run by the loop and the host CPU seconds they took (thread time).
        self.policy_rounds = 0
        self.policy_cpu_seconds = 0.0
        self.started_at = 0.0

    # ================================================================== lifetime

    async def start(self) -> None:
        """Create the run dir, the VMs and the servers; launch VM processes."""
        rundir.prepare_run_dir(self.run_dir)
        try:
            if self.launch:
                # First: the fork server loads while this host starts (supervisor.py).
                await self.supervisor.launch_fork_server()
            if self.topology.host.metrics is not None:
                from hypervisor.metrics import MetricsServer
                # Bound first: a taken address fails the start before any VM exists.
                self.metrics_server = await MetricsServer.start(self, self.topology.host.metrics)
            _warm_up_kernels()
            hc = self.topology.host
            self.memory.open_swap(self.run_dir / rundir.SWAP_FILE)
            for vc in self.topology.vms:
                self._create_vm(vc)
            from hypervisor.control import ControlServer
            self.control = ControlServer(self)
            await self._listen_unix(self.run_dir / rundir.CONTROL_SOCK, self.control.serve,
                                    point="control.accept", max_clients=self.control.max_clients)
            for vm in self.vms.values():
                await self._listen_machine(vm)
                await self._listen_unix(rundir.balloon_sock(self.run_dir, vm.name),
                                        self._balloon_handler(vm))
            from hypervisor.qmp import QmpServer
            self.qmp = QmpServer(self)
            await self.qmp.start()
            self.set_policy(hc.policy, dict(hc.policy_params))
            self.started_at = time.time()
            self.emit("host_started", None, frames=self.ledger.frames_total,
                      swap_slots=self.ledger.swap_slots_total)
            self.spawn(self._policy_loop(), "policy")
            if self.topology.schedule:
                self.spawn(self.run_schedule(self.topology.schedule, time.monotonic()),
                           "schedule")
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

        async def on_fault(pfns: np.ndarray) -> bool | Backed:
            read: list[np.ndarray] = []
            evicted = [0, 0]  # [pages, ios] written to host swap while the fault waited
            if not await self.memory.handle_fault(vm_ref[0], pfns, read, evicted):
                return False
            return Backed(np.concatenate(read) if read else np.empty(0, np.int64), *evicted)

        async def release(g: np.ndarray) -> tuple[int, int]:
            return await self.release_pages(vm_ref[0], g)

        machine = MachineServer(vc.name, mem, on_fault=on_fault,
                                on_boot=lambda: self.supervisor.on_boot(vm_ref[0]),
                                on_disconnect=lambda why: self.supervisor.on_guest_gone(vm_ref[0],
                                                                        why),
                                on_boot_failed=lambda why: self.emit("boot_failed", vc.name,
                                                                     reason=why))
        supported = Feature.from_names(vc.features)
        balloon = BalloonBackend(vc.name, vc.pages, supported=supported, ballooned=led.balloon,
                                 stats_interval=vc.stats_interval, release=release,
                                 emit=self.emit, target=vc.initial_balloon // 4096)
        vm = Vm(config=vc, mem=mem, led=led, machine=machine, balloon=balloon)
        vm_ref.append(vm)
        self.vms[vc.name] = vm
        self._by_index[led.index] = vm
        return vm

    async def _listen_unix(self, path: Path, handler: Any, *, point: str | None = None,
                           max_clients: int | None = None, raw: bool = False) -> None:
        lst = Listener.bind(path, handler if raw else stream_handler(handler), name=path.name,
                            point=point, max_clients=max_clients, on_refused=lambda why:
                            self.emit("connection_refused", None, socket=path.name, reason=why))
        rundir.secure_socket(path)
        self._servers.append(lst.start())

    def _balloon_handler(self, vm: Vm) -> Any:
        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            if vm.state in (VmState.DESTROYED, VmState.OOM_KILLED):
                writer.close()
                return
            await vm.balloon.serve(reader, writer)
        return handler

    async def _listen_machine(self, vm: Vm) -> None:
        async def serve(conn: socket.socket) -> None:
            if vm.state in (VmState.DESTROYED, VmState.OOM_KILLED):
                conn.close()
                return
            if vm.state == VmState.CRASHED and not self.launch and not vm.machine.connected:
                # Without a supervisor, a guest connecting to a crashed VM reboots it.
                await self.restart_vm(vm)
                self.emit("vm_restarted", vm.name, restarts=vm.restarts)
            self.spawn(vm.machine.serve_socket(conn), f"{vm.name}-machine")

        await self._listen_unix(rundir.machine_sock(self.run_dir, vm.name), serve,
                                point="machine.accept", raw=True)

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        """Run ``coro`` as a task the host cancels at shutdown."""
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
            loop.add_signal_handler(sig, self.request_shutdown, f"signal {sig.name}")

    def request_shutdown(self, reason: str = "requested") -> None:
        if not self._stopping:
            self._stopping = True
            self.spawn(self.shutdown(reason), "shutdown")

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
        if self.qmp is not None:
            await self.qmp.close()
        if self.metrics_server is not None:
            await self.metrics_server.close()
        for vm in self.vms.values():
            await vm.machine.disconnect()
        for t in list(self._tasks):
            if t is not me:
                t.cancel()
        await asyncio.sleep(0)
        await self.supervisor.stop_all(0.0)
        await self.supervisor.kill_stragglers()
        await self.supervisor.close_fork_server()
        for vm in self.vms.values():
            vm.mem.close()
        self.memory.close()
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
    # The memory path lives in hypervisor.memory; these are its entry points here.

    @property
    def forkserver_pid(self) -> int | None:
        """The fork server's pid while one runs (None: none now, or VM processes exec'd)."""
        fs = self.supervisor.fork_server
        return None if fs is None else fs.pid

    @property
    def ledger(self) -> FrameLedger:
        return self.memory.ledger

    @property
    def swap(self) -> HostSwap | None:
        return self.memory.swap

    @property
    def mm_lock(self) -> asyncio.Lock:
        return self.memory.lock

    @property
    def mm_changed(self) -> asyncio.Condition:
        return self.memory.changed

    @property
    def _inflight(self) -> np.ndarray:
        return self.memory.inflight

    @property
    def oom_kills(self) -> int:
        return self.memory.oom_kills

    @property
    def releases(self) -> tuple[int, int]:
        """Balloon release rounds (lock holds) and the batches they released."""
        return self.memory.release_rounds, self.memory.release_batches

    @property
    def swap_reads(self) -> tuple[int, int]:
        """Host swap reads (pages, all VMs) and those not contiguous on the swap device."""
        return self.memory.swap_reads, self.memory.swap_reads_noncontig

    async def handle_fault(self, vm: Vm, pfns: np.ndarray) -> bool:
        """Back the pages of an EPT fault. False when the VM died on the way (no resume)."""
        return await self.memory.handle_fault(vm, pfns)

    async def release_pages(self, vm: Vm, gpfns: np.ndarray) -> tuple[int, int]:
        """Inflate/report: EPT NOT_PRESENT, punch the backed runs, free frames and slots."""
        return await self.memory.release_pages(vm, gpfns)

    def _host_oom(self) -> bool:
        return self.memory.host_oom()

    def _free_vm_locked(self, vm: Vm, state: VmState) -> tuple[int, int]:
        return self.memory.free_vm(vm, state)

    def crash_locked(self, vm: Vm, reason: str) -> None:
        self.memory.crash_vm(vm, reason)

    @property
    def stopping(self) -> bool:
        return self._stopping

    @property
    def by_index(self) -> dict[int, Vm]:
        return self._by_index

    def _stop_vm(self, vm: Vm) -> None:
        """Kill a stopped VM's processes and drop its channels (its memory is freed by
        the memory path, which calls this)."""
        for proc in (vm.kernel_proc, vm.driver_proc):
            if proc is not None and proc.returncode is None:
                try:
                    proc.kill()
                except ProcessLookupError:
                    pass
        self.spawn(vm.machine.disconnect(), f"{vm.name}-disconnect")
        self.spawn(vm.balloon.disconnect("VM stopped"), f"{vm.name}-bdisconnect")

    def resident_total(self) -> int:
        return self.memory.resident_total()

    def check_conservation(self) -> None:
        """frames in use == Σ resident memfd pages, and the ledger's own invariants."""
        self.memory.check_conservation()

    # ================================================================== VM life
    # VM processes are supervised by hypervisor.supervisor; this is its entry point here.

    async def restart_vm(self, vm: Vm) -> None:
        """Give a crashed VM a fresh ledger entry (its memfds were punched to zero)."""
        await self.supervisor.restart_vm(vm)

    # ================================================================== schedule

    def _schedule_call(self, e: ScheduleEntry) -> Any:
        """Run *e* through the control channel's handler of the same name."""
        ctl = self.control
        if e.action == "set_policy":
            return ctl.set_policy({"name": e.name, "params": dict(e.params)})
        assert e.size is not None
        if e.action == "setmem":
            return ctl.setmem({"vm": e.vm, "bytes": e.size})
        return ctl.set_balloon({"vm": e.vm, "pages": e.size // PAGE_SIZE})

    async def run_schedule(self, entries: Sequence[ScheduleEntry], start: float) -> None:
        """Run *entries* (``[[schedule]]``) in time order, each at ``start + at``
        (``time.monotonic`` clock), one ``schedule`` event each.

        An action the host refuses (a VM that is gone, say) is reported in its event and
        does not stop the schedule."""
        for i, e in sorted(enumerate(entries), key=lambda p: (p[1].at, p[0])):
            delay = start + e.at - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            fields: dict[str, Any] = {"entry": i, "at": e.at, "action": e.action,
                                      "what": e.describe()}
            try:
                fields["result"] = self._schedule_call(e)
                fields["ok"] = True
            except Exception as ex:  # a refused action is reported, not fatal
                fields["ok"] = False
                fields["error"] = getattr(ex, "message", None) or str(ex)
            self.emit("schedule", e.vm, **fields)

    # ================================================================== targets, policy

    def set_balloon_target(self, vm: Vm, pages: int, reason: str = "manual",
                           policy: str | None = None) -> None:
        """Set *vm*'s balloon target; a change is one event: ``policy`` (with the policy's
        name) when a policy decided it, else ``balloon_target``."""
        old = vm.balloon.target
        vm.balloon.set_target(pages)
        if pages != old:
            if policy is not None:
                self.emit("policy", vm.name, policy=policy, target_pages=pages, old=old,
                          reason=reason)
            else:
                self.emit("balloon_target", vm.name, target_pages=pages, old=old, reason=reason)

    def set_policy(self, name: str, params: dict[str, Any] | None = None) -> None:
        self.policy = load_policy(name, params or {})
        self.policy_name = name

    def host_sample(self) -> HostSample:
        return HostSample(time=time.time(), frames_total=self.ledger.frames_total,
                          frames_free=self.ledger.frames_free,
                          swap_slots_total=self.ledger.swap_slots_total,
                          swap_slots_free=self.ledger.slots_free)

    def vm_sample(self, vm: Vm) -> VmSample:
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
            t0 = time.thread_time()
            try:
                self.policy_step()
            except Exception:
                log.exception("policy %s failed", self.policy_name)
            self.policy_rounds += 1
            self.policy_cpu_seconds += time.thread_time() - t0

    def policy_step(self) -> list[Decision]:
        """One collect → decide → act round; returns the decisions applied."""
        running = [vm for vm in self.vms.values() if not vm.state.stopped]
        if self.policy is None or not running:
            return []
        hs = self.host_sample()
        samples = [self.vm_sample(vm) for vm in running]
        decisions = self.policy.decide(hs, samples, list(self.policy_history))
        self.policy_history.append((hs, samples))
        applied: list[Decision] = []
        for d in decisions:
            vm = self.vms.get(d.vm)
            if vm is None or vm.manual_target:
                # A target set by hand holds until the policy is set again or it is released.
                continue
            target = max(0, min(int(d.target_pages), vm.pages))
            if target != vm.balloon.target:
                self.set_balloon_target(vm, target, reason=d.reason, policy=self.policy_name)
                applied.append(d)
        return applied


def _warm_up_kernels() -> None:
    """Load the Numba kernels of the balloon path now (from the on-disk cache), not on
    the first inflate, whose time users measure."""
    from hypervisor import kernels
    from protocol.warmup import warm_up

    warm_up()
    state = np.zeros(8, dtype=np.uint8)
    idx, _hint = kernels.map_alloc(state, 2, 0)
    kernels.map_count(state, 1)
    kernels.map_free(state, idx)
    # The release path of an inflate, on a one-page P2M that backs nothing (no-op).
    p2m = np.full(1, -1, dtype=np.int64)
    runs = np.array([[0, 1]], dtype=np.int64)
    owner_vm, owner_gpfn = np.zeros(8, dtype=np.int32), np.zeros(8, dtype=np.int64)
    kernels.runs_first_locked(p2m, runs, state)
    kernels.release_runs(p2m, runs, state, owner_vm, owner_gpfn, state.copy(),
                         owner_vm.copy(), owner_gpfn.copy(), 0)


async def run_host(topology: Topology, **kwargs: Any) -> None:
    """Entry point body: start, wait for a signal or ``shutdown``, stop."""
    host = Host(topology, **kwargs)
    await host.start()
    # Never through a link, and only a file this instance created (docs: the run directory).
    log_fd = rundir.open_new(host.run_dir / rundir.LOG_FILE, os.O_WRONLY | os.O_APPEND)
    log_file = open(log_fd, "a", buffering=1, encoding="utf-8")  # noqa: SIM115 - host-long
    handler = logging.StreamHandler(log_file)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger().addHandler(handler)
    host.install_signal_handlers()
    await host.wait_stopped()


