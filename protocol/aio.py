"""The one asyncio adapter: an asyncio stream pair driven by a sans-IO connection.

Everything above this module is pure (bytes in, events out); this is where bytes meet a
socket. A :class:`Channel` reads in large chunks (a RANGES batch can be megabytes), hands
them to its connection, writes whatever the connection queued (auto replies, ``error``
before closing) and turns a clean EOF into :class:`PeerClosed`. A channel may bound how long
its peer stays silent (``idle_timeout``) and how long half a frame may sit unfinished
(``frame_timeout``); either ends the connection with :class:`PeerStalled`.

A :class:`Listener` is the one accept loop of every listening socket (the hypervisor's control,
machine and balloon sockets, the guest kernel's driver socket). It survives running out of
file descriptors, bounds its concurrent clients, and refuses with an ``error`` frame instead of
leaving a peer queued in the backlog.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from . import syscalls
from .connection import CLOSED, NEED_DATA, Connection
from .errors import ErrorCode, PeerClosed, RemoteProtocolError
from .framing import encode_frame
from .messages import Bye, Error, Message

READ_CHUNK = 1 << 20
#: Seconds a listener pauses accepting when it is out of descriptors and its reserved one is
#: gone too (another part of the process took it meanwhile): long enough not to spin on a
#: readable listening socket, short enough that a freed descriptor is used promptly.
ACCEPT_PAUSE = 0.1
#: A listener logs at most one refusal per this many seconds (the rest are counted).
REFUSAL_LOG_INTERVAL = 1.0

__all__ = ["ACCEPT_PAUSE", "READ_CHUNK", "REFUSAL_LOG_INTERVAL", "Channel", "Listener",
           "PeerClosed", "PeerStalled", "SocketHandler", "refusal_frame", "refuse",
           "stream_handler"]

log = logging.getLogger(__name__)

C = TypeVar("C", bound=Connection)


class PeerStalled(PeerClosed):
    """The peer stayed silent longer than the channel's idle timeout, or left half a frame
    unfinished longer than its frame timeout; the channel treats it as gone."""


class Channel:
    """An asyncio stream plus the :class:`~protocol.connection.Connection` that parses it."""

    def __init__(self, conn: Connection, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter, *, idle_timeout: float | None = None,
                 frame_timeout: float | None = None) -> None:
        self.conn = conn
        self.reader = reader
        self.writer = writer
        #: Seconds ``recv`` waits for a first byte from a silent peer (None: forever).
        self.idle_timeout = idle_timeout
        #: Seconds a started frame may stay unfinished (None: forever).
        self.frame_timeout = frame_timeout

    @classmethod
    async def connect_unix(cls, path: str | os.PathLike[str], conn: Connection) -> Channel:
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
                    data = await self._read()
                except PeerClosed:
                    raise
                except (ConnectionError, OSError) as e:
                    raise PeerClosed(str(e)) from e
                conn.receive_data(data)
                continue
            if ev is CLOSED:
                raise PeerClosed("peer closed the connection")
            return ev

    async def _read(self) -> bytes:
        """The next bytes from the peer, within the channel's timeouts.

        Each wait is measured from the last bytes received (a frame that keeps arriving is
        never cut off), and a timeout is only a stall when nothing arrived meanwhile: a
        process whose own loop was too busy to read (a loaded machine, a long vCPU quantum)
        finds the peer's bytes waiting and carries on."""
        if self.idle_timeout is None and self.frame_timeout is None:
            return await self.reader.read(READ_CHUNK)
        if self.frame_timeout is not None and not self.conn.at_frame_boundary():
            timeout: float | None = self.frame_timeout
            what = f"left half a frame unfinished for {self.frame_timeout:g} s"
        else:
            timeout = self.idle_timeout
            if timeout is None:
                return await self.reader.read(READ_CHUNK)
            what = f"sent nothing for {timeout:g} s"
        assert timeout is not None  # both branches above set it
        try:
            return await asyncio.wait_for(self.reader.read(READ_CHUNK), timeout)
        except TimeoutError:
            # Bytes (or EOF) that came in while the timer fired are still in the stream.
            if getattr(self.reader, "_buffer", b"") or self.reader.at_eof():
                return await self.reader.read(READ_CHUNK)
            raise PeerStalled(f"peer {what}") from None

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
            if timeout is None or not self.writer.transport.get_write_buffer_size():
                # Nothing left unsent: drain does not block, and wait_for would cost a trip
                # through the loop (a busy guest kernel yields once per round of quanta).
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
            except Exception:  # closing anyway; the peer may be gone
                pass
        self.flush()
        if not self.writer.is_closing():
            self.writer.close()
        try:
            await asyncio.wait_for(self.writer.wait_closed(), 1.0)
        except (TimeoutError, ConnectionError, OSError):
            pass


