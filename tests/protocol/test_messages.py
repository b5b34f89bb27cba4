"""Messages and framing: round trips, h11-style ``tr()`` feeding, fuzz invariants.

The fuzz invariant is h11's: any bytes either parse into frames/messages or raise the
protocol error (``LocalProtocolError`` from the codec, ``RemoteProtocolError`` from
``next_event``) — never any other exception.
"""

from __future__ import annotations

import random
import struct

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocol import messages as m
from protocol.balloon import BalloonDevice, BalloonDriver
from protocol.connection import (
    CLOSED,
    NEED_DATA,
    ControlClient,
    ControlServer,
    KernelClient,
    KernelServer,
    MachineGuest,
    MachineHost,
    State,
)
from protocol.errors import ErrorCode, LocalProtocolError, ProtocolError, RemoteProtocolError
from protocol.features import MAX_FRAME, Feature
from protocol.framing import HEADER_SIZE, FrameBuffer, decode_payload, encode_frame
from protocol.testing.strategies import (
    EXAMPLES,
    MSGPACK_VALUES,
    any_message,
    message_strategy,
)

SETTINGS = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])


def registry_for(msg: m.Message) -> m.Registry:
    return next(r for r in m.ALL_REGISTRIES.values() if msg.TYPE in r)


def read_frames(fb: FrameBuffer) -> list[bytes]:
    out = []
    while (body := fb.next_frame()) is not None:
        out.append(body)
    return out


# ------------------------------------------------------------------ round trips


@pytest.mark.parametrize("cls", list(m.ALL_MESSAGE_TYPES.values()), ids=lambda c: c.TYPE)
@SETTINGS
@given(data=st.data())
def test_every_message_round_trips(cls, data):
    msg = data.draw(message_strategy(cls))
    frame = encode_frame(msg.to_wire())
    (n,) = struct.unpack(">I", frame[:HEADER_SIZE])
    assert n == len(frame) - HEADER_SIZE
    fb = FrameBuffer()
    fb.feed(frame)
    [body] = read_frames(fb)
    back = m.decode_message(registry_for(msg), decode_payload(body))
    assert type(back) is cls
    assert back == msg
    # Optional fields that are absent stay absent on the wire.
    wire = msg.to_wire()
    assert all(v is not None for v in wire.values())
    assert wire["t"] == cls.TYPE


@SETTINGS
@given(any_message(), st.dictionaries(st.text(min_size=1, max_size=6).filter(lambda k: k != "t"),
                                      MSGPACK_VALUES, max_size=3))
def test_unknown_keys_are_ignored(msg, extra):
    wire = msg.to_wire()
    known = {name for name, _k, _r in type(msg).SPEC}
    wire.update({k: v for k, v in extra.items() if k not in known})
    assert m.decode_message(registry_for(msg), wire) == msg


@pytest.mark.parametrize("cls", [c for c in m.ALL_MESSAGE_TYPES.values()
                                 if any(req for _n, _k, req in c.SPEC)], ids=lambda c: c.TYPE)
def test_missing_required_field_is_bad_field(cls):
    msg = EXAMPLES[cls]
    wire = msg.to_wire()
    name = next(n for n, _k, req in cls.SPEC if req)
    del wire[name]
    with pytest.raises(LocalProtocolError) as ei:
        m.decode_message(registry_for(msg), wire)
    assert ei.value.code is ErrorCode.BAD_FIELD
    assert name in ei.value.message




