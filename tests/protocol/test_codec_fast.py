"""The codec's fast paths against the generic ones they stand in for.

Every fast path must be indistinguishable from the generic path except in speed:

* ``msg.to_frame()`` (hand encoders) is byte for byte ``encode_frame(msg.to_wire())`` —
  i.e. ``msgpack.packb`` — for every message;
* ``__init__`` (the page batches' hand-written one included) and ``from_wire`` accept
  exactly what the plain SPEC loop accepts and raise the same error (code and text) for
  what it refuses, in the same order; the naive twins below are that plain code;
* ``decoder_for(registry)(body)`` / ``decode_frame`` give the same message, or the same
  error, as ``decode_message(registry, decode_payload(body))`` for any bytes.
"""

from __future__ import annotations

import struct
from dataclasses import fields
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocol import messages as m
from protocol.codec import bad_field, batch_prefix, check_field
from protocol.errors import ErrorCode, LocalProtocolError
from protocol.features import MAX_FRAME
from protocol.framing import (
    MAX_STR,
    decode_payload,
    encode_frame,
    pack_bin_header,
    pack_str,
    pack_uint,
)
from protocol.testing.strategies import MSGPACK_VALUES, any_message, message_strategy

SETTINGS = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])
CLASSES = list(m.ALL_MESSAGE_TYPES.values())


# ------------------------------------------------------------------ naive twins


def naive_construct(cls: type[m.Message], kwargs: dict[str, Any]) -> m.Message:
    """The original construction: dataclass fields set, then __post_init__'s SPEC loop."""
    names = {f.name for f in fields(cls)}
    required = {f.name for f in fields(cls) if f.default is not None}
    unknown = set(kwargs) - names
    if unknown or required - set(kwargs):
        raise TypeError("bad arguments")
    t = cls.TYPE
    for name, kind, req in cls.SPEC:
        v = kwargs.get(name)
        if v is None:
            if req:
                raise bad_field(t, name, "missing")
            continue
        check_field(t, name, kind, v)
    if cls in (m.Inflate, m.Deflate) and (kwargs.get("pfns") is None) == (
            kwargs.get("runs") is None):
        raise bad_field(t, "pfns", "exactly one of 'pfns' and 'runs' must be present")
    obj = object.__new__(cls)
    for name in names:
        object.__setattr__(obj, name, kwargs.get(name))
    cls._validate(obj)
    return obj


def naive_from_wire(cls: type[m.Message], d: dict[str, Any]) -> m.Message:
    kwargs = {}
    for name, _kind, required in cls.SPEC:
        if name in d:
            kwargs[name] = d[name]
        elif required:
            raise bad_field(cls.TYPE, name, "missing")
    return naive_construct(cls, kwargs)


def naive_decode(registry: m.Registry, body: bytes) -> m.Message:
    d = decode_payload(body)
    t = d.get("t")
    if t is None:
        raise LocalProtocolError(ErrorCode.BAD_FIELD, "message has no 't' (type) key", field="t")
    if type(t) is not str:
        raise LocalProtocolError(ErrorCode.BAD_FIELD, f"message type must be a string, got {t!r}")
    cls = registry.get(t)
    if cls is None:
        raise LocalProtocolError(
            ErrorCode.UNKNOWN_TYPE, f"unknown or unexpected message type {t!r} on this channel",
            type=t)
    return naive_from_wire(cls, d)


def outcome(fn, *args) -> tuple:
    """What a call did: ('ok', type, field values) or ('err', class, code, message)."""
    try:
        r = fn(*args)
    except LocalProtocolError as e:
        return ("err", LocalProtocolError, e.code, e.message, e.fields)
    except TypeError:
        return ("err", TypeError)
    return ("ok", type(r), tuple((f.name, getattr(r, f.name)) for f in fields(r)))


def registry_for(cls: type[m.Message]) -> m.Registry:
    return next(r for r in m.ALL_REGISTRIES.values() if cls.TYPE in r)


