"""The codec: field kinds and their checks, message ↔ frame, and the hot paths.

A message class declares each field once, as an annotation carrying its wire kind
(``id: U64``, ``pfns: Pfns | None = None`` in :mod:`protocol.messages`).
:func:`prepare` reads those declarations once, when the class is created, and hangs on
the class what the codec needs, all of it plain Python (closures and tables, no source
text):

* ``SPEC``: ``(name, kind, required)`` per field, in declaration order;
* ``_from_map(d)``: the decode-side constructor — the message when every value of the
  decoded map passes its check, else ``None`` (the caller's generic path then raises the
  exact error);
* ``to_frame``: for messages of ints, bools, strings and PFN sets, the frame encoded by hand
  (byte for byte ``encode_frame(msg.to_wire())``, a PFN set copied once);
* for the page batches (``id`` and one or two PFN sets: inflate, deflate, report, pages,
  balloon_free …) the hand-written fast paths below: ``__init__`` (where the fields are
  the shapes written out here), ``to_frame`` (the whole header in one ``struct.pack``) and
  ``_fast_body`` (the canonical frame parsed without building a map).

Every fast path accepts exactly what the generic one accepts and, for anything else, hands
over to it, so that errors (code, text and order) never depend on the fast path;
tests/protocol/test_codec_fast.py checks each one against a naive twin.

Why one module of this size: the generic paths and the hand-written page-batch paths must
accept and refuse exactly the same bytes; they live side by side so that a change to one is
seen next to the other.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Mapping
from dataclasses import MISSING, dataclass, fields
from enum import Enum
from operator import attrgetter
from typing import (
    Annotated,
    Any,
    ClassVar,
    TypeVar,
    dataclass_transform,
    get_args,
    get_origin,
    get_type_hints,
)

import msgpack
from msgpack import unpackb as _unpackb

from .errors import ErrorCode, LocalProtocolError
from .features import MAX_FRAME, MAX_STAT_VALUE
from .framing import (
    MAX_ARRAY,
    MAX_MAP,
    MAX_STR,
    decode_payload,
    encode_frame,
    no_ext,
    pack_bin_header,
    pack_frame_header,
    pack_str,
    pack_uint,
)

U64_MAX = (1 << 64) - 1
U32_MAX = (1 << 32) - 1

#: Which types one receiver accepts: wire type name → message class.
Registry = Mapping[str, "type[Message]"]
#: ``decode(buf, start=0, end=None) -> Message``: the frame body ``buf[start:end]``.
Decoder = Callable[..., "Message"]
MapReader = Callable[[Mapping[str, Any]], "Message | None"]


class Kind(Enum):
    """What a field holds on the wire (the value is how docs/protocol.md names it)."""

    U64 = "uint64"
    U32 = "uint32"
    STR = "string"
    BOOL = "bool"
    PFNS = "bin of little-endian uint32 pfns"
    RUNS = "bin of little-endian uint64 (first pfn, count) pairs"
    STATS = "map of integer tag to uint64"
    MAP = "map with string keys"
    ANY = "any msgpack value"


# --------------------------------------------------------------------------------------
# Field checks: the reference (check_field) and the same as predicates
# --------------------------------------------------------------------------------------


def bad_field(msg_type: str, name: str, problem: str) -> LocalProtocolError:
    """The ``bad_field`` error for one field of one message type."""
    return LocalProtocolError(
        ErrorCode.BAD_FIELD, f"{msg_type}.{name}: {problem}", type=msg_type, field=name
    )


def check_field(msg_type: str, name: str, kind: Kind, v: Any) -> None:
    """Raise ``bad_field`` unless ``v`` (not None) is a valid value of ``kind``."""
    # Ordered by frequency on hot paths.
    if kind is Kind.U64 or kind is Kind.U32:
        if type(v) is not int:
            raise bad_field(msg_type, name, f"expected {kind.value}, got {type(v).__name__}")
        if v < 0 or v > (U64_MAX if kind is Kind.U64 else U32_MAX):
            raise bad_field(msg_type, name, f"{v} is outside the {kind.value} range")
    elif kind is Kind.PFNS or kind is Kind.RUNS:
        if type(v) is not bytes:
            raise bad_field(msg_type, name, f"expected {kind.value}, got {type(v).__name__}")
        width = 4 if kind is Kind.PFNS else 16
        if len(v) % width:
            raise bad_field(msg_type, name, f"length {len(v)} is not a multiple of {width}")
    elif kind is Kind.STR:
        if type(v) is not str:
            raise bad_field(msg_type, name, f"expected string, got {type(v).__name__}")
        if len(v) > MAX_STR:
            raise bad_field(msg_type, name, f"string of {len(v)} characters is too long")
    elif kind is Kind.BOOL:
        if type(v) is not bool:
            raise bad_field(msg_type, name, f"expected bool, got {type(v).__name__}")
    elif kind is Kind.STATS:
        if not isinstance(v, dict):
            raise bad_field(msg_type, name, f"expected {kind.value}, got {type(v).__name__}")
        for tag, val in v.items():
            if type(tag) is not int or not 0 <= tag <= 0xFFFF:
                raise bad_field(msg_type, name, f"stats tag {tag!r} is not an integer in 0..65535")
            if type(val) is not int or not 0 <= val <= MAX_STAT_VALUE:
                raise bad_field(msg_type, name, f"stats value for tag {tag} is not a uint64")
    elif kind is Kind.MAP and not (isinstance(v, dict) and all(type(k) is str for k in v)):
        raise bad_field(msg_type, name, f"expected {kind.value}")


def _passes_check(kind: Kind) -> Callable[[Any], bool]:
    def ok(v: Any) -> bool:
        try:
            check_field("", "", kind, v)
        except LocalProtocolError:
            return False
        return True

    return ok


#: ``check_field`` as a predicate on a value that is not None (cheap forms where there are).
VALID: dict[Kind, Callable[[Any], bool]] = {
    Kind.U64: lambda v: type(v) is int and 0 <= v <= U64_MAX,
    Kind.U32: lambda v: type(v) is int and 0 <= v <= U32_MAX,
    Kind.PFNS: lambda v: type(v) is bytes and not len(v) & 3,
    Kind.RUNS: lambda v: type(v) is bytes and not len(v) & 15,
    Kind.STR: lambda v: type(v) is str and len(v) <= MAX_STR,
    Kind.BOOL: lambda v: v is True or v is False,
    Kind.STATS: _passes_check(Kind.STATS),
    Kind.MAP: _passes_check(Kind.MAP),
    Kind.ANY: lambda v: True,
}


def validate_fields(msg: Message) -> None:
    """The generic validation: each field in declaration order, then the cross-field rules
    (``_ONE_OF``, then ``_validate``). What every construction amounts to; the fast paths
    defer to it for anything they do not accept themselves."""
    t = msg.TYPE
    for name, kind, required in msg.SPEC:
        v = getattr(msg, name)
        if v is None:
            if required:
                raise bad_field(t, name, "missing")
            continue
        check_field(t, name, kind, v)
    one_of = msg._ONE_OF
    if one_of and sum(getattr(msg, n) is not None for n in one_of) != 1:
        names = [f"{n!r}" for n in one_of]
        raise bad_field(t, one_of[0], f"exactly one of {', '.join(names[:-1])} and {names[-1]}"
                                      " must be present")
    msg._validate()


# --------------------------------------------------------------------------------------
# Reading the declarations
# --------------------------------------------------------------------------------------

Spec = tuple[tuple[str, Kind, bool], ...]


def _kind_of(hint: Any) -> Kind | None:
    """The wire kind an annotation carries (``Annotated[T, kind]``, possibly ``| None``)."""
    for h in (hint, *get_args(hint)):
        if get_origin(h) is Annotated:
            for meta in h.__metadata__:
                if isinstance(meta, Kind):
                    return meta
    return None


def read_spec(cls: type) -> Spec:
    """``(name, kind, required)`` for each dataclass field of ``cls``, from its annotations.

    A field is required when it has no default; an optional field's default must be None
    (absent on the wire).
    """
    hints = get_type_hints(cls, include_extras=True)
    spec = []
    for f in fields(cls):
        kind = _kind_of(hints[f.name])
        if kind is None:
            raise TypeError(f"{cls.__name__}.{f.name}: annotate the field with its wire kind")
        if f.default_factory is not MISSING or f.default not in (MISSING, None):
            raise TypeError(f"{cls.__name__}.{f.name}: an optional field defaults to None")
        spec.append((f.name, kind, f.default is MISSING))
    return tuple(spec)


def _slot_setter(cls: type, name: str) -> Callable[[Any, Any], None]:
    """Write a slot through its member descriptor (past the frozen ``__setattr__``)."""
    for k in cls.__mro__:
        d = k.__dict__.get(name)
        if d is not None and hasattr(d, "__set__"):
            return d.__set__  # type: ignore[no-any-return]
    raise TypeError(f"{cls.__name__}.{name} is not a slot")


def prepare(cls: type[Message]) -> None:
    """Read ``cls``'s declarations and install its codec (see the module docstring)."""
    spec = read_spec(cls)
    cls.SPEC = spec
    if not cls.TYPE:
        return  # an abstract base: its subclasses get the codec
    setters = {name: _slot_setter(cls, name) for name, _k, _r in spec}
    cls._WIRE_KEYS = frozenset(["t", *(n for n, _k, _r in spec)])
    cls._from_map = staticmethod(_map_reader(cls, spec, setters))
    rule = _has_rule(cls)
    init = _fast_init(cls, spec, setters, rule)
    if init is not None:
        init.__qualname__ = f"{cls.__qualname__}.__init__"
        cls.__init__ = init  # type: ignore[method-assign]
    encoder: Callable[[Any], bytes] | None = None
    if _is_batch(cls, spec):
        encoder = _batch_encoder(cls, spec)
        plan = _batch_plan(cls, spec, setters, rule)
        _BATCH_PLANS[cls] = plan
        cls._fast_body = staticmethod(_decoder({plan[1]: plan}, _no_fallback))
    elif all(k in _SCALAR_ENCODERS or k in (Kind.PFNS, Kind.RUNS) for _n, k, _r in spec):
        encoder = _field_encoder(cls, spec)
    if encoder is not None:
        encoder.__qualname__ = f"{cls.__qualname__}.to_frame"
        encoder.__doc__ = cls.to_frame.__doc__
        cls.to_frame = encoder  # type: ignore[method-assign,assignment]


