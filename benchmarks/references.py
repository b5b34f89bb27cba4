"""The machine's own limits, measured in the same run as what the benchmarks compare to them.

Units: sizes in bytes, pages of 4096 bytes, times in seconds (``time.perf_counter``), rates in
GiB/s (2^30 bytes per second) and pages/s.

* :func:`punch_limit` — one ``fallocate(PUNCH_HOLE|KEEP_SIZE)`` over a fully populated memfd:
  the fastest a host can give guest memory back to Linux (the release limit).
* :func:`mapped_punch_limit` — the same punch while every page is mapped into a process's
  page tables (as guest RAM is mapped by the guest kernel process, and by QEMU): Linux must
  also zap each page's mapping, so this is the release limit a hypervisor can reach.
* :func:`per_page_punch` — one punch call per 4 KiB page: the path QEMU's virtio-balloon
  takes (``ram_block_discard_range`` per pfn), here from Python through ctypes, so the
  interpreter's per-call cost (~0.2 µs) sits on top of the syscall.
* :func:`first_touch` — write one byte per page of an empty memfd through a shared mmap:
  a page fault allocates and zeroes each page (the refault limit).
* :func:`fallocate_populate` — ``fallocate(mode=0)`` over an empty memfd: what the host uses
  to back pages in bulk, for reference.
* :func:`read_bandwidth` — ``numpy.sum`` over a large uint64 array: the streaming read rate
  the Numba kernels are compared against.

Each check verifies with ``os.fstat(fd).st_blocks`` (512-byte units) that the memory was really
populated or released, and raises :class:`ReferenceError` when it was not: a reference that
silently measured nothing would make every ratio a lie.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial

import numpy as np

from protocol.constants import PAGE_SIZE

GIB = float(1 << 30)

# <linux/falloc.h>
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
PUNCH = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_fallocate = _libc.fallocate
_fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
_fallocate.restype = ctypes.c_int


class ReferenceError(RuntimeError):
    """A reference measurement could not be made or did not do what it claims."""


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2) with a mode (``os.posix_fallocate`` cannot punch holes)."""
    if _fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"fallocate(mode={mode:#x}, off={offset}, len={length}): "
                      f"{os.strerror(err)}")


def resident_bytes(fd: int) -> int:
    """Bytes the OS holds for a memfd (``st_blocks`` counts 512-byte units)."""
    return os.fstat(fd).st_blocks * 512


@dataclass(frozen=True)
class Timing:
    """min/median/max over repeats of one measurement, in seconds."""

    min: float
    median: float
    max: float
    repeats: int

    @classmethod
    def of(cls, seconds: list[float]) -> Timing:
        if not seconds:
            raise ValueError("no timings to summarise")
        return cls(min(seconds), statistics.median(seconds), max(seconds), len(seconds))


@dataclass(frozen=True)
class Rate:
    """A measured rate: ``nbytes`` moved per repeat; rates are from the median time, with the
    best (from ``min``) and worst (from ``max``) alongside."""

    name: str
    nbytes: int
    seconds: Timing
    calls: int  # syscalls (or equivalent operations) per repeat

    @property
    def pages(self) -> int:
        return self.nbytes // PAGE_SIZE

    @property
    def gib_s(self) -> float:
        return self.nbytes / GIB / self.seconds.median

    @property
    def pages_s(self) -> float:
        return self.pages / self.seconds.median

    def as_dict(self) -> dict[str, object]:
        d: dict[str, object] = {"name": self.name, "bytes": self.nbytes, "pages": self.pages,
                                "calls": self.calls, "seconds": asdict(self.seconds)}
        d["gib_s"] = self.gib_s
        d["gib_s_min"] = self.nbytes / GIB / self.seconds.max
        d["gib_s_max"] = self.nbytes / GIB / self.seconds.min
        d["pages_s"] = self.pages_s
        return d


def _check_size(nbytes: int) -> int:
    if nbytes < PAGE_SIZE or nbytes % PAGE_SIZE:
        raise ValueError(f"size must be a positive multiple of {PAGE_SIZE} bytes, "
                         f"got {nbytes}")
    return int(nbytes)


def _check_repeats(repeats: int) -> int:
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    return int(repeats)


class _Memfd:
    """An empty memfd of ``nbytes`` (sparse), closed on exit."""

    def __init__(self, nbytes: int, name: str) -> None:
        self.nbytes = nbytes
        self.fd = os.memfd_create(f"balloonlab-bench-{name}", os.MFD_CLOEXEC)
        os.ftruncate(self.fd, nbytes)

    def __enter__(self) -> _Memfd:
        return self

    def __exit__(self, *exc: object) -> None:
        os.close(self.fd)

    def populate(self) -> None:
        fallocate(self.fd, 0, 0, self.nbytes)
        self.expect_resident(self.nbytes, "after fallocate(mode=0) population")

    def release(self) -> None:
        fallocate(self.fd, PUNCH, 0, self.nbytes)
        self.expect_resident(0, "after punching the whole file")

    def expect_resident(self, want: int, when: str) -> None:
        got = resident_bytes(self.fd)
        # tmpfs may round to huge pages when THP is on for shmem; never below what we asked.
        ok = got >= want if want else got == 0
        if not ok:
            raise ReferenceError(f"memfd holds {got} bytes {when}, expected "
                                 f"{'at least ' if want else ''}{want}: the kernel did not "
                                 "do what the reference measures")