# ------------------------------------------------------------------ encoding


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.TYPE)
@SETTINGS
@given(data=st.data())
def test_to_frame_is_byte_for_byte_packb(cls, data):
    msg = data.draw(message_strategy(cls))
    assert msg.to_frame() == encode_frame(msg.to_wire())


_EDGE_INTS = [0, 1, 127, 128, 255, 256, 65535, 65536, 2**32 - 1, 2**32, 2**64 - 1]
_EDGE_LENS = [0, 1, 31, 32, 255, 256, 65535, 65536]


@given(st.one_of(st.sampled_from(_EDGE_INTS), st.integers(0, 2**64 - 1)))
def test_pack_uint_matches_packb(v):
    assert pack_uint(v) == msgpack.packb(v)


@pytest.mark.parametrize("n", _EDGE_LENS)
def test_pack_bin_header_and_str_match_packb(n):
    b = bytes(range(256)) * (n // 256) + bytes(range(n % 256))
    assert pack_bin_header(n) + b == msgpack.packb(b, use_bin_type=True)
    s = "x" * n
    assert pack_str(s) == msgpack.packb(s, use_bin_type=True)


@SETTINGS
@given(st.text(max_size=300))
def test_pack_str_matches_packb_for_any_text(s):
    assert pack_str(s) == msgpack.packb(s, use_bin_type=True)


@pytest.mark.parametrize("npages", [0, 1, 63, 64, 16383, 16384, 70000])
def test_batch_frames_at_bin_format_boundaries(npages):
    pfns = struct.pack(f"<{npages}I", *range(npages))
    for id_ in _EDGE_INTS:
        runs = pfns[: len(pfns) // 16 * 16]
        for msg in (m.Inflate(id=id_, pfns=pfns), m.Deflate(id=id_, runs=runs)):
            frame = msg.to_frame()
            assert frame == encode_frame(msg.to_wire())
            assert m.decode_frame(m.BALLOON_TO_DEVICE, frame[4:]) == msg
            if msg.pfns or msg.runs:  # every id and bin format takes the fast path (an empty set
                # in bin8 ends the frame before the 2-byte read: the generic path's job)
                assert type(msg)._fast_body(frame, 4, len(frame)) == msg


def test_strings_utf8_cannot_hold_fail_like_packb():
    msg = m.Ack(id=1, ok=False, code="\ud800")  # a lone surrogate: valid str, not UTF-8
    with pytest.raises(UnicodeEncodeError):
        encode_frame(msg.to_wire())
    with pytest.raises(UnicodeEncodeError):
        msg.to_frame()


def test_to_frame_refuses_oversize_like_encode_frame():
    msg = m.Inflate(id=1, pfns=b"\0" * MAX_FRAME)
    with pytest.raises(LocalProtocolError) as fast:
        msg.to_frame()
    with pytest.raises(LocalProtocolError) as slow:
        encode_frame(msg.to_wire())
    assert (fast.value.code, fast.value.message, fast.value.fields) == (
        slow.value.code, slow.value.message, slow.value.fields)
    assert fast.value.code is ErrorCode.FRAME_TOO_LARGE


# ------------------------------------------------------------------ construction


def _garbage_kwargs(cls: type[m.Message]) -> st.SearchStrategy[dict[str, Any]]:
    """Each field: absent, None, a valid value or any msgpack value."""
    valid = message_strategy(cls)
    return valid.flatmap(lambda msg: st.fixed_dictionaries({}, optional={
        f.name: st.one_of(st.just(getattr(msg, f.name)), st.none(), MSGPACK_VALUES,
                          st.integers(-2, 2**64 + 1), st.binary(max_size=9))
        for f in fields(cls)}))


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.TYPE)
@SETTINGS
@given(data=st.data())
def test_init_matches_naive_twin(cls, data):
    kwargs = data.draw(_garbage_kwargs(cls))
    assert outcome(lambda: cls(**kwargs)) == outcome(naive_construct, cls, kwargs)


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.TYPE)
@SETTINGS
@given(data=st.data())
def test_from_wire_matches_naive_twin(cls, data):
    d = data.draw(_garbage_kwargs(cls))
    assert outcome(cls.from_wire, d) == outcome(naive_from_wire, cls, d)


