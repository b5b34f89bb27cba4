"""Run snapshots, run summaries and the ``--record DIR`` writer.

A ``Snapshot`` is one poll of a running host over the control channel (``host_info``,
``list_vms`` and one ``dommemstat`` per VM), normalised to fixed units: memory amounts of
the host ledger in pages (4096 bytes), guest-reported amounts in bytes, counters cumulative.
The dashboard renders snapshots, ``RunSummary`` folds them into the end-of-run table, and
``Recorder`` writes them to a directory:

- ``timeseries.csv``: one row per VM per tick (``TIMESERIES_COLUMNS``, docs/cli.md);
- ``events.jsonl``: one JSON object per control-channel event, as received;
- ``topology.toml``: the topology the run used (``Topology.to_toml``);
- ``meta.json``: provenance, written when the run starts (:func:`provenance`): balloonlab's
  version, the git commit of the source when it is a git checkout, the machine, the
  resolved topology, the policy's parameters with their defaults, and the seed;
- ``summary.json``: ``RunSummary.to_json()`` at the end of the run, with the same
  provenance under ``"provenance"``.

Why one module of this size: the recording format (three files and their columns) is a
contract with ``plot``, the dashboard and users' own scripts; writer, readers, the run's
story and the summary all live here so the format is defined in exactly one place.
"""

from __future__ import annotations

import csv
import json
import math
import os
import platform
import socket
import subprocess
import time
from collections import Counter, deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

from hypervisor.topology import Topology
from hypervisor.units import PAGE_SIZE

__all__ = [
    "DOMMEMSTAT_UNIT",
    "PATHOLOGY_COLUMNS",
    "RATE_WINDOW",
    "SUMMARY_HEADERS",
    "TIMESERIES_COLUMNS",
    "HostSnapshot",
    "RateWindow",
    "Recorder",
    "RecordingError",
    "RunSummary",
    "Snapshot",
    "VmSnapshot",
    "modelled_rates",
    "provenance",
    "rates",
    "read_events",
    "read_timeseries",
    "snapshot_from",
    "snapshot_to_json",
    "story_lines",
    "summary_table_rows",
]

#: Bytes per unit of the guest amounts in ``dommemstat`` (``unused``, ``usable``,
#: ``swap_in``, ``swap_out``): the control method gives bytes, as the guest's virtio stats
#: arrive (``balloonlab dommemstat`` prints them in KiB, as virsh does).
DOMMEMSTAT_UNIT = 1


class RecordingError(ValueError):
    """A recording directory cannot be written or read."""


@dataclass(frozen=True, kw_only=True)
class HostSnapshot:
    """Host ledger at one instant; frames and swap slots are pages."""

    name: str
    frames_total: int
    frames_free: int
    swap_slots_total: int
    swap_slots_free: int
    policy: str

    @property
    def frames_used(self) -> int:
        return self.frames_total - self.frames_free

    @property
    def swap_slots_used(self) -> int:
        return self.swap_slots_total - self.swap_slots_free


@dataclass(frozen=True, kw_only=True)
class VmSnapshot:
    """One VM at one instant. ``*_pages`` are host-side pages; ``*_bytes`` guest-reported
    bytes (``None`` before the guest's first stats); counters are cumulative."""

    name: str
    state: str
    driver: str | None
    memory_pages: int
    target_pages: int
    balloon_pages: int
    backed_pages: int
    host_swapped_pages: int
    guest_free_bytes: int | None
    guest_available_bytes: int | None
    guest_swap_used_bytes: int | None
    swap_in_bytes: int
    swap_out_bytes: int
    major_faults: int
    minor_faults: int
    ops: int
    corrupted_reads: int
    oom_kills: int
    #: The guest's modelled time (its tasks' clocks added, ns); None before it reports it.
    modelled_ns: int | None = None
    #: Pathologies of host swapping (pages, cumulative; ``PATHOLOGY_COLUMNS``).
    double_paging: int = 0
    false_swap_reads: int = 0
    silent_swap_writes: int = 0
    stale_swap_reads: int = 0
    host_swap_reads: int = 0
    host_swap_reads_noncontig: int = 0


@dataclass(frozen=True, kw_only=True)
class Snapshot:
    """One poll: ``time`` is UNIX seconds."""

    time: float
    host: HostSnapshot
    vms: tuple[VmSnapshot, ...]


