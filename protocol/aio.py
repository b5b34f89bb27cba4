"""The one asyncio adapter: an asyncio stream pair driven by a sans-IO connection.

Everything above this module is pure (bytes in, events out); this is where bytes meet a
socket. A :class:`Channel` reads in large chunks (a RANGES batch can be megabytes), hands
them to its connection, writes whatever the connection queued (auto replies, ``error``
before closing) and turns a clean EOF into :class:`PeerClosed`.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any, TypeVar

from .connection import CLOSED, NEED_DATA, Connection
from .errors import RemoteProtocolError
from .messages import Bye, Message

READ_CHUNK = 1 << 20

C = TypeVar("C", bound=Connection)


class PeerClosed(ConnectionError):
    """The peer closed the connection (cleanly, or by vanishing)."""


class Channel:
    """An asyncio stream plus the :class:`~protocol.connection.Connection` that parses it."""

    def __init__(self, conn: Connection, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter) -> None:
        self.conn = conn
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect_unix(cls, path: str | os.PathLike[str], conn: Connection) -> "Channel":
        reader, writer = await asyncio.open_unix_connection(os.fspath(path), limit=READ_CHUNK)
        return cls(conn, reader, writer)

    def flush(self) -> None:
        """Write what the connection queued on its own (auto replies)."""
        out = self.conn.data_to_send()
        if out and not self.writer.is_closing():
            self.writer.write(out)

    async def recv(self) -> Any:
        """The next message. Raises :class:`PeerClosed` at EOF and
        :class:`~protocol.errors.RemoteProtocolError` (after sending ``error`` and closing)
        when the peer breaks the protocol."""
        conn = self.conn
        while True:
            try:
                ev = conn.next_event()
            except RemoteProtocolError:
                self.flush()
                await self.close()
                raise
            self.flush()
            if ev is NEED_DATA:
                try:
                    data = await self.reader.read(READ_CHUNK)
                except (ConnectionError, OSError) as e:
                    raise PeerClosed(str(e)) from e
                conn.receive_data(data)
                continue
            if ev is CLOSED:
                raise PeerClosed("peer closed the connection")
            return ev

    def send_nowait(self, msg: Message) -> None:
        data = self.conn.send(msg)
        self.flush()
        self.writer.write(data)

    async def send(self, msg: Message, *, timeout: float | None = None) -> None:
        """Send one message and wait until the transport can take more."""
        self.send_nowait(msg)
        await self.drain(timeout=timeout)

    async def drain(self, *, timeout: float | None = None) -> None:
        self.flush()
        try:
            if timeout is None:
                await self.writer.drain()
            else:
                await asyncio.wait_for(self.writer.drain(), timeout)
        except (ConnectionError, OSError) as e:
            raise PeerClosed(str(e)) from e

    async def close(self, reason: str | None = None) -> None:
        """Say ``bye`` (when given a reason and still open) and close the transport."""
        if reason is not None:
            try:
                self.send_nowait(Bye(reason=reason))
            except Exception:  # noqa: BLE001 - closing anyway; the peer may be gone
                pass
        self.flush()
        if not self.writer.is_closing():
            self.writer.close()
        try:
            await asyncio.wait_for(self.writer.wait_closed(), 1.0)
        except (asyncio.TimeoutError, ConnectionError, OSError):
            pass