def test_cross_field_rules_still_apply_on_every_path():
    for kwargs in ({"id": 1}, {"id": 1, "pfns": b"", "runs": b""}):
        for fn in (lambda kw=kwargs: m.Inflate(**kw), lambda kw=kwargs: m.Inflate.from_wire(kw)):
            with pytest.raises(LocalProtocolError, match="exactly one of"):
                fn()
    with pytest.raises(LocalProtocolError, match="required when ok is false"):
        m.Ack(id=1, ok=False)
    with pytest.raises(LocalProtocolError, match="at least one page"):
        m.decode_frame(m.MACHINE_TO_HOST, msgpack.packb({"t": "ept_fault", "id": 1, "pfns": b""}))
    with pytest.raises(LocalProtocolError, match="exceeds 10"):
        m.BalloonAlloc(id=1, count=1, max_order=11)


# ------------------------------------------------------------------ decoding


@SETTINGS
@given(any_message())
def test_decode_frame_round_trips_every_message(msg):
    reg = registry_for(type(msg))
    body = msg.to_frame()[4:]
    assert m.decode_frame(reg, body) == msg
    assert outcome(m.decoder_for(reg), body) == outcome(naive_decode, reg, body)


_maps = st.builds(
    lambda t, fields: {"t": t, **fields},
    st.one_of(st.sampled_from(sorted(m.ALL_MESSAGE_TYPES)), MSGPACK_VALUES),
    st.dictionaries(st.one_of(st.sampled_from(
        ["id", "pfns", "runs", "ok", "code", "message", "stats", "version", "features",
         "page_size", "vm", "num_pages", "actual", "pages", "count", "max_order", "params",
         "event", "value", "method", "reason", "t"]),
        st.integers(-5, 5), st.binary(max_size=3), st.text(max_size=3)), MSGPACK_VALUES,
        max_size=5),
)


@settings(SETTINGS, max_examples=300)
@given(_maps, st.sampled_from(sorted(m.ALL_REGISTRIES)))
def test_decode_frame_matches_generic_path_on_garbage_maps(d, reg_name):
    reg = m.ALL_REGISTRIES[reg_name]
    body = msgpack.packb(d, use_bin_type=True)
    assert outcome(m.decode_frame, reg, body) == outcome(naive_decode, reg, body)


@settings(SETTINGS, max_examples=300)
@given(st.one_of(st.binary(max_size=64),
                 any_message().map(lambda x: x.to_frame()[4:]).flatmap(
                     lambda b: st.tuples(st.just(b), st.integers(0, len(b)), st.binary(max_size=3))
                     .map(lambda t: t[0][:t[1]] + t[2] + t[0][t[1] + len(t[2]):]))),
       st.sampled_from(sorted(m.ALL_REGISTRIES)))
def test_decode_frame_matches_generic_path_on_bytes(body, reg_name):
    reg = m.ALL_REGISTRIES[reg_name]
    assert outcome(m.decode_frame, reg, body) == outcome(naive_decode, reg, body)


