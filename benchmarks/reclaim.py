"""``balloonlab bench reclaim``: end-to-end balloon inflate/deflate through real processes.

Units: pages of 4096 bytes, sizes in bytes, times in seconds, rates in GiB/s and pages/s.

One run (a *trial*) boots a fresh host (``python -m hypervisor --topology FILE``) with one VM
in its own temporary run dir, and drives it through the control client:

1. the guest's task touches most of its RAM and frees it again (an ``idle`` task with a
   ``duration``), so every page the balloon will take is backed by a host frame;
2. **inflate**: ``set_balloon`` to ~95 % of the VM (capped at what the guest has free), timed
   until ``dommemstat`` shows ``balloon_pages`` at the target;
3. **deflate**: ``set_balloon`` to 0, timed until ``balloon_pages`` is 0;
4. **refault**: a second task (started by the topology at a fixed time) touches the memory
   again; timed from the first rise of ``backed_pages`` until it stops rising.

Scenarios: ``ranges`` and ``virtio`` wire modes on an unfragmented guest, and ``fragmented``
(ranges mode, a uniform task over ~50 % of RAM stays alive while an idle task interleaved
with it is freed, so the free pages the balloon takes are scattered). Free page reporting is
switched off: it would release the freed memory before the balloon could, and the inflate
would then measure nothing but bookkeeping.

The same run measures the references (:mod:`benchmarks.references`) at the VM's size; the
result carries the ratios end-to-end / limit and ranges / virtio (medians over repeats).
The time split is read from the host's ``counters`` call where the host exposes it
(punch calls, batches, released frames); see :data:`SPLIT_GAPS` for what it does not.
"""

from __future__ import annotations

import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from balloonlab import launcher
from balloonlab.client import ControlClient
from benchmarks import references
from hypervisor.topology import (
    DEFAULT_MIN_MEMORY_FRACTION,
    DEFAULT_SHARES,
    HostConfig,
    TaskConfig,
    Topology,
    VmConfig,
)
from protocol.constants import PAGE_SIZE

GIB = float(1 << 30)
MIB = 1 << 20
SCENARIOS = ("ranges", "virtio", "fragmented")
#: How often dommemstat is polled while a phase runs: the timing resolution of a phase.
POLL_S = 0.005
#: Give up on a phase after this long (a stuck balloon is a failure, not a slow result).
PHASE_TIMEOUT_S = 180.0
#: The host and the driver do not (yet) report these parts of the time split.
SPLIT_GAPS = ("guest allocation time (driver: balloon_alloc round trips)",
              "protocol time (driver: inflate/ack round trips)",
              "release time (host: BalloonBackend.release_seconds is kept but not in `counters`)")


class BenchError(RuntimeError):
    """The benchmark could not run (host failed to boot, a phase timed out, ...)."""


@dataclass(frozen=True)
class Plan:
    """Sizes and timings of one trial, derived from the VM size."""

    vm_bytes: int
    scenario: str
    touch_fraction: float = 0.9  # of RAM touched then freed (unfragmented)
    inflate_fraction: float = 0.95

    @property
    def pages(self) -> int:
        return self.vm_bytes // PAGE_SIZE

    @property
    def wire(self) -> str:
        return "virtio" if self.scenario == "virtio" else "ranges"

    @property
    def gib(self) -> float:
        return self.vm_bytes / GIB

    #: Seconds the touch-then-free task keeps its memory once all of it is touched (the
    #: benchmark sees it backed in the meantime), then it ends and the guest frees it.
    hold: float = 1.0

    @property
    def free_at(self) -> float:
        """Seconds after boot by which the touch-then-free task usually has ended: only the
        start of the refault task is placed by it; the phases wait on conditions."""
        # The guest touches memory through EPT faults at ~100-150 MiB/s on a 2-core machine
        # (docs/results.md).
        return 3.0 + 20.0 * max(self.gib, 0.05)

    @property
    def refault_at(self) -> float:
        """Seconds after boot at which the refault task starts (after inflate + deflate;
        virtio mode is the slow one: 256 pages a message). Twice the usual touch time, so
        that a touch slowed down by a loaded machine still ends first; a refault that starts
        during the phases is flagged in the result (``refault_overlapped_phases``), and one
        that was over before the deflate was leaves the trial's ``refault_s`` null (not
        measured) rather than waiting for a refault that already happened."""
        slack = 40.0 if self.scenario == "virtio" else 12.0
        return 2 * self.free_at + 2.0 + slack * max(self.gib, 0.05)


