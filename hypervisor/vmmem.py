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

import ctypes
import ctypes.util
import mmap
import os

import numpy as np

from protocol import pfn as P

PAGE_SIZE = 4096
EPT_NOT_PRESENT = 0
EPT_PRESENT = 1

# <linux/falloc.h>
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_fallocate = _libc.fallocate
_fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
_fallocate.restype = ctypes.c_int


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2) with a mode (os.posix_fallocate cannot punch holes)."""
    if _fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"fallocate(mode={mode:#x}, off={offset}, len={length}): "
                      f"{os.strerror(err)}")


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
        self.ram_fd = os.memfd_create(f"balloonlab-{name}-ram", os.MFD_CLOEXEC)
        self.ept_fd = os.memfd_create(f"balloonlab-{name}-ept", os.MFD_CLOEXEC)
        self.acc_fd = os.memfd_create(f"balloonlab-{name}-accessed", os.MFD_CLOEXEC)
        try:
            os.ftruncate(self.ram_fd, self.pages * PAGE_SIZE)
            os.ftruncate(self.ept_fd, self.pages)
            os.ftruncate(self.acc_fd, self.pages)
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
        """Release pages to the OS, one PUNCH_HOLE per contiguous run. Returns the call count."""
        return self.punch_runs(runs_of(sorted_gpfns))

    def punch_runs(self, runs: np.ndarray) -> int:
        """:meth:`punch` for pages given as (k, 2) runs (first gpfn, count), one PUNCH_HOLE
        per run as given: coalesce adjacent runs first."""
        runs = np.asarray(runs).reshape(-1, 2)
        mode = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
        for first, count in runs.tolist():
            fallocate(self.ram_fd, mode, first * PAGE_SIZE, count * PAGE_SIZE)
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
        return os.pread(self.ram_fd, count * PAGE_SIZE, first * PAGE_SIZE)

    def write_pages(self, first: int, data: bytes | memoryview) -> None:
        view = memoryview(data)
        off = first * PAGE_SIZE
        while view:
            n = os.pwrite(self.ram_fd, view, off)
            view = view[n:]
            off += n

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
