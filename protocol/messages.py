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

Hot path (issue 2): ``msg.to_frame()`` is the length-prefixed frame, byte for byte
``encode_frame(msg.to_wire())``; ``decoder_for(registry)`` gives ``decode(buf, start,
end)``, the same message or error as ``decode_message(registry, decode_payload(body))``
(``decode_frame`` is the one-shot form). Behind the dataclass face each class gets, at
import, generated straight-line code: ``__init__`` (validation without the SPEC loop),
``_from_map`` (decode-side constructor without a kwargs dict), ``to_frame`` (hand msgpack
for ints, bools, strings and PFN sets: one copy of a PFN set) and, for page batches,
``_fast_body`` (parse the canonical bytes without building a map). Each one falls back to
the original code for anything unusual, so errors never depend on the fast path;
tests/protocol/test_codec_fast.py checks all of them against naive twins.
"""

from __future__ import annotations

import struct
from dataclasses import MISSING, dataclass, fields
from enum import Enum
from typing import Any, Callable, ClassVar, Mapping

import msgpack
import numpy as np
from msgpack import unpackb as _unpackb

from .errors import ErrorCode, LocalProtocolError
from .features import MAX_FRAME, MAX_STAT_VALUE
from .framing import (
    MAX_ARRAY, MAX_MAP, MAX_STR, _no_ext, decode_payload, encode_frame, pack_bin_header,
    pack_frame_header, pack_str, pack_uint,
)

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

    #: Optional: a Python expression over ``{field}`` placeholders that is true exactly
    #: when ``_validate`` passes — lets the generated constructors skip the method call.
    _VALID_WHEN: ClassVar[str | None] = None

    def to_wire(self) -> dict[str, Any]:
        d: dict[str, Any] = {"t": self.TYPE}
        for name, _kind, _req in self.SPEC:
            v = getattr(self, name)
            if v is not None:
                d[name] = v
        return d

    def to_frame(self) -> bytes:
        """The message as one length-prefixed frame: ``encode_frame(self.to_wire())``.

        Byte for byte that encoding; classes of ints, bools, strings and PFN sets get a
        generated version that skips the intermediate map and copies a PFN set once.
        """
        return encode_frame(self.to_wire())

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

    _VALID_WHEN = "{ok} or {code} is not None"

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

    _VALID_WHEN = "({pfns} is None) is not ({runs} is None)"

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

    _VALID_WHEN = "{pfns}"

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

    _VALID_WHEN = f"{{max_order}} <= {MAX_ORDER}"

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

    _VALID_WHEN = f"{{min_order}} <= {MAX_ORDER}"

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
# Per-class generated code (speed): validators, decode constructors, frame encoders
# --------------------------------------------------------------------------------------
#
# The dataclass machinery above is the public face and the specification; the functions
# below are generated once per class, at import, from SPEC: straight-line checks with no
# SPEC loop and no getattr, slots written through their member descriptors (bypassing the
# frozen __setattr__), and for messages made only of integers, booleans, short strings and
# PFN sets a hand-written msgpack encoder. Every fast check accepts exactly what ``_check``
# accepts; when one fails, the slow path (``_check`` / the original ``from_wire``) runs to
# raise the very same error, so errors and their order never depend on the fast path.

_new = object.__new__


def _slow_field(msg_type: str, name: str, kind: Kind, required: bool, v: Any) -> None:
    """The original per-field check, run only when a fast check failed (raises)."""
    if v is None:
        if required:
            raise _bad(msg_type, name, "missing")
        return
    _check(msg_type, name, kind, v)


def _slow_from_wire(cls: type[Message], d: Mapping[str, Any]) -> Message:
    """The original ``from_wire``: canonical error order (missing fields first)."""
    kwargs = {}
    for name, _kind, required in cls.SPEC:
        if name in d:
            kwargs[name] = d[name]
        elif required:
            raise _bad(cls.TYPE, name, "missing")
    return cls(**kwargs)


def _passes(v: Any, kind: Kind) -> bool:
    """``_check`` as a predicate (``None`` fails), for kinds with no cheap expression."""
    if v is None:
        return False
    try:
        _check("", "", kind, v)
    except LocalProtocolError:
        return False
    return True


#: Fast checks, as expressions over ``{v}``; each accepts exactly what ``_check`` accepts.
_FAST_CHECK = {
    Kind.U64: f"(type({{v}}) is int and 0 <= {{v}} <= {U64_MAX})",
    Kind.U32: f"(type({{v}}) is int and 0 <= {{v}} <= {U32_MAX})",
    Kind.PFNS: "(type({v}) is bytes and not len({v}) & 3)",
    Kind.RUNS: "(type({v}) is bytes and not len({v}) & 15)",
    Kind.STR: f"(type({{v}}) is str and len({{v}}) <= {MAX_STR})",
    Kind.BOOL: "({v}) is True or ({v}) is False",
}
#: Kinds the hand-written encoder handles (the rest go through msgpack.packb).
_ENCODABLE = {Kind.U64, Kind.U32, Kind.PFNS, Kind.RUNS, Kind.STR, Kind.BOOL}


def _ok_expr(kind: Kind, required: bool, v: str) -> str | None:
    """Expression true when ``v`` passes (None: no cheap expression; use ``_check``)."""
    if kind is Kind.ANY:
        return f"{v} is not None" if required else "True"
    fast = _FAST_CHECK.get(kind)
    if fast is None:
        return None
    e = fast.format(v=v)
    return e if required else f"({v} is None or {e})"


def _descriptor_setter(cls: type, name: str) -> Any:
    for k in cls.__mro__:
        d = k.__dict__.get(name)
        if d is not None and hasattr(d, "__set__"):
            return d.__set__
    raise TypeError(f"{cls.__name__}.{name} is not a slot")  # pragma: no cover


#: Names the generated code uses for itself (fields with these names get a vN alias).
_RESERVED = frozenset({"self", "cls", "d", "get", "e", "p", "q", "s", "n", "h", "i", "v",
                       "key", "size", "body", "type", "len", "Kind", "True", "False", "None"})


def _accelerate(cls: type[Message]) -> None:
    """Install the generated ``__init__``, ``from_wire`` / ``_from_map``, and where the
    kinds allow ``to_frame`` and (page batches) ``_fast_body``."""
    flds = fields(cls)
    spec = cls.SPEC
    if {f.name for f in flds} != {n for n, _k, _r in spec} or any(
        f.default is not None and f.default is not MISSING for f in flds
    ) or any(f.default_factory is not MISSING for f in flds):  # pragma: no cover
        return  # not the shape the generator understands: keep the dataclass code
    T = cls.TYPE
    ns: dict[str, Any] = {
        "_C": cls, "_T": T, "_slow_field": _slow_field, "_slow_from_wire": _slow_from_wire,
        "_check": _check, "_bad": _bad, "_new": _new, "Kind": Kind, "_passes": _passes,
    }
    # Fields are locals of the generated functions under their own names (no rebinding),
    # unless a name would shadow something the generated code uses.
    var = {name: (f"v{i}" if name in _RESERVED or name.startswith("_") else name)
           for i, (name, _k, _r) in enumerate(spec)}
    for name, _k, _r in spec:
        ns[f"_s_{var[name]}"] = _descriptor_setter(cls, name)
    has_validate = cls._validate is not Message._validate
    # _VALID_WHEN: an expression over the fields that, when true, means _validate would
    # pass; the generated code calls _validate (for its exact error) only when it is false.
    when = getattr(cls, "_VALID_WHEN", None) if has_validate else None

    # Checks in SPEC order, as __post_init__ ran them.
    checks: list[str] = []
    cheap: list[str] = []  # the same, as one boolean (None when a kind needs _check)
    for name, kind, required in spec:
        v = var[name]
        ok = _ok_expr(kind, required, v)
        if ok is None:
            if required:
                checks.append(f"    if {v} is None: raise _bad(_T, {name!r}, 'missing')")
                checks.append(f"    _check(_T, {name!r}, Kind.{kind.name}, {v})")
            else:
                checks.append(
                    f"    if {v} is not None: _check(_T, {name!r}, Kind.{kind.name}, {v})")
            cheap.append("None")
        else:
            if ok != "True":
                checks.append(f"    if not ({ok}): "
                              f"_slow_field(_T, {name!r}, Kind.{kind.name}, {required}, {v})")
            cheap.append(ok)
    sets = [f"    _s_{var[n]}(self, {var[n]})" for n, _k, _r in spec]
    if when is not None:
        cond = when.format(**var)
        validate = [f"    if not ({cond}): self._validate()"]
    else:
        validate = ["    self._validate()"] if has_validate else []

    # Parameter names must be the field names (keyword-only): rename inside the body.
    sig = ", ".join(f.name if f.default is MISSING else f"{f.name}=None" for f in flds)
    rebinds = [f"    {var[f.name]} = {f.name}" for f in flds if var[f.name] != f.name]
    src = [f"def __init__(self{', *, ' + sig if flds else ''}):", *rebinds, *checks, *sets,
           *validate] + ([] if spec or validate else ["    pass"])

    # _from_map(d): the decode-side constructor (no kwargs dict, no cls(**kwargs));
    # None (or KeyError) when a value fails a cheap check, so that the caller can take the
    # slow path (the original from_wire) for the exact error in its exact order.
    map_checks: list[str] = []
    for (name, kind, required), c in zip(spec, cheap):
        v = var[name]
        if c == "True":
            continue
        if c != "None":
            map_checks.append(f"    if not ({c}): return None")
        elif required:
            map_checks.append(f"    if not _passes({v}, Kind.{kind.name}): return None")
        else:
            map_checks.append(
                f"    if {v} is not None and not _passes({v}, Kind.{kind.name}): return None")
    # Required fields by subscript (a missing one raises KeyError: the caller's slow path).
    gets = [f"    {var[n]} = d[{n!r}]" if r else f"    {var[n]} = get({n!r})"
            for n, _k, r in spec]
    head = ["    get = d.get"] if any(not r for _n, _k, r in spec) else []
    src += ["def _from_map(d):", *head, *gets, *map_checks, "    self = _new(_C)",
            *sets, *validate, "    return self"]
    src += ["def from_wire(cls, d):",
            "    if cls is _C:",
            "        try:",
            "            self = _from_map(d)",
            "        except KeyError:",
            "            self = None",
            "        if self is not None: return self",
            "    return _slow_from_wire(cls, d)"]
    if all(k in _ENCODABLE for _n, k, _r in spec) and len(spec) < 15:
        src += _encoder_source(cls, var)
        ns.update(_ENCODER_NAMES)
        if _is_batch(cls):
            for n, _k, _r in spec[1:]:
                ns[f"_HDR_{cls.__name__}_{n}"] = _batch_header_table(cls, n)
    if _is_batch(cls):
        src += _batch_decoder_source(cls, var)
        ns.update(_DECODER_NAMES)
        ns["_HU"], ns["_HS"] = _batch_header_readers(cls)
        cls._BATCH_VAR = var  # type: ignore[attr-defined]  # for decoder_for's inlining
    cls._GENERATED_SOURCE = "\n".join(src)  # type: ignore[attr-defined]  # for debugging
    exec(cls._GENERATED_SOURCE, ns)  # noqa: S102 - source built above from SPEC only
    init = ns["__init__"]
    init.__qualname__ = f"{cls.__qualname__}.__init__"
    init.__doc__ = cls.__init__.__doc__
    cls.__init__ = init  # type: ignore[misc]
    cls.from_wire = classmethod(ns["from_wire"])  # type: ignore[method-assign,assignment]
    cls._from_map = staticmethod(ns["_from_map"])  # type: ignore[attr-defined]
    cls._WIRE_KEYS = frozenset(["t", *(n for n, _k, _r in spec)])  # type: ignore[attr-defined]
    if "_fast_body" in ns:
        cls._fast_body = staticmethod(ns["_fast_body"])  # type: ignore[attr-defined]
    if "to_frame" in ns:
        ns["to_frame"].__qualname__ = f"{cls.__qualname__}.to_frame"
        ns["to_frame"].__doc__ = Message.to_frame.__doc__
        cls.to_frame = ns["to_frame"]  # type: ignore[method-assign]


_ENCODER_NAMES = {
    "_uint": pack_uint, "_binh": pack_bin_header, "_str": pack_str,
    "_frame_header": pack_frame_header, "_join": b"".join, "_encode_frame": encode_frame,
}


#: msgpack formats of an unsigned int, by class: (marker byte or None for fixint, struct
#: code). Classes: positive fixint, uint8, uint16, uint32, uint64.
_UINT_FORMS = ((None, "B"), (0xCC, "B"), (0xCD, "H"), (0xCE, "I"), (0xCF, "Q"))
#: msgpack bin formats, by class: bin8, bin16, bin32.
_BIN_FORMS = ((0xC4, "B"), (0xC5, "H"), (0xC6, "I"))


def _batch_header_table(cls: type[Message], name: str) -> list[tuple[Any, bytes, bytes, int]]:
    """For a page batch whose set is ``name``: one entry per (id format × bin format),
    ``(pack, prefix_and_id_marker, key_and_bin_marker, header_size)`` where
    ``pack(size, prefix_and_id_marker, id, key_and_bin_marker, n)`` is the frame's length
    prefix and every byte of the body before the set (``size`` is the body length, the
    header's own bytes after the length prefix plus the set's ``n`` bytes)."""
    prefix = _batch_prefix(cls)
    key = msgpack.packb(name)
    tab = []
    for id_marker, id_code in _UINT_FORMS:
        pm = prefix + (bytes((id_marker,)) if id_marker is not None else b"")
        for bin_marker, bin_code in _BIN_FORMS:
            kb = key + bytes((bin_marker,))
            st = struct.Struct(f">I{len(pm)}s{id_code}{len(kb)}s{bin_code}")
            tab.append((st.pack, pm, kb, st.size - 4))
    return tab


def _is_batch(cls: type[Message]) -> bool:
    """Page-batch shape: ``id`` (uint64) then one or two PFN sets named pfns / runs."""
    spec = cls.SPEC
    return (bool(spec) and spec[0] == ("id", Kind.U64, True) and 2 <= len(spec) <= 3
            and all(k in (Kind.PFNS, Kind.RUNS) and n in ("pfns", "runs")
                    for n, k, _r in spec[1:]))


def _batch_prefix(cls: type[Message]) -> bytes:
    """fixmap(3), "t", the type, then the "id" key: how every page batch frame begins."""
    return b"\x83" + msgpack.packb("t") + msgpack.packb(cls.TYPE) + msgpack.packb("id")


def _batch_parse_lines(cls: type[Message], var: dict[str, str], fail: str,
                       ind: str = "    ", tag: str = "") -> list[str]:
    """The statements of a page batch's parse from ``body[s:e]`` (a ``bytes``): they
    leave the built message in ``self``, or run ``fail`` (``return None`` in a function,
    ``break`` in a loop) for anything but the canonical layout that ``to_frame`` and
    packb both produce — the caller's generic path then decides."""
    prefix = _batch_prefix(cls)
    names = [n for n, _k, _r in cls.SPEC[1:]]
    kinds = {n: k for n, k, _r in cls.SPEC}
    src = [# One unpack per id format (the id's first byte picks it: positive fixint or
           # uint8/16/32/64, what packb writes) reads the whole prefix (map header, "t",
           # the type, "id"), the id, the set's 5-byte key and its bin header as bin16; a
           # bin8 or bin32 header is read from the same fields (a bin8 length is the high
           # byte; a bin32 one goes on for two more bytes).
           f"h = body[s + {len(prefix)}]",
           f"f = _HU{tag}[h]",
           f"if f is None: {fail}",
           "pre, id, key, b, n = f(body, s)",
           f"if pre != {prefix!r}: {fail}",
           f"if b == 0xC5: q = s + _HS{tag}[h]",
           f"elif b == 0xC4: n >>= 8; q = s + _HS{tag}[h] - 1",
           "elif b == 0xC6:",
           f"    q = s + _HS{tag}[h]; n = (n << 16) | (body[q] << 8) | body[q + 1]; q += 2",
           f"else: {fail}",
           f"if q + n != e: {fail}  # short, or trailing bytes"]
    first = True
    for name in names:
        width = 4 if kinds[name] is Kind.PFNS else 16
        kw = "if" if first else "elif"
        first = False
        src += [f"{kw} key == {msgpack.packb(name)!r}:",
                f"    if n & {width - 1}: {fail}",
                f"    self = _new(_C{tag})"]
        for n2 in [n for n, _k, _r in cls.SPEC]:
            val = "id" if n2 == "id" else ("body[q:e]" if n2 == name else "None")
            src.append(f"    _s{tag}_{var[n2]}(self, {val})")
        # The one cross-field rule a page batch may carry (_VALID_WHEN) is checked on
        # the fields just set; a batch that breaks it takes the generic path.
        # (Left out when it holds for any set, empty or not: the page batches' rule.)
        when = getattr(cls, "_VALID_WHEN", None)
        if when is not None and cls._validate is not Message._validate:
            def cond(v: str) -> str:
                return when.format(**{n2: ("id" if n2 == "id" else v if n2 == name
                                           else "None") for n2, _k, _r in cls.SPEC})
            if not all(eval(cond("v"), {"v": b}) for b in (b"", bytes(width))):  # noqa: S307
                src.append(f"    if not ({cond('self.' + name)}): {fail}")
    src.append(f"else: {fail}")
    return [ind + line for line in src]


