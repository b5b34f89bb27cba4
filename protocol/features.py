"""Constants of the balloon protocol: version, page size, feature bits, stats tags, limits.

Feature bits use virtio's numbering (VIRTIO_BALLOON_F_*) plus project extensions; the
``features`` field on the wire is the bitmask ``sum(1 << bit)``. Stats tags 0–15 are virtio's
(VIRTIO_BALLOON_S_*); tags >= 256 are project extensions that receivers which do not know
them ignore. Memory amounts in stats are bytes; events are counts.
"""

from __future__ import annotations

from collections.abc import Iterable
from enum import IntEnum

from .constants import PAGE_SIZE as PAGE_SIZE  # re-exported: the protocol's page size

PROTOCOL_VERSION = 1

#: Frames carry at most 8 MiB of msgpack (the framing limit). With RANGES a run costs 16 bytes, so
#: one frame can describe ~500k runs; a virtio-style pfn list ~2M pages.
MAX_FRAME = 8 * 1024 * 1024

#: Virtio mode sends at most this many pfns per message, as Linux's
#: VIRTIO_BALLOON_ARRAY_PFNS_MAX (256): the baseline the benchmarks compare against.
VIRTIO_PFNS_PER_MESSAGE = 256

#: Largest PFN batch accepted in one message (bounded by the frame size anyway; named so
#: that validation fails with a clear code before any per-page work).
MAX_BATCH_PFNS = (MAX_FRAME - 64) // 4
MAX_BATCH_RUNS = (MAX_FRAME - 64) // 16

#: Guest RAM is addressed by uint32 pfns on the wire: 16 TiB of 4 KiB pages at most.
MAX_GUEST_PAGES = 1 << 32


class Feature(IntEnum):
    """Feature bit numbers (virtio-balloon plus project extensions)."""

    MUST_TELL_HOST = 0
    STATS_VQ = 1
    DEFLATE_ON_OOM = 2
    FREE_PAGE_HINT = 3
    PAGE_POISON = 4
    PAGE_REPORTING = 5
    WS_REPORTING = 8
    RANGES = 40

    @property
    def mask(self) -> int:
        return 1 << int(self)

    @classmethod
    def from_names(cls, names: Iterable[str]) -> int:
        """Bitmask from topology/CLI names (``must_tell_host``, ``stats``, ``reporting``...)."""
        mask = 0
        for name in names:
            key = name.strip().lower()
            if key not in FEATURE_NAMES:
                known = ", ".join(sorted(FEATURE_NAMES))
                raise ValueError(f"unknown balloon feature {name!r}; known features: {known}")
            mask |= FEATURE_NAMES[key].mask
        return mask

    @classmethod
    def to_names(cls, mask: int) -> list[str]:
        return [n for n, f in FEATURE_NAMES.items() if mask & f.mask]


#: The names used in topology files and on command lines.
FEATURE_NAMES: dict[str, Feature] = {
    "must_tell_host": Feature.MUST_TELL_HOST,
    "stats": Feature.STATS_VQ,
    "deflate_on_oom": Feature.DEFLATE_ON_OOM,
    "free_page_hint": Feature.FREE_PAGE_HINT,
    "page_poison": Feature.PAGE_POISON,
    "reporting": Feature.PAGE_REPORTING,
    "ws_reporting": Feature.WS_REPORTING,
    "ranges": Feature.RANGES,
}

#: Features this implementation's device understands and may negotiate.
DEVICE_FEATURES = (
    Feature.MUST_TELL_HOST.mask
    | Feature.STATS_VQ.mask
    | Feature.DEFLATE_ON_OOM.mask
    | Feature.PAGE_REPORTING.mask
    | Feature.RANGES.mask
)


class StatTag(IntEnum):
    """Stats tags: virtio's 0–15 and the project's extensions (>= 256)."""

    SWAP_IN = 0  # bytes swapped in
    SWAP_OUT = 1  # bytes swapped out
    MAJFLT = 2  # major faults (count)
    MINFLT = 3  # minor faults (count)
    MEMFREE = 4  # free memory (bytes)
    MEMTOT = 5  # total memory (bytes)
    AVAIL = 6  # available memory estimate (bytes)
    CACHES = 7  # disk caches (bytes)
    HTLB_PGALLOC = 8
    HTLB_PGFAIL = 9
    OOM_KILL = 10  # OOM kills (count)
    ALLOC_STALL = 11  # allocation stalls (count)
    ASYNC_SCAN = 12  # pages scanned by kswapd
    DIRECT_SCAN = 13  # pages scanned by direct reclaim
    ASYNC_RECLAIM = 14  # pages reclaimed by kswapd
    DIRECT_RECLAIM = 15  # pages reclaimed by direct reclaim
    # project extensions
    CORRUPTED_READS = 256
    OPS = 257
    GUEST_SWAP_TOTAL = 258  # bytes
    GUEST_SWAP_FREE = 259  # bytes
    OOM_KILLS_TOTAL = 260
    BALLOON_PAGES = 261
    REPORTED_PAGES = 262
    ANON_PAGES = 263
    KERNEL_PAGES = 264
    TASKS_RUNNING = 265
    EPT_EXITS = 266
    GUEST_FAULTS = 267
    OUT_OF_PUFF = 268
    STALL_NS_EPT = 269
    STALL_NS_GUEST = 270
    DRIVER_ALLOC_NS = 271  # driver: time waiting for balloon_alloc replies
    DRIVER_INFLATE_NS = 272  # driver: inflate round trips (protocol + host release)
    DRIVER_DEFLATE_NS = 273  # driver: deflate round trips
    DRIVER_FREE_NS = 274  # driver: balloon_free round trips to the kernel
    GUEST_SWAP_WRITE_ERRORS = 275  # guest swap writes that failed (the page stayed resident)
    GUEST_SWAP_READ_ERRORS = 276  # guest swap reads that failed (the task was killed)
    SWAP_READ_KILLS = 277  # tasks killed (as by SIGBUS) on a guest swap read error
    # The pathologies of uncooperative host swapping (VSwapper's names), pages, cumulative;
    # docs/architecture.md, "Pathologies".
    DOUBLE_PAGING = 290  # guest swap-outs of pages the host had swapped (read back first)
    FALSE_SWAP_READS = 291  # host swap reads of pages the guest then overwrote whole
    SILENT_SWAP_WRITES = 292  # host swap writes of clean page-cache pages (fed by the cache)
    STALE_SWAP_READS = 293  # host swap reads of pages a disk read then overwrote (the cache)
    MODELLED_NS = 278  # modelled time of the VM's tasks (sum of their clocks, guest.cost)
    KERNEL_MEMMAP_PAGES = 279  # of KERNEL_PAGES: the page descriptors of configured RAM
    # The page cache and the virtual disk (guest.mm); sent only by a guest with a disk.
    CACHE_PAGES = 296  # pages in the page cache (CACHES in pages)
    DIRTY_PAGES = 297  # of CACHE_PAGES: written and not yet written back
    DISK_READ_PAGES = 298  # blocks read from the disk into the cache
    DISK_READ_IOS = 299  # preads (one per run of contiguous blocks)
    DISK_WRITE_PAGES = 300  # blocks written back to the disk
    DISK_WRITE_IOS = 301  # pwrites
    DISK_READ_ERRORS = 302  # cache fills that failed (the task was killed, as by SIGBUS)
    DISK_WRITE_ERRORS = 303  # writebacks that failed (the pages stayed dirty)
    CACHE_MISSES = 304  # file accesses that missed the cache
    CACHE_DROPPED_CLEAN = 305  # cold clean cache pages reclaimed without I/O
    CACHE_WRITTEN_BACK = 306  # cold dirty cache pages written back, then reclaimed

    @property
    def unit(self) -> str:
        return STAT_UNITS.get(self, "count")


STAT_UNITS: dict[StatTag, str] = {
    StatTag.SWAP_IN: "bytes",
    StatTag.SWAP_OUT: "bytes",
    StatTag.MEMFREE: "bytes",
    StatTag.MEMTOT: "bytes",
    StatTag.AVAIL: "bytes",
    StatTag.CACHES: "bytes",
    StatTag.GUEST_SWAP_TOTAL: "bytes",
    StatTag.GUEST_SWAP_FREE: "bytes",
    StatTag.BALLOON_PAGES: "pages",
    StatTag.REPORTED_PAGES: "pages",
    StatTag.DOUBLE_PAGING: "pages",
    StatTag.FALSE_SWAP_READS: "pages",
    StatTag.SILENT_SWAP_WRITES: "pages",
    StatTag.STALE_SWAP_READS: "pages",
    StatTag.ANON_PAGES: "pages",
    StatTag.KERNEL_PAGES: "pages",
    StatTag.KERNEL_MEMMAP_PAGES: "pages",
    StatTag.CACHE_PAGES: "pages",
    StatTag.DIRTY_PAGES: "pages",
    StatTag.DISK_READ_PAGES: "pages",
    StatTag.DISK_WRITE_PAGES: "pages",
    StatTag.MODELLED_NS: "ns",
    StatTag.STALL_NS_EPT: "ns",
    StatTag.STALL_NS_GUEST: "ns",
    StatTag.DRIVER_ALLOC_NS: "ns",
    StatTag.DRIVER_INFLATE_NS: "ns",
    StatTag.DRIVER_DEFLATE_NS: "ns",
    StatTag.DRIVER_FREE_NS: "ns",
}

#: Per-task stats, ``TASK_STATS_STRIDE`` tags per task from ``TASK_STATS_BASE + stride * tid``:
#: its accesses, its modelled clock (ns), its wall-clock running time (ns); tasks beyond
#: ``MAX_TASK_STATS`` are not reported one by one.
TASK_STATS_BASE = 0x8000
TASK_STATS_STRIDE = 4
MAX_TASK_STATS = 1024

#: Largest value a stat may carry (uint64).
MAX_STAT_VALUE = (1 << 64) - 1