def _int(m: Mapping[str, Any], key: str, default: int = 0) -> int:
    v = m.get(key)
    return default if v is None else int(v)


def _opt_bytes(m: Mapping[str, Any], key: str, unit: int) -> int | None:
    v = m.get(key)
    return None if v is None else int(v) * unit


def _guest_swap_used(stat: Mapping[str, Any]) -> int | None:
    # Not a virsh field: the host may pass the guest's GUEST_SWAP_TOTAL/FREE (bytes) through.
    total, free = stat.get("guest_swap_total"), stat.get("guest_swap_free")
    if total is None or free is None:
        used = stat.get("guest_swap_used")
        return None if used is None else int(used)
    return int(total) - int(free)


def snapshot_from(
    host_info: Mapping[str, Any],
    vms: Sequence[Mapping[str, Any]],
    memstats: Mapping[str, Mapping[str, Any]],
    now: float | None = None,
) -> Snapshot:
    """Build a ``Snapshot`` from control-channel values (docs/protocol.md, "Control channel").

    *vms* is ``list_vms``' value; *memstats* maps VM name to its ``dommemstat`` value (a VM
    missing there, e.g. not booted yet, gets zeros and ``None``).
    """
    host = HostSnapshot(
        name=str(host_info.get("name", "?")),
        frames_total=_int(host_info, "frames_total"),
        frames_free=_int(host_info, "frames_free"),
        swap_slots_total=_int(host_info, "swap_slots_total"),
        swap_slots_free=_int(host_info, "swap_slots_free"),
        policy=str(host_info.get("policy", "?")),
    )
    out = []
    for vm in vms:
        name = str(vm["name"])
        st = memstats.get(name, {})
        out.append(
            VmSnapshot(
                name=name,
                state=str(vm.get("state", "?")),
                driver=None if vm.get("driver") is None else str(vm.get("driver")),
                memory_pages=_int(vm, "memory_pages"),
                target_pages=_int(st, "target_pages"),
                balloon_pages=_int(st, "balloon_pages"),
                backed_pages=_int(st, "backed_pages"),
                host_swapped_pages=_int(st, "host_swapped_pages"),
                guest_free_bytes=_opt_bytes(st, "unused", DOMMEMSTAT_UNIT),
                # virsh `usable` is the guest's MemAvailable; `available` is its MemTotal.
                guest_available_bytes=_opt_bytes(st, "usable", DOMMEMSTAT_UNIT),
                guest_swap_used_bytes=_guest_swap_used(st),
                swap_in_bytes=_int(st, "swap_in") * DOMMEMSTAT_UNIT,
                swap_out_bytes=_int(st, "swap_out") * DOMMEMSTAT_UNIT,
                major_faults=_int(st, "major_fault"),
                minor_faults=_int(st, "minor_fault"),
                ops=_int(st, "ops"),
                corrupted_reads=_int(st, "corrupted_reads"),
                oom_kills=_int(st, "oom_kills"),
                modelled_ns=(None if st.get("modelled_seconds") is None
                             else round(float(st["modelled_seconds"]) * 1e9)),
                **{k: _int(st, k) for k in PATHOLOGY_COLUMNS},
            )
        )
    return Snapshot(time=time.time() if now is None else float(now), host=host, vms=tuple(out))


def rates(prev: Snapshot | None, cur: Snapshot) -> dict[str, tuple[float, float]]:
    """Per VM ``(ops/s, faults/s)`` between two snapshots (faults = major + minor).

    Zero for the first snapshot, for a VM new in *cur*, and across a counter reset (a VM
    restart starts its counters again), where a negative rate would be nonsense.
    """
    out: dict[str, tuple[float, float]] = {}
    before = {v.name: v for v in prev.vms} if prev is not None else {}
    dt = cur.time - prev.time if prev is not None else 0.0
    for vm in cur.vms:
        p = before.get(vm.name)
        if p is None or dt <= 0:
            out[vm.name] = (0.0, 0.0)
            continue
        d_ops = vm.ops - p.ops
        d_faults = (vm.major_faults + vm.minor_faults) - (p.major_faults + p.minor_faults)
        out[vm.name] = (max(d_ops, 0) / dt, max(d_faults, 0) / dt)
    return out


