"""Inflate rate across VM sizes, end to end through real processes, in one run.

    python -m benchmarks.sizes [--vm-size 256MiB,1GiB,4GiB] [--repeat 2] [--json] [--out DIR]

Units: sizes in bytes, times in seconds, rates in GiB/s.

For each VM size, the first two phases of the ``ranges`` trial of :mod:`benchmarks.reclaim`
(a fresh host, a guest that touched 90 % of its RAM and freed it, the balloon inflated to
95 %; no deflate or refault) run ``--repeat`` times next to the same-size punch-hole limit
(one ``fallocate(PUNCH_HOLE)`` over a populated memfd of that size). Reported per size: the
inflate rate and its ratio to that limit, and the host's own release time per inflate batch
(``counters.release_seconds``: EPT update, ledger, punch) with the batch's pages and punch
calls. The driver's batches are 128 MiB whatever the VM, so a host cost that follows the
batch stays flat per batch across sizes; one that follows the VM's size grows with it.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks import references
from benchmarks.reclaim import GIB, BenchError, Host, Plan, freed_since
from hypervisor.units import parse_size

PAGE_SIZE = 4096
DEFAULT_SIZES = (256 << 20, 1 << 30, 4 << 30)


def _summary(values: list[float]) -> dict[str, float]:
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def inflate_trial(plan: Plan, workdir: Path, trial: int) -> dict[str, Any]:
    """Phases 1 and 2 of :func:`benchmarks.reclaim.run_trial` (touch and free, inflate to
    95 %): a fresh host, the same conditions and waits, and nothing after the inflate."""
    pages = plan.pages
    with Host(plan, workdir, trial) as h:
        h.wait("the guest to touch its memory",
               lambda s: s["backed_pages"] >= int(pages * 0.85) * 0.95)
        touched = time.time()
        h.wait("the task's memory to be freed", lambda s: freed_since(s, touched, pages))
        time.sleep(0.5)  # one more stats interval: a settled `unused`
        s = h.stat()
        unused = (s["unused"] or 0) // PAGE_SIZE
        target = int(min(plan.inflate_fraction * pages, unused - pages * 0.01))
        if target <= 0:
            raise BenchError(f"the guest has only {unused} free pages: nothing to inflate")
        before = h.call("counters", vm="bench")
        t0 = time.monotonic()
        h.call("set_balloon", vm="bench", pages=target)
        t1, s = h.wait("inflate", lambda s: s["balloon_pages"] >= target)
        after = h.call("counters", vm="bench")
    counters = {k: after[k] - before[k] for k in
                ("inflate_batches", "punch_calls", "released_frames", "inflated",
                 "release_seconds") if isinstance(after.get(k), (int, float))}
    return {"target_pages": target, "inflate_s": t1 - t0, "host_counters": counters}


def run_sizes(sizes: tuple[int, ...] = DEFAULT_SIZES, repeats: int = 2,
              ref_repeats: int = 3) -> dict[str, Any]:
    """Every size's limit and trials, in the order given; the JSON-ready result."""
    if repeats < 1:
        raise ValueError(f"--repeat must be at least 1, got {repeats}")
    rows = []
    workdir = Path(tempfile.mkdtemp(prefix="blsizes-", dir="/tmp"))
    try:
        for n, size in enumerate(sizes):
            print(f"[{n + 1}/{len(sizes)}] {size >> 20} MiB: punch limit, {repeats} trial(s)",
                  file=sys.stderr, flush=True)
            limit = references.punch_limit(size, ref_repeats)
            trials = [inflate_trial(Plan(size, "ranges"), workdir, n * 100 + i)
                      for i in range(repeats)]
            rate = [t["target_pages"] * PAGE_SIZE / GIB / t["inflate_s"] for t in trials]
            per_batch = [t["host_counters"]["release_seconds"]
                         / max(1, t["host_counters"]["inflate_batches"]) for t in trials]
            c = trials[0]["host_counters"]
            rows.append({
                "vm_bytes": size, "limit_punch_gib_s": limit.gib_s,
                "inflate_gib_s": _summary(rate),
                "ratio_to_limit": _summary([r / limit.gib_s for r in rate]),
                "release_s_per_batch": _summary(per_batch),
                "batches": c.get("inflate_batches"), "punch_calls": c.get("punch_calls"),
                "pages_per_batch": c.get("inflated", 0) // max(1, c.get("inflate_batches", 1)),
                "trials": trials,
            })
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return {"benchmark": "sizes", "repeats": repeats, "sizes": rows}


def markdown(res: dict[str, Any]) -> str:
    lines = ["| VM | punch limit GiB/s | inflate GiB/s (median) | min | max "
             "| ratio to limit (median, min–max) | host release ms / batch (median, min–max) "
             "| batches | pages / batch | punch calls |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["sizes"]:
        i, q, b = r["inflate_gib_s"], r["ratio_to_limit"], r["release_s_per_batch"]
        lines.append(
            f"| {r['vm_bytes'] >> 20} MiB | {r['limit_punch_gib_s']:.2f} | {i['median']:.2f} "
            f"| {i['min']:.2f} | {i['max']:.2f} | {q['median']:.2f} ({q['min']:.2f}–"
            f"{q['max']:.2f}) | {b['median'] * 1e3:.1f} ({b['min'] * 1e3:.1f}–"
            f"{b['max'] * 1e3:.1f}) | {r['batches']} | {r['pages_per_batch']} "
            f"| {r['punch_calls']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.sizes", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vm-size", default="256MiB,1GiB,4GiB",
                    help="comma-separated VM sizes (default: %(default)s)")
    ap.add_argument("--repeat", type=int, default=2, help="trials per size (default: 2)")
    ap.add_argument("--json", action="store_true", help="print the JSON result")
    ap.add_argument("--out", type=Path, help="write sizes.json and sizes.md there")
    a = ap.parse_args(argv)
    try:
        sizes = tuple(parse_size(s.strip()) for s in a.vm_size.split(",") if s.strip())
        if not sizes or any(s < 16 << 20 or s % PAGE_SIZE for s in sizes):
            raise ValueError(f"--vm-size: every size must be a multiple of 4096 bytes and at "
                             f"least 16 MiB, got {a.vm_size!r}")
        res = run_sizes(sizes, a.repeat)
    except (ValueError, BenchError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    md = markdown(res)
    if a.out is not None:
        a.out.mkdir(parents=True, exist_ok=True)
        (a.out / "sizes.json").write_text(json.dumps(res, indent=1, default=str) + "\n")
        (a.out / "sizes.md").write_text(md + "\n")
    print(json.dumps(res, default=str) if a.json else md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