def _batch_decoder_source(cls: type[Message], var: dict[str, str]) -> list[str]:
    """``_fast_body(body, s, e)``: the page batch in ``body[s:e]`` straight from its
    canonical bytes, skipping the map and copying only the PFN set; None for anything
    else (the generic path decides). ``decoder_for`` inlines the same statements."""
    return ["def _fast_body(body, s, e):",
            "    if type(body) is not bytes: return None",
            "    try:",
            *_batch_parse_lines(cls, var, "return None", " " * 8),
            "    except (IndexError, _struct_error):  # cut short",
            "        return None",
            "    return self"]


def _encoder_source(cls: type[Message], var: dict[str, str]) -> list[str]:
    """``to_frame`` for a message of ints, bools, strings and PFN sets: the frame, built by
    hand so that a PFN set is copied once (by the final join)."""
    t_enc = msgpack.packb("t") + msgpack.packb(cls.TYPE)
    if _is_batch(cls):
        # Page batches (the hot path): "t", "id" and exactly one PFN set present. The
        # whole header (length prefix, "t", type, "id", the id, the set's key and bin
        # header) is one struct.pack from a table chosen by the id's and the set's msgpack
        # formats; the set itself is copied once, by the final concatenation. Anything else
        # (no set, two sets: invalid anyway) is encoded generically.
        first, *other = [n for n, _k, _r in cls.SPEC[1:]]
        tabs = {n: f"_HDR_{cls.__name__}_{n}" for n in (first, *other)}
        src = ["def to_frame(self):", f"    v = self.{first}", f"    tab = {tabs[first]}"]
        if other:
            src += ["    if v is None:", f"        v = self.{other[0]}",
                    f"        tab = {tabs[other[0]]}",
                    f"    elif self.{other[0]} is not None: return _encode_frame(self.to_wire())"]
        src += ["    if v is None: return _encode_frame(self.to_wire())",
                "    i = self.id",
                "    n = len(v)",
                "    pack, pm, kb, size = tab[(0 if i < 0x80 else 1 if i < 0x100 else 2"
                " if i < 0x10000 else 3 if i < 0x100000000 else 4) * 3"
                " + (1 if 0x100 <= n < 0x10000 else 0 if n < 0x100 else 2)]",
                "    size += n",
                f"    if size > {MAX_FRAME}: _frame_header(size)  # raises frame_too_large",
                "    return pack(size, pm, i, kb, n) + v"]
        return src
    src = ["def to_frame(self):",
           f"    p = [b'', {t_enc!r}]",
           f"    size = {len(t_enc)}",
           "    n = 1"]
    for name, kind, required in cls.SPEC:
        v = var[name]
        key = msgpack.packb(name)
        ind = "    "
        src.append(f"    {v} = self.{name}")
        if not required:
            src.append(f"    if {v} is not None:")
            ind = "        "
        if kind in (Kind.U64, Kind.U32):
            src += [f"{ind}e = _uint({v})", f"{ind}p.append({key!r} + e)",
                    f"{ind}size += {len(key)} + len(e)"]
        elif kind is Kind.BOOL:
            src += [f"{ind}p.append({key!r} + (b'\\xc3' if {v} else b'\\xc2'))",
                    f"{ind}size += {len(key) + 1}"]
        elif kind is Kind.STR:
            src += [f"{ind}try:", f"{ind}    e = _str({v})",
                    f"{ind}except UnicodeEncodeError:",
                    f"{ind}    return _encode_frame(self.to_wire())  # packb's own error",
                    f"{ind}p.append({key!r} + e)", f"{ind}size += {len(key)} + len(e)"]
        else:  # PFNS / RUNS: the one big value, appended as is
            src += [f"{ind}e = {key!r} + _binh(len({v}))", f"{ind}p.append(e)",
                    f"{ind}p.append({v})", f"{ind}size += len(e) + len({v})"]
        src.append(f"{ind}n += 1")
    src += ["    p[0] = _frame_header(size + 1) + _FIXMAP[n]", "    return _join(p)"]
    return src


