"""Framing: a 4-byte big-endian length N (1 ≤ N ≤ 8 MiB), then N bytes holding
exactly one msgpack map with string keys.

:class:`FrameBuffer` is the receive side: ``feed(data)`` then ``next_frame()`` until it
returns ``None``. The length prefix is checked *before* any payload is buffered, so an
oversize announcement costs four bytes, not eight megabytes. :func:`decode_payload` unpacks
with strict limits (no ext types, bounded string/bin/array/map sizes, no trailing bytes).
``next_frame_span()`` is ``next_frame()`` without the body copy (what ``Connection`` uses).
``pack_uint`` / ``pack_bin_header`` / ``pack_str`` / ``pack_frame_header`` are msgpack's
encodings of single values, byte for byte packb's, for the hand ``to_frame`` encoders of
:mod:`protocol.codec`.
"""

from __future__ import annotations

import struct
from typing import Any

import msgpack

from .errors import ErrorCode, LocalProtocolError
from .features import MAX_FRAME

_LEN = struct.Struct(">I")
_unpack_len = _LEN.unpack_from
HEADER_SIZE = _LEN.size

# Limits on what one decoded payload may hold. Strings are names and messages; binaries
# are PFN sets (bounded by the frame); containers are small everywhere except the
# control channel's event lists.
MAX_STR = 64 * 1024
MAX_ARRAY = 1 << 20
MAX_MAP = 1 << 16


def no_ext(code: int, data: bytes) -> Any:
    raise LocalProtocolError(ErrorCode.BAD_MSGPACK, f"msgpack ext type {code} is not allowed")


def encode_frame(payload: dict[str, Any]) -> bytes:
    """Pack one map into a length-prefixed frame."""
    body: bytes = msgpack.packb(payload, use_bin_type=True)
    return pack_frame_header(len(body)) + body


# ------------------------------------------------------------------ hand encoding
#
# msgpack's encoding of the few value kinds the hot messages hold, byte for byte what
# ``msgpack.packb(..., use_bin_type=True)`` produces (smallest format for each value), so
# that a message can be framed with one copy of its PFN set instead of packb's two
# (into the packer's buffer, then out to a bytes object). tests/protocol checks the
# equality with hypothesis.

_FIXINT = [bytes((i,)) for i in range(128)]
_FIXSTR = [bytes((0xA0 | i,)) for i in range(32)]
_U8 = struct.Struct(">BB").pack
_U16 = struct.Struct(">BH").pack
_U32 = struct.Struct(">BI").pack
_U64 = struct.Struct(">BQ").pack


def pack_uint(v: int) -> bytes:
    """msgpack encoding of an int in 0..2**64-1 (positive fixint, uint8/16/32/64)."""
    if v < 128:
        return _FIXINT[v]
    if v < 0x100:
        return _U8(0xCC, v)
    if v < 0x10000:
        return _U16(0xCD, v)
    if v < 0x100000000:
        return _U32(0xCE, v)
    return _U64(0xCF, v)


def pack_bin_header(n: int) -> bytes:
    """msgpack header of a bin of ``n`` bytes (bin8/16/32)."""
    if n < 0x100:
        return _U8(0xC4, n)
    if n < 0x10000:
        return _U16(0xC5, n)
    return _U32(0xC6, n)


def pack_str(s: str) -> bytes:
    """msgpack encoding of a str (fixstr, str8/16/32 of its UTF-8 bytes).

    Raises ``UnicodeEncodeError`` for strings UTF-8 cannot hold (lone surrogates), as
    packb does; callers fall back to packb for the exact error.
    """
    b = s.encode("utf-8")
    n = len(b)
    if n < 32:
        return _FIXSTR[n] + b
    if n < 0x100:
        return _U8(0xD9, n) + b
    if n < 0x10000:
        return _U16(0xDA, n) + b
    return _U32(0xDB, n) + b


def pack_frame_header(body_len: int) -> bytes:
    """The 4-byte length prefix of a frame whose body is ``body_len`` bytes (checked)."""
    if body_len > MAX_FRAME:
        raise LocalProtocolError(
            ErrorCode.FRAME_TOO_LARGE,
            f"frame of {body_len} bytes exceeds the {MAX_FRAME}-byte limit; split the batch",
            length=body_len,
        )
    return _LEN.pack(body_len)


