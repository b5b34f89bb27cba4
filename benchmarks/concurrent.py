"""``balloonlab bench concurrent``: several VMs inflating at once on one host, end to end.

Units: pages of 4096 bytes, sizes in bytes, times in seconds, rates in GiB/s.

One trial boots a fresh host (real processes, through the project's launcher) with ``vms``
VMs of ``vm_bytes`` each; in every VM an ``idle`` task touches 90 % of RAM, holds it a
second and frees it, so every page a balloon will take is backed by a host frame (as in
:mod:`benchmarks.reclaim`, free page reporting off). Once every guest has freed its memory,
``set_balloon`` goes to every VM back to back (~95 % of each, capped at what the guest has
free) and the clock runs until ``list_vms`` shows every balloon at its target: the
*aggregate* inflate rate is all the targets' bytes over that time.

The same run measures two references of the same total size: the punch limit (one
``fallocate(PUNCH_HOLE)`` over a populated memfd) and the mapped punch limit (the same with
every page mapped in the process, as guest RAM is mapped in its guest kernel). Ratios:
aggregate / each (medians over the trials).
"""

from __future__ import annotations

import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from balloonlab import launcher
from balloonlab.client import ControlClient
from benchmarks import references
from benchmarks.reclaim import GIB, MIB, POLL_S, BenchError, freed_since
from hypervisor.topology import (
    DEFAULT_MIN_MEMORY_FRACTION,
    DEFAULT_SHARES,
    HostConfig,
    TaskConfig,
    Topology,
    VmConfig,
)
from protocol.constants import PAGE_SIZE

#: Give up on a phase after this long (a stuck balloon is a failure, not a slow result).
PHASE_TIMEOUT_S = 300.0
TOUCH_FRACTION = 0.9
INFLATE_FRACTION = 0.95


