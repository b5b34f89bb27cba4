"""Plots of a recorded run (``balloonlab plot DIR``): PNGs written with matplotlib's Agg backend.

- ``memory.png``: one panel per VM, MiB over elapsed seconds: backed (frames the VM holds),
  balloon (pages in the balloon, the driver's ``actual``), balloon target, host-swapped;
  the VM's logical size as a dotted ceiling.
- ``host.png``: host frames used and host swap used (MiB) against their totals.

Guest and host OOM kills and VM crashes from ``events.jsonl`` are marked as vertical lines.
"""

from __future__ import annotations

import os
from collections import defaultdict
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: never needs a display, safe in tests and over ssh

import matplotlib.pyplot as plt  # noqa: E402

from balloonlab.recording import RecordingError, read_events, read_timeseries  # noqa: E402
from hypervisor.units import PAGE_SIZE  # noqa: E402

__all__ = ["plot_run", "MARKED_EVENTS"]

_MIB = 1 << 20
#: Event kinds drawn as vertical lines, with their colours.
MARKED_EVENTS: dict[str, str] = {
    "host_oom_kill": "red",
    "guest_oom_kill": "orange",
    "vm_crashed": "purple",
    "vm_restarted": "grey",
}


def _mib(pages: float) -> float:
    return pages * PAGE_SIZE / _MIB


def _event_marks(events: list[dict[str, Any]], t0: float) -> list[tuple[float, str, str | None]]:
    marks = []
    for ev in events:
        kind = ev.get("kind")
        if kind in MARKED_EVENTS and isinstance(ev.get("time"), (int, float)):
            marks.append((float(ev["time"]) - t0, str(kind), ev.get("vm")))
    return marks


def plot_run(directory: str | os.PathLike[str], out_dir: str | os.PathLike[str] | None = None) -> list[Path]:
    """Write ``memory.png`` and ``host.png`` for the run recorded in *directory*.

    PNGs go to *out_dir* (default: *directory*). Returns their paths. Raises
    ``RecordingError`` when the recording is missing, malformed or has no rows.
    """
    rows = read_timeseries(directory)
    if not rows:
        raise RecordingError(f"{Path(directory) / 'timeseries.csv'}: no samples recorded (the run ended before its first tick)")
    out = Path(out_dir) if out_dir is not None else Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    t0 = rows[0]["time"] - rows[0]["elapsed"] if "time" in rows[0] else 0.0
    marks = _event_marks(read_events(directory), t0)

    by_vm: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        by_vm[r["vm"]].append(r)

    paths = [_plot_memory(by_vm, marks, out / "memory.png"), _plot_host(rows, marks, out / "host.png")]
    return paths


def _mark(ax: Any, marks: list[tuple[float, str, str | None]], vm: str | None) -> None:
    for t, kind, ev_vm in marks:
        if vm is None or ev_vm in (None, vm):
            ax.axvline(t, color=MARKED_EVENTS[kind], linestyle="--", linewidth=0.8, alpha=0.7)


def _plot_memory(
    by_vm: dict[str, list[dict[str, Any]]], marks: list[tuple[float, str, str | None]], path: Path
) -> Path:
    n = len(by_vm)
    fig, axes = plt.subplots(n, 1, figsize=(9, 2.6 * n + 0.6), sharex=True, squeeze=False)
    for ax, (vm, rs) in zip(axes[:, 0], by_vm.items()):
        t = [r["elapsed"] for r in rs]
        ax.plot(t, [_mib(r["backed_pages"]) for r in rs], label="backed", color="tab:blue")
        ax.plot(t, [_mib(r["balloon_pages"]) for r in rs], label="balloon", color="tab:green")
        ax.plot(t, [_mib(r["target_pages"]) for r in rs], label="balloon target", color="tab:green",
                linestyle=":")
        if "host_swapped_pages" in rs[0]:
            ax.plot(t, [_mib(r["host_swapped_pages"]) for r in rs], label="host-swapped",
                    color="tab:red", alpha=0.8)
        ax.plot(t, [_mib(r["memory_pages"]) for r in rs], label="VM memory", color="black",
                linestyle=":", linewidth=0.8)
        _mark(ax, marks, vm)
        ax.set_title(vm, loc="left", fontsize=10)
        ax.set_ylabel("MiB")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    axes[0, 0].legend(loc="upper right", fontsize=8, ncol=5)
    axes[-1, 0].set_xlabel("elapsed (s)")
    fig.suptitle("VM memory over time")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _plot_host(
    rows: list[dict[str, Any]], marks: list[tuple[float, str, str | None]], path: Path
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
    ax_swap.plot(t, [_mib(r["host_swap_slots_total"]) for r in rs], label="host swap", color="black",
                 linestyle=":")
    ax_swap.set_ylabel("MiB")
    ax_swap.set_xlabel("elapsed (s)")
    ax_swap.set_title("host swap", loc="left", fontsize=10)
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