def modelled_rates(prev: Snapshot | None, cur: Snapshot) -> dict[str, float | None]:
    """Per VM accesses per *modelled* second between two snapshots (the throughput the cost
    model predicts, beside ``rates``' wall-clock one); None when it cannot be known (first
    snapshot, no modelled time reported or passed, a counter reset)."""
    out: dict[str, float | None] = {}
    before = {v.name: v for v in prev.vms} if prev is not None else {}
    for vm in cur.vms:
        p = before.get(vm.name)
        out[vm.name] = None
        if p is None or vm.modelled_ns is None or p.modelled_ns is None:
            continue
        d_ns = vm.modelled_ns - p.modelled_ns
        d_ops = vm.ops - p.ops
        if d_ns > 0 and d_ops >= 0:
            out[vm.name] = d_ops * 1e9 / d_ns
    return out


#: Seconds of history rates are computed over. Guests send stats every ``stats_interval``
#: (1 s by default) while the dashboard polls 4 times a second, so a rate between two
#: consecutive polls would read 0, 0, 0, then 4x the truth; a window longer than the stats
#: interval smooths that out.
RATE_WINDOW = 2.0


class RateWindow:
    """Rates over the last ``window`` seconds of snapshots (see ``RATE_WINDOW``)."""

    def __init__(self, window: float = RATE_WINDOW) -> None:
        self.window = window
        self._history: deque[Snapshot] = deque()
        #: Per VM accesses per modelled second over the same window (``modelled_rates``).
        self.modelled: dict[str, float | None] = {}

    def update(self, snap: Snapshot) -> dict[str, tuple[float, float]]:
        """Add *snap*; return per-VM ``(ops/s, faults/s)`` against the oldest snapshot that is
        still inside the window (at least the previous one)."""
        self._history.append(snap)
        while len(self._history) > 2 and snap.time - self._history[1].time >= self.window:
            self._history.popleft()
        base = self._history[0] if len(self._history) > 1 else None
        self.modelled = modelled_rates(base, snap)
        return rates(base, snap)


# --------------------------------------------------------------------------------------------
# Summary
# --------------------------------------------------------------------------------------------


@dataclass
class _VmTotals:
    last: VmSnapshot | None = None
    first_backed_pages: int | None = None  # once the guest reported its first stats
    # From then on: the largest fall of backed pages below an earlier high (frames the VM
    # gave back) and the largest rise above an earlier low (frames it took), and when.
    high: int = 0
    low: int = 0
    gave: int = 0
    gave_at: float = 0.0
    got: int = 0
    got_at: float = 0.0
    peak_backed_pages: int = 0
    min_backed_pages: int | None = None
    peak_balloon_pages: int = 0
    peak_host_swapped_pages: int = 0
    ops_done: int = 0  # summed over counter resets


