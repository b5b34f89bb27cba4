"""QMP, the QEMU Machine Protocol, per VM: ``<vm>.qmp.sock`` in the run directory.

Tools written for QEMU (``qemu.qmp``, libvirt-style scripts, ``socat``) drive a balloonlab VM
as they drive a QEMU guest with ``-device virtio-balloon,id=balloon0``:

- on connect the server sends the greeting ``{"QMP": {"version": ..., "capabilities": []}}``;
- the client negotiates with ``qmp_capabilities``; any other command before that gets
  ``CommandNotFound`` ("Expecting capabilities negotiation ..."), as QEMU answers;
- requests are ``{"execute": NAME, "arguments": {...}, "id": ANY}``; answers are
  ``{"return": VALUE, "id": ...}`` or ``{"error": {"class": C, "desc": TEXT}, "id": ...}``
  (the ``id`` is echoed when the request had one);
- once negotiated, the client also receives asynchronous events
  ``{"event": NAME, "data": {...}, "timestamp": {"seconds": S, "microseconds": US}}``.

Requests are split from the byte stream as QEMU's JSON streamer does (:class:`JsonSplitter`:
a request ends where its brackets balance, so no newline is needed and one may span lines),
at most :data:`MAX_REQUEST` bytes each. The commands and their argument types are declared once, in
:data:`SCHEMA` (QEMU's qapi schema in miniature); the dispatcher checks every request
against it before a handler runs, with QEMU's error texts. Events are declared in
:data:`EVENTS`.

Input is hostile: a request over the limit, invalid JSON, a non-object, unknown members, wrong
argument types or a flood of requests get an error or a disconnect, never an exception in
the host; one client never affects the VM or other clients. A client that leaves
:data:`WRITE_TIMEOUT` seconds of answers unread, or falls :data:`EVENT_BACKLOG` events
behind, is disconnected.

Units: bytes for memory (QEMU's), seconds for the stats polling interval (QEMU's
``guest-stats-polling-interval``), UNIX time in timestamps.

Why one module of this size: QMP is one protocol with one command table (``SCHEMA``, QEMU's
qapi in miniature), and the table, its argument checks, the sans-IO session, the JSON
splitter and the per-VM server read as one unit; splitting them would scatter the table
from the handlers it declares.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import logging
import os
import signal
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from hypervisor.vm import VmState
from protocol.features import PAGE_SIZE, StatTag

if TYPE_CHECKING:
    from hypervisor.hostview import HostView as Host
    from hypervisor.vm import Vm

log = logging.getLogger(__name__)

#: Longest request, bytes: far above any real command, small enough that a client cannot make
#: the host buffer much (QEMU caps a token at 64 MiB; nothing here needs more than a few
#: hundred bytes).
MAX_REQUEST = 64 * 1024
#: Answers queued for one client before the reader stops reading its requests (backpressure).
ANSWER_BACKLOG = 256
#: Events queued for one client before it is disconnected (it stopped reading).
EVENT_BACKLOG = 1000
#: Seconds a client may leave our output unread before it is disconnected.
WRITE_TIMEOUT = 10.0
#: Seconds between looks at each VM's balloon size for BALLOON_CHANGE (QEMU rate-limits
#: the event to one a second; this is finer).
BALLOON_POLL = 0.1
#: The QOM path of the VM's balloon device (QEMU's ``-device virtio-balloon,id=balloon0``).
BALLOON_PATH = "/machine/peripheral/balloon0"
#: The QEMU release whose schema this server follows; ``package`` names the emulator.
QEMU_VERSION: dict[str, Any] = {"qemu": {"major": 8, "minor": 2, "micro": 0},
                                "package": "balloonlab"}
#: QEMU's value for a guest statistic the guest never reported (-1 as uint64).
STAT_UNSET = 2**64 - 1
#: QEMU's guest-stats names, by virtio stats tag (``stat-*`` of ``qom-get guest-stats``).
GUEST_STATS: tuple[tuple[str, StatTag], ...] = (
    ("stat-swap-in", StatTag.SWAP_IN),
    ("stat-swap-out", StatTag.SWAP_OUT),
    ("stat-major-faults", StatTag.MAJFLT),
    ("stat-minor-faults", StatTag.MINFLT),
    ("stat-free-memory", StatTag.MEMFREE),
    ("stat-total-memory", StatTag.MEMTOT),
    ("stat-available-memory", StatTag.AVAIL),
    ("stat-disk-caches", StatTag.CACHES),
    ("stat-htlb-pgalloc", StatTag.HTLB_PGALLOC),
    ("stat-htlb-pgfail", StatTag.HTLB_PGFAIL),
    ("stat-oom-kills", StatTag.OOM_KILL),
    ("stat-alloc-stalls", StatTag.ALLOC_STALL),
    ("stat-async-scans", StatTag.ASYNC_SCAN),
    ("stat-direct-scans", StatTag.DIRECT_SCAN),
    ("stat-async-reclaims", StatTag.ASYNC_RECLAIM),
    ("stat-direct-reclaims", StatTag.DIRECT_RECLAIM),
)
#: Seconds a guest kernel gets to halt after ``system_powerdown`` before it is killed.
POWERDOWN_GRACE = 3.0
#: Longest wait for a VM's processes to show as stopped after ``stop``'s SIGSTOP, seconds.
STOP_WAIT = 5.0

_INT64 = (-(2**63), 2**63 - 1)


# ============================================================================== the schema


@dataclass(frozen=True)
class Arg:
    """One argument: ``type`` is ``int``, ``str``, ``bool``, ``[str]`` or ``any``."""

    name: str
    type: str
    optional: bool = False


@dataclass(frozen=True)
class Command:
    """One command: its arguments and what it returns (documentation only)."""

    name: str
    args: tuple[Arg, ...] = ()
    returns: str = "{}"
    doc: str = ""


#: Every command, its arguments and its result, declared once (QEMU's qapi names and types).
SCHEMA: dict[str, Command] = {c.name: c for c in (
    Command("qmp_capabilities", (Arg("enable", "[str]", optional=True),),
            doc="leave capabilities negotiation (no capability is offered)"),
    Command("query-commands", returns="[{name}]", doc="the commands of this table"),
    Command("query-version", returns="{qemu: {major, minor, micro}, package}"),
    Command("query-name", returns="{name}", doc="the VM's name"),
    Command("query-status", returns="{running, singlestep, status}"),
    Command("query-balloon", returns="{actual}",
            doc="guest memory now: (memory - balloon pages) * 4096 bytes"),
    Command("query-memory-size-summary", returns="{base-memory, plugged-memory}"),
    Command("balloon", (Arg("value", "int"),),
            doc="logical size target in bytes: the balloon takes memory - value"),
    Command("qom-get", (Arg("path", "str"), Arg("property", "str")), returns="any",
            doc=f"{BALLOON_PATH}: guest-stats, guest-stats-polling-interval"),
    Command("qom-set", (Arg("path", "str"), Arg("property", "str"), Arg("value", "any")),
            doc=f"{BALLOON_PATH} guest-stats-polling-interval (seconds, 0 = off)"),
    Command("stop", doc="pause the VM's vCPUs (SIGSTOP of its guest processes); STOP"),
    Command("cont", doc="resume a paused VM; RESUME"),
    Command("system_powerdown", doc="halt the guest gracefully; POWERDOWN, then SHUTDOWN"),
)}

#: Every event and its data members.
EVENTS: dict[str, tuple[str, ...]] = {
    "BALLOON_CHANGE": ("actual",),  # guest memory in bytes, as query-balloon
    "STOP": (),
    "RESUME": (),
    "POWERDOWN": (),
    "SHUTDOWN": ("guest", "reason"),  # QEMU's ShutdownCause names
    "RESET": ("guest", "reason"),
}

_TYPE_NAMES = {"int": "integer", "str": "string", "bool": "boolean", "[str]": "array"}


class QmpError(Exception):
    """A failed command: ``cls`` is QEMU's error class, ``desc`` its human text."""

    def __init__(self, cls: str, desc: str) -> None:
        super().__init__(desc)
        self.cls = cls
        self.desc = desc


