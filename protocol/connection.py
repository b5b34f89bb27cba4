"""Sans-IO connections: bytes in, events out, bytes to send — no sockets (h11's shape).

A :class:`Connection` is one end of one channel. Feed it what the socket gave you with
``receive_data(data)`` (``b""`` means EOF), then call ``next_event()`` until it returns
:data:`NEED_DATA`; it returns decoded :class:`~protocol.messages.Message` objects (or
:data:`CLOSED` after a clean EOF). ``send(msg)`` validates a message against the
connection's state and returns the bytes to write. Replies a state machine produces on
its own (an ``error`` before closing, a ``welcome``, an ``ack ok=false`` for a rejected
batch) accumulate in an outbox: write ``data_to_send()`` after every ``next_event()``.

Transitions are data: ``TRANSITIONS`` maps (state, message type) to the next state, for
messages received; any pair not in the table is a protocol error (``bad_state``) that moves
the connection to ``ERROR`` — so the table is total by construction and the tests pair
every state with every type to prove it. Subclasses hang behaviour on ``_on_<type>``
methods (e.g. the balloon device in :mod:`protocol.balloon`).

Request ids: each side numbers its own requests; a reply (``ack``, ``resume``, ``pages``
…) must answer an id the receiver has outstanding, else ``unknown_id``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any, ClassVar

from . import messages as m
from .errors import ErrorCode, LocalProtocolError, ProtocolError, RemoteProtocolError
from .framing import FrameBuffer


class _Sentinel:
    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


#: ``next_event()`` needs more bytes before it can return an event.
NEED_DATA: Any = _Sentinel("NEED_DATA")
#: The peer closed the connection cleanly (EOF at a frame boundary).
CLOSED: Any = _Sentinel("CLOSED")


class State(Enum):
    START = "start"  # before the handshake (channels that have one)
    HANDSHAKE = "handshake"  # we sent our hello/boot, waiting for the answer
    OPEN = "open"
    CLOSED = "closed"  # bye sent or received, or clean EOF
    ERROR = "error"  # a protocol error happened; close the socket

    # Members are singletons: hash by identity (C) instead of Enum's Python-level
    # hash(name), since every received message looks up TRANSITIONS[(state, type)].
    __hash__ = object.__hash__


@dataclass(frozen=True)
class Role:
    """What one end of a channel receives and which of its messages are requests."""

    name: str
    receives: m.Registry
    #: message types we send that expect a reply carrying the same id
    requests: frozenset[str] = frozenset()
    #: message types we receive that answer one of our requests (consume the id)
    replies: frozenset[str] = frozenset()
    #: message types we receive that refer to an outstanding id without consuming it
    streamed: frozenset[str] = frozenset()
    #: the first state (START for channels with a handshake, else OPEN)
    initial: State = State.OPEN


def _open_table(role: Role) -> dict[tuple[State, str], State]:
    """Every received type is allowed while OPEN; bye/error close."""
    table = {(State.OPEN, t): State.OPEN for t in role.receives}
    for st in (State.OPEN, State.HANDSHAKE, State.START):
        table[(st, "bye")] = State.CLOSED
        table[(st, "error")] = State.CLOSED
    return table


class Connection:
    """One end of a channel. Subclasses set ``ROLE`` and may refine ``TRANSITIONS``."""

    ROLE: ClassVar[Role]
    TRANSITIONS: ClassVar[Mapping[tuple[State, str], State]] = {}

    #: ``_on_<type>`` / ``_send_<type>`` hooks by message type, collected once per class
    #: (a dict lookup per message instead of building a name and a getattr).
    _ON_HOOKS: ClassVar[dict[str, Any]] = {}
    _SEND_HOOKS: ClassVar[dict[str, Any]] = {}
    #: ``ROLE.requests`` / ``replies`` / ``streamed``, one attribute lookup away.
    _REQUESTS: ClassVar[frozenset[str]] = frozenset()
    _REPLIES: ClassVar[frozenset[str]] = frozenset()
    _STREAMED: ClassVar[frozenset[str]] = frozenset()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "TRANSITIONS" not in cls.__dict__ and "ROLE" in cls.__dict__:
            cls.TRANSITIONS = _open_table(cls.ROLE)
        if "ROLE" in cls.__dict__:
            cls._REQUESTS = cls.ROLE.requests
            cls._REPLIES = cls.ROLE.replies
            cls._STREAMED = cls.ROLE.streamed
        cls._ON_HOOKS = {name[4:]: getattr(cls, name) for name in dir(cls)
                         if name.startswith("_on_") and callable(getattr(cls, name))}
        cls._SEND_HOOKS = {name[6:]: getattr(cls, name) for name in dir(cls)
                           if name.startswith("_send_") and callable(getattr(cls, name))}

    def __init__(self) -> None:
        self._frames = FrameBuffer()
        self._decode = m.decoder_for(self.ROLE.receives)
        self._out = bytearray()
        self._eof = False
        self.state: State = self.ROLE.initial
        self._pending: dict[int, str] = {}
        self._next_id = 1
        #: The error that moved us to ERROR, if any.
        self.error: ProtocolError | None = None

    # ------------------------------------------------------------------ receiving

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Give the connection bytes read from the socket; ``b""`` signals EOF."""
        if not data:
            self._eof = True
        else:
            if self._eof:
                raise LocalProtocolError(ErrorCode.BAD_STATE, "data received after EOF")
            self._frames.feed(data)

    def next_event(self) -> m.Message | Any:
        """The next received message, :data:`NEED_DATA` or :data:`CLOSED`.

        Raises :class:`RemoteProtocolError` when the peer broke the protocol; the
        connection is then in ``ERROR`` and ``data_to_send()`` holds the ``error`` frame.
        """
        if self.state is State.ERROR:
            raise RemoteProtocolError(ErrorCode.BAD_STATE, "connection is in the error state")
        try:
            span = self._frames.next_frame_span()
            if span is None:
                if self._eof:
                    if not self._frames.at_frame_boundary():
                        raise LocalProtocolError(
                            ErrorCode.BAD_FRAME,
                            f"connection closed in the middle of a frame "
                            f"({len(self._frames)} bytes buffered)",
                        )
                    self.state = State.CLOSED
                    return CLOSED
                return NEED_DATA
            msg = self._decode(*span)
            return self._dispatch(msg)
        except LocalProtocolError as err:
            self._fail(err)
            raise RemoteProtocolError.from_local(err) from err

    def _dispatch(self, msg: m.Message) -> Any:
        t = msg.TYPE
        new_state = self.TRANSITIONS.get((self.state, t))
        if new_state is None:
            raise LocalProtocolError(
                ErrorCode.BAD_STATE,
                f"message {t!r} is not allowed in state {self.state.value!r}",
                state=self.state.value,
                type=t,
            )
        mid = getattr(msg, "id", None)
        replies = self._REPLIES
        if t in replies and not (t == "error" and mid is None):
            if mid not in self._pending:
                raise LocalProtocolError(
                    ErrorCode.UNKNOWN_ID,
                    f"{t!r} answers request id {mid}, which is not outstanding",
                    id=mid,
                )
        elif t in self._STREAMED and mid not in self._pending:
            raise LocalProtocolError(
                ErrorCode.UNKNOWN_ID, f"{t!r} refers to request id {mid}, not outstanding", id=mid
            )
        handler = self._ON_HOOKS.get(t)
        result = handler(self, msg) if handler is not None else msg
        if t in replies and mid in self._pending:
            del self._pending[mid]
        self.state = new_state
        return result

    def _fail(self, err: ProtocolError) -> None:
        """Queue an ``error`` frame (best effort) and move to ERROR."""
        self.error = err
        if self.state not in (State.CLOSED, State.ERROR):
            try:
                self._out += m.Error(code=str(err.code), message=err.message[:4096]).to_frame()
            except ProtocolError:  # pragma: no cover - error text always encodes
                pass
        self.state = State.ERROR

    # ------------------------------------------------------------------ sending

    def new_id(self) -> int:
        """A request id not outstanding on this connection."""
        i = self._next_id
        while i in self._pending:
            i += 1
        self._next_id = i + 1
        return i

    def send(self, msg: m.Message) -> bytes:
        """Validate ``msg`` against our state and return its frame bytes."""
        state = self.state
        if state is State.CLOSED or state is State.ERROR:
            raise LocalProtocolError(
                ErrorCode.BAD_STATE, f"cannot send {msg.TYPE!r}: connection is {state.value}"
            )
        t = msg.TYPE
        is_request = t in self._REQUESTS
        if is_request and msg.id in self._pending:  # type: ignore[attr-defined]
            raise LocalProtocolError(
                ErrorCode.DUPLICATE_ID,
                f"request id {msg.id} is still outstanding",  # type: ignore[attr-defined]
                id=msg.id,  # type: ignore[attr-defined]
            )
        frame = msg.to_frame()  # may refuse an oversize message: before hooks
        hook = self._SEND_HOOKS.get(t)
        if hook is not None:
            hook(self, msg)
        if is_request:
            self._pending[msg.id] = t  # type: ignore[attr-defined]
        if (t == "bye" or t == "error") and getattr(msg, "id", None) is None:
            self.state = State.CLOSED
        return frame

    def at_frame_boundary(self) -> bool:
        """True when no partial frame from the peer is buffered."""
        return self._frames.at_frame_boundary()

    def data_to_send(self) -> bytes:
        """Bytes the connection produced on its own (auto replies); drains the outbox."""
        if not self._out:
            return b""
        out = bytes(self._out)
        self._out.clear()
        return out

    def _queue(self, msg: m.Message) -> None:
        self._out += self.send(msg)

    @property
    def outstanding(self) -> dict[int, str]:
        """Our requests still waiting for a reply: id → message type."""
        return dict(self._pending)


