"""Machine channel server (``<vm>.machine.sock``): the host end of a VM's vCPU exits.

One guest kernel per VM connects, sends ``boot`` and receives ``boot_ok`` with the RAM, EPT
and accessed memfds attached by SCM_RIGHTS on the same ``sendmsg`` as the frame
(docs/protocol.md, "boot_ok").
The boot exchange runs on the raw socket (asyncio streams cannot attach descriptors); the
socket is then handed to a :class:`protocol.aio.Channel` driven by the same
:class:`protocol.connection.MachineHost` state machine.

After boot the reader loop never blocks on memory work: ``ept_fault`` requests go to a
per-VM worker (faults of one VM are served in order), and ``shootdown_ack`` replies resolve
the futures of :meth:`MachineServer.shootdown`, so a VM whose own fault triggered a host
reclaim still acknowledges the shootdown of its own pages while it waits for ``resume``.

The guest is hostile: a malformed frame, an unknown type, a second ``boot``, a pfn beyond
guest RAM or an oversize fault gets an ``error`` and a disconnect, which the host treats as
the guest going away; other VMs are never touched.
"""

from __future__ import annotations

import array
import asyncio
import logging
import socket
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from protocol import messages as m
from protocol import syscalls
from protocol.aio import Channel, PeerClosed, PeerStalled
from protocol.connection import MachineHost, State
from protocol.errors import ErrorCode, ProtocolError, RemoteProtocolError
from protocol.features import PAGE_SIZE, PROTOCOL_VERSION
from protocol.pfn import pfns_to_wire

if TYPE_CHECKING:
    from hypervisor.vmmem import VmMemory

log = logging.getLogger(__name__)

#: docs/internals.md: a fault names at most this many pages.
MAX_FAULT_PAGES = 4096
#: EPT faults a guest may have queued at once (its vCPUs have one exit outstanding each).
MAX_OUTSTANDING_FAULTS = 64
#: A guest must acknowledge a shootdown within this many seconds (it answers at its next
#: safe point, which is at most one vCPU quantum away); after that it is considered hung.
SHOOTDOWN_TIMEOUT = 10.0
#: A guest that does not send ``boot`` within this many seconds of connecting is dropped.
BOOT_TIMEOUT = 10.0
#: Seconds a booted guest may leave a started frame unfinished (it may be silent for as
#: long as it likes between frames: an idle guest exits nothing).
FRAME_TIMEOUT = 10.0


class ShootdownFailed(Exception):
    """The guest did not acknowledge a shootdown (hung, or broke the protocol)."""


class Backed(NamedTuple):
    """What the host did for one fault, as ``resume`` tells the guest."""

    swapped: np.ndarray  #: pages read back from host swap
    evicted: int = 0  #: pages written to host swap to make room, while the fault waited
    evicted_ios: int = 0  #: in this many writes


#: ``on_fault(pfns)``: False when the VM is gone (no resume); else True, the pages read
#: back from host swap (``resume``'s ``swapped``), or a :class:`Backed`.
FaultHandler = Callable[[np.ndarray], Awaitable[bool | np.ndarray | Backed]]


