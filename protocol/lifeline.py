"""A VM process's ties to the hypervisor instance that started it.

Two rules keep the processes of one host instance from outliving it or harming the next:

- **Die with the hypervisor.** :func:`bind_to_host` asks Linux to SIGKILL this process when
  its parent dies (``prctl(PR_SET_PDEATHSIG, SIGKILL)``; a SIGKILL reaches a stopped process
  too), then checks that the parent is still the hypervisor that started it
  (``BALLOONLAB_HOST_PID``): if the hypervisor died between the fork and the ``prctl``, the
  process was already handed to another parent and exits at once.
- **Remove only your own files.** A run dir is owned by one host instance, named by a random
  *generation* token (file ``generation`` in the run dir, ``BALLOONLAB_GENERATION`` in the
  environment of the processes it starts). :class:`OwnedFile` remembers the device and inode
  of a file this process created; :meth:`OwnedFile.unlink` removes it only when the path
  still names that very file and the run dir still belongs to this generation — so a process
  of an old instance (stopped, then resumed after a new host took the run dir over) never
  deletes the new instance's sockets or swap file.

A process started by hand (no ``BALLOONLAB_HOST_PID``) is bound to nothing, and its files
are checked by identity alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import sys

__all__ = ["ENV_GENERATION", "ENV_HOST_PID", "GENERATION_FILE", "OwnedFile", "bind_to_host",
           "generation", "lifeline_env"]

ENV_HOST_PID = "BALLOONLAB_HOST_PID"
ENV_GENERATION = "BALLOONLAB_GENERATION"
#: The run dir's generation token (written by the hypervisor at start).
GENERATION_FILE = "generation"
#: linux/prctl.h
PR_SET_PDEATHSIG = 1


def lifeline_env(host_pid: int, generation: str | None) -> dict[str, str]:
    """The environment entries the hypervisor gives the processes it starts."""
    env = {ENV_HOST_PID: str(host_pid)}
    if generation:
        env[ENV_GENERATION] = generation
    return env


def _prctl_pdeathsig(sig: int) -> None:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, ctypes.c_ulong(sig), 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl(PR_SET_PDEATHSIG): {os.strerror(err)}")


def bind_to_host(who: str) -> None:
    """Die with the hypervisor named by ``BALLOONLAB_HOST_PID`` (no-op when unset).

    Exits the process (status 1, one line on stderr) when that hypervisor is already gone.
    """
    expected = os.environ.get(ENV_HOST_PID)
    if not expected:
        return
    if sys.platform.startswith("linux"):
        _prctl_pdeathsig(signal.SIGKILL)
    if os.getppid() != int(expected):
        print(f"{who}: the hypervisor (pid {expected}) is gone; exiting", file=sys.stderr)
        os._exit(1)


def generation() -> str | None:
    """The generation this process belongs to (None: started by hand)."""
    return os.environ.get(ENV_GENERATION) or None


def _run_dir_generation(run_dir: str) -> str | None:
    try:
        fd = os.open(os.path.join(run_dir, GENERATION_FILE),
                     os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        return os.read(fd, 64).decode(errors="replace").strip() or None
    except OSError:
        return None
    finally:
        os.close(fd)


class OwnedFile:
    """A file (or socket) this process created, to be removed only while it is still ours."""

    def __init__(self, path: str, st: os.stat_result | None = None) -> None:
        self.path = path
        st = st if st is not None else os.lstat(path)
        self.dev, self.ino = st.st_dev, st.st_ino
        self.generation = generation()

    @classmethod
    def of_fd(cls, path: str, fd: int) -> OwnedFile:
        """The file open as ``fd`` at ``path`` (its identity from the descriptor: no race)."""
        return cls(path, os.fstat(fd))

    def still_ours(self) -> bool:
        try:
            st = os.lstat(self.path)
        except OSError:
            return False
        if (st.st_dev, st.st_ino) != (self.dev, self.ino):
            return False
        if self.generation is not None:
            return _run_dir_generation(os.path.dirname(os.path.abspath(self.path))) \
                == self.generation
        return True

    def unlink(self) -> bool:
        """Remove the file if it is still ours; True when removed."""
        if not self.still_ours():
            return False
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            return False
        return True