@dataclass
class RunSummary:
    """Folds snapshots and events of one run into the end-of-run summary."""

    source: str = ""
    started: float | None = None
    ended: float | None = None
    ticks: int = 0
    peak_frames_used: int = 0
    peak_swap_slots_used: int = 0
    last_host: HostSnapshot | None = None
    events: Counter[str] = field(default_factory=Counter)
    #: UNIX time of the first balloon target above 0 (policy, manual or scheduled), its VM
    #: and pages; of the first host swap-out (event, or a snapshot with host swap in use).
    first_target: tuple[float, str | None, int] | None = None
    first_host_swap: float | None = None
    #: UNIX time of the ``host_started`` event, when the event stream replayed it.
    host_started: float | None = None
    _vms: dict[str, _VmTotals] = field(default_factory=dict)

    def add(self, snap: Snapshot) -> None:
        if self.started is None:
            self.started = snap.time
        self.ended = snap.time
        self.ticks += 1
        self.last_host = snap.host
        self.peak_frames_used = max(self.peak_frames_used, snap.host.frames_used)
        self.peak_swap_slots_used = max(self.peak_swap_slots_used, snap.host.swap_slots_used)
        if snap.host.swap_slots_used > 0 and self.first_host_swap is None:
            self.first_host_swap = snap.time
        for vm in snap.vms:
            t = self._vms.setdefault(vm.name, _VmTotals())
            if t.last is not None:
                # A restart resets the guest's counters: count only forward progress.
                delta = vm.ops - t.last.ops
                t.ops_done += delta if delta >= 0 else vm.ops
            t.last = vm
            if t.first_backed_pages is None and vm.guest_free_bytes is not None:
                t.first_backed_pages = t.high = t.low = vm.backed_pages
            if t.first_backed_pages is not None:
                t.high, t.low = max(t.high, vm.backed_pages), min(t.low, vm.backed_pages)
                if t.high - vm.backed_pages > t.gave:
                    t.gave, t.gave_at = t.high - vm.backed_pages, snap.time
                if vm.backed_pages - t.low > t.got:
                    t.got, t.got_at = vm.backed_pages - t.low, snap.time
            t.peak_backed_pages = max(t.peak_backed_pages, vm.backed_pages)
            t.min_backed_pages = (
                vm.backed_pages if t.min_backed_pages is None
                else min(t.min_backed_pages, vm.backed_pages)
            )
            t.peak_balloon_pages = max(t.peak_balloon_pages, vm.balloon_pages)
            t.peak_host_swapped_pages = max(t.peak_host_swapped_pages, vm.host_swapped_pages)

    def add_event(self, event: Mapping[str, Any]) -> None:
        kind = str(event.get("kind", "?"))
        self.events[kind] += 1
        when = event.get("time")
        if not isinstance(when, (int, float)):
            return
        if kind == "host_started":
            self.host_started = float(when)
        elif kind == "host_swap_out":
            if self.first_host_swap is None or when < self.first_host_swap:
                self.first_host_swap = float(when)
        elif kind in ("policy", "balloon_target", "schedule") and event.get("vm") is not None:
            target = event.get("target_pages")
            if target is None and isinstance(event.get("result"), Mapping):
                target = event["result"].get("target_pages")
            if isinstance(target, int) and target > 0 and (
                    self.first_target is None or when < self.first_target[0]):
                self.first_target = (float(when), str(event["vm"]), target)

    @property
    def duration(self) -> float:
        if self.started is None or self.ended is None:
            return 0.0
        return self.ended - self.started

    def to_json(self) -> dict[str, Any]:
        """JSON-ready summary: host peaks in pages, per-VM finals and peaks (docs/cli.md)."""
        vms = {}
        for name, t in self._vms.items():
            last = t.last
            assert last is not None
            dur = self.duration
            first = t.first_backed_pages
            vms[name] = {
                "state": last.state,
                "first_backed_pages": first,
                # Frames the VM gave back (the largest fall of its backed pages below an
                # earlier high) and took (the largest rise above an earlier low); which
                # came first.
                "gave_pages": None if first is None else t.gave,
                "got_pages": None if first is None else t.got,
                "gave_first": t.gave > 0 and (t.got == 0 or t.gave_at <= t.got_at),
                "memory_pages": last.memory_pages,
                "final_backed_pages": last.backed_pages,
                "final_balloon_pages": last.balloon_pages,
                "final_target_pages": last.target_pages,
                "peak_backed_pages": t.peak_backed_pages,
                "min_backed_pages": t.min_backed_pages,
                "peak_balloon_pages": t.peak_balloon_pages,
                "peak_host_swapped_pages": t.peak_host_swapped_pages,
                "ops": last.ops,
                "ops_during_run": t.ops_done,
                "mean_ops_per_s": (t.ops_done / dur) if dur > 0 else 0.0,
                "corrupted_reads": last.corrupted_reads,
                "oom_kills": last.oom_kills,
                "swap_in_bytes": last.swap_in_bytes,
                "swap_out_bytes": last.swap_out_bytes,
                # the pathology counters at the end (cumulative over the guest's life)
                **{k: getattr(last, k) for k in PATHOLOGY_COLUMNS},
            }
        host = self.last_host

        # Story times count from the host's start (from the first tick when the recording
        # did not see the host start): decisions may come before the first tick.
        origin = self.host_started if self.host_started is not None else self.started

        def rel(t: float | None) -> float | None:
            return None if t is None or origin is None else t - origin

        return {
            "topology": self.source,
            "first_balloon_target_s": rel(self.first_target[0]) if self.first_target else None,
            "first_balloon_target_vm": self.first_target[1] if self.first_target else None,
            "first_balloon_target_pages": self.first_target[2] if self.first_target else None,
            "first_host_swap_out_s": rel(self.first_host_swap),
            "story_origin": "host_started" if self.host_started is not None else "first_tick",
            "started": self.started,
            "ended": self.ended,
            "duration_s": self.duration,
            "ticks": self.ticks,
            "page_size": PAGE_SIZE,
            "host": None
            if host is None
            else {
                "name": host.name,
                "policy": host.policy,
                "frames_total": host.frames_total,
                "peak_frames_used": self.peak_frames_used,
                "final_frames_used": host.frames_used,
                "swap_slots_total": host.swap_slots_total,
                "peak_swap_slots_used": self.peak_swap_slots_used,
            },
            "vms": vms,
            "events": dict(sorted(self.events.items())),
            "corrupted_reads_total": sum(v["corrupted_reads"] for v in vms.values()),
        }