def _has_rule(cls: type[Message]) -> bool:
    """Whether ``cls`` has cross-field rules (overrides the root's no-op ``_validate``)."""
    return cls._validate is not Message._validate


# --------------------------------------------------------------------------------------
# Generic paths, driven by SPEC
# --------------------------------------------------------------------------------------

_new = object.__new__
#: Page batch class → what its parse needs (see :func:`_decoder`).
_BATCH_PLANS: dict[type, BatchPlan] = {}


def _map_reader(cls: type[Message], spec: Spec,
                setters: dict[str, Callable[[Any, Any], None]]) -> MapReader:
    """``_from_map(d)``: the message from a decoded map, or None when anything is off."""
    plan = tuple((name, VALID[kind], required, setters[name]) for name, kind, required in spec)
    rule = _has_rule(cls)
    one_of = cls._ONE_OF

    def from_map(d: Mapping[str, Any]) -> Message | None:
        msg = _new(cls)
        get = d.get
        for name, valid, required, put in plan:
            v = get(name)
            if v is None:
                if required:
                    return None
            elif not valid(v):
                return None
            put(msg, v)
        if one_of and sum(get(n) is not None for n in one_of) != 1:
            return None
        if rule:
            try:
                msg._validate()
            except LocalProtocolError:
                return None
        return msg

    return from_map