@pytest.mark.parametrize("payload, code", [
    ({}, ErrorCode.BAD_FIELD),
    ({"t": 7}, ErrorCode.BAD_FIELD),
    ({"t": "nonsense"}, ErrorCode.UNKNOWN_TYPE),
    ({"t": "inflate", "id": 1}, ErrorCode.BAD_FIELD),  # neither pfns nor runs
    ({"t": "inflate", "id": 1, "pfns": b"", "runs": b""}, ErrorCode.BAD_FIELD),
    ({"t": "inflate", "id": -1, "pfns": b""}, ErrorCode.BAD_FIELD),
    ({"t": "inflate", "id": 1, "pfns": b"abc"}, ErrorCode.BAD_FIELD),
    ({"t": "inflate", "id": 1, "runs": b"x" * 8}, ErrorCode.BAD_FIELD),
    ({"t": "inflate", "id": True, "pfns": b""}, ErrorCode.BAD_FIELD),
    ({"t": "stats", "id": 1, "stats": {"a": 1}}, ErrorCode.BAD_FIELD),
    ({"t": "stats", "id": 1, "stats": {1: -1}}, ErrorCode.BAD_FIELD),
    ({"t": "hello", "version": 1, "features": 0, "page_size": 4096, "vm": 3},
     ErrorCode.BAD_FIELD),
])
def test_bad_payloads_name_the_problem(payload, code):
    with pytest.raises(LocalProtocolError) as ei:
        m.decode_message(m.BALLOON_TO_DEVICE, payload)
    assert ei.value.code is code
    assert ei.value.message


def test_codec_rejects_non_maps_trailing_bytes_and_ext():
    for body, code in [
        (msgpack.packb([1, 2]), ErrorCode.NOT_A_MAP),
        (msgpack.packb({"t": "bye"}) + b"\x00", ErrorCode.BAD_MSGPACK),
        (msgpack.packb({1: 2}), ErrorCode.BAD_MSGPACK),
        (msgpack.packb({"t": msgpack.ExtType(1, b"x")}), ErrorCode.BAD_MSGPACK),
        (b"\xc1", ErrorCode.BAD_MSGPACK),
        (b"\x81", ErrorCode.BAD_MSGPACK),  # truncated map
    ]:
        with pytest.raises(LocalProtocolError) as ei:
            decode_payload(body)
        assert ei.value.code is code, body


def test_encode_refuses_oversize_frames():
    with pytest.raises(LocalProtocolError) as ei:
        encode_frame({"t": "inflate", "id": 1, "pfns": b"\0" * MAX_FRAME})
    assert ei.value.code is ErrorCode.FRAME_TOO_LARGE


# ------------------------------------------------------------------ tr(): three ways


def tr(data: bytes, expected: list[bytes]) -> None:
    """Feed a FrameBuffer all at once, byte by byte, and with trailing bytes."""
    fb = FrameBuffer()
    fb.feed(data)
    assert read_frames(fb) == expected
    assert fb.at_frame_boundary() and len(fb) == 0

    fb = FrameBuffer()
    got: list[bytes] = []
    for i in range(len(data)):
        fb.feed(data[i:i + 1])
        got += read_frames(fb)
    assert got == expected
    assert fb.at_frame_boundary()

    # Trailing bytes: the start of another frame must be left intact for the next read.
    nxt = encode_frame({"t": "bye", "reason": "trailing"})
    for cut in range(1, len(nxt)):
        fb = FrameBuffer()
        fb.feed(data + nxt[:cut])
        assert read_frames(fb) == expected
        assert len(fb) == cut and not fb.at_frame_boundary()
        fb.feed(nxt[cut:])
        assert read_frames(fb) == [nxt[HEADER_SIZE:]]


@SETTINGS
@given(st.lists(any_message(), min_size=1, max_size=4))
def test_framebuffer_three_ways(msgs):
    frames = [encode_frame(x.to_wire()) for x in msgs]
    tr(b"".join(frames), [f[HEADER_SIZE:] for f in frames])