# --------------------------------------------------------------------------------------------
# Recorder
# --------------------------------------------------------------------------------------------

#: The pathology counters of ``dommemstat`` (pages, cumulative), as ``timeseries.csv``
#: columns and ``VmSnapshot`` fields of the same names.
PATHOLOGY_COLUMNS: tuple[str, ...] = (
    "double_paging",
    "false_swap_reads",
    "silent_swap_writes",
    "stale_swap_reads",
    "host_swap_reads",
    "host_swap_reads_noncontig",
)

#: Columns of ``timeseries.csv``; pages are 4096 bytes, times UNIX seconds / seconds.
TIMESERIES_COLUMNS: tuple[str, ...] = (
    "time",
    "elapsed",
    "vm",
    "state",
    "memory_pages",
    "target_pages",
    "balloon_pages",
    "backed_pages",
    "host_swapped_pages",
    "guest_free_bytes",
    "guest_available_bytes",
    "guest_swap_used_bytes",
    "swap_in_bytes",
    "swap_out_bytes",
    "major_faults",
    "minor_faults",
    "ops",
    "ops_per_s",
    "faults_per_s",
    "corrupted_reads",
    "oom_kills",
    "host_frames_total",
    "host_frames_free",
    "host_swap_slots_total",
    "host_swap_slots_free",
    "modelled_seconds",
    "modelled_ops_per_s",
    *PATHOLOGY_COLUMNS,
)


def _json_default(o: Any) -> Any:
    if isinstance(o, (bytes, bytearray, memoryview)):
        return bytes(o).hex()
    if isinstance(o, (set, frozenset, tuple)):
        return list(o)
    return repr(o)