def _pack_bool(v: bool) -> bytes:
    return b"\xc3" if v else b"\xc2"


#: Hand msgpack encoders of scalar kinds (PFN sets are appended as they are).
_SCALAR_ENCODERS: dict[Kind, Callable[[Any], bytes]] = {
    Kind.U64: pack_uint, Kind.U32: pack_uint, Kind.BOOL: _pack_bool, Kind.STR: pack_str,
}
_FIXMAP = [bytes((0x80 | i,)) for i in range(16)]


def _field_encoder(cls: type[Message], spec: Spec) -> Callable[[Any], bytes]:
    """``to_frame`` for a message of ints, bools, strings and PFN sets: the frame built by
    hand, each PFN set copied once (by the final join)."""
    assert len(spec) < 15, "a fixmap holds at most 15 entries"
    t_enc = msgpack.packb("t") + msgpack.packb(cls.TYPE)
    plan = tuple((attrgetter(name), msgpack.packb(name), _SCALAR_ENCODERS.get(kind))
                 for name, kind, _r in spec)

    def to_frame(msg: Any) -> bytes:
        parts = [b"", t_enc]
        size = len(t_enc)
        n = 1
        try:
            for get, key, enc in plan:
                v = get(msg)
                if v is None:
                    continue
                if enc is None:  # a PFN set
                    head = key + pack_bin_header(len(v))
                    parts.append(head)
                    parts.append(v)
                    size += len(head) + len(v)
                else:
                    e = key + enc(v)
                    parts.append(e)
                    size += len(e)
                n += 1
        except UnicodeEncodeError:
            return encode_frame(msg.to_wire())  # packb's own error
        parts[0] = pack_frame_header(size + 1) + _FIXMAP[n]
        return b"".join(parts)

    return to_frame


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
    raise LocalProtocolError(
        ErrorCode.UNKNOWN_TYPE, f"unknown or unexpected message type {t!r} on this channel",
        type=t,
    )