def _timed(fn: Callable[[], None]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def punch_limit(nbytes: int = 1 << 30, repeats: int = 3) -> Rate:
    """One PUNCH_HOLE over a fully populated memfd of ``nbytes``: the release limit."""
    nbytes, repeats = _check_size(nbytes), _check_repeats(repeats)
    times = []
    with _Memfd(nbytes, "punch") as m:
        for _ in range(repeats):
            m.populate()
            times.append(_timed(lambda: fallocate(m.fd, PUNCH, 0, nbytes)))
            m.expect_resident(0, "after the timed punch")
    return Rate("punch_limit", nbytes, Timing.of(times), calls=1)


def mapped_punch_limit(nbytes: int = 1 << 30, repeats: int = 3) -> Rate:
    """One PUNCH_HOLE over a populated memfd of ``nbytes`` whose every page is mapped (shared,
    written once) in this process, as guest RAM is mapped in the guest kernel process: the
    punch also unmaps each page."""
    nbytes, repeats = _check_size(nbytes), _check_repeats(repeats)
    times = []
    with _Memfd(nbytes, "mapped-punch") as m:
        mm = mmap.mmap(m.fd, nbytes)
        try:
            view = np.frombuffer(mm, dtype=np.uint8)
            for _ in range(repeats):
                m.populate()
                view[::PAGE_SIZE] = 1  # map every page (a write fault per page)
                times.append(_timed(lambda: fallocate(m.fd, PUNCH, 0, nbytes)))
                m.expect_resident(0, "after the timed punch of the mapped file")
            del view  # the mmap closes only once no array exports its buffer
        finally:
            mm.close()
    return Rate("mapped_punch_limit", nbytes, Timing.of(times), calls=1)


def per_page_punch(nbytes: int = 1 << 30, repeats: int = 3) -> Rate:
    """One PUNCH_HOLE per 4 KiB page over a populated memfd (QEMU's per-pfn path)."""
    nbytes, repeats = _check_size(nbytes), _check_repeats(repeats)
    pages = nbytes // PAGE_SIZE
    times = []
    with _Memfd(nbytes, "per-page") as m:
        fd = m.fd
        call = _fallocate  # local: keep the loop to one ctypes call per page

        def punch_pages() -> None:
            bad = 0
            for off in range(0, nbytes, PAGE_SIZE):
                bad |= call(fd, PUNCH, off, PAGE_SIZE)
            if bad:
                raise ReferenceError(f"a per-page punch failed: {os.strerror(ctypes.get_errno())}")

        for _ in range(repeats):
            m.populate()
            times.append(_timed(punch_pages))
            m.expect_resident(0, "after the timed per-page punch")
    return Rate("per_page_punch", nbytes, Timing.of(times), calls=pages)


def first_touch(nbytes: int = 1 << 30, repeats: int = 3) -> Rate:
    """Write one byte per page of an empty memfd through a shared mmap: the refault limit."""
    nbytes, repeats = _check_size(nbytes), _check_repeats(repeats)
    times = []
    with _Memfd(nbytes, "first-touch") as m:
        for _ in range(repeats):
            m.expect_resident(0, "before first touch")
            mm = mmap.mmap(m.fd, nbytes)
            try:
                view = np.frombuffer(mm, dtype=np.uint8)
                # A strided store in C: one page fault (allocate + zero) per page.
                touch = partial(view.__setitem__, slice(None, None, PAGE_SIZE), 1)
                times.append(_timed(touch))
                del touch, view  # the mmap closes only once no array exports its buffer
            finally:
                mm.close()
            m.expect_resident(nbytes, "after first touch")
            m.release()
    return Rate("first_touch", nbytes, Timing.of(times), calls=nbytes // PAGE_SIZE)


def fallocate_populate(nbytes: int = 1 << 30, repeats: int = 3) -> Rate:
    """``fallocate(mode=0)`` over an empty memfd: bulk population, as the host backs pages."""
    nbytes, repeats = _check_size(nbytes), _check_repeats(repeats)
    times = []
    with _Memfd(nbytes, "populate") as m:
        for _ in range(repeats):
            m.expect_resident(0, "before population")
            times.append(_timed(lambda: fallocate(m.fd, 0, 0, nbytes)))
            m.expect_resident(nbytes, "after the timed fallocate(mode=0)")
            m.release()
    return Rate("fallocate_populate", nbytes, Timing.of(times), calls=1)


def read_bandwidth(nbytes: int = 256 << 20, repeats: int = 5) -> Rate:
    """``numpy.sum`` over a uint64 array of ``nbytes`` (already faulted in): read bandwidth."""
    if nbytes < 8 or nbytes % 8:
        raise ValueError(f"size must be a positive multiple of 8 bytes, got {nbytes}")
    repeats = _check_repeats(repeats)
    a = np.ones(nbytes // 8, dtype=np.uint64)  # ones, not zeros: zeros may map the zero page
    expect = a.shape[0]
    total = int(a.sum())  # warm-up, and fault every page in before timing
    if total != expect:
        raise ReferenceError(f"sum over {expect} ones gave {total}")
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        total = int(a.sum())
        times.append(time.perf_counter() - t0)
    if total != expect:
        raise ReferenceError(f"sum over {expect} ones gave {total}")
    return Rate("read_bandwidth", nbytes, Timing.of(times), calls=1)


def all_references(nbytes: int = 1 << 30, repeats: int = 3,
                   read_bytes: int = 256 << 20) -> dict[str, Rate]:
    """Every reference at one size, in a fixed order (the release path first, while the
    machine's page cache and free lists are in the same state as for the VM run)."""
    return {
        "punch_limit": punch_limit(nbytes, repeats),
        "mapped_punch_limit": mapped_punch_limit(nbytes, repeats),
        "per_page_punch": per_page_punch(nbytes, repeats),
        "first_touch": first_touch(nbytes, repeats),
        "fallocate_populate": fallocate_populate(nbytes, repeats),
        "read_bandwidth": read_bandwidth(read_bytes, max(repeats, 3)),
    }