# --------------------------------------------------------------------------------------
# Simple channels (no state beyond open/closed and request ids)
# --------------------------------------------------------------------------------------


class MachineGuest(Connection):
    """Guest kernel end of the machine channel: ``boot`` → ``boot_ok``, then faults."""

    ROLE = Role(
        "machine/guest",
        m.MACHINE_TO_GUEST,
        requests=frozenset({"ept_fault"}),
        replies=frozenset({"resume"}),
        initial=State.START,
    )
    TRANSITIONS: ClassVar[Mapping[tuple[State, str], State]] = {
        (State.HANDSHAKE, "boot_ok"): State.OPEN,
        (State.OPEN, "resume"): State.OPEN,
        (State.OPEN, "shootdown"): State.OPEN,
        (State.OPEN, "halt"): State.CLOSED,
        (State.HANDSHAKE, "halt"): State.CLOSED,
        **{(s, t): State.CLOSED for s in (State.START, State.HANDSHAKE, State.OPEN)
           for t in ("bye", "error")},
    }

    def _send_boot(self, msg: m.Boot) -> None:
        if self.state is not State.START:
            raise LocalProtocolError(ErrorCode.BAD_STATE, "boot is sent once, first")
        self.state = State.HANDSHAKE

    def _send_ept_fault(self, msg: m.EptFault) -> None:
        if self.state is not State.OPEN:
            raise LocalProtocolError(ErrorCode.BAD_STATE, "ept_fault before boot_ok")