# --------------------------------------------------------------------------------------
# Page batches: hand-written fast paths
# --------------------------------------------------------------------------------------
#
# A page batch is ``id`` (uint64) and one or two PFN sets named ``pfns`` / ``runs``; the
# frame the encoder writes (and packb writes for the same map) is: fixmap(3), "t", the
# type, "id", the id as a uint, the set's key, the set as bin8/16/32. Both directions work
# on that layout directly; the set is copied once each way.

_U64 = 0xFFFF_FFFF_FFFF_FFFF
_BATCH_SETS = {"pfns": Kind.PFNS, "runs": Kind.RUNS}
#: msgpack formats of an unsigned int, by class (positive fixint, uint8/16/32/64): the
#: marker byte (None for fixint) and the struct code of the value.
_UINT_FORMS = ((None, "B"), (0xCC, "B"), (0xCD, "H"), (0xCE, "I"), (0xCF, "Q"))
#: msgpack bin formats, by class: bin8, bin16, bin32.
_BIN_FORMS = ((0xC4, "B"), (0xC5, "H"), (0xC6, "I"))
#: The two page-batch shapes with a hand-written ``__init__``: either set (exactly one of
#: them, the class's ``_ONE_OF``), or runs only.
_EITHER_SET = (("id", Kind.U64, True), ("pfns", Kind.PFNS, False), ("runs", Kind.RUNS, False))
_RUNS_ONLY = (("id", Kind.U64, True), ("runs", Kind.RUNS, True))


def _is_batch(cls: type[Message], spec: Spec) -> bool:
    """``id`` then one required set, or two optional sets of which exactly one is present."""
    if not (2 <= len(spec) <= 3 and spec[0] == ("id", Kind.U64, True)
            and all(_BATCH_SETS.get(n) is k for n, k, _r in spec[1:])):
        return False
    if len(spec) == 2:
        return spec[1][2] and not cls._ONE_OF
    return set(cls._ONE_OF) == {spec[1][0], spec[2][0]}


def batch_prefix(msg_type: str) -> bytes:
    """How every page batch frame body of ``msg_type`` begins: fixmap(3), "t", the type,
    then the "id" key."""
    return b"".join([b"\x83", msgpack.packb("t"), msgpack.packb(msg_type), msgpack.packb("id")])


def _fast_init(cls: type[Message], spec: Spec, setters: dict[str, Callable[[Any, Any], None]],
               rule: bool) -> Callable[..., None] | None:
    """A hand-written ``__init__`` for the two page-batch shapes, when ``spec`` is one of
    them (else None: the dataclass ``__init__`` and ``__post_init__`` stay). Any value that
    fails the inline checks goes to :func:`validate_fields` for the exact error."""
    names = tuple(n for n, _k, _r in spec)

    def slow(msg: Message, values: tuple[Any, ...]) -> None:
        for name, v in zip(names, values):
            setters[name](msg, v)
        validate_fields(msg)

    if spec == _EITHER_SET and cls._ONE_OF == ("pfns", "runs"):
        put_id, put_pfns, put_runs = setters["id"], setters["pfns"], setters["runs"]

        def init_either(self: Message, *, id: int, pfns: bytes | None = None,
                        runs: bytes | None = None) -> None:
            if (type(id) is int and 0 <= id <= _U64
                    and ((type(pfns) is bytes and not len(pfns) & 3 and runs is None)
                         or (type(runs) is bytes and not len(runs) & 15 and pfns is None))):
                put_id(self, id)
                put_pfns(self, pfns)
                put_runs(self, runs)
                if rule:
                    self._validate()
            else:
                slow(self, (id, pfns, runs))

        return init_either
    if spec == _RUNS_ONLY and not cls._ONE_OF:
        put_id, put_runs = setters["id"], setters["runs"]

        def init_runs(self: Message, *, id: int, runs: bytes) -> None:
            if (type(id) is int and 0 <= id <= _U64
                    and type(runs) is bytes and not len(runs) & 15):
                put_id(self, id)
                put_runs(self, runs)
                if rule:
                    self._validate()
            else:
                slow(self, (id, runs))

        return init_runs
    return None


