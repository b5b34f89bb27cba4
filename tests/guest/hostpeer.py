"""An in-test hypervisor peer for the machine channel: real socket, real memfds.

It does what the hypervisor core does for one VM, minimally: creates the RAM, EPT and
accessed-bit memfds, answers ``boot`` with ``boot_ok`` carrying them (SCM_RIGHTS), backs
pages on ``ept_fault`` (``fallocate`` zeros, or the bytes it swapped out) and can revoke
pages the host way (EPT clear → ``shootdown`` → wait for the ack → copy out → punch hole).
The real hypervisor (engineer H) replaces it in end-to-end tests.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import mmap
import os
import socket

import numpy as np

from protocol import messages as m
from protocol.aio import Channel, PeerClosed
from protocol.connection import MachineHost
from protocol.errors import ProtocolError

PAGE = 4096
_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]


def fallocate(fd: int, mode: int, off: int, length: int) -> None:
    if _libc.fallocate(fd, mode, off, length) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


PUNCH = 0x02 | 0x01  # PUNCH_HOLE | KEEP_SIZE


def runs_of(gpfns: np.ndarray) -> list[tuple[int, int]]:
    g = np.unique(np.asarray(gpfns, np.int64))
    if g.size == 0:
        return []
    cut = np.flatnonzero(np.diff(g) != 1) + 1
    return [(int(c[0]), int(c.size)) for c in np.split(g, cut)]


class HostPeer:
    def __init__(self, path: str, vm: str, pages: int) -> None:
        self.path = path
        self.vm = vm
        self.pages = pages
        self.ram_fd = os.memfd_create(f"{vm}-ram")
        os.ftruncate(self.ram_fd, pages * PAGE)
        self.ept_fd = os.memfd_create(f"{vm}-ept")
        os.ftruncate(self.ept_fd, pages)
        self.acc_fd = os.memfd_create(f"{vm}-acc")
        os.ftruncate(self.acc_fd, pages)
        self._ept_map = mmap.mmap(self.ept_fd, pages)
        self._acc_map = mmap.mmap(self.acc_fd, pages)
        self.ept = np.frombuffer(self._ept_map, np.uint8)
        self.acc = np.frombuffer(self._acc_map, np.uint8)
        self.swapped: dict[int, bytes] = {}
        self.faults = 0
        self.in_flight: dict[int, np.ndarray] = {}  # ept_fault id -> pfns, not resumed yet
        self._fault_tasks: set[asyncio.Task[None]] = set()  # held until done (no early GC)
        self.fault_pages = 0
        self.booted = asyncio.Event()
        self.gone = asyncio.Event()
        self.ch: Channel | None = None
        self._acks: dict[int, asyncio.Future[None]] = {}
        self._lock = asyncio.Lock()
        self._lsock: socket.socket | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(self.path)
        s.listen(1)
        s.setblocking(False)
        self._lsock = s
        self._task = asyncio.create_task(self._serve())

    async def _serve(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._lsock is not None
        sock, _ = await loop.sock_accept(self._lsock)
        sock.setblocking(False)
        conn = MachineHost()
        while True:  # read boot with plain socket calls: boot_ok must carry fds
            ev = conn.next_event()
            if isinstance(ev, m.Boot):
                break
            data = await loop.sock_recv(sock, 65536)
            conn.receive_data(data)
            if not data:
                self.gone.set()
                return
        frame = conn.send(m.BootOk(pages=self.pages, page_size=PAGE))
        socket.send_fds(sock, [frame], [self.ram_fd, self.ept_fd, self.acc_fd])
        reader, writer = await asyncio.open_unix_connection(sock=sock)
        self.ch = Channel(conn, reader, writer)
        self.booted.set()
        try:
            while True:
                msg = await self.ch.recv()
                if isinstance(msg, m.EptFault):
                    self.in_flight[msg.id] = msg.pfn_array.astype(np.int64)
                    # served in its own task: a fault waits while a revoke is in progress,
                    # and this loop must keep reading to see that revoke's shootdown_ack
                    task = asyncio.create_task(self._fault(msg))
                    self._fault_tasks.add(task)
                    task.add_done_callback(self._fault_tasks.discard)
                elif isinstance(msg, m.ShootdownAck):
                    fut = self._acks.pop(msg.id, None)
                    if fut is not None:
                        fut.set_result(None)
        except (PeerClosed, ConnectionError):
            pass
        finally:
            self.gone.set()

    async def _fault(self, msg: m.EptFault) -> None:
        async with self._lock:
            if self.in_flight.pop(msg.id, None) is None:
                return  # resumed already by resume_then_halt
            self._back(msg.pfn_array.astype(np.int64))
        assert self.ch is not None
        try:
            await self.ch.send(m.Resume(id=msg.id))
        except (PeerClosed, ConnectionError, ProtocolError):
            pass

    async def resume_then_halt(self, reason: str = "test") -> int:
        """Resume every fault in flight *without* backing its pages and send ``halt`` right
        behind, in one write: the guest sees its resume and the halt together, and its vCPU
        must exit again at once — on a channel the halt has closed (the shutdown race).
        Call with ``_lock`` held, so that no fault is being served meanwhile."""
        assert self.ch is not None
        ids = list(self.in_flight)
        for mid in ids:
            del self.in_flight[mid]
            self.ch.send_nowait(m.Resume(id=mid))
        self.ch.send_nowait(m.Halt(reason=reason))
        await self.ch.drain()
        return len(ids)

    def _back(self, pfns: np.ndarray) -> None:
        self.faults += 1
        self.fault_pages += int(pfns.size)
        for g in pfns.tolist():
            data = self.swapped.pop(g, None)
            if data is not None:
                os.pwrite(self.ram_fd, data, g * PAGE)
        for start, count in runs_of(pfns):
            fallocate(self.ram_fd, 0, start * PAGE, count * PAGE)
        self.ept[pfns] = 1

    async def revoke(self, gpfns: np.ndarray) -> int:
        """Host-swap these pages: shootdown first, then copy out and punch."""
        assert self.ch is not None
        async with self._lock:  # no fault is served between EPT clear and the punch
            return await self._revoke(gpfns)

    async def _revoke(self, gpfns: np.ndarray) -> int:
        assert self.ch is not None
        g = np.unique(np.asarray(gpfns, np.int64))
        g = g[self.ept[g] == 1]
        if g.size == 0:
            return 0
        self.ept[g] = 0
        mid = self.ch.conn.new_id()
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._acks[mid] = fut
        await self.ch.send(m.Shootdown(id=mid, count=int(g.size)))
        await fut
        for p in g.tolist():
            self.swapped[p] = os.pread(self.ram_fd, PAGE, p * PAGE)
        for start, count in runs_of(g):
            fallocate(self.ram_fd, PUNCH, start * PAGE, count * PAGE)
        return int(g.size)

    async def halt(self, reason: str = "test") -> None:
        if self.ch is not None:
            try:
                await self.ch.send(m.Halt(reason=reason))
            except (PeerClosed, Exception):
                pass

    def resident_pages(self) -> int:
        return os.fstat(self.ram_fd).st_blocks * 512 // PAGE

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass
        if self.ch is not None:
            await self.ch.close()
        if self._lsock is not None:
            self._lsock.close()
        for fd in (self.ram_fd, self.ept_fd, self.acc_fd):
            if fd >= 0:
                os.close(fd)
        self.ram_fd = self.ept_fd = self.acc_fd = -1
        self._task = None
        self._lsock = None