def test_large_bodies_keep_the_strict_limits():
    """Above MAX_STR bytes the fast path uses decode_payload's own limits."""
    reg = m.CONTROL_TO_SERVER
    long_method = msgpack.packb({"t": "call", "id": 1, "method": "x" * (MAX_STR + 1)})
    assert len(long_method) > MAX_STR
    assert outcome(m.decode_frame, reg, long_method) == outcome(naive_decode, reg, long_method)
    assert outcome(m.decode_frame, reg, long_method)[2] is ErrorCode.BAD_MSGPACK
    big = m.Inflate(id=3, pfns=b"\1\0\0\0" * 20000)
    assert m.decode_frame(m.BALLOON_TO_DEVICE, big.to_frame()[4:]) == big
    # A body just under the limit (small-body options): decodes on both paths.
    ok = msgpack.packb({"t": "call", "id": 1, "method": "y" * (MAX_STR - 40)})
    assert len(ok) <= MAX_STR
    assert outcome(m.decode_frame, reg, ok) == outcome(naive_decode, reg, ok)
    assert outcome(m.decode_frame, reg, ok)[0] == "ok"


def test_ext_types_and_non_string_keys_are_refused_as_before():
    reg = m.BALLOON_TO_DEVICE
    for d in ({"t": "inflate", "id": msgpack.ExtType(1, b"x"), "pfns": b""},
              {"t": "inflate", "id": 1, "pfns": b"", 7: 1},
              {"t": "inflate", "id": 1, "pfns": b"", b"raw": 1}):
        body = msgpack.packb(d, use_bin_type=True)
        got = outcome(m.decode_frame, reg, body)
        assert got == outcome(naive_decode, reg, body)
        assert got[0] == "err" and got[2] is ErrorCode.BAD_MSGPACK


# ------------------------------------------------------------------ spans (no body copy)


@SETTINGS
@given(st.lists(any_message(), min_size=1, max_size=4), st.binary(max_size=6))
def test_span_decoding_in_a_shared_buffer(msgs, junk):
    """Several frames in one chunk: each body decodes in place, as the generic path does."""
    from protocol.framing import FrameBuffer

    stream = b"".join(x.to_frame() for x in msgs)
    fb = FrameBuffer()
    fb.feed(stream + junk[:3])  # a partial header after the frames stays buffered
    for msg in msgs:
        buf, start, end = fb.next_frame_span()
        reg = registry_for(type(msg))
        assert m.decoder_for(reg)(buf, start, end) == msg
        # the body, mangled in place with bytes of the neighbouring frames left around it
        mangled = bytearray(buf)
        for i, b in enumerate(junk):
            mangled[start + (i * 7) % (end - start)] = b
        mangled = bytes(mangled)
        got = outcome(m.decoder_for(reg), mangled, start, end)
        assert got == outcome(naive_decode, reg, mangled[start:end])
    assert fb.next_frame_span() is None


@SETTINGS
@given(st.sampled_from([c for c in CLASSES if c._fast_body is not None]), st.data())
def test_batch_fast_path_matches_generic_on_near_misses(cls, data):
    """Page batches with their canonical bytes cut, extended or retyped."""
    msg = data.draw(message_strategy(cls))
    body = msg.to_frame()[4:]
    i = data.draw(st.integers(0, len(body)))
    edit = data.draw(st.sampled_from(["cut", "extend", "flip"]))
    if edit == "cut":
        body = body[:i]
    elif edit == "extend":
        body = body + data.draw(st.binary(min_size=1, max_size=4))
    elif i < len(body):
        body = body[:i] + bytes([data.draw(st.integers(0, 255))]) + body[i + 1:]
    for reg in m.ALL_REGISTRIES.values():
        assert outcome(m.decode_frame, reg, body) == outcome(naive_decode, reg, body)
    # non-minimal uint encodings of the id decode like packb's own output would
    mid: int = msg.id  # type: ignore[attr-defined]
    for width, code in ((1, 0xCC), (2, 0xCD), (4, 0xCE), (8, 0xCF)):
        if mid < 1 << (8 * width):
            pre = batch_prefix(cls.TYPE)
            rest = msg.to_frame()[4 + len(pre) + len(pack_uint(mid)):]
            alt = pre + bytes([code]) + mid.to_bytes(width, "big") + rest
            reg = registry_for(cls)
            assert outcome(m.decode_frame, reg, alt) == outcome(naive_decode, reg, alt)
            assert m.decode_frame(reg, alt) == msg