class MachineServer:
    """The machine channel of one VM.

    ``on_fault(pfns)`` backs the pages (False: the VM is gone, do not resume; the pages read
    back from host swap, when it names them, go back in ``resume``);
    ``on_boot()`` and ``on_disconnect(reason)`` tell the host about the guest's life, and
    ``on_boot_failed(reason)`` about a boot that did not complete (the guest then sees its
    connection close during boot and exits; its supervisor restarts or destroys the VM).
    """

    def __init__(self, vm: str, mem: VmMemory, *, on_fault: FaultHandler,
                 on_boot: Callable[[], None], on_disconnect: Callable[[str], None],
                 on_boot_failed: Callable[[str], object] | None = None) -> None:
        self.vm = vm
        self.on_boot_failed = on_boot_failed
        self.mem = mem
        self.on_fault = on_fault
        self.on_boot = on_boot
        self.on_disconnect = on_disconnect
        self.channel: Channel | None = None
        self.booted = False
        self._pending: dict[int, asyncio.Future[None]] = {}
        self._faults: asyncio.Queue[m.EptFault | None] = asyncio.Queue()
        self._tasks: set[asyncio.Task[Any]] = set()
        self.faults_served = 0
        self.shootdown_timeout = SHOOTDOWN_TIMEOUT
        self.shootdowns = 0
        #: Called around every shootdown round trip (before it is sent, after it ends): a
        #: VM paused by QMP's ``stop`` runs for the moment it needs to answer.
        self.before_shootdown: Callable[[], None] | None = None
        self.after_shootdown: Callable[[], None] | None = None

    @property
    def connected(self) -> bool:
        return self.channel is not None

    # ---- connection ---------------------------------------------------------------------

    async def serve_socket(self, sock: socket.socket) -> None:
        """Run one guest connection to its end (boot, then the reader loop)."""
        if self.channel is not None:
            # A second guest for the same VM: refuse, never disturb the first.
            await _refuse(sock, "this VM's guest kernel is already connected")
            return
        conn = MachineHost()
        try:
            ok = await asyncio.wait_for(self._boot(sock, conn), BOOT_TIMEOUT)
        except (TimeoutError, OSError, ProtocolError) as e:
            why = f"boot failed: {type(e).__name__}: {e}" if str(e) else \
                f"boot failed: {type(e).__name__}"
            log.warning("%s: machine %s", self.vm, why)
            sock.close()
            if self.on_boot_failed is not None:
                self.on_boot_failed(why)
            return
        if not ok:
            sock.close()
            return
        reader, writer = await asyncio.open_unix_connection(sock=sock, limit=1 << 20)
        ch = Channel(conn, reader, writer, frame_timeout=FRAME_TIMEOUT)
        self.channel = ch
        self.booted = True
        self._faults = asyncio.Queue()  # per connection: nothing stale from a previous guest
        worker = asyncio.create_task(self._fault_worker(ch), name=f"{self.vm}-faults")
        self._tasks.add(worker)  # the loop holds tasks weakly
        worker.add_done_callback(self._tasks.discard)
        reason = "guest closed the machine channel"
        try:
            self.on_boot()
            while True:
                msg = await ch.recv()
                if isinstance(msg, m.EptFault):
                    if self._faults.qsize() >= MAX_OUTSTANDING_FAULTS:
                        # A vCPU has one exit outstanding; a flood is a hostile guest.
                        reason = (f"guest has more than {MAX_OUTSTANDING_FAULTS} EPT faults "
                                  "outstanding")
                        await self._fatal(ch, ErrorCode.BAD_STATE, reason)
                        break
                    self._faults.put_nowait(msg)
                elif isinstance(msg, m.ShootdownAck):
                    fut = self._pending.pop(msg.id, None)
                    if fut is not None and not fut.done():
                        fut.set_result(None)
                elif isinstance(msg, (m.Bye, m.Error)):
                    text = getattr(msg, "reason", None) or getattr(msg, "message", "")
                    reason = f"guest said {msg.TYPE}: {text}"
                    break
        except RemoteProtocolError as e:
            reason = f"protocol error from guest: {e}"
            log.warning("%s: %s", self.vm, reason)
        except PeerStalled as e:
            reason = f"guest stalled: {e}"
            log.warning("%s: %s", self.vm, reason)
        except PeerClosed:
            pass
        except asyncio.CancelledError:
            reason = "host closed the machine channel"
            raise
        finally:
            self.channel = None
            # The worker finishes the fault in progress, then sees the sentinel and exits.
            self._faults.put_nowait(None)
            for fut in self._pending.values():
                if not fut.done():
                    fut.set_exception(ShootdownFailed(f"{self.vm}: guest disconnected"))
            self._pending.clear()
            await ch.close()
            self.on_disconnect(reason)

    async def _boot(self, sock: socket.socket, conn: MachineHost) -> bool:
        loop = asyncio.get_running_loop()
        sock.setblocking(False)
        while True:
            ev = _next(conn)
            if ev is not None:
                break
            data = await loop.sock_recv(sock, 1 << 16)
            conn.receive_data(data)
            if not data:
                ev = _next(conn)
                if ev is None:
                    return False
                break
        pending = conn.data_to_send()
        if pending:  # an error frame for garbage before boot
            await loop.sock_sendall(sock, pending)
            return False
        if not isinstance(ev, m.Boot):
            return False
        if ev.vm != self.vm or ev.version != PROTOCOL_VERSION:
            why = (f"this socket serves VM {self.vm!r}, not {ev.vm!r}" if ev.vm != self.vm
                   else f"protocol version {ev.version} is not {PROTOCOL_VERSION}")
            code = ErrorCode.BAD_FIELD if ev.vm != self.vm else ErrorCode.VERSION
            await loop.sock_sendall(sock, conn.send(m.Error(code=str(code), message=why)))
            return False
        frame = conn.send(m.BootOk(pages=self.mem.pages, page_size=PAGE_SIZE))
        # The socket buffer of a fresh connection is empty, so this small frame goes in one
        # sendmsg with the descriptors; a partial write (never seen) falls back to sendall.
        rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                   array.array("i", self.mem.fds()).tobytes())]
        while True:
            try:
                sent = syscalls.sendmsg("machine.sendmsg", sock, [frame], rights)
                break
            except BlockingIOError:
                await asyncio.sleep(0.001)
        if sent < len(frame):
            await loop.sock_sendall(sock, frame[sent:])
        return True

    # ---- faults -------------------------------------------------------------------------

    async def _fault_worker(self, ch: Channel) -> None:
        while True:
            msg = await self._faults.get()
            if msg is None or self.channel is not ch:
                return
            pfns = msg.pfn_array
            if pfns.shape[0] > MAX_FAULT_PAGES or (pfns.shape[0] and
                                                    int(pfns.max()) >= self.mem.pages):
                what = (f"ept_fault {msg.id} names {pfns.shape[0]} pages (max "
                        f"{MAX_FAULT_PAGES})" if pfns.shape[0] > MAX_FAULT_PAGES else
                        f"ept_fault {msg.id}: pfn {int(pfns.max())} is beyond guest RAM "
                        f"({self.mem.pages} pages)")
                code = (ErrorCode.BATCH_TOO_LARGE if pfns.shape[0] > MAX_FAULT_PAGES
                        else ErrorCode.PFN_OUT_OF_RANGE)
                log.warning("%s: %s", self.vm, what)
                await self._fatal(ch, code, what)
                return
            try:
                # Shielded: a fault half-way through a reclaim (victims locked, EPT cleared,
                # shootdowns out) must run to its end even if this guest goes away.
                done = await asyncio.shield(self.on_fault(pfns.astype(np.int64)))
            except Exception as e:
                log.exception("%s: backing ept_fault %d failed", self.vm, msg.id)
                await self._fatal(ch, ErrorCode.INTERNAL, f"host failed to back the fault: {e}")
                return
            if done is False or self.channel is not ch:
                return
            self.faults_served += 1
            evicted = ios = 0
            if isinstance(done, Backed):
                done, evicted, ios = done
            swapped = (pfns_to_wire(done.astype(np.uint32)) if isinstance(done, np.ndarray)
                       else None)
            resume = m.Resume(id=msg.id, swapped=swapped, evicted=evicted or None,
                              evicted_ios=ios or None)
            try:
                await ch.send(resume, timeout=SHOOTDOWN_TIMEOUT)
            except (TimeoutError, PeerClosed, ProtocolError):
                await ch.close()
                return

    async def _fatal(self, ch: Channel, code: ErrorCode, text: str) -> None:
        try:
            ch.send_nowait(m.Error(code=str(code), message=text))
        except ProtocolError:
            pass
        await ch.close()

    # ---- host requests ------------------------------------------------------------------

    async def shootdown(self, count: int, gpfns: np.ndarray | None = None) -> None:
        """Send ``shootdown`` (naming ``gpfns`` when given) and wait for its
        ``shootdown_ack``.

        Call only after the EPT entries were cleared. Returns at once when no guest is
        connected (no vCPU can be running, so nothing can be in flight). Raises
        ShootdownFailed when the guest does not answer within SHOOTDOWN_TIMEOUT.
        """
        ch = self.channel
        if ch is None or ch.conn.state is not State.OPEN:
            return
        sid = ch.conn.new_id()
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending[sid] = fut
        self.shootdowns += 1
        if self.before_shootdown is not None:
            self.before_shootdown()
        try:
            pfns = None if gpfns is None else pfns_to_wire(np.asarray(gpfns, np.uint32))
            await ch.send(m.Shootdown(id=sid, count=count, pfns=pfns),
                          timeout=self.shootdown_timeout)
            await asyncio.wait_for(asyncio.shield(fut), self.shootdown_timeout)
        except ShootdownFailed:
            # The guest went away: no vCPU is left to touch the pages.
            if self.channel is None:
                return
            raise
        except (TimeoutError, PeerClosed, ProtocolError) as e:
            self._pending.pop(sid, None)
            if self.channel is None:
                return
            raise ShootdownFailed(f"{self.vm}: no shootdown_ack within "
                                  f"{self.shootdown_timeout} s ({type(e).__name__})") from e
        finally:
            if self.after_shootdown is not None:
                self.after_shootdown()

    async def halt(self, reason: str = "host shutting down") -> None:
        ch = self.channel
        if ch is None:
            return
        try:
            await ch.send(m.Halt(reason=reason), timeout=1.0)
        except (TimeoutError, PeerClosed, ProtocolError):
            pass

    async def disconnect(self) -> None:
        ch = self.channel
        if ch is not None:
            await ch.close()


def _next(conn: MachineHost) -> Any:
    from protocol.connection import CLOSED, NEED_DATA
    try:
        ev = conn.next_event()
    except RemoteProtocolError:
        return "error"
    if ev is NEED_DATA:
        return None
    if ev is CLOSED:
        return "closed"
    return ev


async def _refuse(sock: socket.socket, why: str) -> None:
    loop = asyncio.get_running_loop()
    sock.setblocking(False)
    try:
        from protocol.framing import encode_frame
        await loop.sock_sendall(
            sock, encode_frame(m.Error(code=str(ErrorCode.BAD_STATE), message=why).to_wire()))
    except OSError:
        pass
    sock.close()
