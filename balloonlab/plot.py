"""Plots of recorded runs (``balloonlab plot DIR [DIR...]``): PNGs written with matplotlib's
Agg backend.

One run (:func:`plot_run`):

- ``memory.png``: one panel per VM, MiB over elapsed seconds: backed (frames the VM holds),
  balloon (pages in the balloon, the driver's ``actual``), the balloon target (dashed, in its
  own colour: where the policy wants the balloon), host-swapped, guest swap in use; the VM's
  logical size as a dotted ceiling. Each balloon target a policy, a command or the schedule
  set is a short tick at the top of the VM's panel.
- ``host.png``: host frames used and host swap used (MiB) against their totals, with every
  VM's balloon-target ticks.

Guest and host OOM kills and VM crashes from ``events.jsonl`` are marked as vertical lines.

Several runs (:func:`plot_runs`): one PNG per metric, one line per run, the legend naming
each run by its directory: ``compare-host-frames.png``, ``compare-host-swap.png``, and per VM
(one panel each) ``compare-backed.png``, ``compare-balloon.png``, ``compare-guest-swap.png``,
``compare-ops.png``.
"""

from __future__ import annotations

import math
import os
from collections import defaultdict
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: never needs a display, safe in tests and over ssh

import matplotlib.pyplot as plt

from balloonlab.recording import RecordingError, read_events, read_timeseries
from hypervisor.units import PAGE_SIZE

__all__ = ["MARKED_EVENTS", "TARGET_EVENTS", "plot_run", "plot_runs"]

_MIB = 1 << 20
#: Event kinds drawn as vertical lines, with their colours.
MARKED_EVENTS: dict[str, str] = {
    "host_oom_kill": "red",
    "guest_oom_kill": "orange",
    "vm_crashed": "purple",
    "vm_restarted": "grey",
}
#: Event kinds that set a balloon target, drawn as ticks at the top of a VM's panel.
TARGET_EVENTS = ("policy", "balloon_target", "schedule")
_TARGET_COLOUR = "tab:orange"


def _mib(pages: float) -> float:
    return pages * PAGE_SIZE / _MIB


def _event_marks(events: list[dict[str, Any]], t0: float) -> list[tuple[float, str, str | None]]:
    marks = []
    for ev in events:
        kind = ev.get("kind")
        if kind in MARKED_EVENTS and isinstance(ev.get("time"), (int, float)):
            marks.append((float(ev["time"]) - t0, str(kind), ev.get("vm")))
    return marks


def _target_ticks(events: list[dict[str, Any]], t0: float) -> dict[str, list[float]]:
    """Elapsed times of the balloon-target decisions, per VM (deduplicated: a policy round
    that emits both a ``policy`` and a ``balloon_target`` event is one decision)."""
    out: dict[str, set[float]] = defaultdict(set)
    for ev in events:
        if ev.get("kind") in TARGET_EVENTS and isinstance(ev.get("time"), (int, float)) \
                and ev.get("vm") is not None:
            if ev.get("kind") == "schedule" and ev.get("action") == "set_policy":
                continue
            out[str(ev["vm"])].add(round(float(ev["time"]) - t0, 3))
    return {vm: sorted(ts) for vm, ts in out.items()}


def _ticks(ax: Any, times: list[float], label: str | None) -> None:
    if times:
        ax.vlines(times, 0.93, 1.0, transform=ax.get_xaxis_transform(), color=_TARGET_COLOUR,
                  linewidth=1.0, label=label)


def plot_run(directory: str | os.PathLike[str],
             out_dir: str | os.PathLike[str] | None = None) -> list[Path]:
    """Write ``memory.png`` and ``host.png`` for the run recorded in *directory*.

    PNGs go to *out_dir* (default: *directory*). Returns their paths. Raises
    ``RecordingError`` when the recording is missing, malformed or has no rows.
    """
    rows = read_timeseries(directory)
    if not rows:
        raise RecordingError(f"{Path(directory) / 'timeseries.csv'}: no samples recorded "
                             "(the run ended before its first tick)")
    out = Path(out_dir) if out_dir is not None else Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    t0 = rows[0]["time"] - rows[0]["elapsed"] if "time" in rows[0] else 0.0
    events = read_events(directory)
    marks = _event_marks(events, t0)
    ticks = _target_ticks(events, t0)

    by_vm: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        by_vm[r["vm"]].append(r)

    return [_plot_memory(by_vm, marks, ticks, out / "memory.png"),
            _plot_host(rows, marks, ticks, out / "host.png")]


