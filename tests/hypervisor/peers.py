"""In-test peers of the hypervisor that speak the real wire protocol over real sockets.

Until the guest kernel and balloon driver processes run in a test, these stand in for them:

- :class:`GuestPeer` connects to ``<vm>.machine.sock``, boots (receiving the RAM, EPT and
  accessed memfds by SCM_RIGHTS), touches its RAM through the shared mappings exactly as a
  vCPU would (EPT check, accessed bit, read/write) and takes EPT exits with ``ept_fault``.
  A reader task answers ``shootdown`` with ``shootdown_ack`` (optionally late, or never, to
  play a hung guest) while faults wait for ``resume``.
- :class:`DriverPeer` connects to ``<vm>.balloon.sock`` and inflates, deflates, reports and
  answers ``stats_request``.
- :func:`raw_connect` / :func:`read_frame` for hostile clients that send arbitrary bytes.

All are asyncio and meant to run in the same event loop as the :class:`Host` under test.
"""

from __future__ import annotations

import asyncio
import mmap
import os
import shutil
import socket
import struct
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from hypervisor import rundir
from hypervisor.host import Host
from hypervisor.topology import parse_topology
from protocol import messages as m
from protocol import pfn as P
from protocol.aio import Channel, PeerClosed
from protocol.balloon import BalloonDriver, Completed
from protocol.connection import NEED_DATA, MachineGuest
from protocol.features import PAGE_SIZE, PROTOCOL_VERSION, Feature
from protocol.framing import decode_payload, encode_frame


class GuestPeer:
    """A guest kernel's machine channel plus a vCPU that touches pages."""

    def __init__(self, vm: str) -> None:
        self.vm = vm
        self.ch: Channel | None = None
        self.pages = 0
        self.shootdowns: list[int] = []
        #: Per shootdown, the pages it named (None: it did not say).
        self.shootdown_pfns: list[np.ndarray | None] = []
        #: Per resume, the pages the host said it read back from its swap (None: not said).
        self.resumed_swapped: list[np.ndarray | None] = []
        #: (evicted, evicted_ios) of every resume: host swap writes the fault waited for.
        self.resumed_evicted: list[tuple[int | None, int | None]] = []
        self.ack_shootdowns = True
        self.ack_delay = 0.0
        self.on_shootdown: Any = None  # callback run before the ack (e.g. "keep writing")
        self._resumes: dict[int, asyncio.Future[None]] = {}
        self._reader: asyncio.Task[None] | None = None
        self._ackers: set[asyncio.Task[None]] = set()
        self.halted = asyncio.Event()
        self.closed = asyncio.Event()
        self.error: m.Error | None = None

    async def connect(self, path: Path | str) -> GuestPeer:
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        await loop.sock_connect(sock, str(path))
        conn = MachineGuest()
        await loop.sock_sendall(sock, conn.send(m.Boot(vm=self.vm, version=PROTOCOL_VERSION)))
        fds: list[int] = []
        while True:
            ev = conn.next_event()
            if ev is not NEED_DATA:
                break
            fut = loop.create_future()
            loop.add_reader(sock.fileno(), lambda f=fut: f.done() or f.set_result(None))
            try:
                await fut
            finally:
                loop.remove_reader(sock.fileno())
            data, got, _flags, _addr = socket.recv_fds(sock, 1 << 16, 3)
            fds.extend(got)
            conn.receive_data(data)
        if not isinstance(ev, m.BootOk):
            sock.close()
            raise ConnectionError(f"boot failed: {ev!r}")
        assert len(fds) == 3, f"boot_ok carried {len(fds)} descriptors"
        self.pages = ev.pages
        self.ram_fd, self.ept_fd, self.acc_fd = fds
        self.ram = mmap.mmap(self.ram_fd, self.pages * PAGE_SIZE)
        self._ept_map = mmap.mmap(self.ept_fd, self.pages)
        self._acc_map = mmap.mmap(self.acc_fd, self.pages)
        self.ept = np.frombuffer(self._ept_map, dtype=np.uint8)
        self.accessed = np.frombuffer(self._acc_map, dtype=np.uint8)
        reader, writer = await asyncio.open_unix_connection(sock=sock)
        self.ch = Channel(conn, reader, writer)
        self._reader = asyncio.create_task(self._read_loop())
        return self

    async def _read_loop(self) -> None:
        assert self.ch is not None
        try:
            while True:
                msg = await self.ch.recv()
                if isinstance(msg, m.Resume):
                    self.resumed_swapped.append(msg.swapped_array)
                    self.resumed_evicted.append((msg.evicted, msg.evicted_ios))
                    fut = self._resumes.pop(msg.id, None)
                    if fut is not None and not fut.done():
                        fut.set_result(None)
                elif isinstance(msg, m.Shootdown):
                    self.shootdowns.append(msg.id)
                    self.shootdown_pfns.append(None if msg.pfns is None else msg.pfn_array)
                    t = asyncio.create_task(self._ack(msg.id))
                    self._ackers.add(t)  # the loop holds tasks weakly
                    t.add_done_callback(self._ackers.discard)
                elif isinstance(msg, m.Halt):
                    self.halted.set()
                    break
                elif isinstance(msg, m.Error):
                    self.error = msg
                    break
        except (PeerClosed, Exception):
            pass
        finally:
            self.closed.set()
            for fut in self._resumes.values():
                if not fut.done():
                    fut.set_exception(PeerClosed("machine channel closed"))

    async def _ack(self, sid: int) -> None:
        if self.on_shootdown is not None:
            self.on_shootdown()
        if not self.ack_shootdowns:
            return
        if self.ack_delay:
            await asyncio.sleep(self.ack_delay)
        if self.ch is not None and not self.closed.is_set():
            await self.ch.send(m.ShootdownAck(id=sid))

    async def fault(self, pfns: np.ndarray | list[int]) -> None:
        """Send one ``ept_fault`` and wait for its ``resume``."""
        assert self.ch is not None
        fid = self.ch.conn.new_id()
        fut = asyncio.get_running_loop().create_future()
        self._resumes[fid] = fut
        await self.ch.send(m.EptFault(id=fid, pfns=P.pfns_to_wire(np.asarray(pfns))))
        await fut

    async def ensure_present(self, pfns: np.ndarray | list[int]) -> None:
        """Fault in every not-present page (at most 4096 per exit), like the vCPU loop."""
        g = np.asarray(pfns, dtype=np.int64)
        while True:
            missing = g[self.ept[g] == 0]
            if missing.size == 0:
                return
            await self.fault(missing[:4096])

    async def write(self, pfn: int, data: bytes) -> None:
        """Write one page (data is padded with zeros) after making it present."""
        assert len(data) <= PAGE_SIZE
        await self.ensure_present([pfn])
        self.accessed[pfn] = 1
        self.ram[pfn * PAGE_SIZE:pfn * PAGE_SIZE + len(data)] = data

    async def read(self, pfn: int, n: int = PAGE_SIZE) -> bytes:
        await self.ensure_present([pfn])
        self.accessed[pfn] = 1
        return bytes(self.ram[pfn * PAGE_SIZE:pfn * PAGE_SIZE + n])

    async def touch(self, pfns: np.ndarray | list[int], stamp: bool = True) -> None:
        """Fault in and write a stamp (pfn, vm) into the first 16 bytes of each page."""
        g = np.asarray(pfns, dtype=np.int64)
        await self.ensure_present(g)
        for p in g.tolist():
            self.accessed[p] = 1
            if stamp:
                self.ram[p * PAGE_SIZE:p * PAGE_SIZE + 16] = self.stamp(p)

    def stamp(self, pfn: int) -> bytes:
        return struct.pack("<Q8s", pfn, self.vm.encode()[:8].ljust(8, b"\0"))

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
        if self.ch is not None:
            await self.ch.close()
        del self.ept, self.accessed
        for mm in (self.ram, self._ept_map, self._acc_map):
            try:
                mm.close()
            except BufferError:
                pass
        for fd in (self.ram_fd, self.ept_fd, self.acc_fd):
            os.close(fd)


class DriverPeer:
    """A balloon driver speaking the real balloon protocol."""

    def __init__(self, vm: str, features: list[str] | None = None) -> None:
        names = features if features is not None else ["must_tell_host", "stats", "reporting",
                                                       "ranges"]
        self.vm = vm
        self.conn = BalloonDriver(vm=vm, features=Feature.from_names(names))
        self.ch: Channel | None = None
        self.welcome: m.Welcome | None = None
        self.targets: list[int] = []
        self.stats: dict[int, int] = {}
        self.stats_requests = 0
        self._acks: dict[int, asyncio.Future[m.Ack]] = {}
        self._reader: asyncio.Task[None] | None = None
        self.closed = asyncio.Event()
        self.error: m.Error | None = None

    async def connect(self, path: Path | str) -> DriverPeer:
        reader, writer = await asyncio.open_unix_connection(str(path))
        self.ch = Channel(self.conn, reader, writer)
        writer.write(self.conn.hello())
        msg = await self.ch.recv()
        if not isinstance(msg, m.Welcome):
            raise ConnectionError(f"expected welcome, got {msg!r}")
        self.welcome = msg
        self._reader = asyncio.create_task(self._read_loop())
        return self

    async def _read_loop(self) -> None:
        assert self.ch is not None
        try:
            while True:
                msg = await self.ch.recv()
                if isinstance(msg, m.Config):
                    self.targets.append(msg.num_pages)
                elif isinstance(msg, m.StatsRequest):
                    self.stats_requests += 1
                    await self.ch.send(m.Stats(id=self.conn.new_id(), stats=dict(self.stats)))
                elif isinstance(msg, Completed):
                    fut = self._acks.pop(msg.request.id, None)
                    if fut is not None and not fut.done():
                        fut.set_result(msg.ack)
                elif isinstance(msg, m.Error):
                    self.error = msg
                    break
        except (PeerClosed, Exception):
            pass
        finally:
            self.closed.set()
            for fut in self._acks.values():
                if not fut.done():
                    fut.set_exception(PeerClosed("balloon channel closed"))

    async def _request(self, msg: m.Message) -> m.Ack:
        assert self.ch is not None
        fut = asyncio.get_running_loop().create_future()
        self._acks[msg.id] = fut  # type: ignore[attr-defined]
        await self.ch.send(msg)
        return await fut

    def _pfnset(self, pfns: Any, runs: bool) -> dict[str, bytes]:
        g = np.asarray(pfns, dtype=np.int64)
        if runs:
            return {"runs": P.runs_to_wire(P.pfns_to_runs(g.astype(np.uint32)))}
        return {"pfns": P.pfns_to_wire(g)}

    async def inflate(self, pfns: Any, *, runs: bool = True) -> m.Ack:
        return await self._request(m.Inflate(id=self.conn.new_id(), **self._pfnset(pfns, runs)))

    async def deflate(self, pfns: Any, *, runs: bool = True) -> m.Ack:
        return await self._request(m.Deflate(id=self.conn.new_id(), **self._pfnset(pfns, runs)))

    async def report(self, pfns: Any) -> m.Ack:
        return await self._request(m.Report(id=self.conn.new_id(),
                                            **self._pfnset(pfns, True)))

    async def actual(self, pages: int, stall: bool = False) -> None:
        assert self.ch is not None
        await self.ch.send(m.Actual(actual=pages, stall=stall or None))

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
        if self.ch is not None:
            await self.ch.close()


