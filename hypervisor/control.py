"""Control server (``control.sock``): the operator's and the CLI's view of the host.

Request ``call {id, method, params}`` → ``result {id, value}`` or ``error {id, code,
message}``; a failed call never closes the connection and changes nothing. ``events`` with
``follow: true`` streams ``event {id, event}`` frames (``id`` is the call's) until the client
disconnects; other calls keep working on the same connection meanwhile.

Stalled clients are cut off, so they cannot pin the host's descriptors: a connection that
sends nothing for :data:`IDLE_TIMEOUT` while it follows no events, leaves half a frame
unfinished for :data:`FRAME_TIMEOUT`, or leaves :data:`WRITE_TIMEOUT` seconds of answers or
events unread gets an ``error`` frame (``unavailable``, when it can still take one) and is
closed. At most :data:`MAX_CLIENTS` connections are served at once; one more is refused with
an ``error`` frame at once (see :class:`protocol.aio.Listener`).

The server sees the host through :class:`ControlledHost`, the few attributes and methods it
reads and calls, and nothing else.

Units: pages of 4096 bytes, bytes where the name says so (virsh's ``dommemstat`` fields are
KiB in virsh; here, as the rest of the project, memory amounts are **bytes**), times in UNIX
seconds.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from hypervisor.pathologies import GUEST_COUNTERS, noncontig_ratio
from hypervisor.vm import Vm
from protocol import messages as m
from protocol.aio import Channel, PeerClosed, PeerStalled
from protocol.connection import ControlServer as ControlConnection
from protocol.errors import ErrorCode, ProtocolError, RemoteProtocolError
from protocol.features import (
    MAX_TASK_STATS,
    PAGE_SIZE,
    TASK_STATS_BASE,
    TASK_STATS_STRIDE,
    StatTag,
)

log = logging.getLogger(__name__)

#: Events a following client may fall behind by before it is disconnected.
FOLLOW_BACKLOG = 10_000
#: Connections served at once. The CLI opens one per command and the dashboard two, so this
#: leaves room for many operators while bounding the descriptors clients can hold.
MAX_CLIENTS = 32
#: Seconds a connection may stay silent while it follows no events (the dashboard polls
#: every second; a one-shot CLI command is done in well under one).
IDLE_TIMEOUT = 120.0
#: Seconds a client may leave a started frame unfinished.
FRAME_TIMEOUT = 10.0
#: Seconds of answers or events a client may leave unread before it is disconnected.
WRITE_TIMEOUT = 10.0


class LedgerView(Protocol):
    """What the control server reads of the frame ledger."""

    frames_total: int
    swap_slots_total: int

    @property
    def frames_free(self) -> int: ...

    @property
    def slots_free(self) -> int: ...

    @property
    def vms(self) -> Mapping[int, Any]: ...


class ControlledHost(Protocol):
    """The host as the control server sees it (:class:`hypervisor.host.Host` is one)."""

    @property
    def name(self) -> str: ...

    @property
    def policy_name(self) -> str: ...

    @property
    def started_at(self) -> float: ...

    @property
    def oom_kills(self) -> int: ...

    @property
    def policy_rounds(self) -> int: ...

    @property
    def swap_reads(self) -> tuple[int, int]: ...

    @property
    def releases(self) -> tuple[int, int]: ...

    @property
    def policy_cpu_seconds(self) -> float: ...

    @property
    def run_dir(self) -> Path: ...

    @property
    def forkserver_pid(self) -> int | None: ...

    @property
    def vms(self) -> Mapping[str, Vm]: ...

    @property
    def events(self) -> Sequence[dict[str, Any]]: ...

    @property
    def ledger(self) -> LedgerView: ...

    def subscribe(self) -> asyncio.Queue[dict[str, Any]]: ...

    def unsubscribe(self, q: asyncio.Queue[dict[str, Any]]) -> None: ...

    def emit(self, kind: str, vm: str | None, **fields: Any) -> Any: ...

    def set_balloon_target(self, vm: Vm, pages: int, reason: str = ...) -> None: ...

    def set_policy(self, name: str, params: dict[str, Any] | None = None) -> None: ...

    def request_shutdown(self, reason: str = ...) -> None: ...


def _say_unavailable(ch: Channel, text: str) -> None:
    """Best effort: tell a client why it is being disconnected."""
    try:
        ch.send_nowait(m.Error(code=str(ErrorCode.UNAVAILABLE), message=text))
    except (ProtocolError, OSError, RuntimeError):
        pass


class CallError(Exception):
    """A call failed: ``code`` goes on the wire with the message."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _modelled(st: Mapping[int, int]) -> dict[str, Any]:
    """``dommemstat``'s modelled-time fields from the guest's stats: the VM's modelled seconds
    (its tasks' clocks added: they share one vCPU) and accesses per modelled second, then the
    same per task, with its wall-clock running time and throughput beside.  None until the
    guest reports them."""
    ns = st.get(int(StatTag.MODELLED_NS))
    ops = st.get(int(StatTag.OPS))
    tasks = []
    for tid in range(MAX_TASK_STATS):
        base = TASK_STATS_BASE + TASK_STATS_STRIDE * tid
        acc = st.get(base)
        if acc is None:
            break
        tns, wns = st.get(base + 1, 0), st.get(base + 2)
        tasks.append({"task": tid, "accesses": acc, "modelled_seconds": tns / 1e9,
                      "modelled_throughput": acc * 1e9 / tns if tns else None,
                      "wall_seconds": None if wns is None else wns / 1e9,
                      "wall_throughput": acc * 1e9 / wns if wns else None})
    return {
        "modelled_seconds": ns / 1e9 if ns is not None else None,
        "modelled_throughput": ops * 1e9 / ns if ns and ops is not None else None,
        "tasks": tasks or None,
    }