def generic(desc: str) -> QmpError:
    return QmpError("GenericError", desc)


def _type_ok(kind: str, v: Any) -> bool:
    if kind == "int":
        return type(v) is int and _INT64[0] <= v <= _INT64[1]
    if kind == "str":
        return type(v) is str
    if kind == "bool":
        return type(v) is bool
    if kind == "[str]":
        return type(v) is list and all(type(x) is str for x in v)
    return True


def check_arguments(cmd: Command, args: Mapping[str, Any]) -> dict[str, Any]:
    """The arguments of a request, checked against ``cmd``'s declaration (QEMU's texts)."""
    known = {a.name for a in cmd.args}
    for name in args:
        if name not in known:
            raise generic(f"Parameter '{name}' is unexpected")
    out: dict[str, Any] = {}
    for a in cmd.args:
        if a.name not in args:
            if not a.optional:
                raise generic(f"Parameter '{a.name}' is missing")
            continue
        v = args[a.name]
        if not _type_ok(a.type, v):
            raise generic(f"Invalid parameter type for '{a.name}', expected: "
                          f"{_TYPE_NAMES.get(a.type, a.type)}")
        out[a.name] = v
    return out


def _reject_constant(name: str) -> Any:
    raise ValueError(f"invalid literal {name}")


def parse_request(text: bytes) -> tuple[dict[str, Any], str, dict[str, Any]]:
    """``(request, command name, arguments)`` of one request text, or QmpError.

    The error carries the request (``err.request``) when the text was a JSON object, so
    the answer can echo its ``id``.
    """
    try:
        req = json.loads(text, parse_constant=_reject_constant)
    except RecursionError:
        raise generic("JSON parse error, nesting too deep") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise generic(f"JSON parse error, {e}") from None
    if not isinstance(req, dict):
        raise generic("QMP input must be a JSON object")
    try:
        name: str | None = None
        for key, v in req.items():
            if key == "execute":
                if type(v) is not str:
                    raise generic("QMP input member 'execute' must be a string")
                name = v
            elif key == "arguments":
                if not isinstance(v, dict):
                    raise generic("QMP input member 'arguments' must be an object")
            elif key != "id":
                raise generic(f"QMP input member '{key}' is unexpected")
        if name is None:
            raise generic("QMP input lacks member 'execute'")
    except QmpError as e:
        e.request = req  # type: ignore[attr-defined]
        raise
    return req, name, req.get("arguments") or {}