def _mark(ax: Any, marks: list[tuple[float, str, str | None]], vm: str | None) -> None:
    for t, kind, ev_vm in marks:
        if vm is None or ev_vm in (None, vm):
            ax.axvline(t, color=MARKED_EVENTS[kind], linestyle="--", linewidth=0.8, alpha=0.7)


def _plot_memory(
    by_vm: dict[str, list[dict[str, Any]]], marks: list[tuple[float, str, str | None]],
    ticks: dict[str, list[float]], path: Path
) -> Path:
    n = len(by_vm)
    fig, axes = plt.subplots(n, 1, figsize=(9, 2.6 * n + 0.6), sharex=True, squeeze=False)
    for ax, (vm, rs) in zip(axes[:, 0], by_vm.items()):
        t = [r["elapsed"] for r in rs]
        ax.plot(t, [_mib(r["backed_pages"]) for r in rs], label="backed", color="tab:blue")
        ax.plot(t, [_mib(r["balloon_pages"]) for r in rs], label="balloon", color="tab:green")
        ax.plot(t, [_mib(r["target_pages"]) for r in rs], label="balloon target",
                color=_TARGET_COLOUR, linestyle="--", linewidth=1.2)
        if "host_swapped_pages" in rs[0]:
            ax.plot(t, [_mib(r["host_swapped_pages"]) for r in rs], label="host-swapped",
                    color="tab:red", alpha=0.8)
        gswap = [r.get("guest_swap_used_bytes", math.nan) / _MIB for r in rs]
        if any(not math.isnan(v) for v in gswap):
            ax.plot(t, gswap, label="guest swap", color="tab:purple")
        _ticks(ax, ticks.get(vm, []), "target set")
        ax.plot(t, [_mib(r["memory_pages"]) for r in rs], label="VM memory", color="black",
                linestyle=":", linewidth=0.8)
        _mark(ax, marks, vm)
        ax.set_title(vm, loc="left", fontsize=10)
        ax.set_ylabel("MiB")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    handles: dict[str, Any] = {}
    for ax in axes[:, 0]:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(lab, h)
    axes[-1, 0].set_xlabel("elapsed (s)")
    fig.suptitle("VM memory over time")
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.3 / fig.get_figheight()))
    fig.legend(handles.values(), handles.keys(), loc="upper center", fontsize=8,
               ncol=len(handles), bbox_to_anchor=(0.5, 1 - 0.3 / fig.get_figheight()),
               frameon=False)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _plot_host(
    rows: list[dict[str, Any]], marks: list[tuple[float, str, str | None]],
    targets: dict[str, list[float]], path: Path
) -> Path:
    # Host columns repeat on each VM's row of a tick: keep the first row per tick.
    ticks: dict[float, dict[str, Any]] = {}
    for r in rows:
        ticks.setdefault(r["elapsed"], r)
    rs = [ticks[k] for k in sorted(ticks)]
    t = [r["elapsed"] for r in rs]
    fig, (ax_mem, ax_swap) = plt.subplots(2, 1, figsize=(9, 5.5), sharex=True)
    ax_mem.plot(t, [_mib(r["host_frames_total"] - r["host_frames_free"]) for r in rs],
                label="frames used", color="tab:blue")
    ax_mem.plot(t, [_mib(r["host_frames_total"]) for r in rs], label="host memory", color="black",
                linestyle=":")
    ax_mem.set_ylabel("MiB")
    ax_mem.set_title("host frames", loc="left", fontsize=10)
    ax_swap.plot(t, [_mib(r["host_swap_slots_total"] - r["host_swap_slots_free"]) for r in rs],
                 label="swap used", color="tab:red")
    ax_swap.plot(t, [_mib(r["host_swap_slots_total"]) for r in rs], label="host swap",
                 color="black", linestyle=":")
    ax_swap.set_ylabel("MiB")
    ax_swap.set_xlabel("elapsed (s)")
    ax_swap.set_title("host swap", loc="left", fontsize=10)
    _ticks(ax_mem, sorted({t for ts in targets.values() for t in ts}), "balloon target set")
    for ax in (ax_mem, ax_swap):
        _mark(ax, marks, None)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(loc="upper right", fontsize=8)
    fig.suptitle("host memory over time")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------------------------
