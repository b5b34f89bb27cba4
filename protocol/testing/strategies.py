"""Hypothesis strategies for every protocol message, reusable by any implementation's tests.

``message_strategy(cls)`` draws valid instances of one message class (respecting its
cross-field rules: exactly one of ``pfns``/``runs``, ``ack`` failures carry a code, orders
bounded by MAX_ORDER …); ``any_message()`` draws from every type in ALL_MESSAGE_TYPES and
``channel_message(registry)`` from the types one receiver accepts. ``pfn_bytes`` and
``run_bytes`` draw PFN sets in their wire encodings (little-endian uint32 / uint64 pairs).
Sizes are kept small so that examples stay cheap; wire values span the full type ranges.
"""

from __future__ import annotations

from typing import Any

from hypothesis import strategies as st

from .. import messages as m

U64 = st.integers(0, m.U64_MAX)
U32 = st.integers(0, m.U32_MAX)
# Small ids and pfns are the interesting ones, but the full range must round trip too.
IDS = st.one_of(st.integers(0, 64), U64)
NAMES = st.text(max_size=24)


def pfn_bytes(*, max_pfn: int = m.U32_MAX, min_size: int = 0, max_size: int = 32,
              unique: bool = False) -> st.SearchStrategy[bytes]:
    """A ``pfns`` field: little-endian uint32 page numbers."""
    return st.lists(st.integers(0, max_pfn), min_size=min_size, max_size=max_size,
                    unique=unique).map(lambda ps: b"".join(p.to_bytes(4, "little") for p in ps))


def run_bytes(*, max_first: int = m.U64_MAX, max_count: int = m.U64_MAX, min_size: int = 0,
              max_size: int = 8) -> st.SearchStrategy[bytes]:
    """A ``runs`` field: little-endian uint64 (first pfn, page count) pairs."""
    pair = st.tuples(st.integers(0, max_first), st.integers(0, max_count))
    return st.lists(pair, min_size=min_size, max_size=max_size).map(
        lambda rs: b"".join(f.to_bytes(8, "little") + c.to_bytes(8, "little") for f, c in rs))


STATS_MAPS = st.dictionaries(st.integers(0, 0xFFFF), U64, max_size=8)

_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**63), m.U64_MAX),
    st.floats(allow_nan=False), st.text(max_size=12), st.binary(max_size=12),
)
#: Any msgpack value that survives a round trip unchanged (lists, not tuples; no NaN).
MSGPACK_VALUES = st.recursive(
    _scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4),
                            st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=12,
)
STR_MAPS = st.dictionaries(st.text(max_size=8), MSGPACK_VALUES, max_size=4)

_KIND: dict[m.Kind, st.SearchStrategy[Any]] = {
    m.Kind.U64: U64,
    m.Kind.U32: U32,
    m.Kind.STR: NAMES,
    m.Kind.BOOL: st.booleans(),
    m.Kind.PFNS: pfn_bytes(),
    m.Kind.RUNS: run_bytes(),
    m.Kind.STATS: STATS_MAPS,
    m.Kind.MAP: STR_MAPS,
    m.Kind.ANY: MSGPACK_VALUES,
}


def field_strategy(kind: m.Kind) -> st.SearchStrategy[Any]:
    return _KIND[kind]


def _generic(cls: type[m.Message], **override: st.SearchStrategy[Any]) -> st.SearchStrategy:
    kwargs: dict[str, st.SearchStrategy[Any]] = {}
    for name, kind, required in cls.SPEC:
        s = override.get(name, _KIND[kind] if name != "id" else IDS)
        kwargs[name] = s if required else st.one_of(st.none(), s)
    return st.builds(cls, **kwargs)


def _batch(cls: type[m.Message]) -> st.SearchStrategy:
    return st.one_of(
        st.builds(cls, id=IDS, pfns=pfn_bytes()),
        st.builds(cls, id=IDS, runs=run_bytes()),
    )


def _ack() -> st.SearchStrategy:
    ok = st.builds(m.Ack, id=IDS, ok=st.just(True), code=st.one_of(st.none(), NAMES),
                   message=st.one_of(st.none(), NAMES))
    failed = st.builds(m.Ack, id=IDS, ok=st.just(False), code=NAMES,
                       message=st.one_of(st.none(), NAMES))
    return st.one_of(ok, failed)


_ORDER = st.integers(0, m.MAX_ORDER)

_SPECIAL: dict[type[m.Message], st.SearchStrategy] = {
    m.Ack: _ack(),
    m.Inflate: _batch(m.Inflate),
    m.Deflate: _batch(m.Deflate),
    m.EptFault: st.builds(m.EptFault, id=IDS, pfns=pfn_bytes(min_size=1)),
    m.BalloonAlloc: _generic(m.BalloonAlloc, max_order=_ORDER),
    m.ReportIsolate: _generic(m.ReportIsolate, min_order=_ORDER),
}


_RUN_1_1 = (1).to_bytes(8, "little") * 2

#: One small valid instance of every message type (deterministic; for exhaustive tables).
EXAMPLES: dict[type[m.Message], m.Message] = {
    m.Ack: m.Ack(id=1, ok=True), m.Error: m.Error(code="internal", message="x"),
    m.Stats: m.Stats(id=1, stats={}), m.Pages: m.Pages(id=1, runs=b""),
    m.Hello: m.Hello(version=1, features=0, page_size=4096, vm="v"),
    m.Welcome: m.Welcome(version=1, features=0, num_pages=0, actual=0, stats_interval_ms=1),
    m.Config: m.Config(num_pages=1), m.Inflate: m.Inflate(id=1, pfns=b"\1\0\0\0"),
    m.Deflate: m.Deflate(id=1, pfns=b"\1\0\0\0"), m.Report: m.Report(id=1, runs=_RUN_1_1),
    m.Actual: m.Actual(actual=0), m.Boot: m.Boot(vm="v", version=1),
    m.BootOk: m.BootOk(pages=1, page_size=4096), m.EptFault: m.EptFault(id=1, pfns=b"\0" * 4),
    m.Resume: m.Resume(id=1), m.Shootdown: m.Shootdown(id=1),
    m.ShootdownAck: m.ShootdownAck(id=1),
    m.BalloonAlloc: m.BalloonAlloc(id=1, count=1, max_order=0),
    m.BalloonFree: m.BalloonFree(id=1, runs=b""), m.BalloonList: m.BalloonList(id=1),
    m.Meminfo: m.Meminfo(id=1), m.OomNotify: m.OomNotify(id=1, pages=1),
    m.ReportIsolate: m.ReportIsolate(id=1, min_order=0, max_runs=1),
    m.ReportDone: m.ReportDone(id=1, runs=b""), m.Call: m.Call(id=1, method="x"),
    m.Result: m.Result(id=1), m.Event: m.Event(id=1, event={}),
    m.Bye: m.Bye(reason="done"), m.StatsRequest: m.StatsRequest(), m.Halt: m.Halt(),
}


def message_strategy(cls: type[m.Message]) -> st.SearchStrategy[m.Message]:
    """Valid instances of one message class."""
    special = _SPECIAL.get(cls)
    return special if special is not None else _generic(cls)


def channel_message(registry: m.Registry) -> st.SearchStrategy[m.Message]:
    """Valid messages of any type the receiver with this registry accepts."""
    return st.one_of([message_strategy(c) for c in registry.values()])


def any_message() -> st.SearchStrategy[m.Message]:
    """Valid messages of every type in ALL_MESSAGE_TYPES."""
    return st.one_of([message_strategy(c) for c in m.ALL_MESSAGE_TYPES.values()])
