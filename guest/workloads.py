"""Task workloads: seeded generators of memory-access streams, one quantum at a time.

A workload produces ``(vpns, is_write)`` arrays (int64 virtual page numbers inside the task,
uint8 write flags) for the next quantum, in vectorised numpy; the vCPU loop
(:func:`guest.kernels.vcpu_run`) consumes them.  Units: sizes in bytes in the spec, pages
(4096 bytes) inside; durations and times in seconds; ``rate`` in accesses per second.

Kinds (``docs/internals.md``): ``uniform``, ``zipf`` (``skew``), ``scan``, ``hotcold``
(``hot_fraction``, ``hot_prob``), ``phases`` (a list of specs, each with a ``duration`` and
optionally its own ``rate``; the list repeats, so working sets and access rates grow and
shrink periodically), ``idle`` (touch ``size`` once,
then sleep; with ``hold``, end that many seconds after the last page was touched),
``fileio`` (dbench-like file I/O: ``files`` files of ``file_size`` bytes on the VM's disk,
the file of each operation drawn zipf(``skew``)-wise, then a run of up to
:data:`FILEIO_RUN` consecutive blocks from a uniform offset, all read or all written as
``write_ratio`` says).  A fileio task's accesses are block numbers relative to its first file
(the kernel adds where its files start on the disk) and go through the page cache; its
address space is one page.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from guest.kernels import PAGE_SIZE

KINDS = ("uniform", "zipf", "scan", "hotcold", "phases", "idle", "fileio")
#: Blocks one fileio operation reads or writes (at most the file's size).
FILEIO_RUN = 8


class SpecError(ValueError):
    """A workload spec with a bad value; the message names the field."""


@dataclass(frozen=True, kw_only=True)
class WorkloadSpec:
    workload: str
    size: int  # bytes
    write_ratio: float = 0.3
    rate: float | None = None
    skew: float = 0.9
    hot_fraction: float = 0.1
    hot_prob: float = 0.9
    duration: float | None = None
    start: float = 0.0
    hold: float | None = None  # idle: seconds kept once all touched, then the task ends
    phases: tuple[WorkloadSpec, ...] = field(default_factory=tuple)
    files: int = 0  # fileio: number of files
    file_size: int = 0  # fileio: bytes per file (a multiple of the page)

    @property
    def pages(self) -> int:
        """Address-space size in pages: the largest working set over all phases."""
        if self.workload == "phases":
            return max(p.pages for p in self.phases)
        if self.workload == "fileio":
            return 1  # its data is on the disk, cached in the page cache
        return -(-self.size // PAGE_SIZE)

    @property
    def file_pages(self) -> int:
        """fileio: blocks per file."""
        return self.file_size // PAGE_SIZE

    @property
    def disk_pages(self) -> int:
        """Disk blocks the task's files take (0 for anonymous workloads)."""
        return self.files * self.file_pages if self.workload == "fileio" else 0

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "task") -> WorkloadSpec:
        """Validate a spec map (``--config`` JSON); raise :class:`SpecError` naming the field."""
        if not isinstance(d, Mapping):
            raise SpecError(f"{where}: expected an object, got {type(d).__name__}")

        def num(name: str, default: Any, lo: float, hi: float, *, allow_none: bool = False,
                integer: bool = False) -> Any:
            v = d.get(name, default)
            if v is None:
                if allow_none:
                    return None
                raise SpecError(f"{where}.{name}: is required")
            if isinstance(v, bool) or not isinstance(v, (int, float)) or (
                    integer and not isinstance(v, int)):
                raise SpecError(f"{where}.{name}: expected a number, got {v!r}")
            if not (lo <= v <= hi) or (isinstance(v, float) and not math.isfinite(v)):
                raise SpecError(f"{where}.{name}: {v!r} is outside [{lo}, {hi}]")
            return v

        kind = d.get("workload")
        if kind not in KINDS:
            raise SpecError(f"{where}.workload: {kind!r} is not one of {', '.join(KINDS)}")
        phases: tuple[WorkloadSpec, ...] = ()
        if kind == "phases":
            raw = d.get("phases")
            if not isinstance(raw, list) or not raw:
                raise SpecError(f"{where}.phases: a 'phases' workload needs a non-empty list")
            phases = tuple(cls.from_dict(p, f"{where}.phases[{i}]") for i, p in enumerate(raw))
            for i, p in enumerate(phases):
                if p.workload == "phases":
                    raise SpecError(f"{where}.phases[{i}].workload: phases do not nest")
                if p.duration is None:
                    raise SpecError(f"{where}.phases[{i}].duration: every phase needs one")
                if p.workload == "fileio":
                    raise SpecError(f"{where}.phases[{i}].workload: a fileio task cannot be "
                                    "a phase")
            size = max(p.size for p in phases)
        files = file_size = 0
        if kind == "fileio":
            files = num("files", None, 1, 1 << 24, integer=True)
            file_size = num("file_size", None, PAGE_SIZE, 1 << 40, integer=True)
            if file_size % PAGE_SIZE:
                raise SpecError(f"{where}.file_size: {file_size} is not a multiple of "
                                f"{PAGE_SIZE}")
            size = files * file_size
        if kind != "phases" and kind != "fileio":
            size = num("size", None, PAGE_SIZE, 1 << 44, integer=True)
        rate = num("rate", None, 1e-3, 1e12, allow_none=True)
        hold = num("hold", None, 0.0, 1e9, allow_none=True)
        if hold is not None and kind != "idle":
            raise SpecError(f"{where}.hold: only an idle task holds its memory for a time")
        return cls(
            workload=kind,
            size=size,
            write_ratio=float(num("write_ratio", 0.3, 0.0, 1.0)),
            rate=None if rate is None else float(rate),
            skew=float(num("skew", 0.9, 0.0, 10.0)),
            hot_fraction=float(num("hot_fraction", 0.1, 1e-9, 1.0)),
            hot_prob=float(num("hot_prob", 0.9, 0.0, 1.0)),
            duration=num("duration", None, 1e-3, 1e9, allow_none=True),
            start=float(num("start", 0.0, 0.0, 1e9)),
            hold=None if hold is None else float(hold),
            phases=phases,
            files=files,
            file_size=file_size,
        )