# Several runs
# --------------------------------------------------------------------------------------------

#: Per-VM metrics of ``plot_runs``: file stem, title, y label, value of a row.
_VM_METRICS: tuple[tuple[str, str, str, Any], ...] = (
    ("backed", "backed memory (frames the VM holds)", "MiB",
     lambda r: _mib(r["backed_pages"])),
    ("balloon", "balloon", "MiB", lambda r: _mib(r["balloon_pages"])),
    ("guest-swap", "guest swap in use", "MiB",
     lambda r: r.get("guest_swap_used_bytes", math.nan) / _MIB),
    ("ops", "memory accesses per second", "ops/s", lambda r: r.get("ops_per_s", math.nan)),
)


def _run_labels(dirs: list[Path]) -> list[str]:
    names = [d.name or str(d) for d in dirs]
    return [str(d) if names.count(n) > 1 else n for d, n in zip(dirs, names)]


def plot_runs(directories: Any, out_dir: str | os.PathLike[str]) -> list[Path]:
    """Overlay the runs recorded in *directories* (two or more): one PNG per metric, one
    line per run, written to *out_dir*. Returns their paths; ``RecordingError`` names the
    first recording that is missing, malformed or empty."""
    dirs = [Path(d) for d in directories]
    runs = []
    for d in dirs:
        rows = read_timeseries(d)
        if not rows:
            raise RecordingError(f"{d / 'timeseries.csv'}: no samples recorded")
        runs.append(rows)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    labels = _run_labels(dirs)
    paths = []

    def host_series(rows: list[dict[str, Any]], used: str, total: str) -> tuple[list, list]:
        ticks: dict[float, dict[str, Any]] = {}
        for r in rows:
            ticks.setdefault(r["elapsed"], r)
        rs = [ticks[k] for k in sorted(ticks)]
        return [r["elapsed"] for r in rs], [_mib(r[total] - r[used]) for r in rs]

    for stem, title, used, total in (
            ("host-frames", "host frames used", "host_frames_free", "host_frames_total"),
            ("host-swap", "host swap used", "host_swap_slots_free", "host_swap_slots_total")):
        fig, ax = plt.subplots(figsize=(9, 3.6))
        for rows, label in zip(runs, labels):
            ax.plot(*host_series(rows, used, total), label=label)
        ax.set_title(title, loc="left", fontsize=10)
        ax.set_ylabel("MiB")
        ax.set_xlabel("elapsed (s)")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(loc="upper right", fontsize=8)
        fig.tight_layout()
        paths.append(out / f"compare-{stem}.png")
        fig.savefig(paths[-1], dpi=100)
        plt.close(fig)

    vms: list[str] = []
    for rows in runs:
        for r in rows:
            if r["vm"] not in vms:
                vms.append(r["vm"])
    for stem, title, unit, value in _VM_METRICS:
        fig, axes = plt.subplots(len(vms), 1, figsize=(9, 2.4 * len(vms) + 0.6), sharex=True,
                                 squeeze=False)
        for ax, vm in zip(axes[:, 0], vms):
            for rows, label in zip(runs, labels):
                rs = [r for r in rows if r["vm"] == vm]
                if rs:
                    ax.plot([r["elapsed"] for r in rs], [value(r) for r in rs], label=label)
            ax.set_title(vm, loc="left", fontsize=10)
            ax.set_ylabel(unit)
            ax.set_ylim(bottom=0)
            ax.grid(alpha=0.3)
        axes[0, 0].legend(loc="upper right", fontsize=8)
        axes[-1, 0].set_xlabel("elapsed (s)")
        fig.suptitle(title)
        fig.tight_layout()
        paths.append(out / f"compare-{stem}.png")
        fig.savefig(paths[-1], dpi=100)
        plt.close(fig)
    return paths
