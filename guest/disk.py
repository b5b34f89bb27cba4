"""The guest's virtual disk: a host-side file of 4096-byte blocks (``<vm>.disk``).

The hypervisor creates and sizes the file before the guest kernel starts
(:func:`hypervisor.rundir.create_disk`) and names it in the kernel's ``--config``
(``disk_path``, ``disk`` bytes); the kernel opens it here and its page cache
(:mod:`guest.mm`) reads and writes whole blocks. A run of contiguous blocks moves in one
system call: ``pread``/``pwrite`` at points ``disk.read``/``disk.write`` of
:mod:`protocol.syscalls`, so a test can make the disk fail as a real one does. A failed
call raises ``OSError`` having changed nothing the caller relies on.

Units: blocks of 4096 bytes (one page), offsets ``block * 4096``.
"""

from __future__ import annotations

import os

import numpy as np

from guest.kernels import PAGE_SIZE
from protocol import syscalls


class DiskError(ValueError):
    """The disk file cannot be used (missing, not a regular file, too small)."""


class DiskDevice:
    """An open virtual disk of ``nblocks`` blocks."""

    def __init__(self, path: str, size_bytes: int) -> None:
        if size_bytes <= 0 or size_bytes % PAGE_SIZE:
            raise DiskError(f"disk size must be a positive multiple of {PAGE_SIZE} bytes, "
                            f"got {size_bytes}")
        self.path = path
        self.nblocks = size_bytes // PAGE_SIZE
        try:
            self.fd = syscalls.open_file("disk.open", path, os.O_RDWR | os.O_NOFOLLOW)
        except OSError as e:
            raise DiskError(f"cannot open the disk {path}: {e}") from None
        st = os.fstat(self.fd)
        if not (st.st_mode & 0o170000 == 0o100000 and st.st_size >= size_bytes):
            os.close(self.fd)
            raise DiskError(f"the disk {path} is not a regular file of {size_bytes} bytes "
                            f"(it has {st.st_size})")
        #: System calls made (reads, writes) and blocks moved (read, written).
        self.read_calls = 0
        self.write_calls = 0

    def _check(self, block: int, count: int) -> None:
        if count <= 0 or block < 0 or block + count > self.nblocks:
            raise IndexError(f"blocks {block}..{block + count - 1} outside the disk's "
                             f"{self.nblocks} blocks")

    def read(self, block: int, count: int) -> bytes:
        """Blocks ``[block, block + count)`` in one ``pread``; OSError when it fails or
        comes back short."""
        self._check(block, count)
        data = syscalls.pread_exact("disk.read", self.fd, count * PAGE_SIZE, block * PAGE_SIZE)
        self.read_calls += 1
        return data

    def write(self, block: int, data: bytes | memoryview) -> None:
        """Write whole blocks from ``block`` on in one ``pwrite``; OSError when refused."""
        count = len(data) // PAGE_SIZE
        if len(data) % PAGE_SIZE:
            raise ValueError(f"a disk write is whole blocks, got {len(data)} bytes")
        self._check(block, count)
        syscalls.pwrite_all("disk.write", self.fd, data, block * PAGE_SIZE)
        self.write_calls += 1

    def close(self) -> None:
        os.close(self.fd)


def contiguous_runs(blocks: np.ndarray) -> list[tuple[int, int, int]]:
    """Runs of consecutive block numbers in sorted ``blocks``: ``(first index, first block,
    length)`` each, in order (the unit of one disk system call)."""
    if blocks.size == 0:
        return []
    cut = np.flatnonzero(np.diff(blocks) != 1) + 1
    starts = np.concatenate(([0], cut))
    ends = np.concatenate((cut, [blocks.size]))
    return [(int(s), int(blocks[s]), int(e - s)) for s, e in zip(starts, ends, strict=True)]
