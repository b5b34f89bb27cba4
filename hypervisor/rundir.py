"""The run directory of a host: where its sockets, pid file, logs and swap file live.

``default_run_dir(name)`` is ``$XDG_RUNTIME_DIR/balloonlab/<name>`` when ``XDG_RUNTIME_DIR``
is set, else ``/tmp/balloonlab-<uid>/<name>``. The directory is created 0700 and every socket
in it is chmod'ed 0600: only the owner may drive the host or its VMs.

A host is *live* when ``hypervisor.pid`` names a running process and ``control.sock``
accepts a connection. ``prepare_run_dir`` refuses to start over a live host and cleans a
stale one (a crashed host's leftovers).
"""

from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path

PID_FILE = "hypervisor.pid"
LOG_FILE = "hypervisor.log"
CONTROL_SOCK = "control.sock"
SWAP_FILE = "host.swap"


class RunDirError(Exception):
    """The run directory cannot be used (a live host owns it, or it is not ours)."""


class HostAlreadyRunning(RunDirError):
    pass


class NoHostFound(RunDirError):
    pass


def _base_dir() -> Path:
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg:
        return Path(xdg) / "balloonlab"
    return Path(f"/tmp/balloonlab-{os.getuid()}")


def default_run_dir(host_name: str) -> Path:
    """The default run dir of host ``host_name``."""
    if not host_name or "/" in host_name or host_name in (".", ".."):
        raise ValueError(f"invalid host name {host_name!r}")
    return _base_dir() / host_name


def machine_sock(run_dir: Path, vm: str) -> Path:
    return run_dir / f"{vm}.machine.sock"


def balloon_sock(run_dir: Path, vm: str) -> Path:
    return run_dir / f"{vm}.balloon.sock"


def kernel_sock(run_dir: Path, vm: str) -> Path:
    return run_dir / f"{vm}.kernel.sock"


def qmp_sock(run_dir: Path, vm: str) -> Path:
    """The VM's QMP monitor (hypervisor.qmp)."""
    return run_dir / f"{vm}.qmp.sock"


def pid_alive(pid: int) -> bool:
    """True while *pid* runs. A zombie counts as gone; when it is our own child (a host
    started by this process, e.g. `up --detach` in a long-lived caller) it is reaped."""
    try:
        done, _status = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            return False
    except ChildProcessError:
        pass  # not our child: its parent (or init) reaps it
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            if f.read().rsplit(b")", 1)[-1].split()[0] == b"Z":
                return False
    except (OSError, IndexError):
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _control_answers(path: Path) -> bool:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(1.0)
    try:
        s.connect(str(path))
        return True
    except OSError:
        return False
    finally:
        s.close()


def read_pid(run_dir: Path) -> int | None:
    try:
        return int((run_dir / PID_FILE).read_text().strip())
    except (OSError, ValueError):
        return None


def is_live(run_dir: Path) -> bool:
    """True when a host process is alive in ``run_dir`` and its control socket answers."""
    pid = read_pid(run_dir)
    return pid is not None and pid_alive(pid) and _control_answers(run_dir / CONTROL_SOCK)


def prepare_run_dir(run_dir: Path) -> Path:
    """Create (or clean and reuse) ``run_dir`` for a new host; write our pid file.

    Raises HostAlreadyRunning when a live host owns it.
    """
    run_dir = Path(run_dir)
    if run_dir.exists():
        if is_live(run_dir):
            raise HostAlreadyRunning(
                f"a host is already running in {run_dir} (pid {read_pid(run_dir)}); "
                "stop it with `balloonlab down` or choose another host name"
            )
        if not run_dir.is_dir():
            raise RunDirError(f"{run_dir} exists and is not a directory")
        if run_dir.stat().st_uid != os.getuid():
            raise RunDirError(f"{run_dir} belongs to another user; refusing to use it")
        # Stale leftovers of a dead host: remove them so nothing old is mistaken for new.
        shutil.rmtree(run_dir)
    run_dir.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    run_dir.mkdir(mode=0o700)
    os.chmod(run_dir, 0o700)
    (run_dir / PID_FILE).write_text(f"{os.getpid()}\n")
    return run_dir


def secure_socket(path: Path) -> None:
    """Make a freshly bound socket owner-only."""
    os.chmod(path, 0o600)


def remove_run_dir(run_dir: Path) -> None:
    shutil.rmtree(run_dir, ignore_errors=True)


def find_host(name: str | None = None) -> Path:
    """The run dir of the live host ``name``, or of the only live host when ``name`` is None.

    Raises NoHostFound (none, or several and no name given).
    """
    if name is not None:
        d = default_run_dir(name)
        if is_live(d):
            return d
        raise NoHostFound(f"no running host named {name!r} (looked in {d})")
    base = _base_dir()
    live = sorted(d for d in base.iterdir() if d.is_dir() and is_live(d)) if base.is_dir() \
        else []
    if not live:
        raise NoHostFound(f"no running host found under {base}; start one with `balloonlab up`")
    if len(live) > 1:
        names = ", ".join(d.name for d in live)
        raise NoHostFound(f"several hosts are running ({names}); pick one with --host NAME")
    return live[0]