class Workload:
    """Stateful generator for one task.  ``quantum(n, t)`` gives the next accesses at task
    time ``t`` (seconds since the task started)."""

    def __init__(self, spec: WorkloadSpec, seed: int) -> None:
        self.spec = spec
        self.rng = np.random.default_rng(seed)
        self._scan_pos = 0
        self._touched = 0  # idle: pages touched so far
        self.touched_at: float | None = None  # idle: task time its last page was touched
        self._phase: tuple[int, int] = (0, 0)  # (cycle, phase index) in force
        self._zipf: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def active(self, t: float) -> WorkloadSpec:
        """The spec in force at task time ``t`` (phases repeat)."""
        s = self.spec
        if s.workload != "phases":
            return s
        cycle = sum(p.duration for p in s.phases)  # type: ignore[misc]
        n = int(t // cycle)
        x = t - n * cycle
        i = len(s.phases) - 1
        for k, p in enumerate(s.phases):
            if x < p.duration:  # type: ignore[operator]
                i = k
                break
            x -= p.duration  # type: ignore[operator]
        key = (n, i)
        if key != self._phase:
            # a new phase starts afresh: an idle phase touches its set again, a scan restarts
            self._phase = key
            self._touched = 0
            self._scan_pos = 0
        return s.phases[i]

    def rate(self, t: float) -> float | None:
        """Accesses per second at task time ``t`` (None: as fast as the vCPU runs): the
        phase's own ``rate`` when it sets one, else the task's."""
        a = self.active(t)
        return a.rate if a.rate is not None else self.spec.rate

    def finished(self, t: float) -> bool:
        """True once an idle task with ``hold`` has kept all its memory that long."""
        h = self.spec.hold
        return h is not None and self.touched_at is not None and t - self.touched_at >= h

    def working_pages(self, t: float) -> int:
        return self.active(t).pages

    def sleeping(self, t: float) -> bool:
        a = self.active(t)
        return a.workload == "idle" and self._touched >= a.pages

    def quantum(self, n: int, t: float) -> tuple[np.ndarray, np.ndarray]:
        a = self.active(t)
        p = a.pages
        rng = self.rng
        if a.workload == "uniform":
            vpns = rng.integers(0, p, n, dtype=np.int64)
        elif a.workload == "zipf":
            cdf, perm = self._zipf_tables(a)
            ranks = np.searchsorted(cdf, rng.random(n) * cdf[-1], side="right")
            np.minimum(ranks, p - 1, out=ranks)
            vpns = perm[ranks]
        elif a.workload == "scan":
            vpns = (self._scan_pos + np.arange(n, dtype=np.int64)) % p
            self._scan_pos = int((self._scan_pos + n) % p)
        elif a.workload == "hotcold":
            hot = max(1, int(p * a.hot_fraction))
            is_hot = rng.random(n) < a.hot_prob
            if hot >= p:
                is_hot[:] = True
            vpns = np.where(is_hot, rng.integers(0, hot, n), rng.integers(hot, max(p, hot + 1), n))
            vpns = vpns.astype(np.int64)
        elif a.workload == "idle":
            # touch every page once (writes, so the memory is really populated), then sleep
            k = max(0, min(n, p - self._touched))
            vpns = np.arange(self._touched, self._touched + k, dtype=np.int64)
            self._touched += k
            if self._touched >= p and self.touched_at is None:
                self.touched_at = t
            return vpns, np.ones(k, np.uint8)
        elif a.workload == "fileio":
            return self._fileio(a, n)
        else:  # pragma: no cover - specs are validated
            raise AssertionError(a.workload)
        writes = (rng.random(n) < a.write_ratio).view(np.uint8)
        return vpns, writes

    def _zipf_tables(self, a: WorkloadSpec) -> tuple[np.ndarray, np.ndarray]:
        p = a.pages
        key = id(a)
        tab = self._zipf.get(key)
        if tab is None:
            w = 1.0 / np.power(np.arange(1, p + 1, dtype=np.float64), a.skew)
            cdf = np.cumsum(w)
            # hot pages scattered over the address space, as a real heap's would be
            perm = np.random.default_rng(p).permutation(p).astype(np.int64)
            tab = (cdf, perm)
            self._zipf[key] = tab
        return tab

    def _fileio(self, a: WorkloadSpec, n: int) -> tuple[np.ndarray, np.ndarray]:
        """``n`` block accesses: operations of ``run`` consecutive blocks in one file."""
        fp = a.file_pages
        run = min(FILEIO_RUN, fp)
        nops = -(-n // run)
        rng = self.rng
        cdf, perm = self._file_tables(a)
        ranks = np.searchsorted(cdf, rng.random(nops) * cdf[-1], side="right")
        np.minimum(ranks, a.files - 1, out=ranks)
        files = perm[ranks]
        starts = files * fp + rng.integers(0, fp - run + 1, nops)
        blocks = (starts[:, None] + np.arange(run, dtype=np.int64)).reshape(-1)[:n]
        op_writes = (rng.random(nops) < a.write_ratio).view(np.uint8)
        writes = np.repeat(op_writes, run)[:n]
        return blocks.astype(np.int64), np.ascontiguousarray(writes)

    def _file_tables(self, a: WorkloadSpec) -> tuple[np.ndarray, np.ndarray]:
        key = -1 - a.files  # apart from the page tables' keys
        tab = self._zipf.get(key)
        if tab is None:
            w = 1.0 / np.power(np.arange(1, a.files + 1, dtype=np.float64), a.skew)
            perm = np.random.default_rng(a.files).permutation(a.files).astype(np.int64)
            tab = (np.cumsum(w), perm)
            self._zipf[key] = tab
        return tab
