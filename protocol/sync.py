"""Blocking adapter: a connected socket driven by a sans-IO connection.

For short-lived clients (the CLI's control client) and for the one exchange that carries
file descriptors (``boot`` → ``boot_ok`` with memfds over SCM_RIGHTS).
"""

from __future__ import annotations

import socket
from collections.abc import Sequence
from typing import Any

from .connection import CLOSED, NEED_DATA, Connection
from .errors import PeerClosed, RemoteProtocolError
from .messages import Message

READ_CHUNK = 1 << 20


class SyncChannel:
    def __init__(self, sock: socket.socket, conn: Connection) -> None:
        self.sock = sock
        self.conn = conn
        self.fds: list[int] = []  # descriptors received and not yet taken
        #: A send that failed because the peer had closed (reported by ``recv``).
        self.send_error: OSError | None = None

    def _flush(self) -> None:
        out = self.conn.data_to_send()
        if out:
            try:
                self.sock.sendall(out)
            except OSError:
                pass

    def send(self, msg: Message, *, fds: Sequence[int] = ()) -> None:
        """Send one message. A peer that already closed the connection may have said why
        first (a server refusing a connection sends an ``error`` frame and closes): that
        failure is kept for :meth:`recv`, which returns what the peer sent and then raises
        :class:`PeerClosed` naming it."""
        data = self.conn.send(msg)
        self._flush()
        try:
            if fds:
                sent = socket.send_fds(self.sock, [data], list(fds))
                if sent < len(data):
                    self.sock.sendall(data[sent:])
            else:
                self.sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError) as e:
            self.send_error = e

    def recv(self, *, maxfds: int = 0) -> Any:
        """The next message (blocking; honours the socket's timeout). With ``maxfds``,
        descriptors that arrive are appended to ``self.fds``."""
        while True:
            try:
                ev = self.conn.next_event()
            except RemoteProtocolError:
                self._flush()
                raise
            self._flush()
            if ev is NEED_DATA:
                try:
                    if maxfds:
                        data, fds, _flags, _addr = socket.recv_fds(self.sock, READ_CHUNK,
                                                                   maxfds)
                        self.fds.extend(fds)
                    else:
                        data = self.sock.recv(READ_CHUNK)
                except ConnectionResetError:
                    # The peer closed with our last request unread (a refusal): everything
                    # it sent before has been read by now, so this is its end of stream.
                    data = b""
                self.conn.receive_data(data)
                continue
            if ev is CLOSED:
                why = f" ({self.send_error.strerror})" if self.send_error is not None else ""
                raise PeerClosed(f"peer closed the connection{why}")
            return ev

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass
