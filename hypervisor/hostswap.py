"""The host swap device: a file of 4096-byte slots.

Units: slot ``s`` lives at byte offset ``s * 4096`` of ``host.swap`` in the run dir. The slot
map itself lives in the frame ledger (``FrameLedger.swap_state``); this module only moves
bytes, coalescing consecutive (gpfn, slot) pairs into one ``pread``/``pwrite`` each.
A host with ``swap = "0"`` has no file and zero slots: every reclaim then ends in host OOM.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from hypervisor.vmmem import (
    FALLOC_FL_KEEP_SIZE,
    FALLOC_FL_PUNCH_HOLE,
    PAGE_SIZE,
    VmMemory,
    fallocate,
)


def _paired_runs(gpfns: np.ndarray, slots: np.ndarray) -> list[tuple[int, int, int]]:
    """Split aligned (gpfn, slot) arrays into (gpfn, slot, count) runs where both advance by 1."""
    g = np.asarray(gpfns, dtype=np.int64)
    s = np.asarray(slots, dtype=np.int64)
    if g.size == 0:
        return []
    breaks = np.nonzero((np.diff(g) != 1) | (np.diff(s) != 1))[0] + 1
    starts = np.concatenate(([0], breaks))
    ends = np.concatenate((breaks, [g.size]))
    return [(int(g[a]), int(s[a]), int(b - a)) for a, b in zip(starts, ends)]


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
            self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            os.ftruncate(self.fd, self.slots * PAGE_SIZE)

    def swap_out(self, mem: VmMemory, gpfns: np.ndarray, slots: np.ndarray) -> None:
        """Copy pages ``gpfns`` of ``mem`` into ``slots`` (aligned arrays)."""
        for g, s, n in _paired_runs(gpfns, slots):
            data = mem.read_pages(g, n)
            self._pwrite_all(data, s * PAGE_SIZE)
            self.bytes_out += len(data)

    def swap_in(self, mem: VmMemory, gpfns: np.ndarray, slots: np.ndarray) -> None:
        """Copy ``slots`` back into pages ``gpfns`` of ``mem`` (this makes them resident)."""
        for g, s, n in _paired_runs(gpfns, slots):
            data = os.pread(self.fd, n * PAGE_SIZE, s * PAGE_SIZE)
            if len(data) != n * PAGE_SIZE:
                raise OSError(f"short read from host swap slot {s} ({len(data)} bytes)")
            mem.write_pages(g, data)
            self.bytes_in += len(data)

    def discard(self, slots: np.ndarray) -> int:
        """Give the disk blocks of freed ``slots`` back (one punch per run of slots), so
        the swap file holds only what is swapped out now. Returns the punch calls."""
        if self.fd < 0 or len(slots) == 0:
            return 0
        s = np.unique(np.asarray(slots, dtype=np.int64))
        breaks = np.nonzero(np.diff(s) != 1)[0] + 1
        starts = np.concatenate(([0], breaks))
        ends = np.concatenate((breaks, [s.size]))
        for a, b in zip(starts.tolist(), ends.tolist()):
            fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                      int(s[a]) * PAGE_SIZE, (b - a) * PAGE_SIZE)
        return int(starts.size)

    def resident_slots(self) -> int:
        """Slots whose bytes occupy disk blocks (st_blocks of the swap file)."""
        return 0 if self.fd < 0 else os.fstat(self.fd).st_blocks * 512 // PAGE_SIZE

    def _pwrite_all(self, data: bytes, off: int) -> None:
        view = memoryview(data)
        while view:
            n = os.pwrite(self.fd, view, off)
            view = view[n:]
            off += n

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
