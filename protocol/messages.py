"""Every message that crosses a process boundary, as frozen keyword-only dataclasses.

Each class names its wire type in ``TYPE`` and its fields in ``SPEC``; construction
validates every field (so an invalid message can neither be built locally nor decoded from
a peer), ``to_wire()`` gives the msgpack map and ``from_wire()`` builds and validates one
from a decoded map. Unknown keys are ignored; missing or ill-typed fields raise
:class:`~protocol.errors.LocalProtocolError` with code ``bad_field``.

PFN sets stay in their wire form (``bytes``) inside messages so that a batch is never
copied or converted on the way through; ``pfn_array`` / ``run_array`` give zero-copy numpy
views (``<u4`` pfns, ``(k, 2)`` ``<u8`` runs of (first pfn, page count)).

Channel registries (``BALLOON_TO_DEVICE`` …) list which types each side may receive.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from enum import Enum
from typing import Any, ClassVar, Mapping

import numpy as np

from .errors import ErrorCode, LocalProtocolError
from .features import MAX_STAT_VALUE
from .framing import MAX_STR

U64_MAX = (1 << 64) - 1
U32_MAX = (1 << 32) - 1


class Kind(Enum):
    U64 = "uint64"
    U32 = "uint32"
    STR = "string"
    BOOL = "bool"
    PFNS = "bin of little-endian uint32 pfns"
    RUNS = "bin of little-endian uint64 (first pfn, count) pairs"
    STATS = "map of integer tag to uint64"
    MAP = "map with string keys"
    ANY = "any msgpack value"


def _bad(msg_type: str, name: str, problem: str) -> LocalProtocolError:
    return LocalProtocolError(
        ErrorCode.BAD_FIELD, f"{msg_type}.{name}: {problem}", type=msg_type, field=name
    )


def _check(msg_type: str, name: str, kind: Kind, v: Any) -> None:
    # Ordered by frequency on hot paths.
    if kind is Kind.U64 or kind is Kind.U32:
        if type(v) is not int:
            raise _bad(msg_type, name, f"expected {kind.value}, got {type(v).__name__}")
        if v < 0 or v > (U64_MAX if kind is Kind.U64 else U32_MAX):
            raise _bad(msg_type, name, f"{v} is outside the {kind.value} range")
    elif kind is Kind.PFNS or kind is Kind.RUNS:
        if type(v) is not bytes:
            raise _bad(msg_type, name, f"expected {kind.value}, got {type(v).__name__}")
        width = 4 if kind is Kind.PFNS else 16
        if len(v) % width:
            raise _bad(msg_type, name, f"length {len(v)} is not a multiple of {width}")
    elif kind is Kind.STR:
        if type(v) is not str:
            raise _bad(msg_type, name, f"expected string, got {type(v).__name__}")
        if len(v) > MAX_STR:
            raise _bad(msg_type, name, f"string of {len(v)} characters is too long")
    elif kind is Kind.BOOL:
        if type(v) is not bool:
            raise _bad(msg_type, name, f"expected bool, got {type(v).__name__}")
    elif kind is Kind.STATS:
        if not isinstance(v, dict):
            raise _bad(msg_type, name, f"expected {kind.value}, got {type(v).__name__}")
        for tag, val in v.items():
            if type(tag) is not int or not 0 <= tag <= 0xFFFF:
                raise _bad(msg_type, name, f"stats tag {tag!r} is not an integer in 0..65535")
            if type(val) is not int or not 0 <= val <= MAX_STAT_VALUE:
                raise _bad(msg_type, name, f"stats value for tag {tag} is not a uint64")
    elif kind is Kind.MAP:
        if not isinstance(v, dict) or not all(type(k) is str for k in v):
            raise _bad(msg_type, name, f"expected {kind.value}")


@dataclass(frozen=True, kw_only=True, slots=True)
class Message:
    """Base of all messages. Subclasses set ``TYPE`` and ``SPEC``."""

    TYPE: ClassVar[str] = ""
    #: (field name, kind, required)
    SPEC: ClassVar[tuple[tuple[str, Kind, bool], ...]] = ()

    def __post_init__(self) -> None:
        t = self.TYPE
        for name, kind, required in self.SPEC:
            v = getattr(self, name)
            if v is None:
                if required:
                    raise _bad(t, name, "missing")
                continue
            _check(t, name, kind, v)
        self._validate()

    def _validate(self) -> None:
        """Cross-field rules; overridden where a message has them."""

    def to_wire(self) -> dict[str, Any]:
        d: dict[str, Any] = {"t": self.TYPE}
        for name, _kind, _req in self.SPEC:
            v = getattr(self, name)
            if v is not None:
                d[name] = v
        return d

    @classmethod
    def from_wire(cls, d: Mapping[str, Any]) -> "Message":
        kwargs = {}
        for name, _kind, required in cls.SPEC:
            if name in d:
                kwargs[name] = d[name]
            elif required:
                raise _bad(cls.TYPE, name, "missing")
        return cls(**kwargs)


def _spec(*items: tuple[str, Kind] | tuple[str, Kind, bool]) -> tuple[tuple[str, Kind, bool], ...]:
    return tuple((it[0], it[1], it[2] if len(it) > 2 else True) for it in items)  # type: ignore[misc]


class _PfnSetMixin:
    """Zero-copy numpy views of ``pfns`` / ``runs`` fields."""

    __slots__ = ()

    @property
    def pfn_array(self) -> np.ndarray:
        b = getattr(self, "pfns", None)
        if b is None:
            return np.empty(0, dtype="<u4")
        return np.frombuffer(b, dtype="<u4")

    @property
    def run_array(self) -> np.ndarray:
        b = getattr(self, "runs", None)
        if b is None:
            return np.empty((0, 2), dtype="<u8")
        return np.frombuffer(b, dtype="<u8").reshape(-1, 2)

    @property
    def page_count(self) -> int:
        """Pages named by the set (runs counted by their lengths)."""
        pfns = getattr(self, "pfns", None)
        if pfns is not None:
            return len(pfns) // 4
        return int(self.run_array[:, 1].sum()) if getattr(self, "runs", None) else 0


# --------------------------------------------------------------------------------------
# Shared by several channels
# --------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True, slots=True)
class Ack(Message):
    """Reply to a request: ``ok``; when not ok, ``code`` and ``message`` say why."""

    TYPE: ClassVar[str] = "ack"
    SPEC = _spec(("id", Kind.U64), ("ok", Kind.BOOL), ("code", Kind.STR, False),
                 ("message", Kind.STR, False))
    id: int
    ok: bool
    code: str | None = None
    message: str | None = None

    def _validate(self) -> None:
        if not self.ok and self.code is None:
            raise _bad(self.TYPE, "code", "required when ok is false")


@dataclass(frozen=True, kw_only=True, slots=True)
class Error(Message):
    """Fatal protocol error (the sender closes), or a failed control call when ``id`` is set."""

    TYPE: ClassVar[str] = "error"
    SPEC = _spec(("code", Kind.STR), ("message", Kind.STR), ("id", Kind.U64, False))
    code: str
    message: str
    id: int | None = None


@dataclass(frozen=True, kw_only=True, slots=True)
class Bye(Message):
    """Orderly goodbye before closing."""

    TYPE: ClassVar[str] = "bye"
    SPEC = _spec(("reason", Kind.STR, False))
    reason: str | None = None


@dataclass(frozen=True, kw_only=True, slots=True)
class Stats(Message):
    """Stats map (tag → value): balloon channel driver → device, kernel channel reply."""

    TYPE: ClassVar[str] = "stats"
    SPEC = _spec(("id", Kind.U64), ("stats", Kind.STATS))
    id: int
    stats: dict[int, int]


@dataclass(frozen=True, kw_only=True, slots=True)
class Pages(_PfnSetMixin, Message):
    """Kernel channel reply carrying a run-encoded page set."""

    TYPE: ClassVar[str] = "pages"
    SPEC = _spec(("id", Kind.U64), ("runs", Kind.RUNS))
    id: int
    runs: bytes


# --------------------------------------------------------------------------------------
# Balloon channel (DESIGN §5)
# --------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True, slots=True)
class Hello(Message):
    TYPE: ClassVar[str] = "hello"
    SPEC = _spec(("version", Kind.U32), ("features", Kind.U64), ("page_size", Kind.U32),
                 ("vm", Kind.STR))
    version: int
    features: int
    page_size: int
    vm: str


@dataclass(frozen=True, kw_only=True, slots=True)
class Welcome(Message):
    TYPE: ClassVar[str] = "welcome"
    SPEC = _spec(("version", Kind.U32), ("features", Kind.U64), ("num_pages", Kind.U64),
                 ("actual", Kind.U64), ("stats_interval_ms", Kind.U32),
                 ("poison_val", Kind.U32, False), ("guest_pages", Kind.U64, False),
                 ("balloon_runs", Kind.RUNS, False))
    version: int
    features: int
    num_pages: int
    actual: int
    stats_interval_ms: int
    poison_val: int | None = None
    #: Extension: pages of guest RAM (bounds for pfn validation on the driver side).
    guest_pages: int | None = None
    #: Extension: the pages the device holds as ballooned, as runs, so that a restarted
    #: driver can reconcile exactly (omitted when empty or too large for one frame).
    balloon_runs: bytes | None = None


@dataclass(frozen=True, kw_only=True, slots=True)
class Config(Message):
    """Device → driver: the balloon target in pages."""

    TYPE: ClassVar[str] = "config"
    SPEC = _spec(("num_pages", Kind.U64))
    num_pages: int


@dataclass(frozen=True, kw_only=True, slots=True)
class StatsRequest(Message):
    TYPE: ClassVar[str] = "stats_request"
    SPEC = _spec()


@dataclass(frozen=True, kw_only=True, slots=True)
class _PageBatch(_PfnSetMixin, Message):
    SPEC = _spec(("id", Kind.U64), ("pfns", Kind.PFNS, False), ("runs", Kind.RUNS, False))
    id: int
    pfns: bytes | None = None
    runs: bytes | None = None

    def _validate(self) -> None:
        if (self.pfns is None) == (self.runs is None):
            raise _bad(self.TYPE, "pfns", "exactly one of 'pfns' and 'runs' must be present")


@dataclass(frozen=True, kw_only=True, slots=True)
class Inflate(_PageBatch):
    TYPE: ClassVar[str] = "inflate"


@dataclass(frozen=True, kw_only=True, slots=True)
class Deflate(_PageBatch):
    TYPE: ClassVar[str] = "deflate"


@dataclass(frozen=True, kw_only=True, slots=True)
class Report(_PfnSetMixin, Message):
    """Free page reporting: these free pages may be released; they stay usable."""

    TYPE: ClassVar[str] = "report"
    SPEC = _spec(("id", Kind.U64), ("runs", Kind.RUNS))
    id: int
    runs: bytes


@dataclass(frozen=True, kw_only=True, slots=True)
class Actual(Message):
    """Driver → device: pages now in the balloon. ``stall`` (extension): out of puff."""

    TYPE: ClassVar[str] = "actual"
    SPEC = _spec(("actual", Kind.U64), ("stall", Kind.BOOL, False))
    actual: int
    stall: bool | None = None


# --------------------------------------------------------------------------------------
# Machine channel (guest kernel ↔ hypervisor, DESIGN §6)
# --------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True, slots=True)
class Boot(Message):
    TYPE: ClassVar[str] = "boot"
    SPEC = _spec(("vm", Kind.STR), ("version", Kind.U32))
    vm: str
    version: int


@dataclass(frozen=True, kw_only=True, slots=True)
class BootOk(Message):
    """Sent with the RAM, EPT and accessed-bit memfds attached (SCM_RIGHTS), in that order."""

    TYPE: ClassVar[str] = "boot_ok"
    SPEC = _spec(("pages", Kind.U64), ("page_size", Kind.U32))
    pages: int
    page_size: int


@dataclass(frozen=True, kw_only=True, slots=True)
class EptFault(_PfnSetMixin, Message):
    TYPE: ClassVar[str] = "ept_fault"
    SPEC = _spec(("id", Kind.U64), ("pfns", Kind.PFNS))
    id: int
    pfns: bytes

    def _validate(self) -> None:
        if not self.pfns:
            raise _bad(self.TYPE, "pfns", "an EPT fault names at least one page")


@dataclass(frozen=True, kw_only=True, slots=True)
class Resume(Message):
    TYPE: ClassVar[str] = "resume"
    SPEC = _spec(("id", Kind.U64))
    id: int


@dataclass(frozen=True, kw_only=True, slots=True)
class Shootdown(Message):
    TYPE: ClassVar[str] = "shootdown"
    SPEC = _spec(("id", Kind.U64), ("count", Kind.U64, False))
    id: int
    #: Extension: pages revoked (informational).
    count: int | None = None


@dataclass(frozen=True, kw_only=True, slots=True)
class ShootdownAck(Message):
    TYPE: ClassVar[str] = "shootdown_ack"
    SPEC = _spec(("id", Kind.U64))
    id: int


@dataclass(frozen=True, kw_only=True, slots=True)
class Halt(Message):
    TYPE: ClassVar[str] = "halt"
    SPEC = _spec(("reason", Kind.STR, False))
    reason: str | None = None


# --------------------------------------------------------------------------------------
# Kernel channel (balloon driver ↔ guest kernel, DESIGN §6)
# --------------------------------------------------------------------------------------

#: Buddy allocator orders are 0..MAX_ORDER (Linux's MAX_PAGE_ORDER = 10: 4 MiB blocks).
MAX_ORDER = 10


@dataclass(frozen=True, kw_only=True, slots=True)
class BalloonAlloc(Message):
    TYPE: ClassVar[str] = "balloon_alloc"
    SPEC = _spec(("id", Kind.U64), ("count", Kind.U64), ("max_order", Kind.U32))
    id: int
    count: int
    max_order: int

    def _validate(self) -> None:
        if self.max_order > MAX_ORDER:
            raise _bad(self.TYPE, "max_order", f"{self.max_order} exceeds {MAX_ORDER}")


@dataclass(frozen=True, kw_only=True, slots=True)
class BalloonFree(_PfnSetMixin, Message):
    TYPE: ClassVar[str] = "balloon_free"
    SPEC = _spec(("id", Kind.U64), ("runs", Kind.RUNS))
    id: int
    runs: bytes


@dataclass(frozen=True, kw_only=True, slots=True)
class BalloonList(Message):
    TYPE: ClassVar[str] = "balloon_list"
    SPEC = _spec(("id", Kind.U64))
    id: int


@dataclass(frozen=True, kw_only=True, slots=True)
class Meminfo(Message):
    TYPE: ClassVar[str] = "meminfo"
    SPEC = _spec(("id", Kind.U64))
    id: int


@dataclass(frozen=True, kw_only=True, slots=True)
class OomNotify(Message):
    """Kernel → driver: deflate at least ``pages`` (deflate-on-OOM) and ack."""

    TYPE: ClassVar[str] = "oom_notify"
    SPEC = _spec(("id", Kind.U64), ("pages", Kind.U64))
    id: int
    pages: int


@dataclass(frozen=True, kw_only=True, slots=True)
class ReportIsolate(Message):
    TYPE: ClassVar[str] = "report_isolate"
    SPEC = _spec(("id", Kind.U64), ("min_order", Kind.U32), ("max_runs", Kind.U32))
    id: int
    min_order: int
    max_runs: int

    def _validate(self) -> None:
        if self.min_order > MAX_ORDER:
            raise _bad(self.TYPE, "min_order", f"{self.min_order} exceeds {MAX_ORDER}")


@dataclass(frozen=True, kw_only=True, slots=True)
class ReportDone(_PfnSetMixin, Message):
    TYPE: ClassVar[str] = "report_done"
    SPEC = _spec(("id", Kind.U64), ("runs", Kind.RUNS))
    id: int
    runs: bytes


# --------------------------------------------------------------------------------------
# Control channel (DESIGN §7)
# --------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True, slots=True)
class Call(Message):
    TYPE: ClassVar[str] = "call"
    SPEC = _spec(("id", Kind.U64), ("method", Kind.STR), ("params", Kind.MAP, False))
    id: int
    method: str
    params: dict[str, Any] | None = None


@dataclass(frozen=True, kw_only=True, slots=True)
class Result(Message):
    TYPE: ClassVar[str] = "result"
    SPEC = _spec(("id", Kind.U64), ("value", Kind.ANY, False))
    id: int
    value: Any = None


@dataclass(frozen=True, kw_only=True, slots=True)
class Event(Message):
    """One event of an ``events`` call with ``follow`` (extension: streamed, same id)."""

    TYPE: ClassVar[str] = "event"
    SPEC = _spec(("id", Kind.U64), ("event", Kind.MAP))
    id: int
    event: dict[str, Any]


# --------------------------------------------------------------------------------------
# Registries: which types each receiver accepts
# --------------------------------------------------------------------------------------

Registry = Mapping[str, type[Message]]


def _reg(*classes: type[Message]) -> dict[str, type[Message]]:
    return {c.TYPE: c for c in classes}


BALLOON_TO_DEVICE: Registry = _reg(Hello, Inflate, Deflate, Report, Stats, Actual, Bye, Error)
BALLOON_TO_DRIVER: Registry = _reg(Welcome, Config, StatsRequest, Ack, Bye, Error)
MACHINE_TO_HOST: Registry = _reg(Boot, EptFault, ShootdownAck, Bye, Error)
MACHINE_TO_GUEST: Registry = _reg(BootOk, Resume, Shootdown, Halt, Bye, Error)
KERNEL_TO_KERNEL: Registry = _reg(
    BalloonAlloc, BalloonFree, BalloonList, Meminfo, ReportIsolate, ReportDone, Ack, Bye, Error
)
KERNEL_TO_DRIVER: Registry = _reg(Pages, Ack, Stats, OomNotify, Bye, Error)
CONTROL_TO_SERVER: Registry = _reg(Call, Bye)
CONTROL_TO_CLIENT: Registry = _reg(Result, Error, Event, Bye)

ALL_REGISTRIES: dict[str, Registry] = {
    "balloon→device": BALLOON_TO_DEVICE,
    "balloon→driver": BALLOON_TO_DRIVER,
    "machine→host": MACHINE_TO_HOST,
    "machine→guest": MACHINE_TO_GUEST,
    "kernel→kernel": KERNEL_TO_KERNEL,
    "kernel→driver": KERNEL_TO_DRIVER,
    "control→server": CONTROL_TO_SERVER,
    "control→client": CONTROL_TO_CLIENT,
}

ALL_MESSAGE_TYPES: dict[str, type[Message]] = {
    c.TYPE: c for reg in ALL_REGISTRIES.values() for c in reg.values()
}


def decode_message(registry: Registry, payload: Mapping[str, Any]) -> Message:
    """Build and validate the message a decoded map describes, for one receiver."""
    t = payload.get("t")
    if t is None:
        raise LocalProtocolError(ErrorCode.BAD_FIELD, "message has no 't' (type) key", field="t")
    if type(t) is not str:
        raise LocalProtocolError(ErrorCode.BAD_FIELD, f"message type must be a string, got {t!r}")
    cls = registry.get(t)
    if cls is None:
        raise LocalProtocolError(
            ErrorCode.UNKNOWN_TYPE,
            f"unknown or unexpected message type {t!r} on this channel",
            type=t,
        )
    return cls.from_wire(payload)


def message_fields(cls: type[Message]) -> list[str]:
    return [f.name for f in fields(cls)]