def _conn_tr(make, frames: list[bytes], expect_types: list[str], prep=None) -> None:
    """The same three ways at the Connection level (bytes → message events)."""
    data = b"".join(frames)

    def events(conn) -> list[str]:
        out = []
        while (ev := conn.next_event()) is not NEED_DATA:
            out.append(ev.TYPE)
        return out

    for mode in ("all", "bytes", "trailing"):
        conn = make()
        if prep:
            prep(conn)
        if mode == "all":
            conn.receive_data(data)
            got = events(conn)
        elif mode == "bytes":
            got = []
            for i in range(len(data)):
                conn.receive_data(data[i:i + 1])
                got += events(conn)
        else:
            tail = encode_frame(m.Bye(reason="later").to_wire())
            conn.receive_data(data + tail[:5])
            got = events(conn)
            conn.receive_data(tail[5:])
            assert events(conn) == ["bye"]
            assert conn.state is State.CLOSED
        assert got == expect_types, mode


def test_connection_readers_three_ways():
    calls = [m.Call(id=i, method="host_info", params={"k": i}) for i in range(1, 4)]
    _conn_tr(ControlServer, [encode_frame(c.to_wire()) for c in calls], ["call"] * 3)

    reqs = [m.BalloonAlloc(id=1, count=8, max_order=3), m.Meminfo(id=2),
            m.BalloonFree(id=3, runs=b"\1" + b"\0" * 7 + b"\2" + b"\0" * 7)]
    _conn_tr(KernelServer, [encode_frame(r.to_wire()) for r in reqs],
             ["balloon_alloc", "meminfo", "balloon_free"])

    def device():
        return BalloonDevice(vm="v", guest_pages=64)

    hello = m.Hello(version=1, features=Feature.STATS_VQ.mask, page_size=4096, vm="v")
    seq = [hello, m.Stats(id=1, stats={4: 1 << 40}), m.Actual(actual=3)]
    _conn_tr(device, [encode_frame(x.to_wire()) for x in seq], ["hello", "stats", "actual"])


# ------------------------------------------------------------------ fuzz


def _fresh_connections() -> list:
    """One connection of every kind, in its initial state and (balloon) after handshake."""
    conns = [MachineGuest(), MachineHost(), KernelServer(), KernelClient(), ControlServer(),
             ControlClient(), BalloonDevice(vm="v", guest_pages=64),
             BalloonDriver(vm="v", features=Feature.RANGES.mask)]
    dev = BalloonDevice(vm="v", guest_pages=64)
    drv = BalloonDriver(vm="v", features=(1 << 64) - 1)
    dev.receive_data(drv.hello())
    dev.next_event()
    drv.receive_data(dev.data_to_send())
    drv.next_event()
    guest = MachineGuest()
    guest.send(m.Boot(vm="v", version=1))
    waiting = BalloonDriver(vm="v", features=(1 << 64) - 1)
    waiting.hello()  # HANDSHAKE: a welcome is what it waits for
    return [*conns, dev, drv, guest, waiting]


def feed_all(conn, data: bytes, eof: bool = False) -> None:
    """Feed bytes and drain events; only protocol errors may escape."""
    conn.receive_data(data)
    if eof:
        conn.receive_data(b"")
    for _ in range(10_000):
        try:
            ev = conn.next_event()
        except RemoteProtocolError as err:
            assert conn.state is State.ERROR
            assert isinstance(err.code, (ErrorCode, str)) and err.message
            return
        if ev is NEED_DATA or ev is CLOSED:
            return
        if isinstance(conn, BalloonDevice) and conn.in_progress is not None:
            conn.complete(conn.in_progress.id)
    raise AssertionError("next_event never ran out of events")


def fuzz_one(data: bytes) -> None:
    fb = FrameBuffer()
    fb.feed(data)
    try:
        while (body := fb.next_frame()) is not None:
            try:
                payload = decode_payload(body)
                for reg in m.ALL_REGISTRIES.values():
                    try:
                        m.decode_message(reg, payload)
                    except LocalProtocolError:
                        pass
            except LocalProtocolError:
                pass
    except LocalProtocolError as err:
        assert err.code in (ErrorCode.BAD_FRAME, ErrorCode.FRAME_TOO_LARGE)
    for conn in _fresh_connections():
        feed_all(conn, data, eof=len(data) % 2 == 0)


