"""Transition tables are total (h2's test_state_machines style).

For every Connection subclass, every state and every message type in ALL_MESSAGE_TYPES,
feeding that message either yields an event and the transition the table names, or raises
RemoteProtocolError and leaves the connection in ERROR — never any other exception.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocol import messages as m
from protocol.balloon import BalloonDevice, BalloonDriver, BatchRejected, Completed
from protocol.connection import (
    Connection,
    ControlClient,
    ControlServer,
    KernelClient,
    KernelServer,
    MachineGuest,
    MachineHost,
    State,
)
from protocol.errors import ErrorCode, RemoteProtocolError
from protocol.features import DEVICE_FEATURES
from protocol.framing import encode_frame
from protocol.testing.strategies import EXAMPLES, message_strategy


def _device_negotiated() -> BalloonDevice:
    d = BalloonDevice(vm="v", guest_pages=64)
    d.features = DEVICE_FEATURES
    return d


def _driver_negotiated() -> BalloonDriver:
    d = BalloonDriver(vm="v", features=DEVICE_FEATURES)
    d.features = DEVICE_FEATURES
    return d


FACTORIES: dict[str, Callable[[], Connection]] = {
    "balloon_device": lambda: BalloonDevice(vm="v", guest_pages=64),
    "balloon_device_negotiated": _device_negotiated,
    "balloon_driver": lambda: BalloonDriver(vm="v", features=DEVICE_FEATURES),
    "balloon_driver_negotiated": _driver_negotiated,
    "machine_guest": MachineGuest,
    "machine_host": MachineHost,
    "kernel_server": KernelServer,
    "kernel_client": KernelClient,
    "control_server": ControlServer,
    "control_client": ControlClient,
}


def test_every_connection_class_is_covered():
    def subclasses(c):
        for s in c.__subclasses__():
            yield s
            yield from subclasses(s)
    covered = {type(f()) for f in FACTORIES.values()}
    project = {c for c in subclasses(Connection) if c.__module__.startswith("protocol.")}
    assert project <= covered, f"add factories for {project - covered}"


def test_examples_cover_every_message_type():
    assert set(EXAMPLES) == set(m.ALL_MESSAGE_TYPES.values())


def feed(conn: Connection, state: State, msg: m.Message) -> None:
    conn.state = state
    t = msg.TYPE
    conn.receive_data(encode_frame(msg.to_wire()))
    try:
        ev = conn.next_event()
    except RemoteProtocolError as err:
        assert conn.state is State.ERROR
        if state is State.ERROR:
            assert err.code is ErrorCode.BAD_STATE
        elif t not in conn.ROLE.receives:
            assert err.code is ErrorCode.UNKNOWN_TYPE
        elif (state, t) not in conn.TRANSITIONS:
            assert err.code is ErrorCode.BAD_STATE
        return
    # Accepted: only table entries are, and the connection took the named transition.
    assert state is not State.ERROR and t in conn.ROLE.receives
    assert (state, t) in conn.TRANSITIONS, f"{t} accepted in {state} without a table entry"
    want = conn.TRANSITIONS[(state, t)]
    if isinstance(conn, ControlClient) and t == "error" and getattr(msg, "id", None) is not None:
        want = State.OPEN  # a failed call, not a fatal error
    assert conn.state is want
    assert isinstance(ev, (m.Message, BatchRejected, Completed))
    if isinstance(ev, m.Message):
        assert ev == msg


@pytest.mark.parametrize("factory", FACTORIES, ids=str)
def test_table_total_exhaustive(factory):
    """Every state × every type, with one fixed valid instance of each type."""
    cells = 0
    for state in State:
        for cls in m.ALL_MESSAGE_TYPES.values():
            feed(FACTORIES[factory](), state, EXAMPLES[cls])
            cells += 1
    assert cells == len(State) * len(m.ALL_MESSAGE_TYPES)


@pytest.mark.parametrize("factory", FACTORIES, ids=str)
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), state=st.sampled_from(list(State)),
       cls=st.sampled_from(list(m.ALL_MESSAGE_TYPES.values())))
def test_table_total_random_fields(factory, data, state, cls):
    """The same with random field values (ids, pfn sets, versions, stats...)."""
    feed(FACTORIES[factory](), state, data.draw(message_strategy(cls)))