# ------------------------------------------------------------------------------ accepting

#: ``handler(sock)``: serve one accepted connection (a connected, non-blocking socket) to
#: its end; the handler owns the socket.
SocketHandler = Callable[[socket.socket], Awaitable[None]]


def refusal_frame(message: str) -> bytes:
    """The ``error`` frame (code ``unavailable``) a listener sends before closing a
    connection it cannot serve; every channel's peer understands it."""
    return encode_frame(Error(code=str(ErrorCode.UNAVAILABLE), message=message).to_wire())


def refuse(sock: socket.socket, message: str) -> None:
    """Send a refusal frame without blocking (best effort) and close ``sock``."""
    try:
        sock.setblocking(False)
        sock.send(refusal_frame(message))
    except OSError:
        pass
    sock.close()


def stream_handler(handler: Callable[[asyncio.StreamReader, asyncio.StreamWriter],
                                     Awaitable[None]]) -> SocketHandler:
    """A :data:`SocketHandler` that serves the socket as an asyncio stream pair."""

    async def serve(sock: socket.socket) -> None:
        try:
            reader, writer = await asyncio.open_unix_connection(sock=sock, limit=READ_CHUNK)
        except OSError:
            sock.close()
            return
        await handler(reader, writer)

    return serve


class Listener:
    """The accept loop of one listening Unix socket.

    - Out of descriptors (``EMFILE``/``ENFILE``, real or injected at ``point``): the listener
      closes the one descriptor it keeps in reserve, accepts the waiting peer with it, sends
      it an ``error`` frame (``unavailable``) and closes it, then takes its reserve back —
      so the peer learns why at once, and the backlog does not fill with peers nobody will
      serve. Other failures of ``accept`` pause it for :data:`ACCEPT_PAUSE`.
    - At most ``max_clients`` connections are served at once; one more is refused the same
      way. ``None``: no bound (a socket whose handler refuses extra peers itself).
    - ``on_refused(reason)`` is told of every refusal (the host turns it into an event).
    """

    def __init__(self, sock: socket.socket, handler: SocketHandler, *, name: str,
                 point: str | None = None, max_clients: int | None = None,
                 on_refused: Callable[[str], None] | None = None) -> None:
        sock.setblocking(False)
        self.sock = sock
        self.handler = handler
        self.name = name
        self.point = point
        self.max_clients = max_clients
        self.on_refused = on_refused
        self.clients: set[asyncio.Task[None]] = set()
        self.accepted = 0
        self.refused = 0
        self._reserve: int | None = _open_reserve()
        self._last_log = -REFUSAL_LOG_INTERVAL
        self._unlogged = 0
        self._task: asyncio.Task[None] | None = None

    @classmethod
    def bind(cls, path: str | os.PathLike[str], handler: SocketHandler, *, backlog: int = 64,
             **kw: Any) -> Listener:
        """Bind and listen on a Unix socket at ``path``; :meth:`start` begins accepting."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(os.fspath(path))
            sock.listen(backlog)
        except BaseException:
            sock.close()
            raise
        return cls(sock, handler, **kw)

    def start(self) -> Listener:
        self._task = asyncio.create_task(self._run(), name=f"{self.name}-accept")
        return self

    def close(self) -> None:
        """Stop accepting (connections being served run on, as with ``asyncio.Server``)."""
        if self._task is not None:
            self._task.cancel()
            self._task = None
        if self.sock.fileno() >= 0:
            # Unwatch before closing: the descriptor number may be reused at once, before
            # the cancelled accept loop gets to run its own clean-up.
            try:
                asyncio.get_running_loop().remove_reader(self.sock.fileno())
            except RuntimeError:
                pass  # no loop running: nothing watches the socket
            self.sock.close()
        if self._reserve is not None:
            os.close(self._reserve)
            self._reserve = None

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await _readable(loop, self.sock)
            while True:
                try:
                    if self.point is not None:
                        conn, _ = syscalls.accept(self.point, self.sock)
                    else:
                        conn, _ = self.sock.accept()
                except (BlockingIOError, InterruptedError):
                    break
                except OSError as e:
                    if not self._accept_failed(e):
                        await asyncio.sleep(ACCEPT_PAUSE)
                    break
                self._serve(conn)

    def _serve(self, conn: socket.socket) -> None:
        if self.max_clients is not None and len(self.clients) >= self.max_clients:
            why = (f"{self.name}: {self.max_clients} connections are being served already; "
                   "try again later")
            refuse(conn, why)
            self._refused(why)
            return
        conn.setblocking(False)
        self.accepted += 1
        task = asyncio.create_task(self._client(conn), name=f"{self.name}-client")
        self.clients.add(task)
        task.add_done_callback(self.clients.discard)

    async def _client(self, conn: socket.socket) -> None:
        try:
            await self.handler(conn)
        except asyncio.CancelledError:
            raise
        except Exception:  # one client's failure never stops the listener
            log.exception("%s: serving a connection failed", self.name)
            conn.close()

    def _accept_failed(self, err: OSError) -> bool:
        """Handle a failed ``accept``; False when the listener must pause."""
        if err.errno not in (errno.EMFILE, errno.ENFILE):
            self._refused(f"{self.name}: accept failed: {err}; pausing accepts")
            return False
        why = f"{self.name}: out of file descriptors ({errno.errorcode.get(err.errno, '?')})"
        if self._reserve is not None:
            os.close(self._reserve)
            self._reserve = None
        try:
            conn: socket.socket | None = self.sock.accept()[0]
        except BlockingIOError:
            conn = None
        except OSError:
            self._reserve = _open_reserve()
            self._refused(why + "; pausing accepts")
            return False
        if conn is not None:
            refuse(conn, why + "; try again later")
            self._refused(why + "; refused a connection")
        self._reserve = _open_reserve()
        return self._reserve is not None

    def _refused(self, why: str) -> None:
        """Count a refusal; log it and tell ``on_refused`` at most once per
        REFUSAL_LOG_INTERVAL (a flood of refusals must not flood the log and the events)."""
        self.refused += 1
        now = time.monotonic()
        if now - self._last_log < REFUSAL_LOG_INTERVAL:
            self._unlogged += 1
            return
        if self._unlogged:
            why += f" (and {self._unlogged} more refusals since the last report)"
        log.warning("%s", why)
        self._last_log = now
        self._unlogged = 0
        if self.on_refused is not None:
            self.on_refused(why)


def _open_reserve() -> int | None:
    try:
        return os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None


async def _readable(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> None:
    fut: asyncio.Future[None] = loop.create_future()

    def ready() -> None:
        if not fut.done():
            fut.set_result(None)

    fd = sock.fileno()
    loop.add_reader(fd, ready)
    try:
        await fut
    finally:
        loop.remove_reader(fd)