@settings(SETTINGS, max_examples=300)
@given(st.binary(max_size=300))
def test_fuzz_arbitrary_bytes(data):
    fuzz_one(data)


# Structured garbage: a real type name with fields of random msgpack values.
_garbage_maps = st.builds(
    lambda t, fields: {"t": t, **fields},
    st.sampled_from(sorted(m.ALL_MESSAGE_TYPES)),
    st.dictionaries(st.sampled_from(["id", "pfns", "runs", "ok", "code", "message", "stats",
                                     "version", "features", "page_size", "vm", "num_pages",
                                     "actual", "pages", "count", "max_order", "params",
                                     "event", "value", "method", "reason", "guest_pages"]),
                    MSGPACK_VALUES, max_size=6),
)


@settings(SETTINGS, max_examples=300)
@given(st.lists(_garbage_maps, min_size=1, max_size=4))
def test_fuzz_structured_garbage(maps):
    data = b"".join(struct.pack(">I", len(b)) + b
                    for b in (msgpack.packb(x, use_bin_type=True) for x in maps))
    fuzz_one(data)


def test_fuzz_seeded_mutations():
    """At least 10,000 inputs: valid frame streams with bytes flipped, cut, spliced."""
    rng = random.Random(0xBA110)
    corpus_msgs = [
        m.Hello(version=1, features=(1 << 41) - 1, page_size=4096, vm="v"),
        m.Inflate(id=1, pfns=bytes(range(16))), m.Deflate(id=2, runs=b"\x01" + b"\0" * 15),
        m.Inflate(id=3, runs=(5).to_bytes(8, "little") + (3).to_bytes(8, "little")),
        m.Report(id=4, runs=(9).to_bytes(8, "little") + (2).to_bytes(8, "little")),
        m.Stats(id=5, stats={0: 1, 261: 7}), m.Actual(actual=4), m.Welcome(
            version=1, features=3, num_pages=4, actual=0, stats_interval_ms=10, guest_pages=64),
        m.Config(num_pages=9), m.StatsRequest(), m.Ack(id=1, ok=True),
        m.Ack(id=2, ok=False, code="not_ballooned", message="x"), m.Boot(vm="v", version=1),
        m.BootOk(pages=64, page_size=4096), m.EptFault(id=1, pfns=b"\1\0\0\0"),
        m.Resume(id=1), m.Shootdown(id=9), m.ShootdownAck(id=9), m.Halt(reason="r"),
        m.BalloonAlloc(id=1, count=4, max_order=2), m.Pages(id=1, runs=b"\0" * 16),
        m.OomNotify(id=3, pages=5), m.Call(id=1, method="x", params={"a": [1]}),
        m.Result(id=1, value={"x": 1.5}), m.Event(id=1, event={"kind": "policy"}),
        m.Error(code="bad_field", message="m"), m.Bye(reason="done"),
    ]
    frames = [encode_frame(x.to_wire()) for x in corpus_msgs]
    n_inputs = 0
    for _ in range(10_000):
        stream = bytearray(b"".join(rng.choice(frames) for _ in range(rng.randint(1, 3))))
        op = rng.random()
        if op < 0.5:
            for _ in range(rng.randint(1, 4)):
                stream[rng.randrange(len(stream))] = rng.randrange(256)
        elif op < 0.7:
            del stream[rng.randrange(len(stream)):]
        elif op < 0.85:
            i = rng.randrange(len(stream))
            stream[i:i] = rng.randbytes(rng.randint(1, 8))
        else:
            stream = bytearray(rng.randbytes(rng.randint(0, 64)))
        fuzz_codec_and_device(bytes(stream), rng)
        n_inputs += 1
    assert n_inputs >= 10_000


