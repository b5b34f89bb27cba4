"""Start a hypervisor process for a topology, wait until its VMs are up, stop it.

The one launcher of the project: ``balloonlab up``, the reclaim benchmark and the
end-to-end tests all start hosts through it.

    with launcher.running(topo) as h:       # launch + wait_ready; stop on exit
        h.call("list_vms")

or step by step: ``h = launch(topo)``, ``wait_ready(h, timeout)``, ``h.stop()``.

The host's stdout/stderr go to an *output file*: ``<run dir>.hypervisor.out`` beside the run
dir (the host wipes a stale run dir when it starts and removes it when it stops), created
afresh and never through a symbolic link (:func:`hypervisor.rundir.open_output`); a clean
stop removes it. Every failure is a :class:`LaunchError` of one line.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from balloonlab.client import ControlClient
from hypervisor import rundir
from hypervisor.topology import Topology
from hypervisor.units import format_duration

__all__ = ["SHUTDOWN_TIMEOUT", "LaunchError", "Launched", "launch", "run_dir_of", "running",
           "stop_host", "wait_ready"]

#: How long ``stop`` waits for the hypervisor to exit after ``shutdown`` (then SIGTERM,
#: then SIGKILL).
SHUTDOWN_TIMEOUT = 20.0
#: Seconds between two looks at a starting host.
POLL = 0.1


class LaunchError(Exception):
    """A host could not be started (or did not come up): one line for the user."""


def run_dir_of(topo: Topology) -> Path:
    """The run dir a host of ``topo`` uses: its ``[host] run_dir`` or the default."""
    if topo.host.run_dir:
        return Path(topo.host.run_dir)
    return rundir.default_run_dir(topo.host.name)


@dataclass
class Launched:
    """A hypervisor process this launcher started."""

    topology: Topology
    run_dir: Path
    proc: subprocess.Popen[bytes]
    #: The host's stdout/stderr.
    output: Path
    #: The topology file the host read (removed at stop when the launcher wrote it).
    topo_file: Path
    own_topo_file: bool = False
    stopped: bool = field(default=False, init=False)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def client(self, timeout: float | None = 5.0) -> ControlClient:
        return ControlClient(self.run_dir, timeout=timeout)

    def call(self, method: str, **params: Any) -> Any:
        """One control call on a connection of its own."""
        c = self.client()
        try:
            return c.call(method, **params)
        finally:
            c.close()

    def output_tail(self, lines: int = 8) -> str:
        try:
            text = self.output.read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return "\n".join(text[-lines:])

    def stop(self, timeout: float = SHUTDOWN_TIMEOUT, *, keep_output: bool = False) -> int | None:
        """Shut the host down in order (escalating to SIGTERM, then SIGKILL); returns its
        exit status. A clean stop (status 0) removes the output file unless
        ``keep_output``; otherwise it stays, for the user to read."""
        stop_host(self.run_dir, timeout, self.proc)
        if self.proc.poll() is None:  # SIGKILL'd and not reaped yet
            self.proc.wait()
        self.stopped = True
        if self.own_topo_file:
            self.topo_file.unlink(missing_ok=True)
        if self.proc.returncode == 0 and not keep_output:
            rundir.remove_output(self.output)
        return self.proc.returncode


def _pdeathsig_setter() -> Callable[[], None]:
    """A function for ``preexec_fn``: in the child before exec, ask for SIGTERM when the
    thread that started it dies (Linux ``PR_SET_PDEATHSIG``), so a host never outlives a
    killed caller. prctl is looked up here, in the parent: the child of a threaded parent
    should do no more than the call itself."""
    import ctypes

    prctl = ctypes.CDLL(None, use_errno=True).prctl
    pr_set_pdeathsig, sigterm = 1, int(signal.SIGTERM)

    def set_pdeathsig() -> None:
        prctl(pr_set_pdeathsig, sigterm, 0, 0, 0)

    return set_pdeathsig


def launch(topo: Topology, *, topo_file: Path | None = None, output: Path | None = None,
           env: Mapping[str, str] | None = None, python: Sequence[str] | None = None,
           log_level: str | None = None, die_with_parent: bool = False) -> Launched:
    """Start ``python -m hypervisor`` for ``topo`` (read from ``topo_file``, or from a
    temporary copy of ``topo.to_toml()``); does not wait for it.

    ``die_with_parent``: the host gets SIGTERM (and shuts down in order) when the calling
    thread dies, even by SIGKILL: for callers that may be killed without warning, such as
    an experiment trial on a dask worker that the cluster kills."""
    run_dir = run_dir_of(topo)
    if rundir.is_live(run_dir):
        raise LaunchError(f"host {topo.host.name!r} is already running in {run_dir}; stop it "
                          f"with `balloonlab down --host {topo.host.name}`")
    out_path = Path(output) if output is not None else rundir.output_path(run_dir)
    out_fd = rundir.open_output(out_path)
    own = topo_file is None
    try:
        if topo_file is None:
            fd, name = tempfile.mkstemp(prefix=f"balloonlab-{topo.host.name}-", suffix=".toml")
            with os.fdopen(fd, "w") as f:
                f.write(topo.to_toml())
            topo_file = Path(name)
        argv = [*(python or [sys.executable]), "-m", "hypervisor", "--topology", str(topo_file)]
        if log_level:
            argv += ["--log-level", log_level]
        try:
            # A new session: Ctrl-C in the caller's terminal reaches only the caller, which
            # then shuts the host down in order instead of everything dying at once.
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out_fd,
                                    stderr=out_fd, start_new_session=True, close_fds=True,
                                    preexec_fn=_pdeathsig_setter() if die_with_parent else None,
                                    env=None if env is None else dict(env))
        except OSError as e:
            if own:
                topo_file.unlink(missing_ok=True)
            raise LaunchError(f"cannot start the hypervisor: {e}") from None
    finally:
        os.close(out_fd)
    return Launched(topology=topo, run_dir=run_dir, proc=proc, output=out_path,
                    topo_file=topo_file, own_topo_file=own)


def _last_error_line(text: str) -> str:
    """The line that says what went wrong: the last ``error:`` line, else the last line."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for ln in reversed(lines):
        if ln.startswith("error:") or "Error:" in ln:
            return ln
    return lines[-1] if lines else ""