def _int_param(params: dict[str, Any], name: str, *, lo: int = 0, hi: int | None = None) -> int:
    if name not in params:
        raise CallError(ErrorCode.BAD_PARAMS, f"missing parameter {name!r}")
    v = params[name]
    if type(v) is not int:
        raise CallError(ErrorCode.BAD_PARAMS, f"{name} must be an integer, got {v!r}")
    if v < lo or (hi is not None and v > hi):
        raise CallError(ErrorCode.BAD_PARAMS,
                        f"{name}={v} is outside {lo}..{hi if hi is not None else '∞'}")
    return v


class ControlServer:
    """Serves control connections for one host.

    ``idle_timeout``, ``frame_timeout``, ``write_timeout`` (seconds) and ``max_clients``
    default to the module's constants; tests shorten them.
    """

    def __init__(self, host: ControlledHost, *, idle_timeout: float = IDLE_TIMEOUT,
                 frame_timeout: float = FRAME_TIMEOUT,
                 write_timeout: float = WRITE_TIMEOUT, max_clients: int = MAX_CLIENTS) -> None:
        self.host = host
        self.max_clients = max_clients
        self.idle_timeout = idle_timeout
        self.frame_timeout = frame_timeout
        self.write_timeout = write_timeout
        self.methods: dict[str, Callable[[dict[str, Any]], Any]] = {
            "host_info": self.host_info,
            "list_vms": self.list_vms,
            "dommemstat": self.dommemstat,
            "setmem": self.setmem,
            "set_balloon": self.set_balloon,
            "set_policy": self.set_policy,
            "shutdown": self.shutdown,
            "counters": self.counters,
        }

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        ch = Channel(ControlConnection(), reader, writer, frame_timeout=self.frame_timeout)
        followers: list[asyncio.Task[None]] = []
        try:
            while True:
                # A following client is waiting for events, not idle.
                following = any(not t.done() for t in followers)
                ch.idle_timeout = None if following else self.idle_timeout
                msg = await ch.recv()
                if isinstance(msg, m.Bye):
                    break
                if not isinstance(msg, m.Call):
                    continue
                params = msg.params or {}
                if msg.method == "events":
                    follow = params.get("follow", False)
                    if type(follow) is not bool:
                        ch.send_nowait(m.Error(id=msg.id, code=str(ErrorCode.BAD_PARAMS),
                                               message="follow must be true or false"))
                    elif follow:
                        followers.append(asyncio.create_task(self._follow(ch, msg.id)))
                        continue
                    else:
                        ch.send_nowait(m.Result(id=msg.id, value=list(self.host.events)))
                else:
                    ch.send_nowait(self._call(msg.id, msg.method, params))
                await ch.drain(timeout=self.write_timeout)
        except PeerStalled as e:
            log.info("control client disconnected: %s", e)
            why = str(e).removeprefix("peer ")
            _say_unavailable(ch, f"closing the connection: the client {why}")
        except (TimeoutError, RemoteProtocolError, PeerClosed):
            pass
        finally:
            for t in followers:
                t.cancel()
            await ch.close()

    def _call(self, cid: int, method: str, params: dict[str, Any]) -> m.Message:
        fn = self.methods.get(method)
        if fn is None:
            known = ", ".join(sorted([*self.methods, "events"]))
            return m.Error(id=cid, code=str(ErrorCode.UNKNOWN_METHOD),
                           message=f"unknown method {method!r}; known: {known}")
        try:
            return m.Result(id=cid, value=fn(params))
        except CallError as e:
            return m.Error(id=cid, code=str(e.code), message=e.message)
        except (ValueError, ProtocolError) as e:
            return m.Error(id=cid, code=str(ErrorCode.BAD_PARAMS), message=str(e))
        except Exception as e:
            log.exception("control method %s failed", method)
            return m.Error(id=cid, code=str(ErrorCode.INTERNAL), message=f"{type(e).__name__}: {e}")

    async def _follow(self, ch: Channel, cid: int) -> None:
        q = self.host.subscribe()
        try:
            for ev in list(self.host.events):
                ch.send_nowait(m.Event(id=cid, event=ev))
            await ch.drain(timeout=self.write_timeout)
            while True:
                ev = await q.get()
                ch.send_nowait(m.Event(id=cid, event=ev))
                await ch.drain(timeout=self.write_timeout)
        except (TimeoutError, PeerClosed, ProtocolError, ConnectionError):
            await ch.close()
        finally:
            self.host.unsubscribe(q)

    # ---------------------------------------------------------------- methods

    def _vm(self, params: dict[str, Any]) -> Vm:
        name = params.get("vm")
        if type(name) is not str:
            raise CallError(ErrorCode.BAD_PARAMS, "parameter 'vm' (a VM name) is required")
        vm = self.host.vms.get(name)
        if vm is None:
            known = ", ".join(self.host.vms) or "none"
            raise CallError(ErrorCode.UNKNOWN_VM, f"no VM named {name!r} (VMs: {known})")
        return vm

    def host_info(self, params: dict[str, Any]) -> dict[str, Any]:
        h, led = self.host, self.host.ledger
        return {"name": h.name, "pid": os.getpid(), "page_size": PAGE_SIZE,
                "frames_total": led.frames_total, "frames_free": led.frames_free,
                "swap_slots_total": led.swap_slots_total, "swap_slots_free": led.slots_free,
                "policy": h.policy_name, "run_dir": str(h.run_dir),
                "started": h.started_at, "oom_kills": h.oom_kills,
                "policy_rounds": h.policy_rounds, "policy_cpu_seconds": h.policy_cpu_seconds,
                "forkserver_pid": h.forkserver_pid, "release_rounds": h.releases[0],
                "release_batches": h.releases[1], **self.pathologies()}

    def pathologies(self) -> dict[str, Any]:
        """The host's pathology totals: its swap reads (all VMs, since it started) and the
        guests' counters added over the VMs running now (pages)."""
        reads, jumps = self.host.swap_reads
        out: dict[str, Any] = {
            "host_swap_reads": reads, "host_swap_reads_noncontig": jumps,
            "host_swap_noncontig_ratio": noncontig_ratio(reads, jumps)}
        for name, t in GUEST_COUNTERS.items():
            out[name] = sum(vm.balloon.stats.get(int(t), 0) for vm in self.host.vms.values())
        return out

    def list_vms(self, params: dict[str, Any]) -> list[dict[str, Any]]:
        out = []
        for vm in self.host.vms.values():
            pid = vm.kernel_proc.pid if vm.kernel_proc is not None else None
            dpid = vm.driver_proc.pid if vm.driver_proc is not None else None
            out.append({"name": vm.name, "state": vm.state, "memory_pages": vm.pages,
                        "driver": "connected" if vm.balloon.connected else "disconnected",
                        "pid": pid, "driver_pid": dpid, "target_pages": vm.balloon.target,
                        "balloon_pages": vm.balloon.actual})
        return out

    def dommemstat(self, params: dict[str, Any]) -> dict[str, Any]:
        vm = self._vm(params)
        st = vm.balloon.stats
        live = vm.led.index in self.host.ledger.vms

        def tag(t: StatTag) -> int | None:
            return st.get(int(t))

        return {
            # virsh's and QMP's `actual`: the guest's current memory (its size minus what the
            # driver reports in the balloon), in bytes like every memory amount here.
            "actual": max(0, vm.pages - vm.balloon.actual) * PAGE_SIZE,
            "swap_in": tag(StatTag.SWAP_IN), "swap_out": tag(StatTag.SWAP_OUT),
            "major_fault": tag(StatTag.MAJFLT), "minor_fault": tag(StatTag.MINFLT),
            "unused": tag(StatTag.MEMFREE), "available": tag(StatTag.MEMTOT),
            "usable": tag(StatTag.AVAIL), "disk_caches": tag(StatTag.CACHES),
            "last_update": vm.balloon.last_update,
            "rss": vm.mem.resident_pages() * PAGE_SIZE,
            "target_pages": vm.balloon.target, "balloon_pages": vm.balloon.balloon_pages,
            "backed_pages": vm.led.backed if live else 0,
            "host_swapped_pages": vm.led.swapped if live else 0,
            "corrupted_reads": tag(StatTag.CORRUPTED_READS),
            "ops": tag(StatTag.OPS),
            "oom_kills": tag(StatTag.OOM_KILLS_TOTAL) or tag(StatTag.OOM_KILL),
            "state": vm.state,
            # Guest-side views (project extension tags), for dashboards and checks that
            # the guest kernel, the driver and the host agree.
            "guest_balloon_pages": tag(StatTag.BALLOON_PAGES),
            "reported_pages": tag(StatTag.REPORTED_PAGES),
            "guest_swap_total": tag(StatTag.GUEST_SWAP_TOTAL),
            "guest_swap_free": tag(StatTag.GUEST_SWAP_FREE),
            "alloc_stalls": tag(StatTag.ALLOC_STALL),
            "ept_exits": tag(StatTag.EPT_EXITS),
            "guest_faults": tag(StatTag.GUEST_FAULTS),
            "out_of_puff": vm.balloon.metrics.out_of_puff,
            # Guest swap I/O errors: writes that failed (the page stayed resident) and reads
            # that failed (the task that needed the page was killed, as by SIGBUS).
            "guest_swap_write_errors": tag(StatTag.GUEST_SWAP_WRITE_ERRORS),
            "guest_swap_read_errors": tag(StatTag.GUEST_SWAP_READ_ERRORS),
            # What the guest's tasks and kernel hold resident (pages), and whether a manual
            # target keeps the policy away from this VM.
            "guest_anon_pages": tag(StatTag.ANON_PAGES),
            "guest_kernel_pages": tag(StatTag.KERNEL_PAGES),
            "guest_kernel_memmap_pages": tag(StatTag.KERNEL_MEMMAP_PAGES),
            # The page cache over the VM's disk (absent: no disk): pages cached and dirty,
            # disk traffic in pages and system calls, and disk I/O errors.
            "guest_cache_pages": tag(StatTag.CACHE_PAGES),
            "guest_dirty_pages": tag(StatTag.DIRTY_PAGES),
            "disk_read_pages": tag(StatTag.DISK_READ_PAGES),
            "disk_read_ios": tag(StatTag.DISK_READ_IOS),
            "disk_write_pages": tag(StatTag.DISK_WRITE_PAGES),
            "disk_write_ios": tag(StatTag.DISK_WRITE_IOS),
            "disk_read_errors": tag(StatTag.DISK_READ_ERRORS),
            "disk_write_errors": tag(StatTag.DISK_WRITE_ERRORS),
            "manual_target": vm.manual_target,
            # Pathologies of host swapping (pages, cumulative; docs/architecture.md): the
            # guest's four (None until it reports them) and the host's swap reads.
            **{name: tag(t) for name, t in GUEST_COUNTERS.items()},
            "host_swap_reads": vm.host_swap_in,
            "host_swap_reads_noncontig": vm.host_swap_reads_noncontig,
            "host_swap_noncontig_ratio": noncontig_ratio(vm.host_swap_in,
                                                         vm.host_swap_reads_noncontig),
            **_modelled(st),
        }

    def counters(self, params: dict[str, Any]) -> dict[str, Any]:
        vm = self._vm(params)
        st = vm.balloon.stats
        driver_s = {name: st.get(int(tag), 0) / 1e9 for name, tag in (
            ("driver_alloc_seconds", StatTag.DRIVER_ALLOC_NS),
            ("driver_inflate_seconds", StatTag.DRIVER_INFLATE_NS),
            ("driver_deflate_seconds", StatTag.DRIVER_DEFLATE_NS),
            ("driver_free_seconds", StatTag.DRIVER_FREE_NS))}
        return {**vm.balloon.metrics.as_dict(), **driver_s,
                "release_seconds": vm.balloon.release_seconds,
                "balloon_violations": vm.balloon_violations,
                "host_swap_out": vm.host_swap_out, "host_swap_in": vm.host_swap_in,
                "faults": vm.faults, "fault_pages": vm.fault_pages,
                "shootdowns": vm.machine.shootdowns, "restarts": vm.restarts,
                "driver_restarts": vm.driver_restarts}

    def setmem(self, params: dict[str, Any]) -> dict[str, Any]:
        vm = self._vm(params)
        nbytes = _int_param(params, "bytes", lo=0, hi=vm.pages * PAGE_SIZE)
        # QEMU's `balloon N`: the guest should end up with N bytes, so the balloon holds
        # the rest (rounded up to whole pages).
        pages = vm.pages - nbytes // PAGE_SIZE
        self.host.set_balloon_target(vm, pages, reason="setmem")
        vm.manual_target = True
        return {"target_pages": pages, "manual_target": True}

    def set_balloon(self, params: dict[str, Any]) -> dict[str, Any]:
        vm = self._vm(params)
        release = params.get("release", False)
        if type(release) is not bool:
            raise CallError(ErrorCode.BAD_PARAMS, f"release must be true or false, got {release!r}")
        if release:
            # Hand the VM back to the policy; its target stays until the policy moves it.
            vm.manual_target = False
            return {"target_pages": vm.balloon.target, "manual_target": False}
        pages = _int_param(params, "pages", lo=0, hi=vm.pages)
        self.host.set_balloon_target(vm, pages, reason="set_balloon")
        vm.manual_target = True
        return {"target_pages": pages, "manual_target": True}

    def set_policy(self, params: dict[str, Any]) -> dict[str, Any]:
        name = params.get("name")
        if type(name) is not str or not name:
            raise CallError(ErrorCode.BAD_PARAMS, "parameter 'name' (a policy) is required")
        pp = params.get("params") or {}
        if not isinstance(pp, dict):
            raise CallError(ErrorCode.BAD_PARAMS, "params must be a map")
        try:
            self.host.set_policy(name, pp)
        except (ValueError, ImportError, TypeError) as e:
            # The loader's messages mostly name the policy already: do not say it twice.
            msg = str(e) if repr(name) in str(e) else f"cannot load policy {name!r}: {e}"
            raise CallError(ErrorCode.BAD_PARAMS, msg) from e
        released = sorted(v.name for v in self.host.vms.values() if v.manual_target)
        for v in self.host.vms.values():
            v.manual_target = False  # a policy set again takes every VM back
        self.host.emit("policy", None, policy=name, reason="set_policy", released=released)
        return {"policy": name, "released": released}

    def shutdown(self, params: dict[str, Any]) -> None:
        self.host.request_shutdown("control shutdown")
        return None
