"""One error tree for every channel.

Code that detects a violation raises :class:`LocalProtocolError` (h11's convention: "you, or
the bytes you are parsing, broke the rules"). The single place that reads from a peer
(``Connection.next_event``) converts it to :class:`RemoteProtocolError`, so callers can tell
"the peer sent garbage" apart from "my own code tried to send something invalid".

Every error carries a machine-readable ``code`` (one of :class:`ErrorCode`, sent on the wire
in ``error`` and ``ack`` messages) and structured ``fields`` besides the human message.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any


class ErrorCode(StrEnum):
    """Codes carried by ``error`` messages and by ``ack`` with ``ok=false``."""

    # framing and decoding (connection-fatal)
    BAD_FRAME = "bad_frame"  # zero length, truncated at EOF
    FRAME_TOO_LARGE = "frame_too_large"  # length prefix above MAX_FRAME
    BAD_MSGPACK = "bad_msgpack"  # undecodable, ext types, trailing bytes, limits
    NOT_A_MAP = "not_a_map"
    UNKNOWN_TYPE = "unknown_type"
    BAD_FIELD = "bad_field"  # missing, ill-typed or out-of-range field
    BAD_STATE = "bad_state"  # message not allowed in the connection's current state
    VERSION = "version"
    PAGE_SIZE = "page_size"
    DUPLICATE_ID = "duplicate_id"  # a request id still in flight reused
    UNKNOWN_ID = "unknown_id"  # a reply for no outstanding request
    # batch validation (ack ok=false, connection stays up, nothing applied)
    FEATURE_NOT_NEGOTIATED = "feature_not_negotiated"
    PFN_OUT_OF_RANGE = "pfn_out_of_range"
    DUPLICATE_PFN = "duplicate_pfn"
    ALREADY_BALLOONED = "already_ballooned"
    NOT_BALLOONED = "not_ballooned"
    IN_FLIGHT = "in_flight"  # page already part of an unacknowledged request
    EMPTY_BATCH = "empty_batch"
    BATCH_TOO_LARGE = "batch_too_large"
    # guest kernel / driver
    OUT_OF_PUFF = "out_of_puff"
    NOT_IN_USE = "not_in_use"
    # control channel
    UNKNOWN_METHOD = "unknown_method"
    BAD_PARAMS = "bad_params"
    UNKNOWN_VM = "unknown_vm"
    UNAVAILABLE = "unavailable"
    # anything else
    INTERNAL = "internal"


class ProtocolError(Exception):
    """Base of every protocol error: ``code``, ``message`` and structured ``fields``."""

    def __init__(self, code: ErrorCode | str, message: str, **fields: Any) -> None:
        super().__init__(message)
        self.code = ErrorCode(code) if code in ErrorCode._value2member_map_ else code
        self.message = message
        self.fields = fields

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"

    def __repr__(self) -> str:
        extra = "".join(f", {k}={v!r}" for k, v in self.fields.items())
        return f"{type(self).__name__}({str(self.code)!r}, {self.message!r}{extra})"


class LocalProtocolError(ProtocolError):
    """Raised where a violation is detected (validation, our own invalid send)."""


class RemoteProtocolError(ProtocolError):
    """The peer violated the protocol; raised by ``next_event``."""

    @classmethod
    def from_local(cls, err: ProtocolError) -> RemoteProtocolError:
        new = cls(err.code, err.message, **err.fields)
        new.__cause__ = err
        return new


class PeerError(ProtocolError):
    """The peer sent an ``error`` message (or a failed ``ack``) that the caller awaited."""


class PeerClosed(ConnectionError):
    """The peer closed the connection (cleanly, or by vanishing): raised by the channels
    (:mod:`protocol.aio`, :mod:`protocol.sync`), not a protocol violation."""
