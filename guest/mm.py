"""Guest memory manager: buddy allocator, page tables, guest swap, page cache, reclaim, OOM,
balloon list.

Units: pages are 4096 bytes; gpfn = guest page frame number (index into guest RAM), vpn =
virtual page number inside one task's address space, slot = guest swap slot (4096 bytes in
the swap file).  Stats amounts are bytes, as virtio's.

Page-table entries (int64): ``gpfn >= 0`` present, ``-1`` never touched, ``-(slot + 2)``
swapped out to guest swap ``slot``.

The memory manager is synchronous except where it must ask the host to back a page before it
copies its bytes (swap-out of a page the host swapped, swap-in into a page not yet backed)
or ask the balloon driver to deflate before an OOM kill: those paths take the async callbacks
``ensure_present(gpfns)`` and ``oom_notify(pages)`` supplied by the process
(:mod:`guest.kernel`).  Copying after ``ensure_present`` is safe because no ``shootdown_ack``
can be sent between the EPT check and the copy (no ``await`` in between): the host does not
touch a revoked page's bytes before the ack.

Why one module of this size: it is the guest's memory manager — page states, tasks' page
tables, swap, the page cache, reclaim (which balances file and anon pages), OOM and the
balloon's page lists — whose invariants span all of them
(a page is in exactly one state, every stamp survives every move); the Numba kernels it
drives live apart in ``guest/kernels.py``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import numpy as np

from guest import kernels as K
from guest.cost import DEFAULT_COST, CostModel
from guest.disk import DiskDevice, contiguous_runs
from guest.kernels import (
    MAX_ORDER,
    NR_ORDERS,
    PAGE_SIZE,
    PAGE_WORDS,
    PG_ANON,
    PG_BALLOON,
    PG_CACHE,
    PG_FREE,
    PG_ISOLATED,
    PG_KERNEL,
)
from protocol import syscalls
from protocol.constants import EPT_NOT_PRESENT
from protocol.errors import ErrorCode
from protocol.pfn import RunError, runs_of_set, runs_to_pfns, validate_runs  # one run family

#: Pages reclaimed per direct-reclaim attempt (Linux's SWAP_CLUSTER_MAX).
SWAP_CLUSTER_MAX = 32
#: Fault-around: on a guest fault, map up to this many further absent pages of the quantum.
FAULT_AROUND = 512
#: Most pages named by one ``ept_fault`` (docs/internals.md).
EPT_BATCH = 4096
#: kswapd reclaims at most this many pages per scheduler round, so tasks keep running.
KSWAPD_BATCH = 256
#: Most pages one balloon request may push to guest swap (see balloon_reclaim): 8 MiB.
BALLOON_RECLAIM_BATCH = 2048
#: Dirty page-cache pages, in percent of the memory that could hold them (free + cache), above
#: which the flusher writes back in the background, and above which a writing task must write
#: back itself before it goes on (Linux's vm.dirty_background_ratio and vm.dirty_ratio).
DIRTY_BACKGROUND_RATIO = 10
DIRTY_RATIO = 20
#: Most dirty pages one writeback round writes (in runs of contiguous blocks).
WRITEBACK_BATCH = 256
#: Default size of the guest kernel's image (text, data, boot-time allocations): 8 MiB,
#: capped at 1/16 of RAM so that toy VMs still boot.
KERNEL_IMAGE = 8 << 20
#: Bytes of page descriptor per page of configured RAM (Linux's ``struct page``).
STRUCT_PAGE = 64


def kernel_reserve(npages: int, kernel_image: int | None = None) -> tuple[int, int]:
    """Pages the guest kernel keeps for itself at boot: ``(image, memmap)``.

    The image is ``kernel_image`` bytes (default :data:`KERNEL_IMAGE`, at most 1/16 of RAM);
    the memmap holds one 64-byte descriptor per page of *configured* RAM (1/64 of it), so a
    VM configured large and ballooned down keeps paying for the memory it gave away."""
    if kernel_image is None:
        image = min(KERNEL_IMAGE // PAGE_SIZE, npages // 16)
    else:
        image = -(-kernel_image // PAGE_SIZE)
    memmap = -(-npages * STRUCT_PAGE // PAGE_SIZE)
    image = max(1, image)
    if image + memmap >= npages:
        raise ValueError(f"the kernel's own memory ({image} image + {memmap} memmap pages) "
                         f"does not fit in {npages} pages of RAM")
    return image, memmap

#: ``ensure_present(gpfns)``: back these pages; returns the ones the host read back from its
#: swap (``resume``'s ``swapped``), or None when the host does not say.
EnsurePresent = Callable[[np.ndarray], Awaitable[np.ndarray | None]]

OomNotify = Callable[[int], Awaitable[bool]]


class OutOfPuff(Exception):
    """Memory is short: the kernel refuses to give pages to the balloon."""


class BuddyAllocator:
    """Typed wrapper around the buddy kernels: owns the arrays, validates arguments."""

    def __init__(self, npages: int) -> None:
        if npages <= 0:
            raise ValueError(f"npages must be positive, got {npages}")
        self.npages = npages
        self.nxt = np.empty(npages, np.int64)
        self.prv = np.empty(npages, np.int64)
        self.forder = np.empty(npages, np.int8)
        self.state = np.empty(npages, np.uint8)
        self.head = np.empty(NR_ORDERS, np.int64)
        self.tail = np.empty(NR_ORDERS, np.int64)
        self.nfree = np.empty(NR_ORDERS, np.int64)
        self.cnt = np.zeros(3, np.int64)
        K.buddy_init(npages, *self._arrays())

    def _arrays(self) -> tuple[np.ndarray, ...]:
        return (self.nxt, self.prv, self.forder, self.state, self.head, self.tail, self.nfree,
                self.cnt)

    @property
    def free_pages(self) -> int:
        """Pages on the free lists (reported ones included, isolated ones not)."""
        return int(self.cnt[K.CNT_FREE])

    @property
    def reported_pages(self) -> int:
        return int(self.cnt[K.CNT_REPORTED])

    @property
    def isolated_pages(self) -> int:
        return int(self.cnt[K.CNT_ISOLATED])

    def free_blocks(self) -> list[tuple[int, int]]:
        """(gpfn, order) of every free block, in list order (for tests and debugging)."""
        out = []
        for o in range(NR_ORDERS):
            g = int(self.head[o])
            while g >= 0:
                out.append((g, o))
                g = int(self.nxt[g])
        return out

    def alloc_block(self, order: int, new_state: int) -> int:
        """One block of ``order``: its first gpfn, or -1 when none is free."""
        if not 0 <= order <= MAX_ORDER:
            raise ValueError(f"order must be in 0..{MAX_ORDER}, got {order}")
        return int(K.alloc_block(order, np.uint8(new_state), *self._arrays()))

    def alloc_many(self, count: int, max_order: int, new_state: int) -> np.ndarray:
        """Up to ``count`` pages as runs (int64 (k, 2)), highest orders first."""
        if count < 0:
            raise ValueError(f"count must be non-negative, got {count}")
        if not 0 <= max_order <= MAX_ORDER:
            raise ValueError(f"max_order must be in 0..{MAX_ORDER}, got {max_order}")
        count = min(count, self.free_pages)
        out = np.empty((max(1, count >> max_order) + NR_ORDERS * 2, 2), np.int64)
        # Each order contributes at most one block below max_order once the big ones run
        # out... except when memory is fragmented, so retry with more room if out filled up.
        runs: list[np.ndarray] = []
        while count > 0:
            n, got = K.alloc_many(count, max_order, np.uint8(new_state), out, *self._arrays())
            if n:
                runs.append(out[:n].copy())
            count -= got
            if got == 0 or n < out.shape[0]:
                break
        if not runs:
            return np.empty((0, 2), np.int64)
        return _coalesce(np.concatenate(runs))

    def free_gpfns(self, gpfns: np.ndarray) -> None:
        """Free single pages (caller guarantees they are allocated)."""
        if len(gpfns):
            K.free_pages(np.ascontiguousarray(gpfns, np.int64), self.npages, *self._arrays())

    def free_runs(self, runs: np.ndarray, *, want_state: int, reported: bool | None = None,
                  code: ErrorCode = ErrorCode.NOT_IN_USE) -> int:
        """Free runs whose pages are all in ``want_state``; else :class:`RunError` with
        ``code`` for a page in another state (range and overlap errors carry their own
        codes), and nothing changes.

        Isolated pages come back marked reported unless ``reported=False``. Returns the
        number of pages freed."""
        r = validate_runs(runs, self.npages)
        bad = int(K.first_not_in_state(r, np.uint8(want_state), self.state))
        if bad >= 0:
            raise RunError(code, f"page {bad} is not in the expected state "
                           f"(it is {_STATE_NAMES[int(self.state[bad])]})", pfn=bad)
        from_isolated = want_state == PG_ISOLATED
        mark = from_isolated if reported is None else reported
        K.free_runs(r, from_isolated, mark, self.npages, *self._arrays())
        return int(r[:, 1].sum()) if len(r) else 0

    def isolate_free(self, min_order: int, max_runs: int) -> np.ndarray:
        """Isolate unreported free blocks of order >= ``min_order`` (at most ``max_runs``)."""
        if not 0 <= min_order <= MAX_ORDER:
            raise ValueError(f"min_order must be in 0..{MAX_ORDER}, got {min_order}")
        if max_runs < 0:
            raise ValueError(f"max_runs must be non-negative, got {max_runs}")
        cap = min(max_runs, self.free_pages >> min_order)
        out = np.empty((cap, 2), np.int64)
        n = int(K.isolate_free(min_order, cap, out, *self._arrays()))
        return out[:n]

    def count_state(self, st: int) -> int:
        return int(np.count_nonzero(self.state == st))


_STATE_NAMES = {K.PG_FREE: "free", K.PG_KERNEL: "kernel", K.PG_ANON: "anon",
                K.PG_CACHE: "cache", K.PG_BALLOON: "balloon", K.PG_REPORTED: "reported",
                K.PG_ISOLATED: "isolated"}


def _coalesce(runs: np.ndarray) -> np.ndarray:
    if runs.shape[0] < 2:
        return runs
    r = runs[np.argsort(runs[:, 0], kind="stable")]
    joined = r[1:, 0] != r[:-1, 0] + r[:-1, 1]
    starts = np.concatenate(([0], np.flatnonzero(joined) + 1))
    ends = np.concatenate((starts[1:], [r.shape[0]]))
    out = np.empty((starts.size, 2), np.int64)
    out[:, 0] = r[starts, 0]
    out[:, 1] = np.add.reduceat(r[:, 1], starts)
    del ends
    return out


def _distinct(a: np.ndarray) -> np.ndarray:
    """The distinct values of ``a`` in first-seen order (a copy)."""
    _, first = np.unique(a, return_index=True)
    return a[np.sort(first)].copy()


class SwapDevice:
    """The guest swap device: a file of 4096-byte slots and a free-slot stack.

    Its I/O goes through :mod:`protocol.syscalls` (points ``guestswap.truncate``,
    ``guestswap.write``, ``guestswap.read``) and fails as a disk does: a file that cannot be
    sized at boot leaves the guest without swap (``error`` says why); a failed write or read
    raises ``OSError`` for the memory manager to handle, having changed nothing.
    """

    def __init__(self, path: str, size_bytes: int) -> None:
        if size_bytes < 0:
            raise ValueError(f"guest_swap must be >= 0 bytes, got {size_bytes}")
        self.path = path
        self.nslots = size_bytes // PAGE_SIZE
        #: Why the device has no slots although some were asked for (None: it has them).
        self.error: str | None = None
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        try:
            syscalls.ftruncate("guestswap.truncate", self.fd, self.nslots * PAGE_SIZE)
        except OSError as e:
            self.error = f"cannot size the guest swap file to {self.nslots} slots: {e}"
            self.nslots = 0
        # slots handed out lowest first: a stack with slot 0 on top
        self._stack = np.arange(self.nslots - 1, -1, -1, dtype=np.int64)
        self._top = self.nslots
        self.used = np.zeros(self.nslots, np.uint8)

    @property
    def free_slots(self) -> int:
        return self._top

    def alloc(self) -> int:
        if self._top == 0:
            return -1
        self._top -= 1
        s = int(self._stack[self._top])
        self.used[s] = 1
        return s

    def free(self, slots: np.ndarray) -> None:
        for s in np.asarray(slots, np.int64).tolist():
            if not self.used[s]:
                raise RuntimeError(f"guest swap slot {s} freed twice")
            self.used[s] = 0
            self._stack[self._top] = s
            self._top += 1

    def write(self, slot: int, data: memoryview | bytes) -> None:
        """Write one page to ``slot``; OSError when the disk refuses (ENOSPC, EIO…)."""
        syscalls.pwrite_all("guestswap.write", self.fd, data, slot * PAGE_SIZE)

    def read_into(self, slot: int, buf: memoryview) -> None:
        """Read ``slot`` into ``buf``; OSError (and ``buf`` untouched) when the read fails
        or comes back short."""
        buf[:] = syscalls.pread_exact("guestswap.read", self.fd, PAGE_SIZE, slot * PAGE_SIZE)

    def close(self, unlink: bool = True) -> None:
        try:
            os.close(self.fd)
        finally:
            if unlink:
                try:
                    os.unlink(self.path)
                except FileNotFoundError:
                    pass


@dataclass
class TaskMem:
    """One task's address space: page table and per-vpn write counts (for the stamps)."""

    tid: int
    npages: int
    pt: np.ndarray = field(init=False)
    wcount: np.ndarray = field(init=False)
    resident: int = 0
    swapped: int = 0
    sigbus: int = 0  # times killed by a guest swap read error
    accesses: int = 0  # memory accesses done (all time)
    modelled_ns: int = 0  # the task's modelled clock (guest.cost)

    def __post_init__(self) -> None:
        self.pt = np.full(self.npages, -1, np.int64)
        self.wcount = np.zeros(self.npages, np.int64)


@dataclass
class QuantumResult:
    ops: int = 0
    corrupted: int = 0
    stall_ns_ept: int = 0
    stall_ns_guest: int = 0
    modelled_ns: int = 0  # modelled time charged to the task in this quantum
    killed: bool = False  # the task was killed while faulting (OOM, or SIGBUS below)
    sigbus: str | None = None  # why, when a guest swap read error killed it


@dataclass
class VmStats:
    """Cumulative counters with virtio meaning (bytes for swap, counts otherwise)."""

    swap_in: int = 0
    swap_out: int = 0
    major_faults: int = 0
    minor_faults: int = 0
    oom_kills: int = 0
    alloc_stalls: int = 0
    async_scan: int = 0
    direct_scan: int = 0
    async_reclaim: int = 0
    direct_reclaim: int = 0
    corrupted_reads: int = 0
    swap_write_errors: int = 0  # pages whose swap-out failed (they stayed resident)
    swap_read_errors: int = 0  # swap-ins that failed (the faulting task was killed)
    swap_read_kills: int = 0
    ops: int = 0
    ept_exits: int = 0
    guest_faults: int = 0
    # Pathologies of host swapping (pages; docs/architecture.md, "Pathologies").
    double_paging: int = 0  # swapped out by the guest after the host read them back for it
    false_swap_reads: int = 0  # read back from host swap, then overwritten whole
    silent_swap_writes: int = 0  # clean page-cache pages the host wrote to its swap
    stale_swap_reads: int = 0  # read back from host swap, then overwritten by a disk read
    host_evicted_waited: int = 0  # pages the host wrote to its swap while our exits waited
    out_of_puff: int = 0
    stall_ns_ept: int = 0
    stall_ns_guest: int = 0
    modelled_ns: int = 0  # sum of the tasks' modelled clocks (one vCPU time-shares them)


@dataclass
class CacheStats:
    """Page-cache and disk counters (pages unless named otherwise)."""

    misses: int = 0  # accesses that found their block uncached (a fill each)
    readahead: int = 0  # further blocks of the quantum read in by the same fill
    write_allocs: int = 0  # misses on a whole-page write: a page without a read
    disk_read_pages: int = 0
    disk_read_ios: int = 0  # pread calls (a run of contiguous blocks each)
    disk_write_pages: int = 0
    disk_write_ios: int = 0  # pwrite calls
    dropped_clean: int = 0  # cold clean pages reclaimed without I/O
    written_back: int = 0  # cold dirty pages written back by reclaim, then dropped
    flushed: int = 0  # dirty pages written back by the flusher (background)
    throttled: int = 0  # dirty pages written back by writers over the dirty limit
    disk_read_errors: int = 0  # fills that failed (the task was killed, as by SIGBUS)
    disk_write_errors: int = 0  # writebacks that failed (the pages stayed dirty)


class MemoryManager:
    """Page states, task page tables, guest swap, reclaim and OOM over guest RAM.

    ``ram`` is guest RAM as uint64 words (the RAM memfd mmap'd), ``ept`` and ``host_acc``
    the shared EPT and accessed byte arrays (one byte per gpfn)."""

    def __init__(self, ram: np.ndarray, ept: np.ndarray, host_acc: np.ndarray,
                 swap: SwapDevice, *, ensure_present: EnsurePresent,
                 oom_notify: OomNotify | None = None, kernel_pages: int | None = None,
                 kernel_image: int | None = None, cost: CostModel | None = None,
                 log: Callable[[str], None] | None = None) -> None:
        npages = ept.shape[0]
        if ram.dtype != np.uint64 or ram.shape[0] != npages * PAGE_WORDS:
            raise ValueError("ram must be a uint64 array of pages * 512 words")
        if host_acc.shape[0] != npages:
            raise ValueError("accessed array must have one byte per page")
        self.npages = npages
        self.ram = ram
        self.ram_bytes = ram.data.cast("B")
        self.ept = ept
        self.host_acc = host_acc
        self.swap = swap
        self.ensure_present = ensure_present
        self.oom_notify = oom_notify
        self.log = log
        self.cost = cost if cost is not None else DEFAULT_COST
        self.last_swap_error = ""
        self.buddy = BuddyAllocator(npages)
        self.guest_acc = np.zeros(npages, np.uint8)
        self.needs_zero = np.zeros(npages, np.uint8)
        #: Page-cache hook: 1 where a page holds an unmodified copy of a disk block (set by
        #: the page cache; counted when the host revokes the page: silent swap writes).
        self.clean_cache = np.zeros(npages, np.uint8)
        self.rmap_task = np.full(npages, -1, np.int64)
        self.rmap_vpn = np.full(npages, -1, np.int64)
        self.tasks: dict[int, TaskMem] = {}
        self.stats = VmStats()
        #: Host swap writes (pages, I/Os) that EPT exits waited for, not yet charged: the
        #: kernel adds ``resume``'s ``evicted``; :meth:`host_backed` charges them.
        self.host_evicted = [0, 0]
        self.clock_hand = 0
        self.kswapd_active = False
        self._victims = np.empty(max(KSWAPD_BATCH, BALLOON_RECLAIM_BATCH), np.int64)
        self._mark = np.zeros(npages, np.uint8)  # look-ahead scratch, kept zeroed
        self._ahead = np.empty(EPT_BATCH, np.int64)
        # Watermarks as Linux sets them: min from a min_free_kbytes-like share, low/high
        # min + distance, distance = max(min/4, 0.1 % of memory) (watermark_scale_factor=10).
        self.wmark_min = max(8, min(npages // 128, 16384))
        dist = max(self.wmark_min // 4, npages // 1000, 1)
        self.wmark_low = self.wmark_min + dist
        self.wmark_high = self.wmark_min + 2 * dist
        # The kernel's own memory: its image and the page descriptors of all configured RAM
        # (``kernel_pages`` overrides the sum, for tests of other arithmetic).
        if kernel_pages is None:
            image, memmap = kernel_reserve(npages, kernel_image)
        else:
            image, memmap = kernel_pages, 0
        self.kernel_runs = self.buddy.alloc_many(image + memmap, MAX_ORDER, PG_KERNEL)
        self.kernel_pages = int(self.kernel_runs[:, 1].sum()) if len(self.kernel_runs) else 0
        self.kernel_memmap_pages = memmap
        self._init_page_cache()

    async def touch_kernel_memory(self) -> None:
        """Touch the kernel's own pages once at boot, as a kernel that uses its image and
        initialises its memmap: the host backs them (EPT faults), then each gets a word."""
        g = runs_to_pfns(self.kernel_runs).astype(np.int64)
        for i in range(0, g.size, EPT_BATCH):
            await self.ensure_present(g[i:i + EPT_BATCH])
            chunk = g[i:i + EPT_BATCH]
            chunk = chunk[self.ept[chunk] != EPT_NOT_PRESENT]  # revoked since: the host has it
            self.ram[chunk * PAGE_WORDS] = 0x6B65726E656C  # "kernel"

    # ------------------------------------------------------------------ modelled time

    def charge(self, t: TaskMem | None, ns: int) -> None:
        """Add ``ns`` of modelled time to task ``t``'s clock (None: background work, such as
        kswapd's or the balloon's reclaim, which no task waits for)."""
        if t is not None:
            t.modelled_ns += ns
            self.stats.modelled_ns += ns

    # ------------------------------------------------------------------ pathologies

    def host_backed(self, t: TaskMem | None, asked: np.ndarray, overwrite: np.ndarray | None,
                    swapped: np.ndarray | None, *, stale: bool = False) -> np.ndarray:
        """Account for the host backing ``asked`` (EPT exits): charge ``t`` and count the
        host swap reads of pages the guest overwrites whole (mask ``overwrite``) as false
        reads, or stale reads when a disk read overwrites them (``stale``).  Returns the
        mask of ``asked`` the host read back from its swap.

        ``swapped`` is what the host said it read back (``ensure_present``'s answer); when
        it does not say, a page with contents (not about to be zeroed) is taken for
        host-swapped, the host's only way to revoke a page in use, and nothing is counted."""
        if swapped is not None:
            read = np.isin(asked, swapped)
            if overwrite is not None:
                n = int(np.count_nonzero(read & overwrite))
                if stale:
                    self.stats.stale_swap_reads += n
                else:
                    self.stats.false_swap_reads += n
        else:
            read = self.needs_zero[asked] == 0 if overwrite is None else ~overwrite
        k = int(np.count_nonzero(read))
        self.charge(t, self.cost.ept_exit_cost(int(asked.size) - k, k))
        pages, ios = self.host_evicted
        if pages:  # the exits waited for the host to write victims to its swap
            self.host_evicted = [0, 0]
            self.stats.host_evicted_waited += pages
            self.charge(t, self.cost.host_swap_writes(pages, ios))
        return read

    def note_host_evicted(self, pages: int, ios: int) -> None:
        """``resume`` said the host wrote ``pages`` pages in ``ios`` writes to its swap
        before it could back the exit: charged with the exit (:meth:`host_backed`)."""
        self.host_evicted[0] += int(pages)
        self.host_evicted[1] += int(ios)

    async def back_for_overwrite(self, t: TaskMem | None, gpfns: np.ndarray, *,
                                 stale: bool) -> None:
        """Page-cache hook: back pages the guest is about to overwrite whole (a disk read
        into them with ``stale``, else a zeroing or copy), counting the ones the host reads
        back from its swap for nothing as stale or false swap reads."""
        g = np.unique(np.asarray(gpfns, np.int64))
        while True:
            g = g[self.ept[g] == EPT_NOT_PRESENT]
            if not g.size:
                return
            self.host_backed(t, g, np.ones(g.size, bool), await self.ensure_present(g),
                             stale=stale)

    def host_revoked(self, gpfns: np.ndarray) -> int:
        """The host is taking these pages to its swap (``shootdown``'s ``pfns``): count the
        clean page-cache ones (``clean_cache``) as silent swap writes.  Returns that count."""
        g = np.asarray(gpfns, np.int64)
        g = g[(g >= 0) & (g < self.npages)]
        n = int(np.count_nonzero(self.clean_cache[g]))
        self.stats.silent_swap_writes += n
        return n

    def pathology_stats(self) -> dict[int, int]:
        """The pathology counters as stats tags (pages)."""
        from protocol.features import StatTag as T

        s = self.stats
        return {T.DOUBLE_PAGING: s.double_paging, T.FALSE_SWAP_READS: s.false_swap_reads,
                T.SILENT_SWAP_WRITES: s.silent_swap_writes,
                T.STALE_SWAP_READS: s.stale_swap_reads}

    # ------------------------------------------------------------------ tasks

    def add_task(self, tid: int, npages: int) -> TaskMem:
        if tid in self.tasks:
            raise ValueError(f"task {tid} already exists")
        if npages <= 0:
            raise ValueError(f"task {tid}: size must be at least one page")
        t = TaskMem(tid, npages)
        self.tasks[tid] = t
        return t

    def unmap_range(self, t: TaskMem, lo: int, hi: int) -> int:
        """Drop vpns [lo, hi) of ``t``: free their pages and swap slots, reset write counts.

        Returns the pages freed."""
        pte = t.pt[lo:hi]
        present = pte[pte >= 0]
        swapped = pte[pte <= -2]
        if present.size:
            self.rmap_task[present] = -1
            self.rmap_vpn[present] = -1
            self.needs_zero[present] = 0
            self.buddy.free_gpfns(present)
        if swapped.size:
            self.swap.free(-swapped - 2)
        t.resident -= int(present.size)
        t.swapped -= int(swapped.size)
        pte[:] = -1
        t.wcount[lo:hi] = 0
        return int(present.size)

    def remove_task(self, tid: int) -> None:
        t = self.tasks.pop(tid)
        self.unmap_range(t, 0, t.npages)

    def oom_kill(self, exclude: int | None = None) -> int | None:
        """Kill (reset) the task with the most resident pages; return its id or None."""
        cands = [t for t in self.tasks.values() if t.resident > 0 and t.tid != exclude]
        if not cands:
            return None
        victim = max(cands, key=lambda t: (t.resident, t.tid))
        self.unmap_range(victim, 0, victim.npages)
        self.stats.oom_kills += 1
        return victim.tid

    # ------------------------------------------------------------------ faults

    async def handle_fault(self, t: TaskMem, vpn: int) -> bool:
        """Guest page fault on ``t``/``vpn``: map a fresh zero page (minor) or swap in (major).

        Returns False when the faulting task itself was OOM-killed."""
        if not 0 <= vpn < t.npages:
            raise IndexError(f"task {t.tid}: vpn {vpn} outside its {t.npages} pages")
        if t.pt[vpn] >= 0:
            return True  # raced with nothing: already present
        g = await self.alloc_anon(t)
        if g < 0:
            return False
        pte = int(t.pt[vpn])
        if pte <= -2:
            slot = -pte - 2
            # a major fault: fault handling, the host backing the page if it must, the read
            self.charge(t, self.cost.minor_fault + self.cost.guest_swap_read(1))
            while self.ept[g] == EPT_NOT_PRESENT:  # the swap read overwrites it whole
                one = np.array([g], np.int64)
                self.host_backed(t, one, one == g, await self.ensure_present(one))
            # No await from the EPT check above to the copy below: the host cannot have
            # reclaimed the page in between (it waits for our shootdown_ack).
            try:
                self.swap.read_into(slot, self.ram_bytes[g * PAGE_SIZE:(g + 1) * PAGE_SIZE])
            except OSError as e:
                # As Linux on a swap read error: the page's contents are lost, so the task
                # that needs it gets SIGBUS rather than wrong bytes.
                self.needs_zero[g] = 0
                self.buddy.free_gpfns(np.array([g], np.int64))
                self.stats.swap_read_errors += 1
                self.stats.swap_read_kills += 1
                t.sigbus += 1
                self.unmap_range(t, 0, t.npages)  # frees its slots, the failed one too
                self._swap_error(f"guest swap read of slot {slot} failed ({e}); task "
                                 f"{t.tid} killed (SIGBUS)", self.stats.swap_read_errors)
                return False
            self.swap.free(np.array([slot]))
            t.swapped -= 1
            self.needs_zero[g] = 0
            self.stats.major_faults += 1
            self.stats.swap_in += PAGE_SIZE
        else:
            self.needs_zero[g] = 1  # zeroed lazily by the vCPU loop, after its EPT check
            self.stats.minor_faults += 1
            self.charge(t, self.cost.minor_faults(1))
        t.pt[vpn] = g
        t.resident += 1
        self.rmap_task[g] = t.tid
        self.rmap_vpn[g] = vpn
        self.guest_acc[g] = 1
        return True

    async def alloc_anon(self, t: TaskMem) -> int:
        """One anon page for ``t``: reclaim, deflate-on-OOM and OOM-kill as needed.

        Returns -1 when ``t`` itself was killed to make room."""
        while True:
            if self.buddy.free_pages > self.wmark_min:
                g = self.buddy.alloc_block(0, PG_ANON)
                if g >= 0:
                    return g
            self.stats.alloc_stalls += 1
            if await self.reclaim(SWAP_CLUSTER_MAX, direct=True, task=t) > 0:
                continue
            if self.oom_notify is not None:
                want = self.wmark_high - self.buddy.free_pages + SWAP_CLUSTER_MAX
                before = self.buddy.free_pages
                if await self.oom_notify(max(want, 1)) and self.buddy.free_pages > before:
                    continue
            killed = self.oom_kill(exclude=t.tid)
            if killed is None:
                if self.buddy.free_pages > 0:
                    # nothing else to kill: dip into the reserve rather than kill the caller
                    g = self.buddy.alloc_block(0, PG_ANON)
                    if g >= 0:
                        return g
                if t.resident == 0:
                    return -1
                self.unmap_range(t, 0, t.npages)
                self.stats.oom_kills += 1
                return -1

    # ------------------------------------------------------------------ vCPU

    async def run_quantum(self, t: TaskMem, vpns: np.ndarray, writes: np.ndarray) -> QuantumResult:
        """Run one quantum of ``t``'s access stream, handling guest faults (with fault-around)
        and EPT exits (batched with look-ahead) until the stream is done or ``t`` is killed."""
        return await self._drive(
            t, t.pt, vpns,
            lambda i, n: K.vcpu_run(self.ram, t.pt, t.wcount, vpns, writes, i, n, self.ept,
                                    self.host_acc, self.guest_acc, self.needs_zero, t.tid),
            lambda i: self._fault_around(t, vpns, i), lambda: self.last_swap_error)

    async def _drive(self, t: TaskMem, table: np.ndarray, idx: np.ndarray,
                     step: Callable[[int, int], tuple[int, int, int, int, int]],
                     fill: Callable[[int], Awaitable[bool]],
                     error: Callable[[], str]) -> QuantumResult:
        """The vCPU loop of one quantum, anon or file: ``step(i, n)`` runs the Numba loop
        from ``i`` to its next exit; a guest fault (``table[idx[i]]`` not mapped) is
        ``fill(i)`` (False: the task is killed, ``error()`` says why); an EPT exit backs the
        not-present pages of ``idx[i:]``'s look-ahead in one ``ensure_present``."""
        res = QuantumResult()
        sigbus = t.sigbus
        i, n = 0, len(idx)
        st = self.stats
        clock0 = t.modelled_ns
        while i < n:
            code, i, _arg, ops, corrupted = step(i, n)
            res.ops += ops
            st.ops += ops
            t.accesses += ops
            # count, then multiply: the vCPU loop itself keeps no clock
            self.charge(t, self.cost.accesses(ops))
            res.corrupted += corrupted
            st.corrupted_reads += corrupted
            if code == K.EXIT_DONE:
                break
            s = time.perf_counter_ns()
            if code == K.EXIT_GUEST_FAULT:
                st.guest_faults += 1
                ok = await fill(i)
                dt = time.perf_counter_ns() - s
                res.stall_ns_guest += dt
                st.stall_ns_guest += dt
                if not ok:
                    res.killed = True
                    if t.sigbus != sigbus:
                        res.sigbus = error()
                    break
            else:
                k = K.lookahead_not_present(table, idx, i, n, self.ept, self._mark,
                                            self._ahead)
                if k:
                    st.ept_exits += 1
                    ahead = self._ahead[:k].copy()
                    # Pages the guest zeroes next (a fresh anon page, a write-allocated cache
                    # page) are overwritten whole: a host swap read of one is a false read.
                    over = self.needs_zero[ahead] != 0
                    self.host_backed(t, ahead, over, await self.ensure_present(ahead))
                dt = time.perf_counter_ns() - s
                res.stall_ns_ept += dt
                st.stall_ns_ept += dt
        res.modelled_ns = t.modelled_ns - clock0
        return res

    async def _fault_around(self, t: TaskMem, vpns: np.ndarray, i: int) -> bool:
        """Fault in vpns[i] and up to FAULT_AROUND further absent vpns of this quantum, so
        that the EPT exits that follow can be batched."""
        # Only from memory above the high watermark: fault-around must never cause reclaim
        # (it would evict the pages it just mapped when the working set exceeds RAM).
        extra = min(FAULT_AROUND, self.buddy.free_pages - self.wmark_high)
        if extra <= 0:
            return await self.handle_fault(t, int(vpns[i]))
        ahead = vpns[i:i + 4 * FAULT_AROUND]
        absent = ahead[t.pt[ahead] < 0]
        _, first = np.unique(absent, return_index=True)
        todo = absent[np.sort(first)][:extra + 1]
        # Minor faults (never-mapped vpns) are mapped in one batch: one buddy call for
        # all their pages, vectorised page-table and rmap updates. There is memory above
        # the high watermark for all of them, so no reclaim can be needed.
        fresh = todo[t.pt[todo] == -1]
        if fresh.size > 1:
            runs = self.buddy.alloc_many(int(fresh.size), MAX_ORDER, PG_ANON)
            g = runs_to_pfns(runs).astype(np.int64)
            if g.size == fresh.size:
                self.needs_zero[g] = 1  # zeroed lazily by the vCPU loop, after its EPT check
                t.pt[fresh] = g
                t.resident += int(g.size)
                self.rmap_task[g] = t.tid
                self.rmap_vpn[g] = fresh
                self.guest_acc[g] = 1
                self.stats.minor_faults += int(g.size)
                self.charge(t, self.cost.minor_faults(int(g.size)))
                todo = todo[t.pt[todo] < 0]  # what is left: swapped-out vpns (major)
            elif g.size:
                self.buddy.free_gpfns(g)  # fragmented: fall back to one page at a time
        for v in todo.tolist():
            if not await self.handle_fault(t, v):
                return False
        return True

    # ------------------------------------------------------------------ reclaim

    async def reclaim(self, nr: int, *, direct: bool, task: TaskMem | None = None) -> int:
        """Swap out up to ``nr`` cold anon pages; returns pages reclaimed.

        Direct reclaim's modelled time (double paging, the swap write) goes to ``task``, the
        one that waits for it.  Cold page-cache pages go first (:meth:`reclaim_cache`), as
        Linux takes its inactive file list before anon memory."""
        cache_done = await self.reclaim_cache(nr, direct=direct, task=task)
        nr -= cache_done
        if nr <= 0:
            return cache_done
        if self.swap.free_slots == 0:
            return cache_done  # anon memory is only reclaimable to swap
        nr = min(nr, self.swap.free_slots, self._victims.shape[0])
        n, self.clock_hand, scanned = K.clock_scan(
            self.buddy.state, self.guest_acc, self.clock_hand, 2 * self.npages, nr,
            self._victims)
        if direct:
            self.stats.direct_scan += int(scanned)
        else:
            self.stats.async_scan += int(scanned)
        if n == 0:
            return cache_done
        victims = self._victims[:n].copy()
        absent = victims[(self.ept[victims] == 0) & (self.needs_zero[victims] == 0)]
        if absent.size:
            # double paging: the host swapped these out; it must back them before we copy
            swapped = await self.ensure_present(absent)
            read = self.host_backed(task, absent, None, swapped)
            self.stats.double_paging += int(np.count_nonzero(read))
        done = 0
        zero = bytes(PAGE_SIZE)
        for g in victims.tolist():
            # re-check after the await: still the same anon mapping, and backed or zero
            tid = int(self.rmap_task[g])
            if tid < 0 or self.buddy.state[g] != PG_ANON or tid not in self.tasks:
                continue
            if self.ept[g] == EPT_NOT_PRESENT and self.needs_zero[g] == 0:
                continue
            slot = self.swap.alloc()
            if slot < 0:
                break
            t = self.tasks[tid]
            vpn = int(self.rmap_vpn[g])
            try:
                if self.needs_zero[g]:
                    self.swap.write(slot, zero)
                else:
                    self.swap.write(slot, self.ram_bytes[g * PAGE_SIZE:(g + 1) * PAGE_SIZE])
            except OSError as e:
                # Nothing is lost: the page stays mapped and resident, the slot goes back.
                # The device is failing, so this batch stops; the caller goes on to other
                # means (deflate-on-OOM, the OOM killer) if it frees too little.
                self.swap.free(np.array([slot], np.int64))
                self.stats.swap_write_errors += 1
                self._swap_error(f"guest swap write to slot {slot} failed ({e}); the page "
                                 "stays resident", self.stats.swap_write_errors)
                break
            t.pt[vpn] = -(slot + 2)
            t.resident -= 1
            t.swapped += 1
            self.rmap_task[g] = -1
            self.rmap_vpn[g] = -1
            self.needs_zero[g] = 0
            self.buddy.free_gpfns(np.array([g], np.int64))
            self.stats.swap_out += PAGE_SIZE
            done += 1
        self.charge(task, self.cost.guest_swap_write(done))
        if direct:
            self.stats.direct_reclaim += done
        else:
            self.stats.async_reclaim += done
        return done + cache_done

    def _swap_error(self, text: str, count: int) -> None:
        """Remember and log a guest swap I/O error: the 1st, 2nd, 4th, 8th… of each kind,
        so that a disk that stays full cannot flood the log."""
        self.last_swap_error = text
        if self.log is not None and count & (count - 1) == 0:
            self.log(f"{text} [{count} so far]")

    async def kswapd(self) -> int:
        """Background reclaim: wake below the low watermark, work until the high one.

        Does at most KSWAPD_BATCH pages per call (the scheduler calls it every round)."""
        free = self.buddy.free_pages
        if free < self.wmark_low:
            self.kswapd_active = True
        if not self.kswapd_active:
            return 0
        if free >= self.wmark_high:
            self.kswapd_active = False
            return 0
        want = min(KSWAPD_BATCH, self.wmark_high - free)
        got = await self.reclaim(want, direct=False)
        if got == 0:
            self.kswapd_active = False  # nothing reclaimable: go back to sleep
        return got

    # ------------------------------------------------------------------ page cache
    #
    # File data lives on the virtual disk (guest.disk) and is cached in PG_CACHE pages, one
    # disk block each: ``bmap`` maps a block to its gpfn (-1: not cached), ``cache_block``
    # maps back (-1: not a cache page, or one being filled, which reclaim leaves alone),
    # ``dirty`` marks pages written since they were read or written back.  ``bcount`` counts
    # the writes to each block: the truth its stamps are checked against, wherever the block
    # is (cache or disk).  Reclaim takes cold clean pages first (no I/O), then writes cold
    # dirty ones back (contiguous blocks in one pwrite) and drops them, and only then swaps
    # anon pages out (:meth:`reclaim`).  A cache page's frame must be backed before its bytes
    # are copied to or from the disk, as an anon page's for swap.

    def _init_page_cache(self) -> None:
        self.disk: DiskDevice | None = None
        self.bmap = np.full(0, -1, np.int64)
        self.bcount = np.zeros(0, np.int64)
        self.cache_block = np.full(self.npages, -1, np.int64)
        self.dirty = np.zeros(self.npages, np.uint8)
        # ``clean_cache`` (made in __init__): 1 where a cache page holds an unmodified copy
        # of its disk block (read in, or written back since its last write), a page the
        # host need not swap, as it could be read from the disk again: what host_revoked
        # counts as silent swap writes. Kept here and by cache_run.
        self.cache_count = 0  # pages in PG_CACHE (those being filled included)
        self.cache_hand = 0
        self.flush_cursor = 0  # the flusher's next block
        self.cstats = CacheStats()
        self.last_disk_error = ""
        self._cache_victims = np.empty(self._victims.shape[0], np.int64)
        self._dirty_victims = np.empty(self._victims.shape[0], np.int64)

    def attach_disk(self, disk: DiskDevice) -> None:
        """Give the page cache its disk (at boot, before any file task runs)."""
        if self.disk is not None:
            raise RuntimeError("the page cache already has a disk")
        self.disk = disk
        self.bmap = np.full(disk.nblocks, -1, np.int64)
        self.bcount = np.zeros(disk.nblocks, np.int64)

    def dirty_pages(self) -> int:
        return int(np.count_nonzero(self.dirty))

    async def run_file_quantum(self, t: TaskMem, blocks: np.ndarray,
                               writes: np.ndarray) -> QuantumResult:
        """Run one quantum of file accesses (disk block numbers) for ``t``: cache hits in
        the vCPU kernel, misses filled from the disk, EPT exits batched as for anon pages."""
        if self.disk is None:
            raise RuntimeError(f"task {t.tid}: file accesses but the VM has no disk")
        blocks = np.ascontiguousarray(blocks, np.int64)
        if blocks.size and (int(blocks.min()) < 0 or int(blocks.max()) >= self.disk.nblocks):
            raise IndexError(f"task {t.tid}: blocks outside the disk's {self.disk.nblocks}")
        clock0 = t.modelled_ns
        res = await self._drive(
            t, self.bmap, blocks,
            lambda i, n: K.cache_run(self.ram, self.bmap, self.bcount, self.dirty,
                                     self.clean_cache, blocks, writes, i, n, self.ept,
                                     self.host_acc, self.guest_acc, self.needs_zero),
            lambda i: self._cache_fill(t, blocks, writes, i), lambda: self.last_disk_error)
        if not res.killed:
            await self.balance_dirty(t)  # a writer over the dirty limit writes back itself
            res.modelled_ns = t.modelled_ns - clock0
        return res

    def _dirty_thresholds(self) -> tuple[int, int]:
        """(background, foreground) dirty-page limits (Linux's dirty ratios)."""
        dirtyable = self.buddy.free_pages + self.cache_count
        return dirtyable * DIRTY_BACKGROUND_RATIO // 100, dirtyable * DIRTY_RATIO // 100

    async def _write_some(self, nr: int, task: TaskMem | None) -> int:
        """Write back up to ``nr`` dirty pages in block order from the flusher's cursor
        (so that runs of contiguous blocks go out in one pwrite each); they stay cached."""
        g = np.flatnonzero(self.dirty)
        if g.size == 0 or nr <= 0:
            return 0
        b = self.cache_block[g]
        order = np.argsort(b, kind="stable")
        g, b = g[order], b[order]
        start = int(np.searchsorted(b, self.flush_cursor))
        pick = np.concatenate((g[start:], g[:start]))[:nr]
        if pick.size:
            self.flush_cursor = int(self.cache_block[pick[-1]]) + 1
        return int((await self.cache_writeback(pick, task)).size)

    async def flush_dirty(self) -> int:
        """The flusher: above the background dirty limit, write one batch back (background
        work, charged to no task). The scheduler calls it every round, beside kswapd."""
        if self.disk is None or self.cache_count == 0:
            return 0
        dirty = self.dirty_pages()
        bg, _ = self._dirty_thresholds()
        if dirty <= bg:
            return 0
        done = await self._write_some(min(WRITEBACK_BATCH, dirty - bg), None)
        self.cstats.flushed += done
        return done

    async def balance_dirty(self, t: TaskMem) -> int:
        """A writer over the dirty limit writes back, batch by batch, until the dirty pages
        are down to the background limit, charged to it: Linux's balance_dirty_pages
        throttling. Stops early when a batch makes no progress (a failing disk)."""
        bg, hard = self._dirty_thresholds()
        dirty = self.dirty_pages()
        if dirty <= hard:
            return 0
        total = 0
        while dirty > bg:
            done = await self._write_some(min(WRITEBACK_BATCH, dirty - bg), t)
            if done == 0:
                break
            total += done
            dirty = self.dirty_pages()
        self.cstats.throttled += total
        return total

    async def _cache_fill(self, t: TaskMem, blocks: np.ndarray, writes: np.ndarray,
                          i: int) -> bool:
        """Bring block ``blocks[i]`` into the cache, with read-around: the quantum's next
        uncached blocks, as many as fit above the high watermark (up to FAULT_AROUND).

        A write miss allocates its page without reading the block (the write covers the
        whole page: the vCPU kernel zeroes it before the stamp).  The blocks to read are
        read in runs of contiguous blocks, one pread each, charged to ``t`` on the disk
        device.  Returns False when ``t`` was killed: to make room (OOM) or by a disk read
        error (as by SIGBUS: the data it needs cannot be had)."""
        assert self.disk is not None
        b = int(blocks[i])
        g0 = await self.alloc_anon(t)  # reclaim, deflate-on-OOM, OOM kill as for anon
        if g0 < 0:
            return False
        self.buddy.state[g0] = PG_CACHE
        self.cache_count += 1
        self.guest_acc[g0] = 1
        if self.bmap[b] >= 0:  # filled while we waited for memory
            self._cache_free(np.array([g0], np.int64))
            return True
        write_alloc = bool(writes[i])
        # Read-around: the quantum's next uncached blocks (at most FAULT_AROUND, at most an
        # eighth of RAM), from free memory down to the low watermark after one pass of
        # reclaim for them, as Linux's readahead allocates (__GFP_NORETRY: one try, no OOM).
        # The pages just read have their accessed bits set, so that pass cannot take them.
        win = blocks[i + 1:i + 4 * FAULT_AROUND]
        absent = win[(self.bmap[win] < 0) & (win != b)]
        _, first = np.unique(absent, return_index=True)
        more = absent[np.sort(first)][:min(FAULT_AROUND, self.npages // 8)]
        room = self.buddy.free_pages - self.wmark_low
        if more.size > room:
            await self.reclaim(int(more.size) - max(room, 0), direct=True, task=t)
            if self.bmap[b] >= 0:  # cannot happen (one filler at a time), but be safe
                self._cache_free(np.array([g0], np.int64))
                return True
            more = more[self.bmap[more] < 0]
            room = self.buddy.free_pages - self.wmark_low
        more = more[:max(room, 0)]
        g_more = np.empty(0, np.int64)
        if more.size:
            runs = self.buddy.alloc_many(int(more.size), MAX_ORDER, PG_CACHE)
            g_more = runs_to_pfns(runs).astype(np.int64)
            more = more[:g_more.size]
            self.cache_count += int(g_more.size)
            self.guest_acc[g_more] = 1
        rblocks = more if write_alloc else np.concatenate(([b], more)).astype(np.int64)
        rpages = g_more if write_alloc else np.concatenate(([g0], g_more)).astype(np.int64)
        ios = 0
        if rpages.size:
            await self._back_for_disk_read(t, rpages)
            # No await from its last check to the copies below (see the module docstring).
            order = np.argsort(rblocks, kind="stable")
            rblocks = rblocks[order]
            rpages = rpages[order]
            words = self.ram.reshape(-1, PAGE_WORDS)
            try:
                for s, blk, ln in contiguous_runs(rblocks):
                    data = self.disk.read(blk, ln)
                    words[rpages[s:s + ln]] = np.frombuffer(data, np.uint64).reshape(
                        ln, PAGE_WORDS)
                    self.charge(t, self.cost.disk.io_ns(ln))
                    self.cstats.disk_read_pages += ln
                    self.cstats.disk_read_ios += 1
                    ios += 1
            except OSError as e:
                self._cache_free(np.concatenate(([g0], g_more)).astype(np.int64))
                self.cstats.disk_read_errors += 1
                t.sigbus += 1
                self.last_disk_error = f"disk read of block {b} failed ({e}); task {t.tid} " \
                                       "killed (SIGBUS)"
                if self.log is not None and self.cstats.disk_read_errors & (
                        self.cstats.disk_read_errors - 1) == 0:
                    self.log(f"{self.last_disk_error} [{self.cstats.disk_read_errors} so far]")
                return False
            self._cache_install(rpages, rblocks)
        if write_alloc:
            self._cache_install(np.array([g0], np.int64), np.array([b], np.int64))
            self.needs_zero[g0] = 1  # zeroed by the vCPU kernel after its EPT check
            self.clean_cache[g0] = 0  # not a copy of the block: its write is coming
            self.cstats.write_allocs += 1
            self.stats.minor_faults += 1
            self.charge(t, self.cost.minor_faults(1))
        else:
            self.stats.major_faults += 1
            self.charge(t, self.cost.minor_fault)
        self.cstats.misses += 1
        self.cstats.readahead += int(more.size)
        return True

    async def _back_for_disk_read(self, t: TaskMem, pages: np.ndarray) -> None:
        """Make ``pages`` EPT-present before a disk read overwrites them whole, charging
        ``t`` for the exits.  A page the host swapped out and reads back here is read for
        nothing: VSwapper's stale swap read, counted (``back_for_overwrite``)."""
        await self.back_for_overwrite(t, pages, stale=True)

    def _cache_install(self, pages: np.ndarray, blocks: np.ndarray) -> None:
        """Map freshly read ``pages`` to their ``blocks``: clean copies of the disk."""
        self.bmap[blocks] = pages
        self.cache_block[pages] = blocks
        self.dirty[pages] = 0
        self.clean_cache[pages] = 1
        self.needs_zero[pages] = 0
        self.guest_acc[pages] = 1

    def _cache_free(self, pages: np.ndarray) -> None:
        """Drop cache pages (being filled or cached, clean) and free their frames."""
        if pages.size == 0:
            return
        b = self.cache_block[pages]
        self.bmap[b[b >= 0]] = -1
        self.cache_block[pages] = -1
        self.dirty[pages] = 0
        self.clean_cache[pages] = 0
        self.needs_zero[pages] = 0
        self.cache_count -= int(pages.size)
        self.buddy.free_gpfns(pages)

    async def reclaim_cache(self, nr: int, *, direct: bool, task: TaskMem | None = None) -> int:
        """Reclaim up to ``nr`` cold page-cache pages: clean ones dropped without I/O, then
        (if too few) dirty ones written back and dropped.  Returns pages freed.

        Writeback in direct reclaim is charged to ``task``; kswapd's and the balloon's is
        background work (``task`` None)."""
        if self.disk is None or self.cache_count == 0 or nr <= 0:
            return 0
        # Scans at most one revolution of the clock (see below).
        nr = min(nr, self._cache_victims.shape[0])
        nc, nd, self.cache_hand, scanned = K.cache_scan(
            self.buddy.state, self.guest_acc, self.dirty, self.cache_block, self.cache_hand,
            self.npages, nr, self._cache_victims, self._dirty_victims)
        if direct:
            self.stats.direct_scan += int(scanned)
        else:
            self.stats.async_scan += int(scanned)
        # One revolution at most: a page used since the last pass loses its bit and stays
        # (Linux's active list ages into the inactive one), and anon pages get their turn
        # rather than the cache being emptied of hot pages.  Victims are distinct already;
        # _distinct keeps that so should the bound change.
        clean = _distinct(self._cache_victims[:nc])
        dirty = _distinct(self._dirty_victims[:nd])[:max(0, nr - clean.size)]
        self._cache_free(clean)
        self.cstats.dropped_clean += int(clean.size)
        done = int(clean.size)
        if dirty.size:
            written = await self.cache_writeback(dirty, task)
            # dropped only if still clean and cold after the write (no await since)
            drop = written[(self.dirty[written] == 0) & (self.cache_block[written] >= 0)]
            self._cache_free(drop)
            self.cstats.written_back += int(drop.size)
            done += int(drop.size)
        if direct:
            self.stats.direct_reclaim += done
        else:
            self.stats.async_reclaim += done
        return done

    async def cache_writeback(self, pages: np.ndarray, task: TaskMem | None = None) -> np.ndarray:
        """Write dirty cache ``pages`` to the disk, contiguous blocks in one pwrite; returns
        the pages written (now clean).  A failed write stops the batch: its pages stay
        dirty and cached, nothing is lost."""
        assert self.disk is not None
        pages = np.asarray(pages, np.int64)
        absent = pages[self.ept[pages] == EPT_NOT_PRESENT]
        if absent.size:
            # double paging, of file pages: the host swapped these out and must read them
            # back before the guest writes them to its disk
            read = self.host_backed(task, absent, None, await self.ensure_present(absent))
            self.stats.double_paging += int(np.count_nonzero(read))
        # re-check after the await: still cached and dirty, and backed
        ok = ((self.buddy.state[pages] == PG_CACHE) & (self.cache_block[pages] >= 0)
              & (self.dirty[pages] != 0) & (self.ept[pages] != EPT_NOT_PRESENT))
        pages = pages[ok]
        blocks = self.cache_block[pages]
        order = np.argsort(blocks, kind="stable")
        pages = pages[order]
        blocks = blocks[order]
        words = self.ram.reshape(-1, PAGE_WORDS)
        written: list[np.ndarray] = []
        for s, blk, ln in contiguous_runs(blocks):
            run = pages[s:s + ln]
            try:
                self.disk.write(blk, words[run].tobytes())
            except OSError as e:
                self.cstats.disk_write_errors += 1
                self.last_disk_error = f"disk write of blocks {blk}..{blk + ln - 1} failed " \
                                       f"({e}); the pages stay dirty"
                n_err = self.cstats.disk_write_errors
                if self.log is not None and n_err & (n_err - 1) == 0:
                    self.log(f"{self.last_disk_error} [{n_err} so far]")
                break
            self.dirty[run] = 0
            self.clean_cache[run] = 1  # the disk holds what the page holds
            self.charge(task, self.cost.disk.io_ns(ln))
            self.cstats.disk_write_pages += ln
            self.cstats.disk_write_ios += 1
            written.append(run)
        return np.concatenate(written) if written else np.empty(0, np.int64)

    async def cache_sync(self) -> int:
        """Write every dirty cache page back (background work, like ``sync``); returns the
        pages written."""
        if self.disk is None:
            return 0
        return int((await self.cache_writeback(np.flatnonzero(self.dirty))).size)

    def cache_stats_map(self) -> dict[int, int]:
        """The page cache's project stats tags (absent without a disk)."""
        from protocol.features import StatTag as T

        if self.disk is None:
            return {}
        c = self.cstats
        return {
            T.CACHE_PAGES: self.cache_count,
            T.DIRTY_PAGES: self.dirty_pages(),
            T.DISK_READ_PAGES: c.disk_read_pages,
            T.DISK_READ_IOS: c.disk_read_ios,
            T.DISK_WRITE_PAGES: c.disk_write_pages,
            T.DISK_WRITE_IOS: c.disk_write_ios,
            T.DISK_READ_ERRORS: c.disk_read_errors,
            T.DISK_WRITE_ERRORS: c.disk_write_errors,
            T.CACHE_MISSES: c.misses,
            T.CACHE_DROPPED_CLEAN: c.dropped_clean,
            T.CACHE_WRITTEN_BACK: c.written_back,
        }

    def check_cache_invariants(self) -> None:
        """Every cached block maps to a PG_CACHE page that maps back; dirty only there."""
        st = self.buddy.state
        cache = st == PG_CACHE
        if int(np.count_nonzero(cache)) != self.cache_count:
            raise AssertionError(f"cache count {self.cache_count} != PG_CACHE pages "
                                 f"{int(np.count_nonzero(cache))}")
        mapped = np.flatnonzero(self.bmap >= 0)
        g = self.bmap[mapped]
        if g.size and not (np.all(st[g] == PG_CACHE) and np.all(self.cache_block[g] == mapped)):
            raise AssertionError("block map and cache rmap disagree")
        if int(np.count_nonzero(self.cache_block >= 0)) != mapped.size:
            raise AssertionError("cache pages with a block that does not map to them")
        if np.any(self.dirty[~cache]):
            raise AssertionError("dirty bit on a page that is not in the page cache")
        want = cache & (self.cache_block >= 0) & (self.dirty == 0) & (self.needs_zero == 0)
        if not np.array_equal(self.clean_cache != 0, want):
            raise AssertionError("clean_cache is not: cached, not dirty, not write-allocated")

    # ------------------------------------------------------------------ balloon

    async def balloon_reclaim(self, count: int) -> int:
        """Make room for a balloon request by reclaiming cold pages, once.

        Linux allocates balloon pages with ``__GFP_NORETRY``: one pass of reclaim, no
        retries, no OOM. That pass is what lets a balloon take an idle guest's memory:
        its cold anonymous pages go to guest swap and their (backed) frames can then be
        ballooned and released to the host. At most ``BALLOON_RECLAIM_BATCH`` pages per
        request, so a busy guest is squeezed gradually and its hot pages (accessed bits
        set again within a clock revolution) survive. Counted as background reclaim, not
        as an allocation stall: no task of the guest waited for it."""
        room = self.buddy.free_pages - self.wmark_low
        want = min(count - max(room, 0), BALLOON_RECLAIM_BATCH)
        if want <= 0 or (self.swap.free_slots == 0 and self.cache_count == 0):
            return 0
        return await self.reclaim(want, direct=False)

    def balloon_alloc(self, count: int, max_order: int) -> np.ndarray:
        """Pages for the balloon, highest orders first; never below the low watermark.

        Raises :class:`OutOfPuff` when nothing can be given without reclaim."""
        if count <= 0:
            raise ValueError(f"count must be positive, got {count}")
        if count > self.npages:
            raise ValueError(f"count {count} exceeds guest RAM of {self.npages} pages")
        if not 0 <= max_order <= MAX_ORDER:
            raise ValueError(f"max_order must be in 0..{MAX_ORDER}, got {max_order}")
        room = self.buddy.free_pages - self.wmark_low
        if room <= 0:
            self.stats.out_of_puff += 1
            raise OutOfPuff(f"free memory ({self.buddy.free_pages} pages) is at or below the "
                            f"low watermark ({self.wmark_low} pages)")
        return self.buddy.alloc_many(min(count, room), max_order, PG_BALLOON)

    def balloon_free(self, runs: np.ndarray) -> int:
        """Return balloon pages to the allocator; all must be in the balloon (RunError)."""
        return self.buddy.free_runs(runs, want_state=PG_BALLOON, code=ErrorCode.NOT_BALLOONED)

    def balloon_list(self) -> np.ndarray:
        return runs_of_set((self.buddy.state == PG_BALLOON).view(np.uint8)).astype(np.int64)

    @property
    def balloon_pages(self) -> int:
        return self.buddy.count_state(PG_BALLOON)

    def report_isolate(self, min_order: int, max_runs: int) -> np.ndarray:
        return self.buddy.isolate_free(min_order, max_runs)

    def report_abort(self) -> int:
        """Put every isolated page back on the free lists, unreported (driver went away)."""
        r = runs_of_set((self.buddy.state == PG_ISOLATED).view(np.uint8)).astype(np.int64)
        if len(r):
            self.buddy.free_runs(r, want_state=PG_ISOLATED, reported=False)
        return int(r[:, 1].sum()) if len(r) else 0

    def report_done(self, runs: np.ndarray) -> int:
        """Reported pages back to the free lists; all must be isolated (RunError
        ``not_in_use`` otherwise)."""
        return self.buddy.free_runs(runs, want_state=PG_ISOLATED)

    # ------------------------------------------------------------------ stats

    def anon_pages(self) -> int:
        return self.buddy.count_state(PG_ANON)

    def stats_map(self, tasks_running: int = 0) -> dict[int, int]:
        """Virtio stats (tags 0–15) and project extensions (>= 256), bytes for memory."""
        from protocol.features import StatTag as T

        s = self.stats
        free = self.buddy.free_pages
        balloon = self.balloon_pages
        return {
            T.SWAP_IN: s.swap_in,
            T.SWAP_OUT: s.swap_out,
            T.MAJFLT: s.major_faults,
            T.MINFLT: s.minor_faults,
            T.MEMFREE: free * PAGE_SIZE,
            # As Linux without DEFLATE_ON_OOM: ballooned pages leave MemTotal.
            T.MEMTOT: (self.npages - balloon) * PAGE_SIZE,
            # si_mem_available(): free minus the reserve (high wmark), plus the page cache
            # but for what the kernel would keep (half of it, at most the low watermark)
            T.AVAIL: max(0, free - self.wmark_high + self.cache_count
                         - min(self.cache_count // 2, self.wmark_low)) * PAGE_SIZE,
            T.CACHES: self.cache_count * PAGE_SIZE,
            T.OOM_KILL: s.oom_kills,
            T.ALLOC_STALL: s.alloc_stalls,
            T.ASYNC_SCAN: s.async_scan,
            T.DIRECT_SCAN: s.direct_scan,
            T.ASYNC_RECLAIM: s.async_reclaim,
            T.DIRECT_RECLAIM: s.direct_reclaim,
            T.CORRUPTED_READS: s.corrupted_reads,
            **self.pathology_stats(),
            T.OPS: s.ops,
            T.GUEST_SWAP_TOTAL: self.swap.nslots * PAGE_SIZE,
            T.GUEST_SWAP_FREE: self.swap.free_slots * PAGE_SIZE,
            T.OOM_KILLS_TOTAL: s.oom_kills,
            T.BALLOON_PAGES: balloon,
            T.REPORTED_PAGES: self.buddy.reported_pages,
            T.ANON_PAGES: self.anon_pages(),
            T.KERNEL_PAGES: self.kernel_pages,
            T.TASKS_RUNNING: tasks_running,
            T.EPT_EXITS: s.ept_exits,
            T.GUEST_FAULTS: s.guest_faults,
            T.OUT_OF_PUFF: s.out_of_puff,
            T.STALL_NS_EPT: s.stall_ns_ept,
            T.STALL_NS_GUEST: s.stall_ns_guest,
            T.GUEST_SWAP_WRITE_ERRORS: s.swap_write_errors,
            T.GUEST_SWAP_READ_ERRORS: s.swap_read_errors,
            T.SWAP_READ_KILLS: s.swap_read_kills,
            T.MODELLED_NS: s.modelled_ns,
            T.KERNEL_MEMMAP_PAGES: self.kernel_memmap_pages,
            **self.cache_stats_map(),
            **self.task_stats(),
        }

    def task_stats(self) -> dict[int, int]:
        """Per-task accesses and modelled clocks as stats tags (``TASK_STATS_BASE``)."""
        from protocol.features import MAX_TASK_STATS, TASK_STATS_BASE, TASK_STATS_STRIDE

        out: dict[int, int] = {}
        for t in self.tasks.values():
            if 0 <= t.tid < MAX_TASK_STATS:
                out[TASK_STATS_BASE + TASK_STATS_STRIDE * t.tid] = t.accesses
                out[TASK_STATS_BASE + TASK_STATS_STRIDE * t.tid + 1] = t.modelled_ns
        return out

    def check_invariants(self) -> None:
        """Conservation: free + isolated + allocated == total; page tables match rmap."""
        st = self.buddy.state
        free = int(np.count_nonzero((st == PG_FREE) | (st == K.PG_REPORTED)))
        if free != self.buddy.free_pages:
            raise AssertionError(f"free count {self.buddy.free_pages} != pages free {free}")
        resident = 0
        for t in self.tasks.values():
            p = t.pt[t.pt >= 0]
            resident += p.size
            if p.size and not (np.all(st[p] == PG_ANON) and np.all(self.rmap_task[p] == t.tid)):
                raise AssertionError(f"task {t.tid}: mapped pages not anon/rmapped to it")
            if p.size != t.resident:
                raise AssertionError(f"task {t.tid}: resident {t.resident} != mapped {p.size}")
        if resident != int(np.count_nonzero(st == PG_ANON)):
            raise AssertionError("anon pages not all mapped exactly once")
        used = int(self.swap.used.sum())
        if used != sum(t.swapped for t in self.tasks.values()):
            raise AssertionError("swap slots in use != swapped ptes")
        self.check_cache_invariants()