def decode_payload(body: bytes | memoryview) -> dict[str, Any]:
    """Unpack one frame body: exactly one map with string keys, nothing after it."""
    try:
        obj = msgpack.unpackb(
            body,
            raw=False,
            use_list=True,
            strict_map_key=False,  # nested stats maps use integer tags
            ext_hook=no_ext,
            max_str_len=MAX_STR,
            max_bin_len=MAX_FRAME,
            max_array_len=MAX_ARRAY,
            max_map_len=MAX_MAP,
            max_ext_len=0,
        )
    except LocalProtocolError:
        raise
    except msgpack.ExtraData as e:
        raise LocalProtocolError(
            ErrorCode.BAD_MSGPACK, "trailing bytes after the msgpack map in a frame"
        ) from e
    except (ValueError, TypeError, msgpack.UnpackException, RecursionError) as e:
        raise LocalProtocolError(ErrorCode.BAD_MSGPACK, f"undecodable msgpack: {e}") from e
    if not isinstance(obj, dict):
        raise LocalProtocolError(
            ErrorCode.NOT_A_MAP, f"a frame must hold a msgpack map, got {type(obj).__name__}"
        )
    for key in obj:
        if not isinstance(key, str):
            raise LocalProtocolError(
                ErrorCode.BAD_MSGPACK, f"message keys must be strings, got {key!r}"
            )
    return obj


class FrameBuffer:
    """Receive buffer that splits a byte stream into frame bodies.

    ``feed()`` appends bytes; ``next_frame()`` returns the next complete body, or ``None``
    when more bytes are needed. A bad length prefix raises :class:`LocalProtocolError`
    and leaves the buffer as it was (the caller closes the connection).
    """

    __slots__ = ("_buf", "_need", "_pos", "max_frame")

    def __init__(self, max_frame: int = MAX_FRAME) -> None:
        # bytes while it holds one fed chunk by reference (b"" when empty), else a bytearray
        self._buf: bytes | bytearray = bytearray()
        self._pos = 0
        self._need = -1  # body length once the header is read
        self.max_frame = max_frame

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        if type(data) is bytes and self._pos == len(self._buf):
            # Empty buffer (the common case: a read returns whole frames): hold the
            # immutable bytes by reference instead of copying them into the bytearray.
            if data:
                self._buf = data
                self._pos = 0
            return
        if not data:
            return
        buf = self._buf
        if isinstance(buf, bytearray):
            if self._pos and self._pos >= len(buf) // 2:
                del buf[: self._pos]
                self._pos = 0
        else:
            buf = self._buf = bytearray(memoryview(buf)[self._pos:])
            self._pos = 0
        buf += data

    def __len__(self) -> int:
        """Bytes buffered and not yet returned as frames (a parsed header counts)."""
        return len(self._buf) - self._pos + (HEADER_SIZE if self._need >= 0 else 0)

    def next_frame(self) -> bytes | None:
        """The next complete frame body (``bytes``), or ``None`` when more are needed."""
        span = self.next_frame_span()
        if span is None:
            return None
        buf, start, end = span
        return buf[start:end]  # one copy (none when the frame is the whole buffer)

    def next_frame_span(self) -> tuple[bytes, int, int] | None:
        """``next_frame()`` without its copy: ``(buf, start, end)``, the body being
        ``buf[start:end]`` of an immutable ``bytes`` — the fed chunk itself when the buffer
        holds one by reference (the common case), else a copy of just the body — or
        ``None``. ``Connection`` decodes from the span, so a PFN set is copied once."""
        buf = self._buf
        pos = self._pos
        need = self._need
        if need < 0:
            if len(buf) - pos < HEADER_SIZE:
                return None
            (need,) = _unpack_len(buf, pos)
            if not 0 < need <= self.max_frame:
                if need == 0:
                    raise LocalProtocolError(ErrorCode.BAD_FRAME, "zero-length frame")
                raise LocalProtocolError(
                    ErrorCode.FRAME_TOO_LARGE,
                    f"frame length {need} exceeds the {self.max_frame}-byte limit",
                    length=need,
                )
            pos += HEADER_SIZE
        else:
            self._need = -1
        end = pos + need
        n = len(buf)
        if end >= n:
            if end > n:
                self._pos = pos  # the header is parsed: remember the body length
                self._need = need
                return None
            self._buf = b""  # empty; the next feed holds its chunk by reference
            self._pos = 0
        else:
            self._pos = end
        if type(buf) is bytes:
            return buf, pos, end
        with memoryview(buf) as mv:  # one copy, and the export ends before any resize
            body = bytes(mv[pos:end])
        return body, 0, need

    def at_frame_boundary(self) -> bool:
        """True when no partial frame is buffered (EOF here is a clean close)."""
        return self._need < 0 and len(self._buf) == self._pos