class RequestTooLong(Exception):
    """A request grew past :data:`MAX_REQUEST` bytes without ending."""


_WS = frozenset(b" \t\r\n")
_OPEN = frozenset(b"{[")
_CLOSE = frozenset(b"}]")
_QUOTE, _BACKSLASH = ord('"'), ord("\\")


class JsonSplitter:
    """Splits a byte stream into top-level JSON texts, as QEMU's JSON streamer does.

    An object or array ends when its brackets balance (brackets inside strings, and escaped
    quotes, do not count); a bare scalar or stray character ends at whitespace or at the
    next bracket or quote. Validation is :func:`parse_request`'s. Sans-IO: :meth:`feed` takes
    bytes and returns the texts completed by them.
    """

    def __init__(self, limit: int = MAX_REQUEST) -> None:
        self.limit = limit
        self._buf = bytearray()
        self._pos = 0  # next byte to scan
        self._start = -1  # start of the text being read, -1 between texts
        self._depth = 0
        self._in_str = False
        self._esc = False
        self._scalar = False

    def feed(self, data: bytes) -> list[bytes]:
        """The texts ``data`` completes; RequestTooLong when one passes the limit."""
        buf = self._buf
        buf += data
        out: list[bytes] = []
        i = self._pos
        n = len(buf)
        while i < n:
            c = buf[i]
            if self._start < 0:
                if c not in _WS:
                    self._start = i
                    if c in _OPEN:
                        self._depth = 1
                    elif c == _QUOTE:
                        self._in_str = True
                    else:
                        self._scalar = True
            elif self._in_str:
                if self._esc:
                    self._esc = False
                elif c == _BACKSLASH:
                    self._esc = True
                elif c == _QUOTE:
                    self._in_str = False
                    if self._depth == 0:
                        out.append(bytes(buf[self._start:i + 1]))
                        self._start = -1
            elif self._scalar:
                if c in _WS or c in _OPEN or c in _CLOSE or c == _QUOTE:
                    out.append(bytes(buf[self._start:i]))
                    self._start, self._scalar = -1, False
                    continue  # this byte starts (or is between) the next texts
            elif c == _QUOTE:
                self._in_str = True
            elif c in _OPEN:
                self._depth += 1
            elif c in _CLOSE:
                self._depth -= 1
                if self._depth == 0:
                    out.append(bytes(buf[self._start:i + 1]))
                    self._start = -1
            i += 1
        if any(len(t) > self.limit for t in out):
            raise RequestTooLong(f"request over {self.limit} bytes")
        # Keep only the unfinished text.
        keep = self._start if self._start >= 0 else n
        del buf[:keep]
        self._pos = n - keep
        if self._start >= 0:
            self._start = 0
            if len(buf) > self.limit:
                raise RequestTooLong(f"request over {self.limit} bytes")
        return out