def _batch_header_table(prefix: bytes,
                        name: str) -> list[tuple[Callable[..., bytes], bytes, bytes, int]]:
    """For a page batch whose set is ``name``, one entry per (id format × bin format):
    ``(pack, prefix + id marker, key + bin marker, header size)``, where
    ``pack(size, pm, id, kb, n)`` is the frame's length prefix and every body byte before
    the set (``size``: the body length, the header size plus the set's ``n`` bytes)."""
    key = msgpack.packb(name)
    tab = []
    for id_marker, id_code in _UINT_FORMS:
        pm = prefix + (bytes((id_marker,)) if id_marker is not None else b"")
        for bin_marker, bin_code in _BIN_FORMS:
            kb = key + bytes((bin_marker,))
            st = struct.Struct(f">I{len(pm)}s{id_code}{len(kb)}s{bin_code}")
            tab.append((st.pack, pm, kb, st.size - 4))
    return tab


def _batch_encoder(cls: type[Message], spec: Spec) -> Callable[[Any], bytes]:
    """``to_frame`` of a page batch: the length prefix and every byte before the set in one
    ``struct.pack`` (from a table by the id's and the set's msgpack formats), then the set.
    A batch with no set or two (invalid: only an unchecked object has them) is encoded
    generically."""
    prefix = batch_prefix(cls.TYPE)
    names = [n for n, _k, _r in spec[1:]]
    tabs = {n: _batch_header_table(prefix, n) for n in names}

    # The table entry is (id format) * 3 + (bin format), written out inline below: this is
    # the hottest encode in the project.
    if names == ["pfns", "runs"]:
        tab_p, tab_r = tabs["pfns"], tabs["runs"]

        def to_frame_either(msg: Any) -> bytes:
            v = msg.pfns
            if v is None:
                v = msg.runs
                tab = tab_r
                if v is None:
                    return encode_frame(msg.to_wire())
            elif msg.runs is not None:
                return encode_frame(msg.to_wire())
            else:
                tab = tab_p
            i = msg.id
            n = len(v)
            pack, pm, kb, size = tab[(0 if i < 0x80 else 1 if i < 0x100 else 2 if i < 0x10000
                                      else 3 if i < 0x100000000 else 4) * 3
                                     + (0 if n < 0x100 else 1 if n < 0x10000 else 2)]
            size += n
            if size > MAX_FRAME:
                pack_frame_header(size)  # raises frame_too_large, as encode_frame does
            return pack(size, pm, i, kb, n) + v  # type: ignore[no-any-return]

        return to_frame_either
    (name,) = names
    get, tab = attrgetter(name), tabs[name]

    def to_frame_one(msg: Any) -> bytes:
        v = get(msg)
        if v is None:
            return encode_frame(msg.to_wire())
        i = msg.id
        n = len(v)
        pack, pm, kb, size = tab[(0 if i < 0x80 else 1 if i < 0x100 else 2 if i < 0x10000
                                  else 3 if i < 0x100000000 else 4) * 3
                                 + (0 if n < 0x100 else 1 if n < 0x10000 else 2)]
        size += n
        if size > MAX_FRAME:
            pack_frame_header(size)  # raises frame_too_large, as encode_frame does
        return pack(size, pm, i, kb, n) + v  # type: ignore[no-any-return]

    return to_frame_one


#: What the batch parse needs of one class: (class, body prefix, its length, by the id's
#: first byte the header unpack and the bytes it spans, by set key (setter, length mask,
#: the other set's setter or None), the id's setter, whether ``_validate`` has rules).
BatchPlan = tuple[type, bytes, int, list[Any], list[int], dict[bytes, Any],
                  Callable[[Any, Any], None], bool]


