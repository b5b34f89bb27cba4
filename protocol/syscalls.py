"""System calls that can fail, behind one failure-injection layer (SQLite's anomaly tests).

Every system call on the memory and supervision paths whose failure the project must
survive — a full disk under a swap write, a failed punch, no descriptor left for an accept
or a log, a spawn that fails — goes through a *point* here: a name such as
``hostswap.write``. Each point counts its calls in this process. A *plan* makes the N-th call
of a point (or every call from the N-th on) fail with an errno Linux can give, before the
real call is made, so a failed call never has half an effect.

This module sits in ``protocol/`` because that is the one package both the hypervisor and the
guest processes import; it does no I/O of its own besides the calls it wraps.

Plans come from the environment of a process (so the hypervisor hands them on to the VM
processes it starts) or from :func:`install` in a test::

    BALLOONLAB_FAULTS="hostswap.write@3=ENOSPC;guestswap.read@1+=EIO"

``@3`` fails the third call only; ``@1+`` fails the first call and every later one (a disk
that stays full). ``EINTR`` is retried by the wrappers, as Python's own system-call wrappers
retry it (PEP 475), so an injected ``EINTR`` exercises that loop and then succeeds.

``BALLOONLAB_FAULT_COUNTS=DIR`` makes each process write ``DIR/<pid>.json`` — its call
count per point — at exit, which is how a test learns the injection points a scenario
reaches before it walks them one by one.
"""

from __future__ import annotations

import atexit
import errno as _errno
import json
import os
import socket
import threading
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "ENV_COUNTS",
    "ENV_PLAN",
    "ERRNOS",
    "POINTS",
    "InjectedFault",
    "Injection",
    "accept",
    "clear",
    "counts",
    "fallocate",
    "ftruncate",
    "hit",
    "install",
    "open_file",
    "parse_plan",
    "pread_exact",
    "pwrite_all",
    "reload_environment",
    "sendmsg",
]

ENV_PLAN = "BALLOONLAB_FAULTS"
ENV_COUNTS = "BALLOONLAB_FAULT_COUNTS"

#: Every injection point, with what it guards. A point not listed here is refused by
#: :func:`parse_plan`, so a typo in a plan is an error, not a plan that never fires.
POINTS: dict[str, str] = {
    "hostswap.write": "pwrite of pages into the host swap file (swap-out)",
    "hostswap.read": "pread of pages from the host swap file (swap-in)",
    "hostswap.open": "open of the host swap file at start-up",
    "hostswap.truncate": "ftruncate that sizes the host swap file at start-up",
    "hostswap.punch": "fallocate(PUNCH_HOLE) giving freed host swap slots back",
    "memfd.punch": "fallocate(PUNCH_HOLE) releasing guest RAM pages to the host",
    "memfd.create": "memfd_create/ftruncate of a VM's RAM, EPT and accessed-bit maps",
    "memfd.populate": "fallocate(mode=0) backing faulted-in guest RAM pages with zeros",
    "memfd.write": "pwrite of swapped-in bytes back into guest RAM",
    "memfd.read": "pread of guest RAM pages on their way to host swap",
    "guestswap.write": "pwrite of pages into a guest's swap file",
    "guestswap.read": "pread of pages from a guest's swap file",
    "guestswap.truncate": "ftruncate that sizes a guest's swap file at boot",
    "rundir.open": "open of a file in the run directory (logs, pid file)",
    "control.accept": "accept on control.sock",
    "machine.accept": "accept on a VM's machine socket",
    "machine.sendmsg": "sendmsg carrying the RAM/EPT memfds to a booting guest",
    "spawn": "starting a VM process (guest kernel or balloon driver)",
    "disk.create": "open (O_CREAT|O_EXCL) of a VM's virtual disk file in the run directory",
    "disk.truncate": "ftruncate that sizes a VM's virtual disk file before its kernel starts",
    "disk.open": "open of its virtual disk file by a booting guest kernel",
    "disk.read": "pread of disk blocks into the guest's page cache (a cache miss)",
    "disk.write": "pwrite of dirty page-cache pages to the virtual disk (writeback)",
}

#: The errors an injection may name.
ERRNOS: dict[str, int] = {name: getattr(_errno, name) for name in
                          ("ENOSPC", "EIO", "EMFILE", "ENFILE", "ENOMEM", "EINTR", "EAGAIN",
                           "EFBIG", "EDQUOT", "EPERM", "EACCES")}


class InjectedFault(OSError):
    """An ``OSError`` raised by a plan, not by the kernel; its text names the point."""


@dataclass(frozen=True)
class Injection:
    point: str
    nth: int          # 1-based call number
    errno: int
    sticky: bool = False  # every call from the nth on

    def matches(self, call: int) -> bool:
        return call >= self.nth if self.sticky else call == self.nth

    def __str__(self) -> str:
        name = _errno.errorcode.get(self.errno, str(self.errno))
        return f"{self.point}@{self.nth}{'+' if self.sticky else ''}={name}"


def parse_plan(text: str) -> list[Injection]:
    """``"point@N=ERRNO;point@N+=ERRNO"`` → injections; ValueError naming the bad part."""
    out: list[Injection] = []
    for part in filter(None, (p.strip() for p in text.replace(",", ";").split(";"))):
        try:
            where, err = part.split("=", 1)
            point, nth_s = where.split("@", 1)
        except ValueError:
            raise ValueError(f"fault plan {part!r}: expected POINT@N=ERRNO") from None
        point = point.strip()
        if point not in POINTS:
            raise ValueError(f"fault plan {part!r}: unknown point {point!r} "
                             f"(known: {', '.join(sorted(POINTS))})")
        sticky = nth_s.strip().endswith("+")
        try:
            nth = int(nth_s.strip().rstrip("+"))
        except ValueError:
            raise ValueError(f"fault plan {part!r}: N must be a positive integer") from None
        if nth < 1:
            raise ValueError(f"fault plan {part!r}: N must be a positive integer")
        code = ERRNOS.get(err.strip().upper())
        if code is None:
            raise ValueError(f"fault plan {part!r}: unknown errno {err.strip()!r} "
                             f"(known: {', '.join(sorted(ERRNOS))})")
        out.append(Injection(point, nth, code, sticky))
    return out


