"""The run directory of a host: where its sockets, pid file, logs and swap file live.

``default_run_dir(name)`` is ``$XDG_RUNTIME_DIR/balloonlab/<name>`` when ``XDG_RUNTIME_DIR``
is set, else ``/tmp/balloonlab-<uid>/<name>``. The *base* (the directory holding the default
run dirs) sits in a directory every local user can write to, so another user could create it
first, or plant a symbolic link in it. Hence:

- the base is created 0700 by us, and checked with ``lstat`` before every use: a directory,
  not a symbolic link, owned by our uid, no group/other permission bits. Anything else is
  refused with a one-line :class:`RunDirError` naming the path and what is wrong;
- a run dir is created 0700 (fresh: a stale one is removed first) and checked the same way;
  every socket in it is chmod'ed 0600;
- every file this package creates there or in the base is opened with ``O_NOFOLLOW`` and,
  when it is new, ``O_CREAT|O_EXCL`` (through ``protocol.syscalls.open_file`` at the point
  ``rundir.open``), so no planted link is ever followed and no file of someone else's written.

A host is *live* when ``hypervisor.pid`` names a running process and ``control.sock``
accepts a connection. ``prepare_run_dir`` refuses to start over a live host and cleans a
stale one (a crashed host's leftovers).

Each host instance has a *generation*: a random token written to ``generation`` in its run
dir and handed to its VM processes (:mod:`protocol.lifeline`), so that a process of an old
instance never removes the files of a new one.
"""

from __future__ import annotations

import errno
import os
import secrets
import shutil
import socket
import stat
from pathlib import Path

from protocol import lifeline, syscalls

PID_FILE = "hypervisor.pid"
LOG_FILE = "hypervisor.log"
CONTROL_SOCK = "control.sock"
SWAP_FILE = "host.swap"
GENERATION_FILE = lifeline.GENERATION_FILE
#: The launcher's capture of a host's stdout/stderr: ``<run dir>.hypervisor.out`` beside the
#: run dir (the host wipes its run dir at start and removes it at stop).
OUTPUT_SUFFIX = ".hypervisor.out"


class RunDirError(Exception):
    """The run directory cannot be used (a live host owns it, or it is not ours)."""


class HostAlreadyRunning(RunDirError):
    pass


class NoHostFound(RunDirError):
    pass


class InvalidHostName(RunDirError, ValueError):
    """A host name that cannot name a run dir."""


def _base_dir() -> Path:
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg:
        return Path(xdg) / "balloonlab"
    return Path(f"/tmp/balloonlab-{os.getuid()}")


def base_dir() -> Path:
    """The directory holding the default run dirs (not checked: see :func:`ensure_base`)."""
    return _base_dir()


def check_private_dir(path: Path) -> os.stat_result:
    """``lstat`` ``path``: a directory, not a symbolic link, ours, no group/other bits.

    Raises RunDirError (one line naming the path and the problem) otherwise."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise RunDirError(f"{path} does not exist") from None
    except OSError as e:
        raise RunDirError(f"{path}: {e.strerror}") from None
    if stat.S_ISLNK(st.st_mode):
        raise RunDirError(f"{path} is a symbolic link; refusing to use it")
    if not stat.S_ISDIR(st.st_mode):
        raise RunDirError(f"{path} exists and is not a directory; refusing to use it")
    if st.st_uid != os.getuid():
        raise RunDirError(f"{path} belongs to uid {st.st_uid}, not to this user "
                          f"(uid {os.getuid()}); refusing to use it")
    if st.st_mode & 0o077:
        raise RunDirError(f"{path} has mode {stat.S_IMODE(st.st_mode):04o}: other users may "
                          "use it (it must be 0700); refusing to use it")
    return st


def ensure_base(base: Path | None = None) -> Path:
    """Create the base 0700 if it is missing, then check it (:func:`check_private_dir`)."""
    base = Path(base) if base is not None else _base_dir()
    try:
        os.mkdir(base, 0o700)
    except FileExistsError:
        pass
    except FileNotFoundError:  # $XDG_RUNTIME_DIR itself is missing
        raise RunDirError(f"cannot create {base}: {base.parent} does not exist") from None
    except OSError as e:
        raise RunDirError(f"cannot create {base}: {e.strerror}") from None
    check_private_dir(base)
    return base


def _check_parent(run_dir: Path) -> None:
    """A default run dir's parent is the base: make sure it is safe before touching it."""
    if run_dir.parent == _base_dir():
        ensure_base(run_dir.parent)