def _batch_plan(cls: type[Message], spec: Spec,
                setters: dict[str, Callable[[Any, Any], None]], rule: bool) -> BatchPlan:
    prefix = batch_prefix(cls.TYPE)
    plen = len(prefix)
    # By the id's first byte: one unpack_from reading the prefix, the id, the set's key
    # (5 bytes: "pfns" and "runs" are both fixstr of 4) and its bin header read as bin16 —
    # a bin8 length is then the high byte, a bin32 one goes on for two more bytes — and
    # the bytes that spans. None where no uint starts with that byte.
    unpack: list[Callable[[bytes, int], tuple[Any, ...]] | None] = [None] * 256
    span = [0] * 256
    for marker, code in _UINT_FORMS:
        st = struct.Struct(f">{plen}s{'x' if marker is not None else ''}{code}5sBH")
        for h in ([marker] if marker is not None else range(0x80)):
            unpack[h] = st.unpack_from
            span[h] = st.size
    # Exactly one set is present, as the class's _ONE_OF demands when it has two.
    names = [n for n, _k, _r in spec[1:]]
    by_key = {
        msgpack.packb(n): (setters[n], 3 if _BATCH_SETS[n] is Kind.PFNS else 15,
                           next((setters[o] for o in names if o != n), None))
        for n in names
    }
    return (cls, prefix, plen, unpack, span, by_key, setters["id"], rule)


# --------------------------------------------------------------------------------------
# Receiving: frame body → message in one call
# --------------------------------------------------------------------------------------

_decoders: dict[int, tuple[Registry, Decoder]] = {}


def decoder_for(registry: Registry) -> Decoder:
    """``decode(buf, start=0, end=None) -> Message`` for one receiver: ``decode_frame``
    of ``buf[start:end]`` with its lookups done once (connections keep one, and feed it
    ``FrameBuffer.next_frame_span()`` so that the body is never sliced out).

    The page batches the receiver accepts are told apart by one byte of their prefix and
    parsed by their ``_fast_body``; every other frame, and any batch not in the canonical
    layout, goes through ``unpackb`` and the class's ``_from_map``, and failing that the
    generic path (``decode_payload`` + ``decode_message``), which names the error.
    """
    hit = _decoders.get(id(registry))
    if hit is not None and hit[0] is registry:
        return hit[1]
    table = {t: (cls._from_map, cls._WIRE_KEYS) for t, cls in registry.items() if t == cls.TYPE}

    def rest(buf: Any, start: int, end: int) -> Message:
        body: Any = None
        try:
            body = buf if start == 0 and end == len(buf) else buf[start:end]
            if len(body) <= MAX_STR:
                # unpackb's default limits are the body's own length, which for a body
                # this small is never looser than decode_payload's on complete data (a
                # string, bin, array or map cannot outgrow the bytes holding it): the same
                # maps decode, without seven keyword arguments per frame.
                d = _unpackb(body, strict_map_key=False, ext_hook=no_ext)
            else:
                d = _unpackb(body, raw=False, use_list=True, strict_map_key=False,
                             ext_hook=no_ext, max_str_len=MAX_STR, max_bin_len=MAX_FRAME,
                             max_array_len=MAX_ARRAY, max_map_len=MAX_MAP, max_ext_len=0)
            from_map, keys = table[d["t"]]
            # keys ⊆ {"t", fields}: every key is a string, as decode_payload demands
            if d.keys() <= keys:
                msg = from_map(d)
                if msg is not None:
                    return msg
        except Exception:  # whatever it was, the generic path names it
            pass
        if body is None:
            body = buf[start:end]
        return decode_message(registry, decode_payload(body))

    plans = {cls: _BATCH_PLANS[cls] for t, cls in registry.items()
             if t == cls.TYPE and cls in _BATCH_PLANS}
    decode = _decoder({p[1]: p for p in plans.values()}, rest)
    _decoders[id(registry)] = (registry, decode)
    return decode


def _no_fallback(body: Any, s: int, e: int) -> None:
    return None


