"""The guest kernel process: ``python -m guest.kernel --vm NAME --machine-sock PATH
--kernel-sock PATH --config JSON``.

One asyncio loop, one thread.  It boots over the machine channel (receives the RAM, EPT and
accessed-bit memfds), serves the balloon driver on ``<vm>.kernel.sock`` and runs its tasks
round-robin in short quanta of the Numba vCPU loop, yielding to the loop between quanta.

Safe points.  The vCPU loop runs synchronously inside one quantum and the memory manager
never awaits between an EPT check and the copy that depends on it, so whenever the machine
reader coroutine runs, no access to guest RAM is in flight: it acknowledges ``shootdown``
at once.  That covers "between quanta" and "while waiting for ``resume``" alike.

Units: pages of 4096 bytes, times in seconds (monotonic), stall times in ns.

Why one module of this size: it is one process — boot (RAM, swap, disk), the task
scheduler, the machine channel and the kernel-channel server with its stats — whose parts
share the loop's safe-point rule; the memory manager it drives lives in ``guest/mm.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import mmap
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from guest.cost import CostModel
from guest.disk import DiskDevice, DiskError
from guest.mm import EPT_BATCH, MemoryManager, OutOfPuff, SwapDevice, TaskMem, kernel_reserve
from guest.workloads import SpecError, Workload, WorkloadSpec
from protocol import messages as m
from protocol.aio import Channel, Listener, PeerClosed, PeerStalled, stream_handler
from protocol.connection import KernelServer, MachineGuest, State
from protocol.constants import EPT_NOT_PRESENT
from protocol.cost import CostError
from protocol.errors import ErrorCode, ProtocolError
from protocol.errors import PeerClosed as SyncPeerClosed
from protocol.features import MAX_BATCH_RUNS, PAGE_SIZE, PROTOCOL_VERSION
from protocol.lifeline import OwnedFile, bind_to_host
from protocol.pfn import RunError, pfns_to_wire, runs_to_wire
from protocol.sync import SyncChannel

#: Accesses per quantum when no rate limits the task: ~1 ms of vCPU time at tens of
#: millions of accesses/s, small enough that shootdowns and the driver are served promptly.
QUANTUM = 32768
#: A rate-limited task runs once it has earned this many seconds of accesses: fewer,
#: larger quanta (the loop's cost per quantum is fixed; 32 throttled guests on 2 cores
#: spent most of the machine waking up for a few accesses each).
RATE_BATCH = 0.02
#: Scheduler sleep when no task could run (all throttled, sleeping or done): until the
#: first task is due, within these bounds (kswapd and the flusher run at least this often).
IDLE_TICK = 0.003
IDLE_MAX = 0.05
#: Seconds an OOM-killed task waits before it restarts with a fresh address space.
OOM_RESTART_DELAY = 1.0
#: Seconds a second driver connection waits for the first one to go away before refusal.
DRIVER_HANDOVER = 2.0
#: Seconds to wait for the driver's answer to ``oom_notify``.
OOM_NOTIFY_TIMEOUT = 5.0
#: Connections to the kernel socket served at once: the driver, a restarting driver's
#: successor waiting for the handover, and room to refuse a stray one with an error frame.
DRIVER_CONNECTIONS = 4
#: Seconds the driver may leave a started frame unfinished, or our replies unread.
DRIVER_STALL_TIMEOUT = 10.0


class ConfigError(ValueError):
    """Bad ``--config``: the message names the field."""


@dataclass
class Task:
    tid: int
    spec: WorkloadSpec
    wl: Workload
    mem: TaskMem
    started: float | None = None
    ended: float | None = None
    done: bool = False
    sleeping_until: float = 0.0
    tokens: float = 0.0
    last: float = 0.0
    mapped_hi: int = 0  # vpns >= this are guaranteed unmapped (working-set shrink)
    ops: int = 0
    ops_window: list[tuple[float, int]] = field(default_factory=list)
    stall_ns_ept: int = 0
    stall_ns_guest: int = 0
    oom_kills: int = 0
    disk_base: int = 0  # fileio: the disk block its first file starts at


def parse_config(raw: str) -> dict[str, Any]:
    try:
        cfg = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ConfigError(f"--config is not valid JSON: {e}") from e
    if not isinstance(cfg, dict):
        raise ConfigError("--config must be a JSON object")
    tasks = cfg.get("tasks", [])
    if not isinstance(tasks, list):
        raise ConfigError("config.tasks: expected a list")
    for key in ("guest_swap", "memory"):
        v = cfg.get(key, 0)
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ConfigError(f"config.{key}: expected a non-negative integer of bytes, got {v!r}")
    si = cfg.get("stats_interval", 1.0)
    if isinstance(si, bool) or not isinstance(si, (int, float)) or not 0 < si <= 3600:
        raise ConfigError(f"config.stats_interval: expected seconds in (0, 3600], got {si!r}")
    seed = cfg.get("seed", 1)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigError(f"config.seed: expected an integer, got {seed!r}")
    try:
        cfg["_cost"] = CostModel.from_table(cfg.get("cost") or {})
    except CostError as e:
        raise ConfigError(f"config.{e}") from e
    ki = cfg.get("kernel_image")
    if ki is not None and (isinstance(ki, bool) or not isinstance(ki, int) or ki <= 0):
        raise ConfigError(f"config.kernel_image: expected a positive integer of bytes, got {ki!r}")
    if cfg.get("memory"):
        try:
            kernel_reserve(int(cfg["memory"]) // PAGE_SIZE, ki)
        except ValueError as e:
            raise ConfigError(f"config.kernel_image: {e}") from e
    try:
        cfg["_specs"] = [WorkloadSpec.from_dict(t, f"config.tasks[{i}]")
                         for i, t in enumerate(tasks)]
    except SpecError as e:
        raise ConfigError(str(e)) from e
    _check_disk(cfg)
    return cfg


def _check_disk(cfg: dict[str, Any]) -> None:
    """``disk`` (bytes) and ``disk_path``; fileio tasks' files laid out one after another
    on it, which must fit (``_disk_bases`` holds where each task's files start)."""
    disk = cfg.get("disk", 0)
    if isinstance(disk, bool) or not isinstance(disk, int) or disk < 0 or disk % PAGE_SIZE:
        raise ConfigError(f"config.disk: expected a non-negative multiple of {PAGE_SIZE} bytes, "
                          f"got {disk!r}")
    if disk and not isinstance(cfg.get("disk_path"), str):
        raise ConfigError("config.disk_path: a VM with a disk needs the path of its disk file")
    bases: list[int] = []
    used = 0
    for i, spec in enumerate(cfg["_specs"]):
        bases.append(used)
        if spec.workload != "fileio":
            continue
        if not disk:
            raise ConfigError(f"config.tasks[{i}].workload: a fileio task needs a disk "
                              "(config.disk)")
        if used + spec.disk_pages > disk // PAGE_SIZE:
            raise ConfigError(f"config.tasks[{i}].files: {spec.files} files of "
                              f"{spec.file_size} bytes do not fit on the disk ({disk} bytes, "
                              f"{used * PAGE_SIZE} taken by earlier tasks)")
        used += spec.disk_pages
    cfg["_disk_bases"] = bases


class GuestKernel:
    def __init__(self, vm: str, machine_sock: str, kernel_sock: str, cfg: dict[str, Any]) -> None:
        self.vm = vm
        self.machine_sock = machine_sock
        self.kernel_sock = kernel_sock
        self.cfg = cfg
        self.stopping = asyncio.Event()
        self.machine: Channel | None = None
        self.driver: Channel | None = None
        self._driver_free = asyncio.Event()
        self._driver_free.set()
        self._resumes: dict[int, asyncio.Future[np.ndarray | None]] = {}
        self.shootdowns_acked = 0
        self._oom_acks: dict[int, asyncio.Future[bool]] = {}
        self._oom_ids = 1
        self.tasks: list[Task] = []
        self.mm: MemoryManager | None = None
        self.halt_reason = ""

    # ------------------------------------------------------------------ boot

    def _boot(self) -> tuple[MachineGuest, socket.socket, int, list[int]]:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(30.0)
        sock.connect(self.machine_sock)
        conn = MachineGuest()
        ch = SyncChannel(sock, conn)
        ch.send(m.Boot(vm=self.vm, version=PROTOCOL_VERSION))
        reply = ch.recv(maxfds=3)
        if isinstance(reply, m.Halt):
            raise SystemExit(f"halted during boot: {reply.reason}")
        if isinstance(reply, m.Error):
            raise RuntimeError(f"the hypervisor refused the boot: {reply.code}: {reply.message}")
        if not isinstance(reply, m.BootOk):
            raise RuntimeError(f"expected boot_ok, got {reply.TYPE}")
        if reply.page_size != PAGE_SIZE:
            raise RuntimeError(f"host page size {reply.page_size} != {PAGE_SIZE}")
        if len(ch.fds) != 3:
            raise RuntimeError(f"boot_ok carried {len(ch.fds)} descriptors, expected 3")
        sock.settimeout(None)
        sock.setblocking(False)
        return conn, sock, reply.pages, ch.fds

    async def run(self) -> int:
        # The kernel socket exists before boot, so the driver can connect once we booted.
        if os.path.exists(self.kernel_sock):
            os.unlink(self.kernel_sock)
        server = Listener.bind(self.kernel_sock, stream_handler(self._serve_driver),
                               name=os.path.basename(self.kernel_sock),
                               max_clients=DRIVER_CONNECTIONS).start()
        os.chmod(self.kernel_sock, 0o600)
        # Ours to remove at exit, and only while it is still ours (protocol.lifeline).
        own_sock = OwnedFile(self.kernel_sock)
        own_swap: OwnedFile | None = None
        swap: SwapDevice | None = None
        maps: list[mmap.mmap] = []
        try:
            try:
                conn, sock, pages, fds = self._boot()
            except (SyncPeerClosed, ProtocolError, RuntimeError, TimeoutError,
                    ConnectionResetError, BrokenPipeError) as e:
                self._log(f"boot failed: {e}")
                return 1
            ram_fd, ept_fd, acc_fd = fds
            ram_map = mmap.mmap(ram_fd, pages * PAGE_SIZE, mmap.MAP_SHARED,
                                mmap.PROT_READ | mmap.PROT_WRITE)
            ept_map = mmap.mmap(ept_fd, pages, mmap.MAP_SHARED, mmap.PROT_READ)
            acc_map = mmap.mmap(acc_fd, pages, mmap.MAP_SHARED,
                                mmap.PROT_READ | mmap.PROT_WRITE)
            maps = [ram_map, ept_map, acc_map]
            for fd in fds:
                os.close(fd)
            run_dir = os.path.dirname(os.path.abspath(self.kernel_sock))
            swap = SwapDevice(os.path.join(run_dir, f"{self.vm}.guest-swap"),
                              int(self.cfg.get("guest_swap", 0)))
            own_swap = OwnedFile.of_fd(swap.path, swap.fd)
            self.mm = MemoryManager(
                np.frombuffer(ram_map, dtype=np.uint64),
                np.frombuffer(ept_map, dtype=np.uint8),
                np.frombuffer(acc_map, dtype=np.uint8),
                swap, ensure_present=self.ensure_present, oom_notify=self._oom_notify,
                kernel_image=self.cfg.get("kernel_image"), cost=self.cfg.get("_cost"),
                log=self._log)
            if swap.error is not None:
                self._log(f"guest swap disabled: {swap.error}")
            if self.cfg.get("disk"):
                try:
                    disk = DiskDevice(str(self.cfg["disk_path"]), int(self.cfg["disk"]))
                except DiskError as e:
                    self._log(f"boot failed: {e}")
                    return 1
                self.mm.attach_disk(disk)
            reader, writer = await asyncio.open_unix_connection(sock=sock, limit=1 << 20)
            self.machine = Channel(conn, reader, writer)
            self._make_tasks()
            self._log(f"booted: {pages} pages, kernel {self.mm.kernel_pages} pages "
                      f"(memmap {self.mm.kernel_memmap_pages}), {len(self.tasks)} tasks, "
                      f"guest swap {swap.nslots} slots, "
                      f"disk {self.mm.disk.nblocks if self.mm.disk else 0} blocks, "
                      f"watermarks min/low/high "
                      f"{self.mm.wmark_min}/{self.mm.wmark_low}/{self.mm.wmark_high}, "
                      f"workload seed {int(self.cfg.get('seed', 1))}")
            machine_task = asyncio.create_task(self._machine_reader())
            try:
                await self.mm.touch_kernel_memory()  # the host backs the kernel's own pages
            except PeerClosed:
                pass  # halted while booting: the wait below sees the reader finish
            stats_task = asyncio.create_task(self._stats_logger())
            sched = asyncio.create_task(self._scheduler())
            stop = asyncio.create_task(self.stopping.wait())
            done, _ = await asyncio.wait({sched, stop, machine_task},
                                         return_when=asyncio.FIRST_COMPLETED)
            for t in (sched, stop, machine_task, stats_task):
                t.cancel()
            for t in (sched, machine_task, stats_task):
                try:
                    await t
                except (asyncio.CancelledError, PeerClosed):
                    pass
            if sched in done and not sched.cancelled():
                exc = sched.exception()
                if exc is not None and not isinstance(exc, PeerClosed):
                    raise exc  # a bug: let it show (PeerClosed is the host going away)
            self._log(f"stopping: {self.halt_reason or 'done'}; "
                      f"corrupted reads {self.mm.stats.corrupted_reads}")
            return 0
        finally:
            server.close()
            own_sock.unlink()
            if self.machine is not None:
                await self.machine.close()
            if self.driver is not None:
                await self.driver.close()
            if self.mm is not None and self.mm.disk is not None:
                self.mm.disk.close()  # the file is the host's: it stays
            if swap is not None:
                swap.close(unlink=False)
                if own_swap is not None:
                    own_swap.unlink()
            self.mm = None
            for mp in maps:
                try:
                    mp.close()
                except BufferError:
                    pass  # numpy views still alive; the process is exiting anyway

    def _make_tasks(self) -> None:
        assert self.mm is not None
        seed = int(self.cfg.get("seed", 1))
        for i, spec in enumerate(self.cfg["_specs"]):
            mem = self.mm.add_task(i, spec.pages)
            self.tasks.append(Task(i, spec, Workload(spec, seed * 1000003 + i), mem,
                                   disk_base=self.cfg["_disk_bases"][i]))

    def _log(self, text: str) -> None:
        print(f"[{self.vm} kernel] {text}", file=sys.stderr, flush=True)

    # ------------------------------------------------------------------ machine channel

    async def _machine_reader(self) -> None:
        assert self.machine is not None
        ch = self.machine
        try:
            while True:
                msg = await ch.recv()
                if isinstance(msg, m.Shootdown):
                    if msg.pfns is not None and self.mm is not None:
                        self.mm.host_revoked(msg.pfn_array)
                    # Always a safe point here: see the module docstring.
                    await ch.send(m.ShootdownAck(id=msg.id))
                    self.shootdowns_acked += 1
                elif isinstance(msg, m.Resume):
                    if msg.evicted and self.mm is not None:
                        self.mm.note_host_evicted(msg.evicted, msg.evicted_ios or 1)
                    fut = self._resumes.pop(msg.id, None)
                    if fut is not None and not fut.done():
                        fut.set_result(msg.swapped_array)
                elif isinstance(msg, m.Halt):
                    self.halt_reason = f"halt ({msg.reason or 'no reason'})"
                    break
                elif isinstance(msg, (m.Bye, m.Error)):
                    self.halt_reason = f"hypervisor said {msg.TYPE}"
                    break
        except PeerClosed:
            self.halt_reason = "hypervisor vanished (EOF)"
        except ProtocolError as e:
            self.halt_reason = f"machine channel protocol error: {e}"
        finally:
            for fut in self._resumes.values():
                if not fut.done():
                    fut.set_exception(PeerClosed("machine channel closed"))
            self.stopping.set()

    async def ensure_present(self, gpfns: np.ndarray) -> np.ndarray | None:
        """EPT fault for every not-present page of ``gpfns``; returns when all resumed,
        with the pages the host read back from its swap (None when it did not say)."""
        assert self.machine is not None and self.mm is not None
        ch = self.machine
        ept = self.mm.ept
        g = np.unique(np.asarray(gpfns, np.int64))
        g = g[ept[g] == EPT_NOT_PRESENT]
        swapped: list[np.ndarray] = []
        told = g.size == 0  # nothing to fault: nothing read back, for sure
        while g.size:
            # A halt or a closed channel may arrive at any await: no exit can be taken any
            # more, and the task's access ends here (the kernel is stopping).
            if self.stopping.is_set() or ch.conn.state is not State.OPEN:
                raise PeerClosed(f"machine channel closed ({self.halt_reason or 'stopping'})")
            futs = []
            for i in range(0, g.size, EPT_BATCH):
                chunk = g[i:i + EPT_BATCH]
                mid = ch.conn.new_id()
                fut: asyncio.Future[np.ndarray | None] = \
                    asyncio.get_running_loop().create_future()
                self._resumes[mid] = fut
                try:
                    ch.send_nowait(m.EptFault(id=mid, pfns=pfns_to_wire(
                        chunk.astype(np.uint32))))
                except (ProtocolError, OSError, RuntimeError) as e:
                    self._resumes.pop(mid, None)
                    raise PeerClosed(f"machine channel closed: {e}") from None
                futs.append(fut)
            await ch.drain()
            for fut in futs:
                read = await fut
                if read is not None:
                    told = True
                    swapped.append(read.astype(np.int64))
            # a shootdown may have raced with the resume: fault again
            g = g[ept[g] == EPT_NOT_PRESENT]
        if not told:
            return None
        return np.concatenate(swapped) if swapped else np.empty(0, np.int64)

    # ------------------------------------------------------------------ scheduler

    async def _scheduler(self) -> None:
        assert self.mm is not None
        mm = self.mm
        t0 = time.monotonic()
        for t in self.tasks:
            t.last = t0
        while not self.stopping.is_set():
            ran = False
            now = time.monotonic()
            due = now + IDLE_MAX  # when the first task that could not run now can
            for t in self.tasks:
                if t.done:
                    continue
                if now < t.sleeping_until:
                    due = min(due, t.sleeping_until)
                    continue
                if t.started is None:
                    if now - t0 < t.spec.start:
                        due = min(due, t0 + t.spec.start)
                        continue
                    t.started = now
                    t.last = now
                tt = now - t.started
                if (t.spec.duration is not None and tt >= t.spec.duration) or t.wl.finished(tt):
                    mm.unmap_range(t.mem, 0, t.mem.npages)
                    t.done = True
                    t.ended = now
                    self._log(f"task {t.tid} finished after {tt:.1f}s ({t.ops} ops, modelled "
                              f"{t.mem.modelled_ns / 1e9:.3f}s)")
                    continue
                wp = t.wl.working_pages(tt)
                if wp < t.mapped_hi:
                    mm.unmap_range(t.mem, wp, t.mapped_hi)  # working set shrank: free it
                t.mapped_hi = wp
                if t.wl.sleeping(tt):
                    continue
                rate = t.wl.rate(tt)  # a phase may set its own
                if rate is not None:
                    t.tokens = min(QUANTUM, t.tokens + rate * (now - t.last))
                    t.last = now
                    n = int(t.tokens)
                    # batch a throttled task's accesses (>= RATE_BATCH s worth) instead of
                    # spinning the loop on tiny quanta
                    need = min(QUANTUM, max(1.0, rate * RATE_BATCH))
                    if n < need:
                        due = min(due, now + (need - t.tokens) / rate)  # rate > 0
                        continue
                else:
                    n = QUANTUM
                    t.last = now
                vpns, writes = t.wl.quantum(n, tt)
                if rate is not None:
                    t.tokens -= len(vpns)
                if len(vpns):
                    ran = True
                    await self._run_quantum(t, vpns, writes)
                    if self.stopping.is_set():
                        return
            background = await mm.kswapd()
            background += await mm.flush_dirty()  # the page cache's background writeback
            # Yield to the loop: serve shootdowns and the driver between quanta; with
            # nothing to do, sleep until the first task is due.
            if ran or background:
                await asyncio.sleep(0)
            else:
                await asyncio.sleep(min(IDLE_MAX, max(IDLE_TICK, due - time.monotonic())))

    async def _run_quantum(self, t: Task, vpns: np.ndarray, writes: np.ndarray) -> None:
        assert self.mm is not None
        if t.spec.workload == "fileio":  # file blocks, through the page cache
            res = await self.mm.run_file_quantum(t.mem, vpns + t.disk_base, writes)
        else:
            res = await self.mm.run_quantum(t.mem, vpns, writes)
        t.ops += res.ops
        t.stall_ns_ept += res.stall_ns_ept
        t.stall_ns_guest += res.stall_ns_guest
        if res.corrupted:
            self._log(f"task {t.tid}: {res.corrupted} CORRUPTED READS")
        if res.killed:
            t.sleeping_until = time.monotonic() + OOM_RESTART_DELAY
            if res.sigbus is not None:
                self._log(f"task {t.tid} killed by SIGBUS: {res.sigbus}; restarts in "
                          f"{OOM_RESTART_DELAY}s")
            else:
                t.oom_kills += 1
                self._log(f"task {t.tid} OOM-killed; restarts in {OOM_RESTART_DELAY}s")

    # ------------------------------------------------------------------ driver channel

    async def _serve_driver(self, reader: asyncio.StreamReader,
                            writer: asyncio.StreamWriter) -> None:
        ch = Channel(KernelServer(), reader, writer, frame_timeout=DRIVER_STALL_TIMEOUT)
        if self.driver is not None:
            # A restarting driver may reconnect before we noticed its old connection close.
            try:
                await asyncio.wait_for(self._driver_free.wait(), DRIVER_HANDOVER)
            except TimeoutError:
                pass
        if self.driver is not None or self.mm is None:
            # one driver at a time, and only once booted
            try:
                ch.send_nowait(m.Error(code=str(ErrorCode.BAD_STATE),
                                       message="a balloon driver is already connected"
                                       if self.mm else "the guest has not booted yet"))
                await ch.drain(timeout=DRIVER_STALL_TIMEOUT)
            except (TimeoutError, PeerClosed, ProtocolError):
                pass
            finally:
                await ch.close()
            return
        self.driver = ch
        self._driver_free.clear()
        try:
            while True:
                msg = await ch.recv()
                if isinstance(msg, m.BalloonAlloc) and self.mm is not None:
                    await self.mm.balloon_reclaim(msg.count)
                reply = self._driver_request(msg)
                if reply is not None:
                    await ch.send(reply, timeout=DRIVER_STALL_TIMEOUT)
                if isinstance(msg, (m.Bye, m.Error)):
                    break
        except (TimeoutError, PeerClosed, ProtocolError, ConnectionError) as e:
            if not isinstance(e, PeerClosed) or isinstance(e, PeerStalled):
                self._log(f"balloon driver disconnected: {type(e).__name__}: {e}")
        finally:
            if self.mm is not None:
                # reports still in flight die with the driver: pages go back unreported
                self.mm.report_abort()
            for fut in self._oom_acks.values():
                if not fut.done():
                    fut.set_result(False)
            if self.driver is ch:
                self.driver = None
                self._driver_free.set()
            await ch.close()

    def _driver_request(self, msg: m.Message) -> m.Message | None:
        mm = self.mm
        assert mm is not None

        def fail(code: str, text: str) -> m.Ack:
            return m.Ack(id=msg.id, ok=False, code=str(code), message=text)  # type: ignore

        if isinstance(msg, m.BalloonAlloc):
            if msg.count == 0 or msg.count > mm.npages:
                return fail(ErrorCode.BAD_FIELD, f"balloon_alloc.count: {msg.count} is not in "
                            f"1..{mm.npages} (guest RAM pages)")
            try:
                runs = mm.balloon_alloc(msg.count, msg.max_order)
            except OutOfPuff as e:
                return fail(ErrorCode.OUT_OF_PUFF, str(e))
            return m.Pages(id=msg.id, runs=runs_to_wire(runs))
        if isinstance(msg, m.BalloonFree):
            try:
                mm.balloon_free(msg.run_array)
            except RunError as e:
                return fail(e.code, f"balloon_free: {e.message}")
            return m.Ack(id=msg.id, ok=True)
        if isinstance(msg, m.BalloonList):
            return m.Pages(id=msg.id, runs=runs_to_wire(mm.balloon_list()))
        if isinstance(msg, m.Meminfo):
            return m.Stats(id=msg.id, stats={int(k): int(v) for k, v in self._stats().items()})
        if isinstance(msg, m.ReportIsolate):
            if msg.max_runs == 0 or msg.max_runs > MAX_BATCH_RUNS:
                return fail(ErrorCode.BAD_FIELD, f"report_isolate.max_runs: {msg.max_runs} is "
                            f"not in 1..{MAX_BATCH_RUNS}")
            runs = mm.report_isolate(msg.min_order, msg.max_runs)
            return m.Pages(id=msg.id, runs=runs_to_wire(runs))
        if isinstance(msg, m.ReportDone):
            try:
                mm.report_done(msg.run_array)
            except RunError as e:
                return fail(e.code, f"report_done: {e.message} (only isolated pages can be "
                            "reported)")
            return m.Ack(id=msg.id, ok=True)
        if isinstance(msg, m.Ack):
            fut = self._oom_acks.pop(msg.id, None)
            if fut is not None and not fut.done():
                fut.set_result(bool(msg.ok))
        return None

    async def _oom_notify(self, pages: int) -> bool:
        ch = self.driver
        if ch is None:
            return False
        mid = self._oom_ids
        self._oom_ids += 1
        fut: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._oom_acks[mid] = fut
        try:
            await ch.send(m.OomNotify(id=mid, pages=pages), timeout=DRIVER_STALL_TIMEOUT)
            return await asyncio.wait_for(fut, OOM_NOTIFY_TIMEOUT)
        except (TimeoutError, PeerClosed, ProtocolError):
            return False
        finally:
            self._oom_acks.pop(mid, None)

    # ------------------------------------------------------------------ stats

    def _stats(self) -> dict[int, int]:
        from protocol.features import MAX_TASK_STATS, TASK_STATS_BASE, TASK_STATS_STRIDE

        assert self.mm is not None
        running = sum(1 for t in self.tasks if t.started is not None and not t.done)
        st = self.mm.stats_map(tasks_running=running)
        now = time.monotonic()
        for t in self.tasks:  # wall-clock time each task has run, beside its modelled clock
            if t.started is not None and t.tid < MAX_TASK_STATS:
                end = t.ended if t.ended is not None else now
                st[TASK_STATS_BASE + TASK_STATS_STRIDE * t.tid + 2] = int((end - t.started) * 1e9)
        return st

    async def _stats_logger(self) -> None:
        interval = float(self.cfg.get("stats_interval", 1.0))
        last_ops = {t.tid: 0 for t in self.tasks}
        while True:
            await asyncio.sleep(interval)
            mm = self.mm
            if mm is None:
                return
            parts = []
            for t in self.tasks:
                rate = (t.ops - last_ops[t.tid]) / interval
                last_ops[t.tid] = t.ops
                mod = t.mem.modelled_ns / 1e9
                mrate = t.mem.accesses / mod if mod > 0 else 0.0
                parts.append(f"t{t.tid}:{rate / 1e6:.2f}Mops/s,ept={t.stall_ns_ept / 1e9:.2f}s,"
                             f"gf={t.stall_ns_guest / 1e9:.2f}s,modelled={mod:.3f}s"
                             f"@{mrate / 1e6:.2f}Mops/s")
            s = mm.stats
            self._log(f"free={mm.buddy.free_pages} anon={mm.anon_pages()} "
                      f"cache={mm.cache_count} dirty={mm.dirty_pages()} "
                      f"balloon={mm.balloon_pages} swap_out={s.swap_out // PAGE_SIZE} "
                      f"swap_in={s.swap_in // PAGE_SIZE} oom={s.oom_kills} "
                      f"corrupted={s.corrupted_reads} ept_waiting={len(self._resumes)} "
                      f"shootdowns={self.shootdowns_acked} " + " ".join(parts))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m guest.kernel", description=__doc__.split("\n")[0])
    ap.add_argument("--vm", required=True)
    ap.add_argument("--machine-sock", required=True)
    ap.add_argument("--kernel-sock", required=True)
    ap.add_argument("--config", required=True, help="JSON object (docs/internals.md)")
    args = ap.parse_args(argv)
    bind_to_host(f"guest.kernel[{args.vm}]")  # first: die with the hypervisor
    try:
        cfg = parse_config(args.config)
    except ConfigError as e:
        print(f"guest.kernel: {e}", file=sys.stderr)
        return 2
    kernel = GuestKernel(args.vm, args.machine_sock, args.kernel_sock, cfg)

    async def amain() -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, kernel.stopping.set)
        return await kernel.run()

    try:
        return asyncio.run(amain())
    except (ConnectionRefusedError, FileNotFoundError) as e:
        print(f"guest.kernel: cannot reach the hypervisor at {args.machine_sock}: {e}",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