async def raw_connect(path: Path | str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_unix_connection(str(path))


def frame(payload: dict[str, Any]) -> bytes:
    return encode_frame(payload)


async def read_frame(reader: asyncio.StreamReader, timeout: float = 5.0) -> dict[str, Any] | None:
    """The next frame's decoded map, or None at EOF."""
    try:
        hdr = await asyncio.wait_for(reader.readexactly(4), timeout)
    except asyncio.IncompleteReadError:
        return None
    (n,) = struct.unpack(">I", hdr)
    body = await asyncio.wait_for(reader.readexactly(n), timeout)
    return decode_payload(body)


async def read_until_eof(reader: asyncio.StreamReader, timeout: float = 5.0) -> list[dict]:
    out = []
    while True:
        f = await read_frame(reader, timeout)
        if f is None:
            return out
        out.append(f)




PAGE = 4096


def topo(frames: int, swap_pages: int, vms: dict[str, int], extra: str = "") -> str:
    text = (f'[host]\nname = "t"\nmemory = "{frames * PAGE}"\nswap = "{swap_pages * PAGE}"\n'
            f'policy = "none"\npolicy_interval = "1s"\n')
    for name, pages in vms.items():
        text += (f'[[vm]]\nname = "{name}"\nmemory = "{pages * PAGE}"\n'
                 f'stats_interval = "50ms"\nmin_memory = "{PAGE}"\n{extra}')
    return text


class Lab:
    """A running Host with peers; use via the ``lab`` fixture."""

    def __init__(self, text: str, run_dir: Path | None = None) -> None:
        self.base = Path(tempfile.mkdtemp(prefix="bl-", dir="/tmp"))
        self.run_dir = run_dir or self.base / "run"
        self.host = Host(parse_topology(text), launch_vm_processes=False, run_dir=self.run_dir)
        self.guests: dict[str, GuestPeer] = {}
        self.drivers: dict[str, DriverPeer] = {}

    async def __aenter__(self) -> Lab:
        await self.host.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        for p in [*self.guests.values(), *self.drivers.values()]:
            try:
                await p.close()
            except Exception:
                pass
        try:
            await self.host.shutdown("test over")
        finally:  # even when a timed-out test is cancelled in the shutdown
            shutil.rmtree(self.base, ignore_errors=True)

    async def guest(self, vm: str) -> GuestPeer:
        g = await GuestPeer(vm).connect(rundir.machine_sock(self.run_dir, vm))
        self.guests[vm] = g
        return g

    async def driver(self, vm: str, **kw) -> DriverPeer:
        d = await DriverPeer(vm, **kw).connect(rundir.balloon_sock(self.run_dir, vm))
        self.drivers[vm] = d
        return d

    async def quiesce(self) -> None:
        # Wait until no memory operation runs (none holds the lock, no reclaim is waiting
        # for a shootdown), then check conservation.
        async with self.host.mm_lock:
            while np.any(self.host._inflight):
                await self.host.mm_changed.wait()
            self.host.check_conservation()


async def check_stamps(lab: Lab, touched: dict[str, list[int]]) -> None:
    """Every page of every running VM still holds the stamp its guest wrote."""
    for name, pages in touched.items():
        if lab.host.vms[name].state != "running":
            continue
        g = lab.guests[name]
        bad = [p for p in pages if await g.read(p, 16) != g.stamp(p)]
        assert not bad, f"VM {name}: {len(bad)} pages read back wrong, first {bad[:5]}"


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))



__all__ = [
    "DriverPeer",
    "GuestPeer",
    "Lab",
    "frame",
    "raw_connect",
    "read_frame",
    "read_until_eof",
    "run",
    "topo",
]