class MachineHost(Connection):
    """Hypervisor end of the machine channel."""

    ROLE = Role(
        "machine/host",
        m.MACHINE_TO_HOST,
        requests=frozenset({"shootdown"}),
        replies=frozenset({"shootdown_ack"}),
        initial=State.START,
    )
    TRANSITIONS: ClassVar[Mapping[tuple[State, str], State]] = {
        (State.START, "boot"): State.HANDSHAKE,
        (State.OPEN, "ept_fault"): State.OPEN,
        (State.OPEN, "shootdown_ack"): State.OPEN,
        **{(s, t): State.CLOSED for s in (State.START, State.HANDSHAKE, State.OPEN)
           for t in ("bye", "error")},
    }

    def _send_boot_ok(self, msg: m.BootOk) -> None:
        if self.state is not State.HANDSHAKE:
            raise LocalProtocolError(ErrorCode.BAD_STATE, "boot_ok answers boot")
        self.state = State.OPEN

    def _send_shootdown(self, msg: m.Shootdown) -> None:
        if self.state is not State.OPEN:
            raise LocalProtocolError(ErrorCode.BAD_STATE, "shootdown before boot")


class KernelServer(Connection):
    """Guest kernel end of the kernel channel (serves the balloon driver)."""

    ROLE = Role(
        "kernel/kernel",
        m.KERNEL_TO_KERNEL,
        requests=frozenset({"oom_notify"}),
        replies=frozenset({"ack"}),
    )


class KernelClient(Connection):
    """Balloon driver end of the kernel channel."""

    ROLE = Role(
        "kernel/driver",
        m.KERNEL_TO_DRIVER,
        requests=frozenset(
            {"balloon_alloc", "balloon_free", "balloon_list", "meminfo", "report_isolate",
             "report_done"}
        ),
        replies=frozenset({"pages", "ack", "stats"}),
    )


class ControlServer(Connection):
    ROLE = Role("control/server", m.CONTROL_TO_SERVER)


class ControlClient(Connection):
    ROLE = Role(
        "control/client",
        m.CONTROL_TO_CLIENT,
        requests=frozenset({"call"}),
        replies=frozenset({"result", "error"}),
        streamed=frozenset({"event"}),
    )

    TRANSITIONS: ClassVar[Mapping[tuple[State, str], State]] = {
        (State.OPEN, "result"): State.OPEN,
        (State.OPEN, "event"): State.OPEN,
        (State.OPEN, "error"): State.CLOSED,  # an error with an id only fails that call
        (State.OPEN, "bye"): State.CLOSED,
    }

    def _dispatch(self, msg: m.Message) -> Any:
        # An error with an id is the failed reply to one call; without one it is fatal.
        result = super()._dispatch(msg)
        if msg.TYPE == "error" and getattr(msg, "id", None) is not None:
            self.state = State.OPEN
        return result
