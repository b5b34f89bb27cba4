"""Per-VM guest memory: the RAM, EPT and accessed-bit memfds and the calls that move pages.

Units: pages of ``PAGE_SIZE`` (4096) bytes; offsets in the RAM memfd are ``gpfn * 4096``.

The RAM memfd is sparse: a page is resident (costs the OS a page) exactly when the host has
populated it with ``fallocate(mode=0)`` (zeros) or written swapped-in bytes into it, and stops
being resident when ``fallocate(PUNCH_HOLE|KEEP_SIZE)`` removes it. Both are issued once per
contiguous run of gpfns, never once per page where a run exists: the punch-hole
path is what makes inflate fast, and the per-call cost dominates small runs.

EPT and accessed arrays are one byte per guest page, mmap'd shared into numpy arrays here and
into the guest kernel after ``boot_ok`` hands it the same memfds.
"""

from __future__ import annotations

import mmap
import os

import numpy as np

from protocol import pfn as P
from protocol import syscalls
from protocol.constants import EPT_NOT_PRESENT, EPT_PRESENT, PAGE_SIZE

# <linux/falloc.h>
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02

def fallocate(fd: int, mode: int, offset: int, length: int, point: str | None = None) -> None:
    """fallocate(2) with a mode (os.posix_fallocate cannot punch holes), through the
    failure-injection point ``point`` of :mod:`protocol.syscalls` (by default
    ``memfd.punch`` for a punch, ``memfd.populate`` otherwise)."""
    if point is None:
        point = "memfd.punch" if mode & FALLOC_FL_PUNCH_HOLE else "memfd.populate"
    syscalls.fallocate(point, fd, mode, offset, length)


class PunchFailed(OSError):
    """A punch failed part-way; ``punched`` holds the gpfns whose runs were released."""

    def __init__(self, err: OSError, punched: np.ndarray) -> None:
        super().__init__(err.errno, err.strerror or str(err))
        self.punched = punched


def runs_of(sorted_gpfns: np.ndarray) -> np.ndarray:
    """Coalesce gpfns into an (n, 2) array of (first, count) runs (``protocol.pfn``'s kernel)."""
    g = np.asarray(sorted_gpfns, dtype=np.int64)
    return P.pfns_to_runs(g)


class VmMemory:
    """The three memfds of one VM and the host's mappings of EPT and accessed bytes."""

    def __init__(self, name: str, pages: int) -> None:
        if pages <= 0:
            raise ValueError(f"VM {name!r} needs at least one page")
        self.name = name
        self.pages = int(pages)
        self.ram_fd = self.ept_fd = self.acc_fd = -1
        try:
            self.ram_fd = _memfd(f"balloonlab-{name}-ram")
            self.ept_fd = _memfd(f"balloonlab-{name}-ept")
            self.acc_fd = _memfd(f"balloonlab-{name}-accessed")
            syscalls.ftruncate("memfd.create", self.ram_fd, self.pages * PAGE_SIZE)
            syscalls.ftruncate("memfd.create", self.ept_fd, self.pages)
            syscalls.ftruncate("memfd.create", self.acc_fd, self.pages)
            self._ept_map = mmap.mmap(self.ept_fd, self.pages)
            self._acc_map = mmap.mmap(self.acc_fd, self.pages)
        except BaseException:
            self._close_fds()
            raise
        self.ept = np.frombuffer(self._ept_map, dtype=np.uint8)
        self.accessed = np.frombuffer(self._acc_map, dtype=np.uint8)
        self.punch_calls = 0
        self.populate_calls = 0

    # ---- residency ---------------------------------------------------------------------

    def resident_pages(self) -> int:
        """Pages the OS holds for the RAM memfd right now (``st_blocks`` is 512-byte units)."""
        return os.fstat(self.ram_fd).st_blocks * 512 // PAGE_SIZE

    def punch(self, sorted_gpfns: np.ndarray) -> int:
        """Release pages to the OS, one PUNCH_HOLE per contiguous run. Returns the call count.

        A failed call raises :class:`PunchFailed` carrying the gpfns of the runs released
        before it (the rest stay resident)."""
        return self.punch_runs(runs_of(sorted_gpfns))

    def punch_runs(self, runs: np.ndarray) -> int:
        """:meth:`punch` for pages given as (k, 2) runs (first gpfn, count), one PUNCH_HOLE
        per run as given: coalesce adjacent runs first."""
        runs = np.asarray(runs).reshape(-1, 2)
        mode = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
        for i, (first, count) in enumerate(runs.tolist()):
            try:
                fallocate(self.ram_fd, mode, first * PAGE_SIZE, count * PAGE_SIZE)
            except OSError as e:
                self.punch_calls += i
                done = P.runs_to_pfns(runs[:i]) if i else np.empty(0, dtype=np.int64)
                raise PunchFailed(e, np.asarray(done, dtype=np.int64)) from e
        self.punch_calls += len(runs)
        return len(runs)

    def populate(self, sorted_gpfns: np.ndarray) -> int:
        """Make pages resident as zeros, one fallocate(0) per run. Returns the call count."""
        runs = runs_of(sorted_gpfns)
        for first, count in runs.tolist():
            fallocate(self.ram_fd, 0, first * PAGE_SIZE, count * PAGE_SIZE)
        self.populate_calls += len(runs)
        return len(runs)

    # ---- bytes -------------------------------------------------------------------------

    def read_pages(self, first: int, count: int) -> bytes:
        return syscalls.pread_exact("memfd.read", self.ram_fd, count * PAGE_SIZE,
                                    first * PAGE_SIZE)

    def write_pages(self, first: int, data: bytes | memoryview) -> None:
        syscalls.pwrite_all("memfd.write", self.ram_fd, data, first * PAGE_SIZE)

    # ---- EPT ---------------------------------------------------------------------------

    def set_present(self, gpfns: np.ndarray) -> None:
        self.ept[np.asarray(gpfns, dtype=np.int64)] = EPT_PRESENT

    def set_not_present(self, gpfns: np.ndarray) -> None:
        self.ept[np.asarray(gpfns, dtype=np.int64)] = EPT_NOT_PRESENT

    def fds(self) -> list[int]:
        """The memfds in ``boot_ok`` order: RAM, EPT, accessed."""
        return [self.ram_fd, self.ept_fd, self.acc_fd]

    # ---- lifetime ----------------------------------------------------------------------

    def _close_fds(self) -> None:
        for fd in (self.ram_fd, self.ept_fd, self.acc_fd):
            if fd < 0:
                continue
            try:
                os.close(fd)
            except OSError:
                pass
        self.ram_fd = self.ept_fd = self.acc_fd = -1

    def close(self) -> None:
        """Unmap and close (idempotent). Arrays handed out earlier must no longer be used."""
        if self.ram_fd < 0:
            return
        del self.ept, self.accessed
        for m in (self._ept_map, self._acc_map):
            try:
                m.close()
            except BufferError:
                # A numpy view still exports the buffer (e.g. the ledger's typed list);
                # the mapping goes away when the last view does.
                pass
        self._close_fds()


def _memfd(name: str) -> int:
    syscalls.hit("memfd.create")
    return os.memfd_create(name, os.MFD_CLOEXEC)