def _batch_header_readers(cls: type[Message]) -> tuple[list[Any], list[int]]:
    """By the id's first byte: the ``unpack_from(body, s)`` giving ``(prefix, id, key,
    bin marker, bin16 length)`` of a page batch of ``cls`` at ``s``, and the bytes that
    spans (None / 0 where no uint starts with that byte)."""
    unpack: list[Any] = [None] * 256
    size = [0] * 256
    plen = len(_batch_prefix(cls))
    for marker, code in _UINT_FORMS:
        st = struct.Struct(f">{plen}s{'x' if marker is not None else ''}{code}5sBH")
        for h in ([marker] if marker is not None else range(0x80)):
            unpack[h] = st.unpack_from
            size[h] = st.size
    return unpack, size


_DECODER_NAMES = {"_struct_error": struct.error}

_FIXMAP = [bytes((0x80 | i,)) for i in range(16)]
_ENCODER_NAMES["_FIXMAP"] = _FIXMAP


def _concrete_messages() -> list[type[Message]]:
    out, todo = [], [Message]
    while todo:
        c = todo.pop()
        todo.extend(c.__subclasses__())
        # dataclass(slots=True) replaces each class: the pre-slots originals may still be
        # listed as subclasses until collected, so take only the module's own objects.
        if c.TYPE and globals().get(c.__name__) is c and c not in out:
            out.append(c)
    return out


for _cls in _concrete_messages():
    _accelerate(_cls)
del _cls


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
    if type(t) is str:
        cls = registry.get(t)
        if cls is not None:
            return cls.from_wire(payload)
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


# --------------------------------------------------------------------------------------
# Receive fast path: frame body → message in one call
# --------------------------------------------------------------------------------------


#: ``decode(buf, start=0, end=None) -> Message``: the frame body ``buf[start:end]``.
Decoder = Callable[..., Message]
_decoders: dict[int, tuple[Registry, Decoder]] = {}


def decoder_for(registry: Registry) -> Decoder:
    """``decode(buf, start=0, end=None) -> Message`` for one receiver: ``decode_frame``
    of ``buf[start:end]`` with its lookups done once (connections keep one, and feed it
    ``FrameBuffer.next_frame_span()`` so that the body is never sliced out).

    Generated per registry: the page batches it accepts are told apart by one byte of
    their type name and parsed inline (the statements of their ``_fast_body``); every
    other frame, and any batch not in the canonical layout, goes through ``unpackb`` and
    the class's ``_from_map``, and failing that the generic path, which names the error.
    """
    hit = _decoders.get(id(registry))
    if hit is not None and hit[0] is registry:
        return hit[1]
    table = {t: (cls._from_map, cls._WIRE_KEYS)  # type: ignore[attr-defined]
             for t, cls in registry.items() if cls.TYPE == t and "_from_map" in cls.__dict__}

    def rest(buf: Any, start: int, end: int, _small: int = MAX_STR,
             _unpackb: Any = _unpackb, _no_ext: Any = _no_ext) -> Message:
        body: Any = None
        try:
            body = buf if start == 0 and end == len(buf) else buf[start:end]
            if len(body) <= _small:
                # unpackb's default limits are the body's own length, which for a body
                # this small is never looser than decode_payload's on complete data (a
                # string, bin, array or map cannot outgrow the bytes holding it): the same
                # maps decode, without seven keyword arguments per frame.
                d = _unpackb(body, strict_map_key=False, ext_hook=_no_ext)
            else:
                d = _unpackb(body, raw=False, use_list=True, strict_map_key=False,
                             ext_hook=_no_ext, max_str_len=MAX_STR, max_bin_len=MAX_FRAME,
                             max_array_len=MAX_ARRAY, max_map_len=MAX_MAP, max_ext_len=0)
            from_map, keys = table[d["t"]]
            # keys ⊆ {"t", fields}: every key is a string, as decode_payload demands
            if d.keys() <= keys:
                msg = from_map(d)
                if msg is not None:
                    return msg  # type: ignore[no-any-return]
        except Exception:  # noqa: BLE001 - whatever it was, the generic path names it
            pass
        if body is None:
            body = buf[start:end]
        return decode_message(registry, decode_payload(body))

    # Page batches: one byte position where their prefixes (fixmap, "t", the type's
    # fixstr) all differ selects the parse; the parse checks the whole prefix itself.
    batches = [cls for t, cls in registry.items()
               if cls.TYPE == t and "_fast_body" in cls.__dict__]
    prefixes = [_batch_prefix(cls) for cls in batches]
    pos = next((k for k in range(min(map(len, prefixes), default=0))
                if len({p[k] for p in prefixes}) == len(prefixes)), None)
    ns: dict[str, Any] = {"_rest": rest, "_new": _new, **_DECODER_NAMES}
    src = ["def decode(body, s=0, e=None):",
           "    if e is None: e = len(body)"]
    if batches and pos is not None:
        # A frame cut short makes an index or unpack run off the buffer: generic path.
        src += ["    try:",
                f"        if type(body) is bytes and e - s > {pos}:",
                f"            c = body[s + {pos}]"]
        for j, (cls, pre) in enumerate(zip(batches, prefixes)):
            var = cls._BATCH_VAR  # type: ignore[attr-defined]
            ns[f"_C_{j}"] = cls
            for name, _k, _r in cls.SPEC:
                ns[f"_s_{j}_{var[name]}"] = _descriptor_setter(cls, name)
            ns[f"_HU_{j}"], ns[f"_HS_{j}"] = _batch_header_readers(cls)
            src += [f"            {'if' if j == 0 else 'elif'} c == {pre[pos]}:  # {cls.TYPE}",
                    "                while True:  # a block to break out of to the generic path",
                    *_batch_parse_lines(cls, var, "break", " " * 20, f"_{j}"),
                    "                    return self"]
        src += ["    except (IndexError, _struct_error):", "        pass"]
    src.append("    return _rest(body, s, e)")
    exec("\n".join(src), ns)  # noqa: S102 - source built above from SPEC only
    decode = ns["decode"]
    decode._GENERATED_SOURCE = "\n".join(src)
    _decoders[id(registry)] = (registry, decode)
    return decode  # type: ignore[no-any-return]


def decode_frame(registry: Registry, body: bytes | memoryview) -> Message:
    """The message in one frame body, for one receiver.

    Same result, and same errors, as ``decode_message(registry, decode_payload(body))``:
    when the body unpacks to a map whose keys are all field names of a type this receiver
    accepts and whose values pass the cheap checks, the map goes straight to that class's
    generated constructor; anything else takes the generic path, which raises the exact
    error.
    """
    return decoder_for(registry)(body)