class _State:
    """This process's plan and call counters (one per process: injection is a property of
    the process under test, like SQLite's test VFS)."""

    def __init__(self) -> None:
        self.plan: dict[str, list[Injection]] = {}
        self.calls: Counter[str] = Counter()
        self.fired: list[str] = []

    def load(self, injections: Iterable[Injection]) -> None:
        self.plan = {}
        for inj in injections:
            self.plan.setdefault(inj.point, []).append(inj)


_state = _State()
_count_lock = threading.Lock()


def install(injections: Iterable[Injection] | str) -> None:
    """Replace this process's plan (a parsed list or plan text) and reset the counters."""
    if isinstance(injections, str):
        injections = parse_plan(injections)
    _state.load(injections)
    _state.calls.clear()
    _state.fired.clear()


def clear() -> None:
    """No injection, counters reset."""
    install([])


def counts() -> Mapping[str, int]:
    """Calls made so far per point in this process."""
    return dict(_state.calls)


def fired() -> list[str]:
    """The injections that fired in this process, as ``point@N=ERRNO`` texts."""
    return list(_state.fired)


def hit(point: str) -> None:
    """Count one call of ``point``; raise :class:`InjectedFault` when the plan says so."""
    with _count_lock:  # the host punches on worker threads too
        _state.calls[point] += 1
        n = _state.calls[point]
    for inj in _state.plan.get(point, ()):
        if inj.matches(n):
            _state.fired.append(f"{point}@{n}={_errno.errorcode.get(inj.errno, inj.errno)}")
            raise InjectedFault(inj.errno, f"{os.strerror(inj.errno)} (injected at {point}, "
                                f"call {n})")


def _retrying(point: str) -> None:
    """``hit`` with EINTR retried, as the real wrappers retry it."""
    while True:
        try:
            hit(point)
            return
        except InjectedFault as e:
            if e.errno != _errno.EINTR:
                raise


# ---------------------------------------------------------------------------- wrappers


def fallocate(point: str, fd: int, mode: int, offset: int, length: int) -> None:
    """``fallocate(2)`` (glibc through ctypes where ``os`` lacks the mode argument)."""
    _retrying(point)
    _fallocate(fd, mode, offset, length)


def pwrite_all(point: str, fd: int, data: bytes | memoryview, offset: int) -> None:
    """Write all of ``data`` at ``offset`` (short writes continue; any error raises before
    the caller records anything as written)."""
    _retrying(point)
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        if n == 0:
            raise OSError(_errno.EIO, f"pwrite wrote nothing at offset {offset}")
        view = view[n:]
        offset += n


def pread_exact(point: str, fd: int, size: int, offset: int) -> bytes:
    """Read exactly ``size`` bytes at ``offset``; a short read is EIO."""
    _retrying(point)
    data = os.pread(fd, size, offset)
    if len(data) != size:
        raise OSError(_errno.EIO, f"short read at offset {offset}: {len(data)} of {size} bytes")
    return data


def ftruncate(point: str, fd: int, size: int) -> None:
    _retrying(point)
    os.ftruncate(fd, size)


def open_file(point: str, path: str | os.PathLike[str], flags: int, mode: int = 0o600,
              *, dir_fd: int | None = None) -> int:
    """``os.open``; callers pass ``O_NOFOLLOW``/``O_EXCL`` as the file's use needs."""
    _retrying(point)
    return os.open(path, flags | os.O_CLOEXEC, mode, dir_fd=dir_fd)


def accept(point: str, sock: socket.socket) -> tuple[socket.socket, object]:
    _retrying(point)
    return sock.accept()


def sendmsg(point: str, sock: socket.socket, buffers: list[bytes],
            ancdata: list[tuple[int, int, bytes]]) -> int:
    _retrying(point)
    return sock.sendmsg(buffers, ancdata)


# ---------------------------------------------------------------------------- fallocate


def _make_fallocate() -> Callable[[int, int, int, int], None]:
    import ctypes
    import ctypes.util

    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    fn = libc.fallocate
    fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong]
    fn.restype = ctypes.c_int

    def call(fd: int, mode: int, offset: int, length: int) -> None:
        while fn(fd, mode, offset, length) != 0:
            err = ctypes.get_errno()
            if err != _errno.EINTR:
                raise OSError(err, f"fallocate: {os.strerror(err)}")

    return call


_fallocate = _make_fallocate()


# ---------------------------------------------------------------------------- environment


_counts_registered = False


def _from_environment() -> None:
    global _counts_registered
    text = os.environ.get(ENV_PLAN, "")
    if text:
        install(parse_plan(text))
    out = os.environ.get(ENV_COUNTS)
    if out and not _counts_registered:
        _counts_registered = True

        def dump() -> None:
            where = os.environ.get(ENV_COUNTS)
            if not where:
                return
            try:
                Path(where, f"{os.getpid()}.json").write_text(json.dumps(
                    {"pid": os.getpid(), "calls": dict(_state.calls), "fired": _state.fired}))
            except OSError:
                pass  # counting is best effort: the directory may be gone
        atexit.register(dump)


def reload_environment() -> None:
    """Start over from this process's environment as it is now: the plan and counters of a
    process forked from another (``guest.forkserver``) are its own, not its parent's."""
    clear()
    _from_environment()


_from_environment()
