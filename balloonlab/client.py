"""Blocking control client for ``control.sock`` (used by the CLI, dashboard and tests).

    with ControlClient.find("lab") as c:          # or ControlClient(run_dir_or_socket)
        c.call("set_balloon", vm="web", pages=1024)
        for ev in c.events(follow=True): ...

docs/client.md is the guide. ``call`` raises :class:`ControlError` (``code``, ``message``)
when the host refuses a call and :class:`HostNotRunning` when nothing listens on the socket.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from hypervisor.rundir import CONTROL_SOCK
from protocol import messages as m
from protocol.connection import ControlClient as ControlConnection
from protocol.errors import PeerClosed
from protocol.sync import SyncChannel


class ControlError(Exception):
    """The host answered a call with an error."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class HostNotRunning(ConnectionError):
    """No host listens on the control socket."""


class ControlClient:
    """One connection to a host's control socket."""

    def __init__(self, path: str | Path, timeout: float | None = 5.0) -> None:
        p = Path(path)
        if p.is_dir():
            p = p / CONTROL_SOCK
        self.path = p
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(str(p))
        except (FileNotFoundError, ConnectionRefusedError) as e:
            sock.close()
            raise HostNotRunning(f"no host is listening on {p} ({e.strerror}); "
                                 "start one with `balloonlab up`") from e
        except OSError:
            sock.close()
            raise
        self._ch = SyncChannel(sock, ControlConnection())

    @classmethod
    def find(cls, name: str | None = None, timeout: float | None = 5.0) -> ControlClient:
        """Connect to the running host called *name* (None: the only one running), found
        in the default run directories as the CLI's ``--host`` finds it.

        Raises ``hypervisor.rundir.NoHostFound`` (none, or several and no name given).
        """
        from hypervisor.rundir import find_host

        return cls(find_host(name), timeout=timeout)

    def call(self, method: str, **params: Any) -> Any:
        """Call ``method`` and return its value."""
        conn = self._ch.conn
        cid = conn.new_id()
        self._ch.send(m.Call(id=cid, method=method, params=params or None))
        while True:
            try:
                msg = self._ch.recv()
            except PeerClosed as e:
                raise HostNotRunning(f"the host closed the control connection ({e})") from e
            except TimeoutError as e:
                raise TimeoutError(f"no answer to {method!r} from {self.path}") from e
            if isinstance(msg, m.Result) and msg.id == cid:
                return msg.value
            if isinstance(msg, m.Error) and msg.id == cid:
                raise ControlError(msg.code, msg.message)
            if isinstance(msg, m.Error):
                raise ControlError(msg.code, msg.message)

    def call_many(self, calls: Sequence[tuple[str, dict[str, Any]]]) -> list[Any]:
        """Send every ``(method, params)`` of ``calls`` at once, then collect the answers:
        one round trip for all of them (e.g. a balloon target for each of many VMs, all
        set at the same moment). Returns the values in order; when any call failed, every
        answer is read first (the connection stays usable) and the first failure, in
        ``calls`` order, is raised as :class:`ControlError`."""
        conn = self._ch.conn
        ids = [conn.new_id() for _ in calls]
        for cid, (method, params) in zip(ids, calls):
            self._ch.send(m.Call(id=cid, method=method, params=params or None))
        answers: dict[int, Any] = {}
        while len(answers) < len(ids):
            try:
                msg = self._ch.recv()
            except PeerClosed as e:
                raise HostNotRunning(f"the host closed the control connection ({e})") from e
            except TimeoutError as e:
                raise TimeoutError(f"no answer to {len(ids) - len(answers)} of "
                                   f"{len(ids)} calls from {self.path}") from e
            if isinstance(msg, (m.Result, m.Error)) and msg.id in ids:
                answers[msg.id] = msg
            elif isinstance(msg, m.Error):
                raise ControlError(msg.code, msg.message)
        for cid in ids:
            a = answers[cid]
            if isinstance(a, m.Error):
                raise ControlError(a.code, a.message)
        return [answers[cid].value for cid in ids]

    def events(self, follow: bool = False) -> Iterator[dict[str, Any]]:
        """Past events; with ``follow``, then every new one as it happens (blocks)."""
        if not follow:
            yield from self.call("events")
            return
        cid = self._ch.conn.new_id()
        self._ch.send(m.Call(id=cid, method="events", params={"follow": True}))
        while True:
            try:
                msg = self._ch.recv()
            except PeerClosed:
                return
            if isinstance(msg, m.Event) and msg.id == cid:
                yield msg.event
            elif isinstance(msg, m.Error):
                raise ControlError(msg.code, msg.message)

    def settimeout(self, timeout: float | None) -> None:
        self._ch.sock.settimeout(timeout)

    def close(self) -> None:
        self._ch.close()

    def __enter__(self) -> ControlClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["ControlClient", "ControlError", "HostNotRunning"]