def _decoder(plans: dict[bytes, BatchPlan], rest: Callable[[Any, int, int], Any]) -> Decoder:
    """``decode(body, s=0, e=None)``: the page batch in ``body[s:e]`` when it is one of
    ``plans`` (by body prefix) in the canonical layout, parsed here and copying only the
    set; anything else is ``rest(body, s, e)``. The decoders of ``decoder_for`` and the
    classes' ``_fast_body`` (whose ``rest`` gives None)."""
    # One byte position where the prefixes all differ selects the plan; the parse checks
    # the whole prefix itself.
    pos = next((k for k in range(min(map(len, plans), default=0))
                if len({p[k] for p in plans}) == len(plans)), None)
    if pos is None:
        def decode_rest(body: Any, s: int = 0, e: int | None = None) -> Any:
            return rest(body, s, len(body) if e is None else e)

        return decode_rest
    by_byte: list[BatchPlan | None] = [None] * 256
    for prefix, plan in plans.items():
        by_byte[prefix[pos]] = plan
    struct_error = struct.error

    def decode(body: Any, s: int = 0, e: int | None = None, _new: Any = _new) -> Any:
        if e is None:
            e = len(body)
        if e - s <= pos or type(body) is not bytes:
            return rest(body, s, e)
        plan = by_byte[body[s + pos]]
        if plan is None:
            return rest(body, s, e)
        cls, prefix, plen, unpack, span, by_key, put_id, rule = plan
        try:
            h = body[s + plen]
            f = unpack[h]
            if f is None:
                return rest(body, s, e)
            pre, id_, key, b, n = f(body, s)
            if pre != prefix:
                return rest(body, s, e)
            q = s + span[h]
            if b == 0xC5:
                pass
            elif b == 0xC4:
                n >>= 8
                q -= 1
            elif b == 0xC6:
                n = (n << 16) | (body[q] << 8) | body[q + 1]
                q += 2
            else:
                return rest(body, s, e)
            put, mask, put_other = by_key[key]  # KeyError: another key
            if q + n != e or n & mask:  # short or trailing bytes, a set of the wrong length
                return rest(body, s, e)
        except (IndexError, KeyError, struct_error):  # cut short, or another key
            return rest(body, s, e)
        msg = _new(cls)  # a local: bound as a default
        put_id(msg, id_)
        put(msg, body[q:e])
        if put_other is not None:
            put_other(msg, None)
        if rule:
            try:
                msg._validate()
            except LocalProtocolError:
                return rest(body, s, e)
        return msg

    return decode


def decode_frame(registry: Registry, body: bytes | memoryview) -> Message:
    """The message in one frame body, for one receiver.

    Same result, and same errors, as ``decode_message(registry, decode_payload(body))``.
    """
    return decoder_for(registry)(body)


# --------------------------------------------------------------------------------------
# The root of every message, and the decorator that declares one
# --------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True, slots=True)
class Message:
    """Base of all messages. Subclasses set ``TYPE`` and are declared with :func:`message`."""

    TYPE: ClassVar[str] = ""
    #: (field name, kind, required) per field, read from the annotations at class creation.
    SPEC: ClassVar[tuple[tuple[str, Kind, bool], ...]] = ()
    #: "t" and the field names: the keys a decoded map may hold for ``_from_map``.
    _WIRE_KEYS: ClassVar[frozenset[str]] = frozenset()
    #: The message from a decoded map whose values all pass their checks, else None.
    _from_map: ClassVar[Callable[[Mapping[str, Any]], Message | None]]
    #: Fields of which exactly one must be present (a cross-field rule the codec knows).
    _ONE_OF: ClassVar[tuple[str, ...]] = ()
    #: Page batches: the message parsed from its canonical frame body, else None.
    _fast_body: ClassVar[Callable[[bytes, int, int], Message | None] | None] = None

    def __post_init__(self) -> None:
        validate_fields(self)

    def _validate(self) -> None:
        """Cross-field rules; overridden where a message has them."""

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
        hand encoder that skips the intermediate map and copies a PFN set once.
        """
        return encode_frame(self.to_wire())

    @classmethod
    def from_wire(cls, d: Mapping[str, Any]) -> Message:
        if cls.TYPE:
            msg = cls._from_map(d)
            if msg is not None:
                return msg
        kwargs = {}
        for name, _kind, required in cls.SPEC:
            if name in d:
                kwargs[name] = d[name]
            elif required:
                raise bad_field(cls.TYPE, name, "missing")
        return cls(**kwargs)


_M = TypeVar("_M", bound=Message)


@dataclass_transform(frozen_default=True, kw_only_default=True)
def message(cls: type[_M]) -> type[_M]:
    """Declare a message class: a frozen, keyword-only, slotted dataclass whose codec
    :func:`prepare` installs from its annotations."""
    new = dataclass(frozen=True, kw_only=True, slots=True)(cls)
    prepare(new)
    return new