def timestamp(t: float | None = None) -> dict[str, int]:
    """QMP's ``timestamp``: whole seconds and microseconds of UNIX time."""
    t = time.time() if t is None else t
    sec = int(t)
    return {"seconds": sec, "microseconds": int((t - sec) * 1_000_000)}


def event(name: str, data: dict[str, Any] | None = None, t: float | None = None
          ) -> dict[str, Any]:
    """An event message; ``name`` must be declared in :data:`EVENTS`."""
    assert name in EVENTS, name
    msg: dict[str, Any] = {"event": name, "timestamp": timestamp(t)}
    if data is not None:
        msg["data"] = data
    return msg


def greeting() -> dict[str, Any]:
    return {"QMP": {"version": QEMU_VERSION, "capabilities": []}}


# ============================================================================== one session


class QmpSession:
    """One client's QMP state: capabilities negotiation, then dispatch to a monitor.

    :meth:`handle` takes one request's text and returns the answer to send (awaiting only
    commands that wait for the guest, such as ``stop``).
    """

    def __init__(self, monitor: VmMonitor) -> None:
        self.monitor = monitor
        self.negotiated = False

    async def handle(self, text: bytes) -> dict[str, Any]:
        req: dict[str, Any] | None = None
        try:
            req, name, raw_args = parse_request(text)
            result = self._dispatch(name, raw_args)
            if inspect.isawaitable(result):
                result = await result
            answer = {"return": result}
        except QmpError as e:
            req = req if req is not None else getattr(e, "request", None)
            answer = {"error": {"class": e.cls, "desc": e.desc}}
        except Exception as e:  # a host bug is answered; it never ends the connection
            log.exception("QMP command failed")
            answer = {"error": {"class": "GenericError",
                                "desc": f"internal error: {type(e).__name__}: {e}"}}
        if isinstance(req, dict) and "id" in req:
            answer["id"] = req["id"]
        return answer

    def _dispatch(self, name: str, raw_args: dict[str, Any]) -> Any:
        cmd = SCHEMA.get(name)
        if not self.negotiated:
            if name != "qmp_capabilities":
                raise QmpError("CommandNotFound",
                               "Expecting capabilities negotiation with 'qmp_capabilities'")
        elif name == "qmp_capabilities":
            raise QmpError("CommandNotFound",
                           "Capabilities negotiation is already complete, command ignored")
        if cmd is None:
            raise QmpError("CommandNotFound", f"The command {name} has not been found")
        args = check_arguments(cmd, raw_args)
        if name == "qmp_capabilities":
            if args.get("enable"):  # no capability is offered
                raise generic(f"Capability '{args['enable'][0]}' not available")
            self.negotiated = True
            return {}
        handler: Callable[..., Any] = getattr(self.monitor, "cmd_" + name.replace("-", "_"))
        return handler(**{k.replace("-", "_"): v for k, v in args.items()})


# ============================================================================== one VM


