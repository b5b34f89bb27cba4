"""Synthetic control-channel values for CLI, dashboard and recording tests.

Built the way a host reports them (docs/cli.md): ``host_info``, ``list_vms``, ``dommemstat``
(memory amounts in bytes; ``actual`` is the guest's current memory, as in virsh). A small
deterministic "run": a balloon inflating in one VM while the other grows, so recordings and
plots have shape.
"""

from __future__ import annotations

from typing import Any

from balloonlab.recording import Snapshot, snapshot_from

FRAMES = 12288  # 48 MiB host


def host_info(frames_free: int, swap_free: int = 8192) -> dict[str, Any]:
    return {
        "name": "small", "pid": 4242, "page_size": 4096, "frames_total": FRAMES,
        "frames_free": frames_free, "swap_slots_total": 8192, "swap_slots_free": swap_free,
        "policy": "none",
    }


def list_vms() -> list[dict[str, Any]]:
    return [
        {"name": "a", "state": "running", "memory_pages": 8192, "driver": "connected"},
        {"name": "b", "state": "running", "memory_pages": 8192, "driver": "connected"},
    ]


def memstat(
    backed: int, balloon: int, target: int, ops: int, faults: int, corrupted: int = 0
) -> dict[str, Any]:
    return {
        "actual": (8192 - balloon) * 4096, "swap_in": 0, "swap_out": 8192,
        "major_fault": faults // 10,
        "minor_fault": faults - faults // 10, "unused": 4 << 20, "available": 32 << 20,
        "usable": 8 << 20, "disk_caches": 0, "last_update": 0, "rss": backed * 4096,
        "target_pages": target, "balloon_pages": balloon, "backed_pages": backed,
        "host_swapped_pages": 0, "corrupted_reads": corrupted, "ops": ops, "oom_kills": 0,
        "guest_swap_total": 16 << 20, "guest_swap_free": (16 << 20) - 65536,
    }


def run(ticks: int = 10, t0: float = 1_700_000_000.0) -> list[Snapshot]:
    """*ticks* snapshots 0.5 s apart: VM a inflates toward 2048 pages, VM b grows."""
    snaps = []
    for i in range(ticks):
        balloon_a = min(2048, i * 300)
        backed_a = 4096 - balloon_a // 2
        backed_b = 1000 + i * 400
        stats = {
            "a": memstat(backed_a, balloon_a, 2048, ops=i * 50_000, faults=i * 100),
            "b": memstat(backed_b, 0, 0, ops=i * 80_000, faults=i * 400),
        }
        free = FRAMES - backed_a - backed_b
        snaps.append(snapshot_from(host_info(free), list_vms(), stats, now=t0 + 0.5 * i))
    return snaps