def topology(vms: int, vm_bytes: int, host_name: str, run_dir: Path) -> Topology:
    """``vms`` VMs of ``vm_bytes``, each touching 90 % of its RAM once and freeing it."""
    memory = vm_bytes // MIB * MIB
    total = vms * memory
    host_mem = total + max(64 * MIB, total // 4)  # every guest page fits: no host swap
    cfgs = tuple(VmConfig(
        name=f"v{i}", memory=memory,
        features=("must_tell_host", "stats", "deflate_on_oom", "ranges"), wire="ranges",
        stats_interval=0.2, guest_swap=16 * MIB, on_crash="destroy",
        tasks=(TaskConfig(workload="idle", size=int(memory * TOUCH_FRACTION) // MIB * MIB,
                          hold=1.0),),
        min_memory=int(memory * DEFAULT_MIN_MEMORY_FRACTION) // MIB * MIB,
        max_memory=memory, shares=DEFAULT_SHARES, initial_balloon=0) for i in range(vms))
    host = HostConfig(name=host_name, memory=host_mem // MIB * MIB, swap=0, policy="none",
                      policy_interval=1.0, run_dir=str(run_dir))
    return Topology(host=host, vms=cfgs, source="<bench concurrent>")


def _wait(client: ControlClient, what: str, cond: Callable[[list[dict[str, Any]]], bool],
          timeout: float = PHASE_TIMEOUT_S) -> float:
    """Poll ``list_vms`` until ``cond`` holds for it; the monotonic time it held."""
    deadline = time.monotonic() + timeout
    while True:
        vms = client.call("list_vms")
        now = time.monotonic()
        if cond(vms):
            return now
        gone = [v["name"] for v in vms if v["state"] not in ("running", "created")]
        if gone:
            raise BenchError(f"VM {', '.join(gone)} left the running state while waiting for "
                             f"{what}")
        if now > deadline:
            raise BenchError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(POLL_S)


def run_trial(vms: int, vm_bytes: int, workdir: Path, trial: int) -> dict[str, Any]:
    """One fresh host, every VM touched and freed, then every balloon inflated at once."""
    pages = vm_bytes // PAGE_SIZE
    tdir = workdir / f"t{trial}"
    tdir.mkdir(parents=True)
    topo = topology(vms, vm_bytes, f"blconc{trial}", tdir / "run")
    topo_file = tdir / "topology.toml"
    topo_file.write_text(topo.to_toml())
    names = [v.name for v in topo.vms]
    h = launcher.launch(topo, topo_file=topo_file, output=tdir / "host.out",
                        log_level="WARNING")
    client: ControlClient | None = None
    try:
        try:
            launcher.wait_ready(h, 60.0 + 10.0 * vms)
        except launcher.LaunchError as e:
            raise BenchError(str(e)) from None
        client = ControlClient(tdir / "run", timeout=10.0)
        c = client

        def stat(name: str) -> dict[str, Any]:
            return c.call("dommemstat", vm=name)

        goal = int(pages * 0.85 * 0.95)
        _wait(c, "every guest to touch its memory",
              lambda _v: all(stat(n)["backed_pages"] >= goal for n in names))
        touched = time.time()
        _wait(c, "every guest to free its memory",
              lambda _v: all(freed_since(stat(n), touched, pages) for n in names))
        time.sleep(0.5)  # one more stats interval: settled `unused`
        targets = {}
        for n in names:
            unused = (stat(n)["unused"] or 0) // PAGE_SIZE
            targets[n] = int(min(INFLATE_FRACTION * pages, unused - pages * 0.01))
            if targets[n] <= 0:
                raise BenchError(f"{n} has only {unused} free pages: nothing to inflate")
        # All the targets in one round trip (pipelined calls): the VMs start together.
        t0 = time.monotonic()
        c.call_many([("set_balloon", {"vm": n, "pages": targets[n]}) for n in names])
        sent = time.monotonic() - t0
        t1 = _wait(c, "every balloon to reach its target",
                   lambda v: all(x["balloon_pages"] >= targets[x["name"]] for x in v))
        corrupted = sum(int(stat(n)["corrupted_reads"] or 0) for n in names)
    finally:
        if client is not None:
            client.close()
        if not h.stopped:
            h.stop(20.0, keep_output=True)
    return {"targets": targets, "target_pages": sum(targets.values()), "inflate_s": t1 - t0,
            "requests_s": sent, "corrupted_reads": corrupted}


def _summary(values: list[float]) -> dict[str, float]:
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def run_concurrent(vms: int = 8, vm_bytes: int = 128 * MIB, repeats: int = 2,
                   ref_repeats: int = 3,
                   progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """The references and ``repeats`` trials; the JSON-ready result."""
    if vms < 1 or repeats < 1:
        raise ValueError(f"--vms and --repeat must be at least 1, got {vms} and {repeats}")
    if vm_bytes < 16 * MIB or vm_bytes % MIB:
        raise ValueError(f"--vm-size must be whole MiB and at least 16 MiB, got {vm_bytes}")
    say = progress or (lambda _m: None)
    total = vms * vm_bytes
    steps = 2 + repeats
    say(f"[1/{steps}] punch limit of {total >> 20} MiB")
    limit = references.punch_limit(total, ref_repeats)
    say(f"[2/{steps}] mapped punch limit of {total >> 20} MiB")
    mapped = references.mapped_punch_limit(total, ref_repeats)
    workdir = Path(tempfile.mkdtemp(prefix="blconc-", dir="/tmp"))
    trials = []
    try:
        for i in range(repeats):
            say(f"[{3 + i}/{steps}] {vms} VMs of {vm_bytes >> 20} MiB: trial {i + 1}/{repeats}")
            trials.append(run_trial(vms, vm_bytes, workdir, i))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    rates = [t["target_pages"] * PAGE_SIZE / GIB / t["inflate_s"] for t in trials]
    agg = _summary(rates)
    return {
        "benchmark": "concurrent", "vms": vms, "vm_bytes": vm_bytes, "repeats": repeats,
        "aggregate_gib_s": agg["median"],
        "limit_punch_gib_s": limit.gib_s, "limit_mapped_punch_gib_s": mapped.gib_s,
        "ratio_to_limit": agg["median"] / limit.gib_s,
        "ratio_to_mapped_limit": agg["median"] / mapped.gib_s,
        "targets": {"aggregate_ge_0.7_limit": agg["median"] / limit.gib_s >= 0.7,
                    "aggregate_ge_0.7_mapped_limit": agg["median"] / mapped.gib_s >= 0.7},
        "aggregate": agg,
        "references": {"punch_limit": limit.as_dict(), "mapped_punch_limit": mapped.as_dict()},
        "trials": trials,
    }


def markdown(res: dict[str, Any]) -> str:
    a = res["aggregate"]
    rows = [
        f"{res['vms']} VMs of {res['vm_bytes'] >> 20} MiB inflating at once, "
        f"{res['repeats']} trial(s) (a fresh host each).",
        "",
        "| measure | GiB/s | min | max |",
        "|---|---|---|---|",
        f"| aggregate inflate | {a['median']:.2f} | {a['min']:.2f} | {a['max']:.2f} |",
        f"| punch limit (same total, same run) | {res['limit_punch_gib_s']:.2f} | | |",
        f"| mapped punch limit (same total, same run) | {res['limit_mapped_punch_gib_s']:.2f}"
        " | | |",
        "",
        "| ratio (medians) | value | target |",
        "|---|---|---|",
        f"| aggregate / punch limit | {res['ratio_to_limit']:.2f} | ≥ 0.7 |",
        f"| aggregate / mapped punch limit | {res['ratio_to_mapped_limit']:.2f} | ≥ 0.7 |",
    ]
    return "\n".join(rows)