class VmMonitor:
    """The commands of :data:`SCHEMA` for one VM of a host."""

    def __init__(self, server: QmpServer, vm: Vm) -> None:
        self.server = server
        self.host = server.host
        self.vm = vm
        #: pids stopped by ``stop`` (guest kernel and balloon driver), empty when running.
        self.paused_pids: tuple[int, ...] = ()
        self.paused = False
        self.powering_down = False
        #: Shootdown round trips in progress: a paused guest runs while there are any.
        self._woken = 0
        vm.machine.before_shootdown = self._wake_for_shootdown
        vm.machine.after_shootdown = self._end_of_shootdown

    # ---- state -----------------------------------------------------------------------

    def _pids(self) -> tuple[int, ...]:
        procs = (self.vm.kernel_proc, self.vm.driver_proc)
        return tuple(p.pid for p in procs if p is not None and p.returncode is None)

    def is_paused(self) -> bool:
        """Paused by ``stop`` and still the same guest (a restarted guest runs)."""
        if not self.paused:
            return False
        if self.vm.state is not VmState.RUNNING or (
                self.paused_pids and self.vm.kernel_proc is not None
                and self.vm.kernel_proc.pid not in self.paused_pids):
            self.paused, self.paused_pids = False, ()
            return False
        return True

    def status(self) -> str:
        """QEMU's RunState name for the VM's state."""
        st = self.vm.state
        if st is VmState.RUNNING:
            return "paused" if self.is_paused() else "running"
        return {VmState.CREATED: "prelaunch", VmState.CRASHED: "guest-panicked"}.get(
            st, "shutdown")

    def actual_bytes(self) -> int:
        """Guest memory now, QEMU's ``actual``: (memory - balloon pages) * 4096."""
        return (self.vm.pages - min(max(self.vm.balloon.actual, 0), self.vm.pages)) * PAGE_SIZE

    # ---- commands --------------------------------------------------------------------

    def cmd_query_commands(self) -> list[dict[str, str]]:
        return [{"name": n} for n in SCHEMA]

    def cmd_query_version(self) -> dict[str, Any]:
        return QEMU_VERSION

    def cmd_query_name(self) -> dict[str, str]:
        return {"name": self.vm.name}

    def cmd_query_status(self) -> dict[str, Any]:
        status = self.status()
        return {"running": status == "running", "singlestep": False, "status": status}

    def cmd_query_balloon(self) -> dict[str, int]:
        return {"actual": self.actual_bytes()}

    def cmd_query_memory_size_summary(self) -> dict[str, int]:
        return {"base-memory": self.vm.pages * PAGE_SIZE, "plugged-memory": 0}

    def cmd_balloon(self, value: int) -> dict[str, Any]:
        if value <= 0:
            raise generic("Parameter 'target' expects a size")
        memory = self.vm.pages * PAGE_SIZE
        # As QEMU's virtio_balloon_to_target: a target above RAM means an empty balloon;
        # the balloon holds the whole pages between the target and RAM.
        target = min(value, memory)
        self.host.set_balloon_target(self.vm, (memory - target) // PAGE_SIZE, reason="qmp")
        # As `balloonlab setmem`: a target set by hand holds against the policy.
        self.vm.manual_target = True
        return {}

    def _balloon_property(self, path: str, prop: str) -> None:
        if path != BALLOON_PATH:
            raise QmpError("DeviceNotFound", f"Device '{path}' not found")
        if prop not in ("guest-stats", "guest-stats-polling-interval"):
            raise generic(f"Property 'virtio-balloon-device.{prop}' not found")

    def cmd_qom_get(self, path: str, property: str) -> Any:
        self._balloon_property(path, property)
        b = self.vm.balloon
        if property == "guest-stats-polling-interval":
            # Whole seconds, as QEMU's property; a sub-second interval reads as 1 (0 is off).
            return max(1, round(b.stats_interval)) if b.stats_interval > 0 else 0
        if b.last_update is None:
            raise generic("guest hasn't updated any stats yet")
        st = b.stats
        return {"stats": {name: int(st.get(int(tag), STAT_UNSET)) for name, tag in GUEST_STATS},
                "last-update": int(b.last_update)}

    def cmd_qom_set(self, path: str, property: str, value: Any) -> dict[str, Any]:
        self._balloon_property(path, property)
        if property == "guest-stats":
            raise generic(f"Property 'virtio-balloon-device.{property}' is not writable")
        if type(value) is not int:
            raise generic("Invalid parameter type for 'value', expected: integer")
        if value < 0:
            raise generic("timer value must be greater than zero")
        if value > 2**32 - 1:
            raise generic("timer value is too big")
        self.vm.balloon.stats_interval = float(value)
        return {}

    async def cmd_stop(self) -> dict[str, Any]:
        if self.is_paused():
            return {}
        if self.vm.state is not VmState.RUNNING:
            raise generic(f"VM '{self.vm.name}' is not running (state {self.status()})")
        pids = self._pids()
        for pid in pids:
            _signal_group(pid, signal.SIGSTOP)
        self.paused, self.paused_pids = True, pids
        # As QEMU's stop, answer once the vCPUs are stopped (a signal is delivered a moment
        # after kill returns); the bound only keeps a vanished process from holding us.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(STOP_WAIT):
                while not all(_stopped(pid) for pid in pids):
                    await asyncio.sleep(0.005)
        self.server.broadcast(self.vm.name, event("STOP"))
        return {}

    def cmd_cont(self) -> dict[str, Any]:
        if not self.is_paused():
            return {}
        self.resume()
        self.server.broadcast(self.vm.name, event("RESUME"))
        return {}

    def resume(self) -> None:
        """SIGCONT whatever ``stop`` stopped (also at host shutdown)."""
        for pid in self.paused_pids:
            _signal_group(pid, signal.SIGCONT)
        self.paused, self.paused_pids = False, ()

    def _wake_for_shootdown(self) -> None:
        """A reclaim needs this guest's ack: a paused guest kernel runs until it is given
        (as on a real host, where a paused VM's memory can still be reclaimed)."""
        self._woken += 1
        if self._woken == 1 and self.is_paused():
            self._signal_kernel(signal.SIGCONT)

    def _end_of_shootdown(self) -> None:
        self._woken = max(0, self._woken - 1)
        if self._woken == 0 and self.is_paused():
            self._signal_kernel(signal.SIGSTOP)

    def _signal_kernel(self, sig: signal.Signals) -> None:
        kernel = self.vm.kernel_proc
        if kernel is not None and kernel.pid in self.paused_pids:
            _signal_group(kernel.pid, sig)

    def cmd_system_powerdown(self) -> dict[str, Any]:
        if self.vm.state is not VmState.RUNNING or self.powering_down:
            # QEMU sends the ACPI request whatever the guest does with it; a VM that is
            # not running has nothing to power down.
            return {}
        self.powering_down = True
        self.server.broadcast(self.vm.name, event("POWERDOWN"))
        self.host.spawn(self._powerdown(), f"{self.vm.name}-powerdown")
        return {}

    async def _powerdown(self) -> None:
        """The guest halts: no restart, its processes end, its memory goes back."""
        vm, host = self.vm, self.host
        try:
            if self.is_paused():
                self.resume()
            vm.state = VmState.HALTED  # its channels closing is expected from here on
            if vm.supervisor is not None:
                vm.supervisor.cancel()  # no restart; the driver is stopped on the way out
                await asyncio.gather(vm.supervisor, return_exceptions=True)
            await vm.machine.halt("system_powerdown")
            kernel = vm.kernel_proc
            with contextlib.suppress(asyncio.TimeoutError):
                if kernel is not None:
                    await asyncio.wait_for(kernel.wait(), POWERDOWN_GRACE)
                else:  # an in-test guest: it leaves the machine channel
                    async with asyncio.timeout(POWERDOWN_GRACE):
                        while vm.machine.connected:
                            await asyncio.sleep(0.01)
            async with host.mm_lock:
                frames, slots = host.memory.free_vm(vm, VmState.HALTED)
                vm.balloon.actual = 0  # a halted VM has no balloon (nor memory)
            host.emit("vm_halted", vm.name, reason="system_powerdown", frames=frames,
                      swap_slots=slots)
        finally:
            self.powering_down = False


def _stopped(pid: int) -> bool:
    """The process is stopped by a signal (state T), or gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[-1].split()[0] in (b"T", b"Z", b"X")
    except (OSError, IndexError):
        return True


def _signal_group(pid: int, sig: signal.Signals) -> None:
    """Signal a VM process's group (each is a session leader), or the process itself."""
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


# ============================================================================== the server


#: Host events that are QMP events too: kind -> (QMP event, data).
_HOST_EVENTS: dict[str, tuple[str, dict[str, Any]]] = {
    "vm_halted": ("SHUTDOWN", {"guest": True, "reason": "guest-shutdown"}),
    "vm_crashed": ("SHUTDOWN", {"guest": True, "reason": "guest-panic"}),
    "host_oom_kill": ("SHUTDOWN", {"guest": False, "reason": "host-error"}),
    "vm_restarted": ("RESET", {"guest": False, "reason": "host-error"}),
    "host_stopping": ("SHUTDOWN", {"guest": False, "reason": "host-signal"}),
}


class QmpServer:
    """Every VM's ``<vm>.qmp.sock`` of one host, and the events they send."""

    def __init__(self, host: Host) -> None:
        self.host = host
        self.monitors: dict[str, VmMonitor] = {}
        #: Negotiated clients per VM: their outgoing queues.
        self.clients: dict[str, set[asyncio.Queue[dict[str, Any] | None]]] = {}
        self._servers: list[asyncio.AbstractServer] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._conns: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        """Listen on ``<vm>.qmp.sock`` for every VM (mode 0600)."""
        from hypervisor import rundir

        for vm in self.host.vms.values():
            self.monitors[vm.name] = VmMonitor(self, vm)
            self.clients[vm.name] = set()
            path = rundir.qmp_sock(self.host.run_dir, vm.name)
            server = await asyncio.start_unix_server(self._handler(vm.name), path=str(path),
                                                     limit=MAX_REQUEST)
            rundir.secure_socket(path)
            self._servers.append(server)
        self._tasks.append(asyncio.create_task(self._host_events(), name="qmp-events"))
        self._tasks.append(asyncio.create_task(self._balloon_watch(), name="qmp-balloon"))

    async def close(self) -> None:
        for m in self.monitors.values():
            if m.paused:
                m.resume()
        for s in self._servers:
            s.close()
        for t in [*self._tasks, *self._conns]:
            t.cancel()
        await asyncio.gather(*self._tasks, *self._conns, return_exceptions=True)

    # ---- events ----------------------------------------------------------------------

    def broadcast(self, vm: str | None, msg: dict[str, Any]) -> None:
        """Queue ``msg`` for every negotiated client of ``vm`` (None: of every VM)."""
        for name in ([vm] if vm is not None else list(self.clients)):
            for q in list(self.clients.get(name, ())):
                if q.qsize() >= EVENT_BACKLOG:
                    self.clients[name].discard(q)
                    q.put_nowait(None)  # the writer closes this connection
                else:
                    q.put_nowait(msg)

    async def _host_events(self) -> None:
        q = self.host.subscribe()
        try:
            while True:
                ev = await q.get()
                kind = ev.get("kind")
                if kind == "host_stopping":
                    for m in self.monitors.values():  # a stopped guest could not halt
                        if m.paused:
                            m.resume()
                mapped = _HOST_EVENTS.get(str(kind))
                if mapped is not None:
                    self.broadcast(ev.get("vm"), event(mapped[0], dict(mapped[1]),
                                                       t=ev.get("time")))
        finally:
            self.host.unsubscribe(q)

    async def _balloon_watch(self) -> None:
        seen: dict[str, int] = {}
        while True:
            for name, mon in self.monitors.items():
                actual = mon.actual_bytes()
                if seen.get(name, actual) != actual and self.clients[name]:
                    self.broadcast(name, event("BALLOON_CHANGE", {"actual": actual}))
                seen[name] = actual
            await asyncio.sleep(BALLOON_POLL)

    # ---- connections -----------------------------------------------------------------

    def _handler(self, vm: str) -> Callable[[asyncio.StreamReader, asyncio.StreamWriter], Any]:
        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            task = asyncio.current_task()
            assert task is not None
            self._conns.add(task)
            try:
                await self._serve(vm, reader, writer)
            except asyncio.CancelledError:
                pass  # the host is closing: this connection task simply ends
            finally:
                self._conns.discard(task)
        return handler

    async def _serve(self, vm: str, reader: asyncio.StreamReader,
                     writer: asyncio.StreamWriter) -> None:
        session = QmpSession(self.monitors[vm])
        out: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
        writer_task = asyncio.create_task(self._write_loop(out, writer))
        try:
            out.put_nowait(greeting())
            splitter = JsonSplitter()
            while not writer_task.done():
                try:
                    data = await reader.read(65536)
                except ConnectionError:
                    break
                if not data:
                    break
                try:
                    texts = splitter.feed(data)
                except RequestTooLong as e:
                    # No resynchronising inside an endless request: answer and hang up.
                    out.put_nowait({"error": {"class": "GenericError",
                                              "desc": f"JSON parse error, {e}"}})
                    break
                for text in texts:
                    was = session.negotiated
                    answer = await session.handle(text)
                    if session.negotiated and not was:
                        self.clients[vm].add(out)
                    while out.qsize() >= ANSWER_BACKLOG and not writer_task.done():
                        await asyncio.sleep(0.01)  # the client reads slowly: so do we
                    out.put_nowait(answer)
        finally:
            self.clients[vm].discard(out)
            out.put_nowait(None)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.shield(writer_task), WRITE_TIMEOUT)
            writer_task.cancel()
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _write_loop(self, out: asyncio.Queue[dict[str, Any] | None],
                          writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                msg = await out.get()
                if msg is None:
                    return
                writer.write(json.dumps(msg).encode() + b"\r\n")
                await asyncio.wait_for(writer.drain(), WRITE_TIMEOUT)
        except (TimeoutError, ConnectionError):
            writer.transport.abort()