class Recorder:
    """Writes one run into *directory* (created if needed; existing files are replaced).

    Rows and events are flushed as they come, so a killed run still leaves readable files.
    """

    def __init__(self, directory: str | os.PathLike[str], topology: Topology) -> None:
        self.directory = Path(directory)
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise RecordingError(
                f"cannot create recording directory {self.directory}: {e}") from None
        if not self.directory.is_dir():
            raise RecordingError(f"{self.directory} is not a directory")
        self.summary = RunSummary(source=topology.source)
        self.provenance = provenance(topology)
        self._write_json("meta.json", self.provenance)
        self._rates = RateWindow()
        self._t0: float | None = None
        (self.directory / "topology.toml").write_text(topology.to_toml(), encoding="utf-8")
        # Both files stay open for the recorder's life (closed by close()).
        self._csv_file: IO[str] = open(  # noqa: SIM115
            self.directory / "timeseries.csv", "w", newline="", encoding="utf-8")
        self._csv = csv.writer(self._csv_file)
        self._csv.writerow(TIMESERIES_COLUMNS)
        self._csv_file.flush()
        self._events: IO[str] = open(  # noqa: SIM115
            self.directory / "events.jsonl", "w", encoding="utf-8")
        self._closed = False

    def tick(self, snap: Snapshot) -> None:
        """Append one row per VM of *snap* and fold it into the summary."""
        if self._t0 is None:
            self._t0 = snap.time
        r = self._rates.update(snap)
        h = snap.host
        for vm in snap.vms:
            ops_s, faults_s = r[vm.name]
            self._csv.writerow(
                [
                    f"{snap.time:.3f}",
                    f"{snap.time - self._t0:.3f}",
                    vm.name,
                    vm.state,
                    vm.memory_pages,
                    vm.target_pages,
                    vm.balloon_pages,
                    vm.backed_pages,
                    vm.host_swapped_pages,
                    "" if vm.guest_free_bytes is None else vm.guest_free_bytes,
                    "" if vm.guest_available_bytes is None else vm.guest_available_bytes,
                    "" if vm.guest_swap_used_bytes is None else vm.guest_swap_used_bytes,
                    vm.swap_in_bytes,
                    vm.swap_out_bytes,
                    vm.major_faults,
                    vm.minor_faults,
                    vm.ops,
                    f"{ops_s:.1f}",
                    f"{faults_s:.1f}",
                    vm.corrupted_reads,
                    vm.oom_kills,
                    h.frames_total,
                    h.frames_free,
                    h.swap_slots_total,
                    h.swap_slots_free,
                    "" if vm.modelled_ns is None else f"{vm.modelled_ns / 1e9:.9f}",
                    "" if (mr := self._rates.modelled.get(vm.name)) is None else f"{mr:.1f}",
                    *(getattr(vm, k) for k in PATHOLOGY_COLUMNS),
                ]
            )
        self._csv_file.flush()
        self.summary.add(snap)

    def event(self, event: Mapping[str, Any]) -> None:
        """Append one event (a control-channel event map) to ``events.jsonl``."""
        self._events.write(json.dumps(dict(event), default=_json_default, sort_keys=True) + "\n")
        self._events.flush()
        self.summary.add_event(event)

    def close(self, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Write ``summary.json`` (plus *extra* keys) and close the files; returns the summary."""
        summary = self.summary.to_json()
        summary["provenance"] = self.provenance
        if extra:
            summary.update(extra)
        if not self._closed:
            self._closed = True
            self._csv_file.close()
            self._events.close()
            self._write_json("summary.json", summary)
        return summary

    def _write_json(self, name: str, value: Any) -> None:
        tmp = self.directory / f"{name}.tmp"
        tmp.write_text(json.dumps(value, indent=2, default=_json_default) + "\n", encoding="utf-8")
        tmp.replace(self.directory / name)

    def __enter__(self) -> Recorder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_timeseries(directory: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Rows of ``DIR/timeseries.csv`` with numbers converted (empty cells become ``nan``)."""
    path = Path(directory) / "timeseries.csv"
    if not path.is_file():
        raise RecordingError(
            f"{path}: no such file; record a run with `balloonlab up --record {directory}`"
        )
    rows: list[dict[str, Any]] = []
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = {"elapsed", "vm", "backed_pages"} - set(reader.fieldnames or ())
        if missing:
            raise RecordingError(
                f"{path}: not a balloonlab timeseries (missing columns {sorted(missing)})")
        for lineno, raw in enumerate(reader, start=2):
            row: dict[str, Any] = {}
            for k, v in raw.items():
                if k in ("vm", "state"):
                    row[k] = v
                elif k is None:
                    raise RecordingError(f"{path}:{lineno}: more cells than columns")
                else:
                    try:
                        row[k] = math.nan if v in ("", None) else float(v)
                    except ValueError:
                        raise RecordingError(
                            f"{path}:{lineno}: column {k!r}: {v!r} is not a number") from None
            rows.append(row)
    return rows


def read_events(directory: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Events of ``DIR/events.jsonl`` (an absent file means no events)."""
    path = Path(directory) / "events.jsonl"
    if not path.is_file():
        return []
    out = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            ev = json.loads(line)
        except json.JSONDecodeError as e:
            raise RecordingError(f"{path}:{lineno}: not JSON: {e.msg}") from None
        if isinstance(ev, dict):
            out.append(ev)
    return out


def summary_table_rows(summary: Mapping[str, Any]) -> Iterable[tuple[str, ...]]:
    """Rows (strings) for the end-of-run table: VM, backed final/peak, balloon peak, ops/s,
    corrupted reads, OOM kills."""
    from hypervisor.units import format_size

    for name, v in summary.get("vms", {}).items():
        yield (
            name,
            v["state"],
            format_size(v["final_backed_pages"] * PAGE_SIZE),
            format_size(v["peak_backed_pages"] * PAGE_SIZE),
            format_size(v["peak_balloon_pages"] * PAGE_SIZE),
            format_size(v["peak_host_swapped_pages"] * PAGE_SIZE),
            f"{v['mean_ops_per_s']:,.0f}",
            str(v["corrupted_reads"]),
            str(v["oom_kills"]),
        )


SUMMARY_HEADERS: tuple[str, ...] = (
    "vm",
    "state",
    "backed",
    "peak backed",
    "peak balloon",
    "peak host swap",
    "ops/s",
    "corrupted",
    "oom kills",
)


def snapshot_to_json(snap: Snapshot) -> dict[str, Any]:
    """A snapshot as plain JSON (for ``--json`` output)."""
    return {"time": snap.time, "host": asdict(snap.host), "vms": [asdict(v) for v in snap.vms]}


# --------------------------------------------------------------------------------------------
# Provenance and the run's story
# --------------------------------------------------------------------------------------------


def _git_commit(start: Path) -> str | None:
    """The commit of the git checkout holding *start* (``+dirty`` when it has changes), or
    ``None`` when it is not a checkout or git is missing."""
    try:
        def git(*args: str) -> str:
            return subprocess.run(["git", "-C", str(start), *args], capture_output=True,
                                  text=True, timeout=5, check=True).stdout.strip()

        rev = git("rev-parse", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return None
    return rev + ("+dirty" if dirty else "") if rev else None


def _machine() -> dict[str, Any]:
    mem = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) * 1024
                break
    except OSError:
        pass
    return {"hostname": socket.gethostname(), "cores": os.cpu_count(), "memory_bytes": mem,
            "kernel": platform.release(), "python": platform.python_version()}


def provenance(topology: Topology) -> dict[str, Any]:
    """What a recording needs to be compared with another: software, machine and inputs."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        bl_version: str | None = version("balloonlab")
    except PackageNotFoundError:
        bl_version = None
    h = topology.host
    params: dict[str, Any] = dict(h.policy_params)
    try:
        from hypervisor.policies import load_policy

        params = dict(getattr(load_policy(h.policy, dict(h.policy_params)), "params", params))
    except (ImportError, ValueError, TypeError, AttributeError):
        pass  # a user policy that cannot load here: its given parameters only
    return {
        "balloonlab_version": bl_version,
        "git_commit": _git_commit(Path(__file__).resolve().parent),
        "machine": _machine(),
        "seed": h.seed,
        "policy": h.policy,
        "policy_params": params,
        "topology_source": topology.source,
        "topology": topology.to_toml(),
        "recorded_at": time.time(),
    }


def story_lines(summary: Mapping[str, Any]) -> list[str]:
    """What the run showed, in a few sentences with numbers: when the first balloon target
    came against the first host swap-out, and what each VM gave back or took."""
    from hypervisor.units import format_size

    def size(pages: int) -> str:
        return format_size(pages * PAGE_SIZE)

    out = []
    since = " after the host started" if summary.get("story_origin") == "host_started" else ""
    first = summary.get("first_balloon_target_s")
    swap = summary.get("first_host_swap_out_s")
    if first is None:
        out.append("no balloon target was set")
    else:
        out.append(f"first balloon target at {first:.1f} s{since} "
                   f"({summary.get('first_balloon_target_vm')}: "
                   f"{size(summary.get('first_balloon_target_pages') or 0)})")
    if swap is None:
        out[-1] += "; the host never swapped"
    elif first is not None and first <= swap:
        out[-1] += f", {swap - first:.1f} s before the first host swap-out at {swap:.1f} s"
    else:
        out[-1] += f"; the host swapped first, at {swap:.1f} s"
    for name, v in summary.get("vms", {}).items():
        if v.get("first_backed_pages") is None:
            continue
        gave, got = v.get("gave_pages") or 0, v.get("got_pages") or 0
        parts = [f"backed {size(v['first_backed_pages'])} at start, "
                 f"{size(v['min_backed_pages'])} lowest, {size(v['peak_backed_pages'])} peak, "
                 f"{size(v['final_backed_pages'])} at the end"]
        if v["peak_balloon_pages"]:
            parts.append(f"balloon up to {size(v['peak_balloon_pages'])}")
        else:
            parts.append("never ballooned")
        steady = max(1, v["memory_pages"] // 100)  # under 1 % of the VM either way
        moves = []
        if got >= steady:
            moves.append(f"took {size(got)}")
        if gave >= steady:
            moves.append(f"gave back {size(gave)}")
        if v.get("gave_first"):
            moves.reverse()
        verdict = ", then ".join(moves) if moves else "held steady"
        out.append(f"{name}: {verdict} ({'; '.join(parts)})")
    return out
