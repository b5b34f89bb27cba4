"""Every message that crosses a process boundary, as frozen keyword-only dataclasses.

Each class names its wire type in ``TYPE`` and declares each field once, as an annotation
carrying its wire kind: ``id: U64`` is a required uint64, ``code: Str | None = None`` an
optional string (absent on the wire when None). Cross-field rules are declared once too:
``_ONE_OF`` names fields of which exactly one must be present (the page batches' pfns or
runs), and the rest live in one method, ``_validate``.

Construction validates every field (so an invalid message can neither be built locally nor
decoded from a peer), ``to_wire()`` gives the msgpack map and ``from_wire()`` builds and
validates one from a decoded map. Unknown keys are ignored; missing or ill-typed fields
raise :class:`~protocol.errors.LocalProtocolError` with code ``bad_field``.

PFN sets stay in their wire form (``bytes``) inside messages so that a batch is never
copied or converted on the way through; ``pfn_array`` / ``run_array`` give zero-copy numpy
views (``<u4`` pfns, ``(k, 2)`` ``<u8`` runs of (first pfn, page count)).

Channel registries (``BALLOON_TO_DEVICE`` …) list which types each side may receive.

The codec (:mod:`protocol.codec`) reads each class's declarations once, when
:func:`message` creates it: ``SPEC`` (name, kind, required per field) drives the generic
validation, and the hot paths — ``msg.to_frame()``, byte for byte
``encode_frame(msg.to_wire())``, and ``decoder_for(registry)``, the same message or error
as ``decode_message(registry, decode_payload(body))`` — are installed on the class from
it.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar

import numpy as np

from . import codec

# Re-exported: callers use them as ``m.<name>``.
from .codec import U32_MAX as U32_MAX
from .codec import U64_MAX as U64_MAX
from .codec import Decoder as Decoder
from .codec import Kind as Kind
from .codec import Message as Message
from .codec import Registry as Registry
from .codec import decode_frame as decode_frame
from .codec import decode_message as decode_message
from .codec import decoder_for as decoder_for
from .codec import message as message
from .constants import MAX_ORDER as MAX_ORDER
from .errors import LocalProtocolError

# The wire kinds, as annotations: ``name: U64`` (required) or ``name: U64 | None = None``.
U64 = Annotated[int, Kind.U64]
U32 = Annotated[int, Kind.U32]
Str = Annotated[str, Kind.STR]
Bool = Annotated[bool, Kind.BOOL]
Pfns = Annotated[bytes, Kind.PFNS]
Runs = Annotated[bytes, Kind.RUNS]
StatsMap = Annotated[dict[int, int], Kind.STATS]
StrMap = Annotated[dict[str, Any], Kind.MAP]
AnyValue = Annotated[Any, Kind.ANY]


def _bad(msg_type: str, name: str, problem: str) -> LocalProtocolError:
    return codec.bad_field(msg_type, name, problem)


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


@message
class Ack(Message):
    """Reply to a request: ``ok``; when not ok, ``code`` and ``message`` say why."""

    TYPE: ClassVar[str] = "ack"
    id: U64
    ok: Bool
    code: Str | None = None
    message: Str | None = None

    def _validate(self) -> None:
        if not self.ok and self.code is None:
            raise _bad(self.TYPE, "code", "required when ok is false")


@message
class Error(Message):
    """Fatal protocol error (the sender closes), or a failed control call when ``id`` is set."""

    TYPE: ClassVar[str] = "error"
    code: Str
    message: Str
    id: U64 | None = None


@message
class Bye(Message):
    """Orderly goodbye before closing."""

    TYPE: ClassVar[str] = "bye"
    reason: Str | None = None


@message
class Stats(Message):
    """Stats map (tag → value): balloon channel driver → device, kernel channel reply."""

    TYPE: ClassVar[str] = "stats"
    id: U64
    stats: StatsMap


@message
class Pages(_PfnSetMixin, Message):
    """Kernel channel reply carrying a run-encoded page set."""

    TYPE: ClassVar[str] = "pages"
    id: U64
    runs: Runs


# --------------------------------------------------------------------------------------
# Balloon channel
# --------------------------------------------------------------------------------------


@message
class Hello(Message):
    TYPE: ClassVar[str] = "hello"
    version: U32
    features: U64
    page_size: U32
    vm: Str


@message
class Welcome(Message):
    TYPE: ClassVar[str] = "welcome"
    version: U32
    features: U64
    num_pages: U64
    actual: U64
    stats_interval_ms: U32
    poison_val: U32 | None = None
    #: Extension: pages of guest RAM (bounds for pfn validation on the driver side).
    guest_pages: U64 | None = None
    #: Extension: the pages the device holds as ballooned, as runs, so that a restarted
    #: driver can reconcile exactly (omitted when empty or too large for one frame).
    balloon_runs: Runs | None = None


@message
class Config(Message):
    """Device → driver: the balloon target in pages."""

    TYPE: ClassVar[str] = "config"
    num_pages: U64


@message
class StatsRequest(Message):
    TYPE: ClassVar[str] = "stats_request"


@message
class _PageBatch(_PfnSetMixin, Message):
    _ONE_OF: ClassVar[tuple[str, ...]] = ("pfns", "runs")
    id: U64
    pfns: Pfns | None = None
    runs: Runs | None = None


@message
class Inflate(_PageBatch):
    TYPE: ClassVar[str] = "inflate"


@message
class Deflate(_PageBatch):
    TYPE: ClassVar[str] = "deflate"


@message
class Report(_PfnSetMixin, Message):
    """Free page reporting: these free pages may be released; they stay usable."""

    TYPE: ClassVar[str] = "report"
    id: U64
    runs: Runs


@message
class Actual(Message):
    """Driver → device: pages now in the balloon. ``stall`` (extension): out of puff."""

    TYPE: ClassVar[str] = "actual"
    actual: U64
    stall: Bool | None = None


# --------------------------------------------------------------------------------------
# Machine channel (guest kernel ↔ hypervisor)
# --------------------------------------------------------------------------------------


@message
class Boot(Message):
    TYPE: ClassVar[str] = "boot"
    vm: Str
    version: U32


@message
class BootOk(Message):
    """Sent with the RAM, EPT and accessed-bit memfds attached (SCM_RIGHTS), in that order."""

    TYPE: ClassVar[str] = "boot_ok"
    pages: U64
    page_size: U32


@message
class EptFault(_PfnSetMixin, Message):
    TYPE: ClassVar[str] = "ept_fault"
    id: U64
    pfns: Pfns

    def _validate(self) -> None:
        if not self.pfns:
            raise _bad(self.TYPE, "pfns", "an EPT fault names at least one page")


@message
class Resume(Message):
    TYPE: ClassVar[str] = "resume"
    id: U64
    #: Extension: the pages of the fault the host read back from its swap (the rest it
    #: backed with zeros or found present); absent when the host does not say.
    swapped: Pfns | None = None
    #: Extension: pages the host wrote to its swap, in ``evicted_ios`` writes, to find
    #: frames for this fault while it waited (host direct reclaim); absent when none or
    #: when the host does not say.
    evicted: U64 | None = None
    evicted_ios: U64 | None = None

    @property
    def swapped_array(self) -> np.ndarray | None:
        """``swapped`` as little-endian uint32 pfns, or None when the host did not say."""
        return None if self.swapped is None else np.frombuffer(self.swapped, dtype="<u4")


@message
class Shootdown(_PfnSetMixin, Message):
    TYPE: ClassVar[str] = "shootdown"
    id: U64
    #: Extension: pages revoked (informational).
    count: U64 | None = None
    #: Extension: which pages are revoked (informational: the guest's page cache counts
    #: the clean ones the host is about to write to its swap).
    pfns: Pfns | None = None


@message
class ShootdownAck(Message):
    TYPE: ClassVar[str] = "shootdown_ack"
    id: U64


@message
class Halt(Message):
    TYPE: ClassVar[str] = "halt"
    reason: Str | None = None


# --------------------------------------------------------------------------------------
# Kernel channel (balloon driver ↔ guest kernel)
# --------------------------------------------------------------------------------------


@message
class BalloonAlloc(Message):
    TYPE: ClassVar[str] = "balloon_alloc"
    id: U64
    count: U64
    max_order: U32

    def _validate(self) -> None:
        if self.max_order > MAX_ORDER:
            raise _bad(self.TYPE, "max_order", f"{self.max_order} exceeds {MAX_ORDER}")


@message
class BalloonFree(_PfnSetMixin, Message):
    TYPE: ClassVar[str] = "balloon_free"
    id: U64
    runs: Runs


@message
class BalloonList(Message):
    TYPE: ClassVar[str] = "balloon_list"
    id: U64


@message
class Meminfo(Message):
    TYPE: ClassVar[str] = "meminfo"
    id: U64


@message
class OomNotify(Message):
    """Kernel → driver: deflate at least ``pages`` (deflate-on-OOM) and ack."""

    TYPE: ClassVar[str] = "oom_notify"
    id: U64
    pages: U64


@message
class ReportIsolate(Message):
    TYPE: ClassVar[str] = "report_isolate"
    id: U64
    min_order: U32
    max_runs: U32

    def _validate(self) -> None:
        if self.min_order > MAX_ORDER:
            raise _bad(self.TYPE, "min_order", f"{self.min_order} exceeds {MAX_ORDER}")


@message
class ReportDone(_PfnSetMixin, Message):
    TYPE: ClassVar[str] = "report_done"
    id: U64
    runs: Runs


# --------------------------------------------------------------------------------------
# Control channel
# --------------------------------------------------------------------------------------


@message
class Call(Message):
    TYPE: ClassVar[str] = "call"
    id: U64
    method: Str
    params: StrMap | None = None


@message
class Result(Message):
    TYPE: ClassVar[str] = "result"
    id: U64
    value: AnyValue | None = None


@message
class Event(Message):
    """One event of an ``events`` call with ``follow`` (extension: streamed, same id)."""

    TYPE: ClassVar[str] = "event"
    id: U64
    event: StrMap


# --------------------------------------------------------------------------------------
# Registries: which types each receiver accepts
# --------------------------------------------------------------------------------------


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