def fuzz_codec_and_device(data: bytes, rng: random.Random) -> None:
    # The whole matrix of connections is exercised by the hypothesis tests; the seeded
    # loop rotates through them so that 10k inputs stay fast.
    conns = _fresh_connections()
    feed_all(conns[rng.randrange(len(conns))], data, eof=rng.random() < 0.5)
    fb = FrameBuffer()
    fb.feed(data)
    try:
        while (body := fb.next_frame()) is not None:
            try:
                decode_payload(body)
            except LocalProtocolError:
                pass
    except ProtocolError:
        pass


def test_oversize_length_prefix_is_refused_without_buffering():
    for conn in _fresh_connections():
        conn.receive_data(struct.pack(">I", MAX_FRAME + 1))
        with pytest.raises(RemoteProtocolError) as ei:
            conn.next_event()
        assert ei.value.code is ErrorCode.FRAME_TOO_LARGE
        assert len(conn._frames) == HEADER_SIZE  # only the header was ever held
        assert conn.state is State.ERROR
        out = conn.data_to_send()
        if out:  # the error frame says why
            body = FrameBuffer()
            body.feed(out)
            assert decode_payload(body.next_frame())["code"] == "frame_too_large"
    fb = FrameBuffer()
    fb.feed(struct.pack(">I", 0xFFFFFFFF) + b"x" * 10)
    with pytest.raises(LocalProtocolError) as ei:
        fb.next_frame()
    assert ei.value.code is ErrorCode.FRAME_TOO_LARGE and ei.value.fields["length"] == 0xFFFFFFFF
    assert len(fb) == HEADER_SIZE + 10


def test_welcome_with_absurd_guest_pages_is_a_protocol_error():
    drv = BalloonDriver(vm="v", features=3)
    drv.hello()
    welcome = m.Welcome(version=1, features=3, num_pages=0, actual=0, stats_interval_ms=1,
                        guest_pages=(1 << 64) - 1)
    drv.receive_data(encode_frame(welcome.to_wire()))
    with pytest.raises(RemoteProtocolError) as ei:
        drv.next_event()
    assert ei.value.code is ErrorCode.BAD_FIELD and "guest_pages" in ei.value.message


def test_zero_length_frame_and_eof_mid_frame():
    conn = ControlServer()
    conn.receive_data(b"\0\0\0\0")
    with pytest.raises(RemoteProtocolError) as ei:
        conn.next_event()
    assert ei.value.code is ErrorCode.BAD_FRAME
    conn = ControlServer()
    frame = encode_frame(m.Call(id=1, method="x").to_wire())
    conn.receive_data(frame[:-1])
    assert conn.next_event() is NEED_DATA
    conn.receive_data(b"")
    with pytest.raises(RemoteProtocolError) as ei:
        conn.next_event()
    assert ei.value.code is ErrorCode.BAD_FRAME
    # A clean EOF at a frame boundary is CLOSED, not an error.
    conn = ControlServer()
    conn.receive_data(frame)
    conn.receive_data(b"")
    assert conn.next_event().TYPE == "call"
    assert conn.next_event() is CLOSED


@SETTINGS
@given(st.lists(any_message(), min_size=1, max_size=5), st.data())
def test_framebuffer_arbitrary_chunking(msgs, data):
    """Any split of the stream, fed as bytes, bytearray or memoryview, gives the frames."""
    frames = [encode_frame(x.to_wire()) for x in msgs]
    stream = b"".join(frames)
    cuts = sorted(data.draw(st.sets(st.integers(1, len(stream) - 1), max_size=8)))
    fb = FrameBuffer()
    got: list[bytes] = []
    for a, b in zip([0, *cuts], [*cuts, len(stream)]):
        wrap = data.draw(st.sampled_from([bytes, bytearray, memoryview]))
        fb.feed(wrap(stream[a:b]))
        got += read_frames(fb)
    assert got == [f[HEADER_SIZE:] for f in frames]
    assert all(type(g) is bytes for g in got)
    assert fb.at_frame_boundary() and len(fb) == 0
