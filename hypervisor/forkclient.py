"""The host's end of the fork server (``guest.forkserver``): VM processes forked, not exec'd.

One :class:`ForkServer` per host. :meth:`ForkServer.spawn` asks the server (over a
``SOCK_SEQPACKET`` socket pair, the log descriptor passed with ``SCM_RIGHTS``) to fork a guest
kernel or balloon driver, and returns a :class:`ForkedProcess`: the same face as an
``asyncio.subprocess.Process`` (``pid``, ``returncode``, ``wait``, ``kill``, ``terminate``),
so the supervisor treats both alike. The forked process is the host's own child: the host is
a child subreaper (``PR_SET_CHILD_SUBREAPER``) and the server forks twice, so the process is
re-parented here before the server answers. The host reaps it through a pidfd, and the
lifeline of ``protocol.lifeline`` (PDEATHSIG, parent check) is the same as for an exec'd one.

The server itself is watched: when it exits the host emits ``forkserver_died`` and starts a
new one on the next spawn; a server that does not answer within ``REQUEST_TIMEOUT`` is
killed (``forkserver_hung``). Either way the spawn that met the failure raises
:class:`ForkServerUnavailable` and the supervisor starts that process with ``exec`` instead,
so a broken fork server costs memory and start time, never a VM. After
``MAX_CONSECUTIVE_FAILURES`` failed starts in a row the host stops trying
(``forkserver_disabled``) and exec's every process.

Units: seconds.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import ctypes
import ctypes.util
import json
import logging
import os
import signal
import socket
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

#: Seconds the server may take to import and load everything (a cold numba cache compiles
#: nothing there: the server loads only what the cache holds).
READY_TIMEOUT = 60.0
#: Seconds one fork request may take before the server counts as hung.
REQUEST_TIMEOUT = 10.0
#: Failed starts in a row after which the host exec's every VM process.
MAX_CONSECUTIVE_FAILURES = 3
#: linux/prctl.h
PR_SET_CHILD_SUBREAPER = 36
#: ``0`` in the environment of ``python -m hypervisor``: exec every VM process (as its
#: ``--no-fork-server``).
ENV_FORK_SERVER = "BALLOONLAB_FORK_SERVER"


def fork_server_enabled(environ: Mapping[str, str] | None = None) -> bool:
    """Whether a host started with this environment forks its VM processes."""
    env = os.environ if environ is None else environ
    return env.get(ENV_FORK_SERVER, "1") != "0"

Emit = Callable[..., Any]


class ForkServerUnavailable(Exception):
    """The fork server cannot fork this process now (the caller exec's it instead)."""


def set_child_subreaper() -> None:
    """Make this process the reaper of its orphaned descendants (Linux ≥ 3.4)."""
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, ctypes.c_ulong(1), 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl(PR_SET_CHILD_SUBREAPER): {os.strerror(err)}")


class ForkedProcess:
    """A VM process forked by the server and re-parented to this host: reaped through a
    pidfd watched by the event loop. ``returncode`` follows asyncio's convention (``-N``:
    killed by signal N)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None
        self._exited = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        try:
            self._pidfd: int | None = os.pidfd_open(pid)
        except OSError:
            # No descriptor to watch it by (EMFILE): it must not run untracked. It is our
            # unreaped child, so the pid is still its own.
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
            raise
        self._loop.add_reader(self._pidfd, self._on_exit)
        self._on_exit()  # it may be gone already

    def _on_exit(self) -> None:
        if self.returncode is not None:
            return
        try:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
        except ChildProcessError:
            # Not (or no longer) ours to reap: it exited and someone else reaped it.
            pid, status = self.pid, 255 << 8
        if pid == 0:
            return
        self.returncode = os.waitstatus_to_exitcode(status)
        self._close()
        self._exited.set()

    def _close(self) -> None:
        if self._pidfd is not None:
            self._loop.remove_reader(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = None

    async def wait(self) -> int:
        await self._exited.wait()
        assert self.returncode is not None
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.returncode is not None or self._pidfd is None:
            raise ProcessLookupError(self.pid)
        signal.pidfd_send_signal(self._pidfd, sig)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


class ForkServer:
    """Starts, uses, watches and replaces one ``guest.forkserver`` process."""

    def __init__(self, python: Sequence[str], log_path: Path, emit: Emit,
                 env: Callable[[], Mapping[str, str]]) -> None:
        self.python = list(python)
        self.run_dir = log_path.parent
        self.log_path = log_path
        self.emit = emit
        self._env = env
        #: The server process (from its exec on; ready once ``_ready`` is done).
        self.proc: asyncio.subprocess.Process | None = None
        #: Its pid once it said it is ready.
        self.pid: int | None = None
        self.sock: socket.socket | None = None
        self._ready: asyncio.Future[None] | None = None
        self._lock = asyncio.Lock()
        self._next_id = 0
        self.starts = 0
        self.failures = 0
        self.disabled = False
        self.closing = False
        #: Servers whose end was already reported (hung, or failed to start): their exit
        #: is not reported again as ``forkserver_died``.
        self._reported: set[int] = set()
        self._launching = False
        self._watch: asyncio.Future[None] | None = None

    # ------------------------------------------------------------------ life

    async def launch(self) -> None:
        """Exec a server (returns once the process exists; it gets ready in the background,
        while the host goes on starting). Errors are reported, counted and not raised: the
        next spawn tries again or exec's."""
        if self.proc is not None or self._launching or self.disabled or self.closing:
            return
        self._launching = True
        try:
            await self._exec()
        except OSError as e:
            self._failed(str(e))
        finally:
            self._launching = False

    async def _exec(self) -> None:
        from hypervisor import rundir

        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            logfd = rundir.open_log(self.log_path)
        except BaseException:
            ours.close()
            theirs.close()
            raise
        env = dict(self._env())
        # The server runs no injection point; the plans are the VM processes' (each request
        # carries its own environment).
        env.pop("BALLOONLAB_FAULTS", None)
        env.pop("BALLOONLAB_FAULT_COUNTS", None)
        try:
            proc = await asyncio.create_subprocess_exec(
                *self.python, "-m", "guest.forkserver", "--fd", str(theirs.fileno()),
                "--run-dir", str(self.run_dir),
                stdin=asyncio.subprocess.DEVNULL, stdout=logfd, stderr=logfd,
                start_new_session=True, env=env, pass_fds=(theirs.fileno(),))
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
            os.close(logfd)
        ours.setblocking(False)
        self.proc, self.sock = proc, ours
        self._ready = ready = asyncio.ensure_future(self._await_ready(proc))
        # Its failure is reported by _await_ready; the spawns waiting on it see it raise.
        ready.add_done_callback(lambda f: f.cancelled() or f.exception())
        self._watch = asyncio.ensure_future(self._watch_exit(proc))

    async def _await_ready(self, proc: asyncio.subprocess.Process) -> None:
        try:
            ready = await asyncio.wait_for(self._recv(), READY_TIMEOUT)
            if not ready.get("ready"):
                raise ForkServerUnavailable(f"unexpected first message {ready!r}")
        except (OSError, TimeoutError, ValueError, ForkServerUnavailable) as e:
            detail = f"not ready in {READY_TIMEOUT:.0f} s" if isinstance(e, TimeoutError) \
                else str(e)
            self._reported.add(proc.pid)
            self._kill()
            self._failed(detail)
            raise ForkServerUnavailable(detail) from None
        self.pid = proc.pid
        self.starts += 1
        self.failures = 0
        self.emit("forkserver_started", None, pid=proc.pid, starts=self.starts,
                  preloaded=ready.get("preloaded"), threads=ready.get("threads"))

    def _failed(self, detail: str) -> None:
        self.failures += 1
        log.error("cannot start the fork server (%s); exec'ing VM processes", detail)
        self.emit("forkserver_failed", None, error=detail, failures=self.failures)
        if self.failures >= MAX_CONSECUTIVE_FAILURES:
            self.disabled = True
            self.emit("forkserver_disabled", None, failures=self.failures)

    async def _watch_exit(self, proc: asyncio.subprocess.Process) -> None:
        code = await proc.wait()
        if proc is self.proc:
            self._drop()
        if not self.closing and proc.pid not in self._reported:
            log.warning("the fork server (pid %d) exited with status %s; the next VM process "
                        "starts a new one", proc.pid, code)
            self.emit("forkserver_died", None, pid=proc.pid, status=code)
        if not self.closing and not self.disabled:
            await self.launch()  # replaced at once: the next VM process need not wait

    def _drop(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        self.proc = None
        self.pid = None
        self._ready = None

    def _kill(self) -> None:
        proc = self.proc
        if proc is not None and proc.returncode is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
        self._drop()  # the watch task reaps it

    async def close(self) -> None:
        """Stop the server (end of file on its socket, then SIGKILL if it lingers)."""
        self.closing = True
        proc = self.proc
        ready = self._ready
        if ready is not None and not ready.done():
            ready.cancel()
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        if proc is not None and proc.returncode is None:
            try:
                await asyncio.wait_for(proc.wait(), 2.0)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)
                await proc.wait()
        self._drop()

    # ------------------------------------------------------------------ requests

    async def _recv(self) -> dict[str, Any]:
        if self.sock is None:
            raise ForkServerUnavailable("no fork server")
        data = await asyncio.get_running_loop().sock_recv(self.sock, 1 << 16)
        if not data:
            raise ForkServerUnavailable("the fork server closed its socket")
        obj = json.loads(data)
        if not isinstance(obj, dict):
            raise ForkServerUnavailable(f"unexpected message {obj!r}")
        return obj

    async def spawn(self, which: str, argv: Sequence[str], env: Mapping[str, str],
                    logfd: int) -> ForkedProcess:
        """Fork ``which`` ("kernel" or "driver") running ``main(argv)`` with ``logfd`` as its
        stdout and stderr. OSError: the server could not fork (its errno, e.g. EAGAIN);
        ForkServerUnavailable: no server now (exec this process instead)."""
        async with self._lock:
            if self.disabled or self.closing:
                raise ForkServerUnavailable("the fork server is disabled")
            if self.proc is None:
                await self.launch()
            ready = self._ready
            if ready is None:
                raise ForkServerUnavailable("the fork server could not be started")
            await asyncio.shield(ready)  # raises ForkServerUnavailable when it failed
            if self.sock is None:
                raise ForkServerUnavailable("the fork server is gone")
            self._next_id += 1
            rid = self._next_id
            msg = json.dumps({"id": rid, "which": which, "argv": list(argv),
                              "env": dict(env)}).encode()
            fds = array.array("i", [logfd]).tobytes()
            try:
                self.sock.sendmsg([msg], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)])
                reply = await asyncio.wait_for(self._recv(), REQUEST_TIMEOUT)
            except TimeoutError:
                pid = self.pid
                if pid is not None:
                    self._reported.add(pid)
                log.error("the fork server (pid %s) did not answer in %.0f s; killing it",
                          pid, REQUEST_TIMEOUT)
                self._kill()
                self.emit("forkserver_hung", None, pid=pid, timeout=REQUEST_TIMEOUT)
                raise ForkServerUnavailable("the fork server did not answer") from None
            except (OSError, ValueError, ForkServerUnavailable) as e:
                # Broken socket (the server died: its watch reports it) or garbage.
                self._kill()
                raise ForkServerUnavailable(str(e)) from e
            if reply.get("id") != rid:
                self._kill()
                raise ForkServerUnavailable(f"answer {reply!r} to request {rid}")
            if "pid" in reply:
                return ForkedProcess(int(reply["pid"]))
            raise OSError(int(reply.get("errno") or 0), f"fork server: {reply.get('error')}")