# ------------------------------------------------------------------ declarations


def test_product_code_runs_no_source_strings():
    """No exec, eval or compile() of source text anywhere in the shipped packages."""
    import io
    import tokenize
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    offenders = []
    for pkg in ("protocol", "hypervisor", "guest", "balloonlab", "benchmarks"):
        for path in sorted((root / pkg).rglob("*.py")):
            toks = list(tokenize.generate_tokens(io.StringIO(path.read_text()).readline))
            for prev, tok, nxt in zip(toks, toks[1:], toks[2:]):
                if (tok.type == tokenize.NAME and tok.string in ("exec", "eval", "compile")
                        and nxt.string == "(" and prev.string != "."):
                    offenders.append(f"{path.relative_to(root)}:{tok.start[0]}")
    assert not offenders, offenders


def test_spec_is_read_from_the_annotations():
    """Each field is declared once: SPEC is exactly the dataclass fields, in order, with the
    kind its annotation carries and required == no default."""
    from dataclasses import MISSING

    for cls in CLASSES:
        flds = fields(cls)
        assert [n for n, _k, _r in cls.SPEC] == [f.name for f in flds], cls
        assert [r for _n, _k, r in cls.SPEC] == [f.default is MISSING for f in flds], cls
        assert all(isinstance(k, m.Kind) for _n, k, _r in cls.SPEC)
    assert m.Inflate.SPEC == (("id", m.Kind.U64, True), ("pfns", m.Kind.PFNS, False),
                              ("runs", m.Kind.RUNS, False))
    assert m.Welcome.SPEC[-1] == ("balloon_runs", m.Kind.RUNS, False)


def test_a_new_declaration_gets_the_whole_codec():
    """A class declared with ``@message`` validates, encodes byte for byte as packb and
    decodes through decoder_for with nothing but its annotations."""

    @m.message
    class Probe(m.Message):
        TYPE = "probe"
        id: m.U64
        name: m.Str | None = None
        flag: m.Bool | None = None

    assert Probe.SPEC == (("id", m.Kind.U64, True), ("name", m.Kind.STR, False),
                          ("flag", m.Kind.BOOL, False))
    reg = {"probe": Probe}
    for msg in (Probe(id=3), Probe(id=2**40, name="x" * 40, flag=False)):
        frame = msg.to_frame()
        assert frame == encode_frame(msg.to_wire())
        assert m.decoder_for(reg)(frame, 4, len(frame)) == msg
        assert Probe.from_wire(msg.to_wire()) == msg
    with pytest.raises(LocalProtocolError, match=r"probe\.id: expected uint64, got str"):
        Probe(id="1")  # type: ignore[arg-type]
    with pytest.raises(LocalProtocolError, match=r"probe\.name: expected string"):
        m.decode_frame(reg, msgpack.packb({"t": "probe", "id": 1, "name": 5}))


def test_declarations_without_a_kind_or_with_a_default_are_refused():
    with pytest.raises(TypeError, match="annotate the field with its wire kind"):
        @m.message
        class NoKind(m.Message):
            TYPE = "no_kind"
            id: int

    with pytest.raises(TypeError, match="defaults to None"):
        @m.message
        class Defaulted(m.Message):
            TYPE = "defaulted"
            id: m.U64 = 7


def test_page_batches_take_the_hand_written_paths():
    """The hot messages get the hand-written constructor, encoder and parser."""
    from protocol import codec

    for cls in (m.Inflate, m.Deflate, m.Report, m.Pages, m.BalloonFree, m.ReportDone):
        assert cls.__init__.__code__.co_filename == codec.__file__, cls
        assert cls.to_frame.__code__.co_name.startswith("to_frame_"), cls
        assert cls._fast_body is not None, cls
    assert m.Ack.to_frame.__code__.co_name == "to_frame"  # the declaration-driven encoder
    assert m.Stats._fast_body is None
