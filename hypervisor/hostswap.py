"""The host swap device: a file of 4096-byte slots.

Units: slot ``s`` lives at byte offset ``s * 4096`` of ``host.swap`` in the run dir. The slot
map itself lives in the frame ledger (``FrameLedger.swap_state``); this module only moves
bytes, coalescing consecutive (gpfn, slot) pairs into one ``pread``/``pwrite`` each.
A host with ``swap = "0"`` has no file and zero slots: every reclaim then ends in host OOM.

Every system call goes through a failure-injection point of :mod:`protocol.syscalls`
(``hostswap.write``, ``hostswap.read``, ``hostswap.truncate``, ``hostswap.punch``), and
every error reaches the caller before it records anything: a page is committed to a slot
only after its bytes are in the file.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from hypervisor.vmmem import FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, VmMemory
from protocol import syscalls
from protocol.constants import PAGE_SIZE


def paired_runs(gpfns: np.ndarray, slots: np.ndarray) -> list[tuple[int, int, int]]:
    """Split aligned (gpfn, slot) arrays into (gpfn, slot, count) runs where both advance by 1."""
    g = np.asarray(gpfns, dtype=np.int64)
    s = np.asarray(slots, dtype=np.int64)
    if g.size == 0:
        return []
    breaks = np.nonzero((np.diff(g) != 1) | (np.diff(s) != 1))[0] + 1
    starts = np.concatenate(([0], breaks))
    ends = np.concatenate((breaks, [g.size]))
    return [(int(g[a]), int(s[a]), int(b - a)) for a, b in zip(starts, ends, strict=True)]


def noncontiguous(slots: np.ndarray) -> int:
    """Reads of one fault (slots in the order read) whose slot is not the previous one + 1:
    the seeks a disk would make beyond the first."""
    s = np.asarray(slots, dtype=np.int64)
    return int(np.count_nonzero(np.diff(s) != 1)) if s.size > 1 else 0


class HostSwap:
    """Slot storage for host-swapped guest pages."""

    def __init__(self, path: Path | None, slots: int) -> None:
        if slots < 0:
            raise ValueError(f"slots must be >= 0, got {slots}")
        self.slots = int(slots)
        self.path = path
        self.fd = -1
        self.bytes_out = 0
        self.bytes_in = 0
        if slots:
            if path is None:
                raise ValueError("a host swap with slots needs a file path")
            self.fd = syscalls.open_file("hostswap.open", path,
                                         os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW)
            try:
                syscalls.ftruncate("hostswap.truncate", self.fd, self.slots * PAGE_SIZE)
            except BaseException:
                self.close()
                raise

    def write(self, data: bytes, slot: int) -> None:
        """Put whole pages ``data`` into the slots from ``slot`` on. Raises OSError
        (ENOSPC, EIO, ...) when the bytes are not all in the file."""
        syscalls.pwrite_all("hostswap.write", self.fd, data, slot * PAGE_SIZE)
        self.bytes_out += len(data)

    def write_run(self, mem: VmMemory, gpfn: int, slot: int, count: int) -> None:
        """Copy ``count`` pages of ``mem`` from ``gpfn`` into slots from ``slot`` on."""
        self.write(mem.read_pages(gpfn, count), slot)

    def swap_out(self, mem: VmMemory, gpfns: np.ndarray, slots: np.ndarray) -> None:
        """Copy pages ``gpfns`` of ``mem`` into ``slots`` (aligned arrays)."""
        for g, s, n in paired_runs(gpfns, slots):
            self.write_run(mem, g, s, n)

    def read(self, gpfns: np.ndarray, slots: np.ndarray) -> list[tuple[int, bytes]]:
        """The bytes of ``slots`` as (first gpfn, data) runs, for :meth:`install`. Reads
        everything before anything is written, so a failed read leaves the VM untouched."""
        out = []
        for g, s, n in paired_runs(gpfns, slots):
            out.append((g, syscalls.pread_exact("hostswap.read", self.fd, n * PAGE_SIZE,
                                                s * PAGE_SIZE)))
        return out

    def install(self, mem: VmMemory, runs: list[tuple[int, bytes]]) -> None:
        """Write runs from :meth:`read` into ``mem`` (this makes those pages resident)."""
        for g, data in runs:
            mem.write_pages(g, data)
            self.bytes_in += len(data)

    def swap_in(self, mem: VmMemory, gpfns: np.ndarray, slots: np.ndarray) -> None:
        """Copy ``slots`` back into pages ``gpfns`` of ``mem`` (this makes them resident)."""
        self.install(mem, self.read(gpfns, slots))

    def discard(self, slots: np.ndarray) -> int:
        """Give the disk blocks of freed ``slots`` back (one punch per run of slots), so
        the swap file holds only what is swapped out now. Returns the punch calls."""
        if self.fd < 0 or len(slots) == 0:
            return 0
        s = np.unique(np.asarray(slots, dtype=np.int64))
        breaks = np.nonzero(np.diff(s) != 1)[0] + 1
        starts = np.concatenate(([0], breaks))
        ends = np.concatenate((breaks, [s.size]))
        for a, b in zip(starts.tolist(), ends.tolist(), strict=True):
            syscalls.fallocate("hostswap.punch", self.fd,
                               FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                               int(s[a]) * PAGE_SIZE, (b - a) * PAGE_SIZE)
        return int(starts.size)

    def resident_slots(self) -> int:
        """Slots whose bytes occupy disk blocks (st_blocks of the swap file)."""
        return 0 if self.fd < 0 else os.fstat(self.fd).st_blocks * 512 // PAGE_SIZE

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