def wait_ready(h: Launched, timeout: float,
               progress: Callable[[str], None] | None = None) -> None:
    """Wait until every VM is ``running`` with its driver ``connected``.

    Raises LaunchError when the hypervisor exits first, or (after stopping it) when
    ``timeout`` seconds pass."""
    deadline = time.monotonic() + timeout
    expected = {v.name for v in h.topology.vms}
    last_state = ""
    while True:
        if h.proc.poll() is not None:
            why = _last_error_line(h.output_tail(40))
            raise LaunchError(
                f"the hypervisor exited with status {h.proc.returncode} before its VMs were up"
                + (f": {why.removeprefix('error: ')}" if why else "") + f" (see {h.output})")
        if time.monotonic() > deadline:
            h.stop(5.0, keep_output=True)
            raise LaunchError(
                f"VMs not ready after {format_duration(timeout)} "
                f"({last_state or 'no control socket'}); host stopped; see {h.output}")
        if rundir.is_live(h.run_dir):
            try:
                vms = h.call("list_vms")
            except Exception:  # starting up: look again
                vms = None
            if vms is not None:
                ready = {v["name"] for v in vms
                         if v.get("state") == "running" and v.get("driver") == "connected"}
                last_state = ", ".join(f"{v['name']} {v.get('state')}/{v.get('driver')}"
                                       for v in vms)
                if progress is not None:
                    progress(f"booting: {last_state}")
                if expected <= ready:
                    return
        time.sleep(POLL)


def stop_host(run_dir: Path, timeout: float = SHUTDOWN_TIMEOUT,
              proc: subprocess.Popen[bytes] | None = None) -> None:
    """Ask the host in ``run_dir`` to shut down and wait for its process to exit; escalate
    to SIGTERM, then SIGKILL, only for a process this caller started (``proc``) or that the
    pid file names."""
    pid = proc.pid if proc is not None else rundir.read_pid(run_dir)
    try:
        c = ControlClient(run_dir, timeout=5.0)
        try:
            c.call("shutdown")
        finally:
            c.close()
    except Exception:  # already going away: wait for the process
        pass
    if pid is None:
        return

    def gone() -> bool:
        return proc.poll() is not None if proc is not None else not rundir.pid_alive(pid)

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if gone():
            return
        time.sleep(POLL)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        end = time.monotonic() + 5.0
        while time.monotonic() < end:
            if gone():
                return
            time.sleep(POLL)


@contextmanager
def running(topo: Topology, *, boot_timeout: float = 60.0,
            progress: Callable[[str], None] | None = None,
            stop_timeout: float = SHUTDOWN_TIMEOUT, **launch_args: Any) -> Iterator[Launched]:
    """A host of ``topo`` with every VM up for the ``with`` body; stopped afterwards
    (whatever happened)."""
    h = launch(topo, **launch_args)
    try:
        wait_ready(h, boot_timeout, progress)
        yield h
    finally:
        if not h.stopped:
            h.stop(stop_timeout)