def _mib(nbytes: int) -> str:
    return f"{max(1, nbytes // MIB)}MiB"


def _task(workload: str, size: int, **kw: Any) -> TaskConfig:
    return TaskConfig(workload=workload, size=size // MIB * MIB, **kw)


def topology(plan: Plan, host_name: str, run_dir: Path) -> Topology:
    """The topology of one trial (docs/topology.md)."""
    size = plan.vm_bytes
    host_mem = size + max(64 * MIB, size // 4)  # every guest page fits: no host swap path
    if plan.scenario == "fragmented":
        tasks = [_task("uniform", size // 2, rate=400000, write_ratio=0.5)]
        freed, refault = int(size * 0.4), int(size * 0.35)
    else:
        tasks = []
        freed = refault = int(size * plan.touch_fraction)
    tasks += [_task("idle", freed, hold=round(plan.hold, 1)),
              _task("idle", refault, start=round(plan.refault_at, 1))]
    memory = size // MIB * MIB
    # The parser's default min_memory: 10 % of memory in whole MiB (to a page under 10 MiB).
    unit = MIB if memory >= 10 * MIB else PAGE_SIZE
    vm = VmConfig(name="bench", memory=memory,
                  features=("must_tell_host", "stats", "deflate_on_oom", "ranges"),
                  wire=plan.wire, stats_interval=0.2, guest_swap=16 * MIB,
                  on_crash="destroy", tasks=tuple(tasks),
                  min_memory=int(memory * DEFAULT_MIN_MEMORY_FRACTION) // unit * unit,
                  max_memory=memory, shares=DEFAULT_SHARES, initial_balloon=0)
    host = HostConfig(name=host_name, memory=host_mem // MIB * MIB, swap=0, policy="none",
                      policy_interval=1.0, run_dir=str(run_dir))
    return Topology(host=host, vms=(vm,), source="<bench reclaim>")


class Host:
    """A hypervisor subprocess in a private run dir (through the project's launcher);
    stopped and cleaned up on exit."""

    def __init__(self, plan: Plan, workdir: Path, trial: int) -> None:
        self.dir = workdir / f"t{trial}"
        self.run_dir = self.dir / "run"
        self.dir.mkdir(parents=True)
        self.name = f"bench{os.getpid()}t{trial}"
        self.topology = topology(plan, self.name, self.run_dir)
        self.topo = self.dir / "topology.toml"
        self.topo.write_text(self.topology.to_toml())
        self.launched: launcher.Launched | None = None
        self.client: ControlClient | None = None

    def __enter__(self) -> Host:
        self.launched = launcher.launch(self.topology, topo_file=self.topo,
                                        output=self.dir / "host.out", log_level="WARNING")
        self.boot_time = time.monotonic()
        try:
            launcher.wait_ready(self.launched, 60.0)
        except launcher.LaunchError as e:
            self.__exit__()
            raise BenchError(str(e)) from None
        self.client = ControlClient(self.run_dir, timeout=10.0)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None
        if self.launched is not None and not self.launched.stopped:
            self.launched.stop(20.0, keep_output=True)

    def call(self, method: str, **params: Any) -> Any:
        assert self.client is not None
        return self.client.call(method, **params)

    def stat(self) -> dict[str, Any]:
        return self.call("dommemstat", vm="bench")

    def wait(self, what: str, cond: Callable[[dict[str, Any]], bool],
             timeout: float = PHASE_TIMEOUT_S) -> tuple[float, dict[str, Any]]:
        """Poll dommemstat until ``cond``; returns (monotonic time it held, the stat)."""
        deadline = time.monotonic() + timeout
        while True:
            s = self.stat()
            now = time.monotonic()
            if cond(s):
                return now, s
            if s.get("state") not in (None, "running", "booting"):
                raise BenchError(f"VM left the running state ({s.get('state')}) while "
                                 f"waiting for {what}")
            if now > deadline:
                raise BenchError(f"timed out after {timeout:.0f} s waiting for {what} "
                                 f"(last dommemstat: {s})")
            time.sleep(POLL_S)


def freed_since(s: dict[str, Any], since: float, pages: int) -> bool:
    """Has the guest freed its task's memory (35 % of ``pages`` unused), by stats taken
    after ``since`` (UNIX time)? Stats from before the touch ended still show the memory
    free that the task has not touched yet: a target computed from them is far too small."""
    return (s.get("last_update") is not None and s["last_update"] > since
            and s["unused"] is not None and s["unused"] // PAGE_SIZE >= pages * 0.35)


def run_trial(plan: Plan, workdir: Path, trial: int) -> dict[str, Any]:
    """One fresh host, one inflate, one deflate, one refault. Returns the measured phases."""
    pages = plan.pages
    with Host(plan, workdir, trial) as h:  # every VM up, its driver connected
        # 1. touched: backed_pages climbs; then the idle task's duration ends and frees it.
        touched_goal = int(pages * (0.85 if plan.scenario != "fragmented" else 0.8))
        # (The task holds its memory `hold` s after touching the last page, however long
        # the touch took, then ends: both waits are on conditions, bounded against a hang.)
        _, s = h.wait("the guest to touch its memory",
                      lambda s: s["backed_pages"] >= touched_goal * 0.95)
        touched = time.time()
        _, s = h.wait("the task's memory to be freed",
                      lambda s: freed_since(s, touched, pages))
        time.sleep(0.5)  # one more stats interval: a settled `unused`
        s = h.stat()
        unused = (s["unused"] or 0) // PAGE_SIZE
        target = int(min(plan.inflate_fraction * pages, unused - pages * 0.01))
        if target <= 0:
            raise BenchError(f"the guest has only {unused} free pages: nothing to inflate")
        before = h.call("counters", vm="bench")
        backed0 = s["backed_pages"]
        rss0 = s["rss"]
        # 2. inflate
        t0 = time.monotonic()
        h.call("set_balloon", vm="bench", pages=target)
        t1, s = h.wait("inflate", lambda s: s["balloon_pages"] >= target)
        after = h.call("counters", vm="bench")
        backed1, rss1 = s["backed_pages"], s["rss"]
        # 3. deflate
        t2 = time.monotonic()
        h.call("set_balloon", vm="bench", pages=0)
        t3, s = h.wait("deflate", lambda s: s["balloon_pages"] == 0)
        if time.monotonic() - h.boot_time > plan.refault_at:
            late = True  # the refault task started during the phases: refault is mixed in
        else:
            late = False
        # 4. refault: the second task starts at refault_at and touches its memory again.
        base = s["backed_pages"]
        goal = h.topology.vms[0].tasks[-1].size // PAGE_SIZE

        def refault_done(s: dict[str, Any]) -> bool:
            """The refault task has touched all its pages (an idle task's accesses are its
            first touches)."""
            tasks = s.get("tasks") or []
            return bool(tasks) and int(tasks[-1].get("accesses") or 0) >= goal

        # The refault task may touch its pages without one EPT exit: it ran whole during the
        # phases (a loaded machine), or the guest gave it free pages still backed (the
        # fragmented scenario's task frees memory the balloon did not all take). Then there
        # is nothing to time, and the trial says why instead of waiting forever.
        t4, s = h.wait("the refault to start",
                       lambda s: s["backed_pages"] > base or refault_done(s))
        last_b, last_t = s["backed_pages"], t4
        measured = last_b > base
        unmeasured = None if measured else (
            "the refault ran during the inflate and deflate" if late else
            "the refault task got free pages that were still backed")
        stable_since = time.monotonic()
        while measured and time.monotonic() - stable_since < 0.5:  # until it stops rising
            s = h.stat()
            if s["backed_pages"] > last_b:
                last_b, last_t, stable_since = s["backed_pages"], time.monotonic(), time.monotonic()
            time.sleep(POLL_S)
        corrupted = s.get("corrupted_reads") or 0
    delta = {k: after.get(k, 0) - before.get(k, 0) for k in
             ("inflate_batches", "punch_calls", "released_frames", "inflated",
              "release_seconds")
             if isinstance(after.get(k), (int, float))}
    refault_pages = last_b - base
    return {
        "scenario": plan.scenario, "wire": plan.wire, "pages": pages, "target_pages": target,
        "backed_before": backed0, "backed_after_inflate": backed1,
        "released_pages": backed0 - backed1, "rss_released_bytes": rss0 - rss1,
        "inflate_s": t1 - t0, "deflate_s": t3 - t2,
        "refault_s": max(last_t - t4, POLL_S) if measured else None,
        "refault_pages": refault_pages, "refault_overlapped_phases": late,
        "refault_unmeasured": unmeasured,
        "host_counters": delta, "corrupted_reads": corrupted,
    }


def _summary(values: list[float]) -> dict[str, float | None]:
    """min/median/max; all None when no trial measured it."""
    if not values:
        return {"min": None, "median": None, "max": None}
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def summarise_trials(trials: list[dict[str, Any]]) -> dict[str, Any]:
    """Rates of one scenario over its repeats (min/median/max)."""
    inflate = [t["target_pages"] * PAGE_SIZE / GIB / t["inflate_s"] for t in trials]
    released = [t["released_pages"] * PAGE_SIZE / GIB / t["inflate_s"] for t in trials]
    deflate = [t["target_pages"] * PAGE_SIZE / GIB / t["deflate_s"] for t in trials]
    timed = [t for t in trials if t["refault_s"] is not None]  # see run_trial: a late refault
    dr = [t["target_pages"] * PAGE_SIZE / GIB / (t["deflate_s"] + t["refault_s"]
          * t["target_pages"] / max(t["refault_pages"], 1)) for t in timed]
    refault = [t["refault_pages"] * PAGE_SIZE / GIB / t["refault_s"] for t in timed]
    return {
        "inflate_gib_s": _summary(inflate),
        "inflate_pages_s": _summary([x * GIB / PAGE_SIZE for x in inflate]),
        "released_gib_s": _summary(released),
        "deflate_gib_s": _summary(deflate),
        "refault_gib_s": _summary(refault),
        "deflate_refault_gib_s": _summary(dr),
        "trials": trials,
    }


def run_reclaim(*, vm_bytes: int = 1 << 30, repeats: int = 3,
                scenarios: tuple[str, ...] = SCENARIOS, ref_repeats: int = 3,
                progress: Callable[[str], None] | None = None,
                keep_dir: Path | None = None) -> dict[str, Any]:
    """The whole reclaim benchmark; returns the JSON-ready result."""
    if vm_bytes < 16 * MIB or vm_bytes % PAGE_SIZE:
        raise ValueError(f"--vm-size must be a multiple of 4096 bytes and at least 16 MiB, "
                         f"got {vm_bytes}")
    if repeats < 1:
        raise ValueError(f"--repeat must be at least 1, got {repeats}")
    bad = [s for s in scenarios if s not in SCENARIOS]
    if bad or not scenarios:
        raise ValueError(f"unknown scenario(s) {bad}; choose from {', '.join(SCENARIOS)}")
    say = progress or (lambda _m: None)
    total = 1 + len(scenarios) * repeats  # "[k/N]" prefixes drive the CLI's progress bar
    say(f"[1/{total}] references")
    refs = references.all_references(vm_bytes, ref_repeats, read_bytes=min(vm_bytes, 256 * MIB))
    results: dict[str, Any] = {}
    workdir = Path(tempfile.mkdtemp(prefix="blbench-", dir="/tmp"))
    try:
        for n, sc in enumerate(scenarios):
            trials = []
            for i in range(repeats):
                say(f"[{2 + n * repeats + i}/{total}] {sc}: trial {i + 1}/{repeats}")
                trials.append(run_trial(Plan(vm_bytes, sc), workdir, len(results) * 100 + i))
            results[sc] = summarise_trials(trials)
    finally:
        if keep_dir is not None:
            shutil.copytree(workdir, keep_dir, dirs_exist_ok=True)
        shutil.rmtree(workdir, ignore_errors=True)
    return build_result(vm_bytes, repeats, refs, results)


def build_result(vm_bytes: int, repeats: int, refs: dict[str, references.Rate],
                 results: dict[str, Any]) -> dict[str, Any]:
    """The JSON object: flat headline medians first (the keys other tools read), then detail."""
    def med(sc: str, key: str) -> float | None:
        r = results.get(sc)
        return None if r is None else r[key]["median"]

    e2e = med("ranges", "inflate_gib_s")
    virtio = med("virtio", "inflate_gib_s")
    limit = refs["punch_limit"].gib_s
    mapped = refs["mapped_punch_limit"].gib_s if "mapped_punch_limit" in refs else None
    first_touch = refs["first_touch"].gib_s
    dr = med("ranges", "deflate_refault_gib_s")

    def ratio(a: float | None, b: float | None) -> float | None:
        return None if a is None or b is None or b == 0 else a / b

    def at_least(r: float | None, bound: float) -> bool | None:
        return None if r is None else r >= bound

    return {
        "benchmark": "reclaim",
        "e2e_gib_s": e2e,
        "virtio_gib_s": virtio,
        "fragmented_gib_s": med("fragmented", "inflate_gib_s"),
        "limit_punch_gib_s": limit,
        "limit_mapped_punch_gib_s": mapped,
        "per_page_punch_gib_s": refs["per_page_punch"].gib_s,
        "refault_gib_s": med("ranges", "refault_gib_s"),
        "deflate_refault_gib_s": dr,
        "limit_first_touch_gib_s": first_touch,
        "fallocate_populate_gib_s": refs["fallocate_populate"].gib_s,
        "read_gib_s": refs["read_bandwidth"].gib_s,
        "ratio_e2e_to_limit": ratio(e2e, limit),
        "ratio_e2e_to_mapped_limit": ratio(e2e, mapped),
        "ratio_ranges_to_virtio": ratio(e2e, virtio),
        "ratio_e2e_to_per_page": ratio(e2e, refs["per_page_punch"].gib_s),
        "ratio_deflate_refault_to_first_touch": ratio(dr, first_touch),
        "targets": {
            "e2e_ge_0.7_limit": at_least(ratio(e2e, limit), 0.7),
            "e2e_ge_0.85_limit": at_least(ratio(e2e, limit), 0.85),
            "e2e_ge_0.85_mapped_limit": at_least(ratio(e2e, mapped), 0.85),
            "e2e_ge_5_virtio": at_least(ratio(e2e, virtio), 5),
            "deflate_refault_ge_0.5_first_touch": at_least(ratio(dr, first_touch), 0.5),
        },
        "vm_bytes": vm_bytes, "repeats": repeats,
        "references": {k: v.as_dict() for k, v in refs.items()},
        "scenarios": results,
        "split_missing": list(SPLIT_GAPS),
    }