def default_run_dir(host_name: str) -> Path:
    """The default run dir of host ``host_name``."""
    if not host_name or "/" in host_name or host_name in (".", "..") or "\0" in host_name:
        raise InvalidHostName(f"invalid host name {host_name!r}: a host name is a plain file "
                              "name (not empty, no '/', not '.' or '..')")
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


def disk_path(run_dir: Path, vm: str) -> Path:
    """The VM's virtual disk image (``disk`` in its ``[[vm]]`` table)."""
    return run_dir / f"{vm}.disk"


def create_disk(run_dir: Path, vm: str, size: int) -> Path:
    """Create the VM's virtual disk afresh: zero-filled (sparse), ``size`` bytes, 0600.

    A previous boot's disk of ours is removed first (every boot starts from a blank disk, as
    the guest's record of what it wrote starts empty); the new file is created with
    ``O_CREAT|O_EXCL|O_NOFOLLOW`` (point ``disk.create``) and sized at ``disk.truncate``.
    Raises ``OSError`` (the system's or an injected one) or :class:`RunDirError` (something
    not ours in the way), leaving no half-made disk behind."""
    path = disk_path(run_dir, vm)
    if _ours_regular(path):
        os.unlink(path)
    fd = syscalls.open_file("disk.create", path,
                            os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        syscalls.ftruncate("disk.truncate", fd, size)
    except BaseException:
        os.unlink(path)
        raise
    finally:
        os.close(fd)
    return path


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
        fd = os.open(Path(run_dir) / PID_FILE, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        return int(os.read(fd, 64).decode().strip())
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    finally:
        os.close(fd)


def is_live(run_dir: Path) -> bool:
    """True when a host process is alive in ``run_dir`` and its control socket answers."""
    pid = read_pid(run_dir)
    return pid is not None and pid_alive(pid) and _control_answers(run_dir / CONTROL_SOCK)


def open_new(path: Path, flags: int = os.O_WRONLY) -> int:
    """Create ``path`` (0600) and open it: ``O_CREAT|O_EXCL|O_NOFOLLOW``."""
    return syscalls.open_file("rundir.open", path,
                              flags | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)


def open_log(path: Path) -> int:
    """Open (creating 0600) a log for appending, never through a symbolic link."""
    return syscalls.open_file("rundir.open", path,
                              os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o600)


def _write_new(path: Path, text: str) -> None:
    fd = open_new(path)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def prepare_run_dir(run_dir: Path) -> Path:
    """Create (or clean and reuse) ``run_dir`` for a new host; write our pid file and a
    fresh generation.

    Raises HostAlreadyRunning when a live host owns it, RunDirError when it (or the base
    holding it) is not safely ours.
    """
    run_dir = Path(run_dir)
    _check_parent(run_dir)
    try:
        st: os.stat_result | None = os.lstat(run_dir)
    except FileNotFoundError:
        st = None
    if st is not None:
        if stat.S_ISDIR(st.st_mode) and is_live(run_dir):
            raise HostAlreadyRunning(
                f"a host is already running in {run_dir} (pid {read_pid(run_dir)}); "
                "stop it with `balloonlab down` or choose another host name"
            )
        _check_reusable(run_dir)
        # Stale leftovers of a dead host: remove them so nothing old is mistaken for new.
        shutil.rmtree(run_dir)
    else:
        run_dir.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        os.mkdir(run_dir, 0o700)
    except FileExistsError:
        raise RunDirError(f"{run_dir} appeared while it was being created; "
                          "is another host starting there?") from None
    try:
        os.chmod(run_dir, 0o700, follow_symlinks=False)
        check_private_dir(run_dir)
        _write_new(run_dir / PID_FILE, f"{os.getpid()}\n")
        _write_new(run_dir / GENERATION_FILE, f"{secrets.token_hex(8)}\n")
    except BaseException:
        shutil.rmtree(run_dir, ignore_errors=True)
        raise
    return run_dir


def _check_reusable(run_dir: Path) -> None:
    """An existing run dir may be reused (after wiping it) when it is a real directory of
    ours; its mode is fixed by the re-creation."""
    st = os.lstat(run_dir)
    if stat.S_ISLNK(st.st_mode):
        raise RunDirError(f"{run_dir} is a symbolic link; refusing to use it")
    if not stat.S_ISDIR(st.st_mode):
        raise RunDirError(f"{run_dir} exists and is not a directory; refusing to use it")
    if st.st_uid != os.getuid():
        raise RunDirError(f"{run_dir} belongs to uid {st.st_uid}, not to this user "
                          f"(uid {os.getuid()}); refusing to use it")


def read_generation(run_dir: Path) -> str | None:
    """The generation token of the host instance that owns ``run_dir`` (None: none)."""
    try:
        fd = os.open(Path(run_dir) / GENERATION_FILE,
                     os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        return os.read(fd, 64).decode().strip() or None
    except (OSError, UnicodeDecodeError):
        return None
    finally:
        os.close(fd)


def secure_socket(path: Path) -> None:
    """Make a freshly bound socket owner-only."""
    os.chmod(path, 0o600)


def remove_run_dir(run_dir: Path) -> None:
    shutil.rmtree(run_dir, ignore_errors=True)


# ---------------------------------------------------------------------------- host output


def output_path(run_dir: Path) -> Path:
    """Where the launcher captures the host's stdout/stderr: beside the run dir."""
    run_dir = Path(run_dir)
    return run_dir.parent / f"{run_dir.name}{OUTPUT_SUFFIX}"


def _ours_regular(path: Path) -> bool | None:
    """None: nothing there; True: a regular file of ours; raises RunDirError otherwise."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    if stat.S_ISLNK(st.st_mode):
        raise RunDirError(f"{path} is a symbolic link; refusing to use it")
    if not stat.S_ISREG(st.st_mode):
        raise RunDirError(f"{path} exists and is not a regular file; refusing to use it")
    if st.st_uid != os.getuid():
        raise RunDirError(f"{path} belongs to uid {st.st_uid}, not to this user "
                          f"(uid {os.getuid()}); refusing to use it")
    return True


def open_output(path: Path) -> int:
    """Create the host-output file ``path`` afresh (a stale one of ours is replaced), never
    following a link; a default run dir's base is checked first. Returns a write fd."""
    path = Path(path)
    if path.name.endswith(OUTPUT_SUFFIX):
        _check_parent(path.parent / path.name[: -len(OUTPUT_SUFFIX)])
    if _ours_regular(path):
        os.unlink(path)
    try:
        return open_new(path)
    except FileExistsError:
        raise RunDirError(f"{path} appeared while it was being created; refusing to use it"
                          ) from None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise RunDirError(f"{path} is a symbolic link; refusing to use it") from None
        raise


def remove_output(path: Path) -> None:
    """Remove a host-output file if it is a regular file of ours (never a link's target)."""
    try:
        if _ours_regular(Path(path)):
            os.unlink(path)
    except (RunDirError, OSError):
        pass


def find_host(name: str | None = None) -> Path:
    """The run dir of the live host ``name``, or of the only live host when ``name`` is None.

    Raises NoHostFound (none, or several and no name given).
    """
    if name is not None:
        d = default_run_dir(name)
        if os.path.lexists(d.parent):
            check_private_dir(d.parent)
        if is_live(d):
            return d
        raise NoHostFound(f"no running host named {name!r} (looked in {d})")
    base = _base_dir()
    if base.is_dir() or base.is_symlink():
        check_private_dir(base)
    live = sorted(d for d in base.iterdir() if d.is_dir() and is_live(d)) if base.is_dir() \
        else []
    if not live:
        raise NoHostFound(f"no running host found under {base}; start one with `balloonlab up`")
    if len(live) > 1:
        names = ", ".join(d.name for d in live)
        raise NoHostFound(f"several hosts are running ({names}); pick one with --host NAME")
    return live[0]
