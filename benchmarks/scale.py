"""``balloonlab bench scale``: how every cost of a host grows with its number of VMs.

Units: times in seconds (latencies in milliseconds), memory in MiB of proportional set size
(PSS: ``Pss:`` of ``/proc/<pid>/smaps_rollup``, so pages shared between the processes are
split between them, not counted once per process).

For each VM count N (quick: 1, 2, 4, 8; ``--full``: 1 .. 32) one fresh host runs the first
N VMs of the shipped ``fleet`` topology (64 MiB VMs, each guest touching a few MiB, mixed
workloads, policy ``mom``), through the project's launcher, and the benchmark measures

* **up**: from launching the hypervisor until every VM runs with its driver negotiated
  (and when the first VM got there);
* **PSS** of every guest kernel, every balloon driver, the hypervisor and its fork server,
  once all are up, and what a VM costs beyond the RAM its guest touched: (kernels + drivers
  − the kernels' shared-memory PSS, which is guest RAM + the fork server) / N;
* **policy round**: host CPU per policy round (``host_info``'s ``policy_rounds`` and
  ``policy_cpu_seconds``) over the sampling window;
* **control latency**: p50/p99 of ``dommemstat`` round trips on one connection, over the
  VMs in turn, while their workloads run;
* **down**: from ``shutdown`` until the hypervisor process has exited.

A count whose host does not come up within its boot timeout (or that the pre-flight check
refuses) is a failed point carrying the error and how many VMs were up; the sweep goes on.

The same run measures one reference: the median time to start and reap a bare Python
interpreter (``python -c pass``), so an up time reads as "this many interpreter starts".
The result's ratios are against that and against the run's 1-VM point.
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from balloonlab import launcher
from balloonlab.client import ControlClient
from hypervisor import preflight
from hypervisor.topology import Topology, example_path, load_topology

MIB = 1 << 20
QUICK_COUNTS = (1, 2, 4, 8)
FULL_COUNTS = (1, 2, 4, 8, 16, 32)
#: Seconds of the sampling window (policy rounds, dommemstat latencies) once a host is up.
SAMPLE_S = 4.0
#: The policy interval of the benchmark hosts: several rounds fit in the sampling window.
POLICY_INTERVAL_S = 0.5


def boot_timeout_for(n: int) -> float:
    """How long N VMs may take to come up: generous on a loaded machine, bounds a hang."""
    return 60.0 + 10.0 * n


def fleet_cut(n: int, host_name: str, run_dir: Path | None = None,
              policy_interval: float | None = None) -> Topology:
    """The first ``n`` VMs of the shipped ``fleet`` topology (cycled, renamed, beyond its
    32) under host ``host_name``, in ``run_dir`` when given."""
    fleet = load_topology(example_path("fleet"))
    if n < 1:
        raise ValueError(f"a fleet cut needs at least 1 VM, got {n}")
    vms = []
    for i in range(n):
        vm = fleet.vms[i % len(fleet.vms)]
        if i >= len(fleet.vms):
            vm = replace(vm, name=f"{vm.name}-{i // len(fleet.vms)}")
        vms.append(vm)
    host = replace(fleet.host, name=host_name,
                   run_dir=None if run_dir is None else str(run_dir))
    if policy_interval is not None:
        host = replace(host, policy_interval=policy_interval)
    return replace(fleet, host=host, vms=tuple(vms), schedule=(),
                   source=f"<fleet cut of {n} VMs>")


def pss_bytes(pid: int, field: str = "Pss") -> int | None:
    """PSS of process ``pid`` in bytes (``smaps_rollup``), None when it cannot be read.
    ``field`` ``Pss_Shmem``: the part in shared memory (a guest kernel's: its RAM memfd)."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def interpreter_start_s(repeats: int = 5) -> float:
    """Median seconds to start and reap ``python -c pass`` (the same-run reference)."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", "pass"], check=True)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _pct(values: Sequence[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


def _mib_stats(values: list[int]) -> dict[str, float] | None:
    if not values:
        return None
    mib = [v / MIB for v in values]
    return {"median": statistics.median(mib), "min": min(mib), "max": max(mib),
            "sum": sum(mib)}


def measure_count(n: int, workdir: Path, *, boot_timeout: float | None = None,
                  sample_s: float = SAMPLE_S,
                  progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """One host of ``n`` fleet VMs: the point of the curves (or a failed point)."""
    say = progress or (lambda _m: None)
    timeout = boot_timeout_for(n) if boot_timeout is None else boot_timeout
    d = workdir / f"n{n}"
    d.mkdir(parents=True)
    topo = fleet_cut(n, f"scale{os.getpid()}n{n}", d / "run", POLICY_INTERVAL_S)
    point: dict[str, Any] = {"vms": n, "ok": False, "boot_timeout_s": timeout,
                             "load_average_before": os.getloadavg()[0]}
    try:
        preflight.check(topo)
    except preflight.PreflightError as e:
        point["error"] = str(e)
        return point
    topo_file = d / "topology.toml"
    topo_file.write_text(topo.to_toml())
    seen: dict[str, float | None] = {"ready": 0, "first": None}
    t0 = time.monotonic()

    def booting(msg: str) -> None:
        ready = msg.count("running/connected")
        if ready and seen["first"] is None:
            seen["first"] = time.monotonic() - t0
        seen["ready"] = ready
        say(f"{n} VMs: booting, {ready}/{n} up")

    h = launcher.launch(topo, topo_file=topo_file, output=d / "host.out", log_level="WARNING")
    try:
        try:
            launcher.wait_ready(h, timeout, booting)
        except launcher.LaunchError as e:
            point.update(error=str(e), vms_up=seen["ready"], first_up_s=seen["first"],
                         gave_up_after_s=time.monotonic() - t0)
            return point
        point["up_s"] = time.monotonic() - t0
        point["first_up_s"] = seen["first"]
        point["vms_up"] = n
        say(f"{n} VMs: up in {point['up_s']:.1f} s; sampling")
        point.update(_sample(h, sample_s))
        say(f"{n} VMs: stopping")
        t1 = time.monotonic()
        status = h.stop(launcher.SHUTDOWN_TIMEOUT, keep_output=True)
        point["down_s"] = time.monotonic() - t1
        point["exit_status"] = status
        point["ok"] = status == 0 and point["corrupted_reads"] == 0
        if not point["ok"]:
            point["error"] = (f"host exit status {status}, corrupted reads "
                              f"{point['corrupted_reads']}")
    finally:
        if not h.stopped:
            h.stop(launcher.SHUTDOWN_TIMEOUT, keep_output=True)
    return point


def _sample(h: launcher.Launched, sample_s: float) -> dict[str, Any]:
    """PSS of every process, policy CPU per round and dommemstat latency of a running host."""
    c = ControlClient(h.run_dir, timeout=30.0)
    try:
        vms = c.call("list_vms")
        info0 = c.call("host_info")
        names = [v["name"] for v in vms]
        lat: list[float] = []
        end = time.monotonic() + sample_s
        i = 0
        while time.monotonic() < end or len(lat) < 20:
            t = time.perf_counter()
            c.call("dommemstat", vm=names[i % len(names)])
            lat.append(time.perf_counter() - t)
            i += 1
            time.sleep(0.005)  # a client polling hard, not a tight loop stealing the cores
        info1 = c.call("host_info")
        # PSS once the workloads ran for the window: the guests have touched their sets.
        kernels = [p for v in vms if v.get("pid") and (p := pss_bytes(v["pid"])) is not None]
        guest_ram = [p for v in vms
                     if v.get("pid") and (p := pss_bytes(v["pid"], "Pss_Shmem")) is not None]
        drivers = [p for v in vms
                   if v.get("driver_pid") and (p := pss_bytes(v["driver_pid"])) is not None]
        host_pss = pss_bytes(int(info1["pid"]))
        fs_pid = info1.get("forkserver_pid")
        fs_pss = pss_bytes(int(fs_pid)) if fs_pid else None
        corrupted = sum(int(c.call("dommemstat", vm=name).get("corrupted_reads") or 0)
                        for name in names)
    finally:
        c.close()
    rounds = int(info1.get("policy_rounds", 0)) - int(info0.get("policy_rounds", 0))
    cpu = float(info1.get("policy_cpu_seconds", 0.0)) - float(info0.get("policy_cpu_seconds",
                                                                        0.0))
    if rounds <= 0 and info1.get("policy_rounds"):  # none in the window: since the start
        rounds, cpu = int(info1["policy_rounds"]), float(info1["policy_cpu_seconds"])
    nvm = max(len(vms), 1)
    return {
        "pss_kernel_mib": _mib_stats(kernels), "pss_driver_mib": _mib_stats(drivers),
        "pss_guest_ram_mib": _mib_stats(guest_ram),
        "pss_host_mib": None if host_pss is None else host_pss / MIB,
        "pss_forkserver_mib": None if fs_pss is None else fs_pss / MIB,
        "pss_total_mib": (sum(kernels) + sum(drivers) + (host_pss or 0) + (fs_pss or 0)) / MIB,
        "pss_per_vm_mib": (sum(kernels) + sum(drivers)) / MIB / nvm,
        # What a VM costs beyond the RAM its guest touched, the fork server's share included.
        "pss_per_vm_beyond_ram_mib": (sum(kernels) + sum(drivers) - sum(guest_ram)
                                      + (fs_pss or 0)) / MIB / nvm,
        "policy_rounds": rounds,
        "policy_round_ms": None if rounds <= 0 else 1e3 * cpu / rounds,
        "dommemstat_calls": len(lat),
        "dommemstat_p50_ms": 1e3 * _pct(lat, 0.50),
        "dommemstat_p99_ms": 1e3 * _pct(lat, 0.99),
        "corrupted_reads": corrupted,
    }


def run_scale(counts: Sequence[int] = QUICK_COUNTS, *, boot_timeout: float | None = None,
              sample_s: float = SAMPLE_S,
              progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """The whole sweep; returns the JSON-ready result."""
    bad = [c for c in counts if c < 1]
    if bad or not counts:
        raise ValueError(f"VM counts must be at least 1, got {list(counts)}")
    if sample_s <= 0:
        raise ValueError(f"the sampling window must be positive, got {sample_s}")
    say = progress or (lambda _m: None)
    load_start = os.getloadavg()
    total = len(counts) + 1
    say(f"[1/{total}] reference: interpreter start")
    ref = interpreter_start_s()
    points = []
    workdir = Path(tempfile.mkdtemp(prefix="blscale-", dir="/tmp"))
    try:
        for k, n in enumerate(counts):
            say(f"[{k + 2}/{total}] {n} VMs")
            step = f"[{k + 2}/{total}]"

            def stage(msg: str, step: str = step) -> None:
                say(f"{step} {msg}")

            points.append(measure_count(n, workdir, boot_timeout=boot_timeout,
                                        sample_s=sample_s, progress=stage))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    res = build_result(points, ref)
    res["load_average_start"] = load_start
    return res


def build_result(points: list[dict[str, Any]], interpreter_s: float) -> dict[str, Any]:
    """The JSON object: the points, then ratios against the 1-VM point and the reference."""
    ok = [p for p in points if p.get("ok")]
    base = next((p for p in ok if p["vms"] == min(q["vms"] for q in ok)), None) if ok else None
    for p in ok:
        p["up_per_vm_s"] = p["up_s"] / p["vms"]
        p["up_in_interpreter_starts"] = p["up_s"] / interpreter_s
        if base is not None:
            p["up_vs_smallest"] = p["up_s"] / base["up_s"]
            p["down_vs_smallest"] = p["down_s"] / base["down_s"] if base["down_s"] else None
            p["dommemstat_p50_vs_smallest"] = (p["dommemstat_p50_ms"]
                                               / base["dommemstat_p50_ms"])
            if p.get("policy_round_ms") and base.get("policy_round_ms"):
                p["policy_round_vs_smallest"] = p["policy_round_ms"] / base["policy_round_ms"]
    return {
        "benchmark": "scale",
        "counts": [p["vms"] for p in points],
        "failed": [{"vms": p["vms"], "error": p.get("error")} for p in points if not p.get("ok")],
        "interpreter_start_s": interpreter_s,
        "vm_memory_mib": 64,
        "policy": "mom",
        "policy_interval_s": POLICY_INTERVAL_S,
        "load_average": os.getloadavg(),
        "points": points,
    }


def markdown(res: dict[str, Any]) -> str:
    """The result as a table (one row per VM count) and the failed points."""
    from benchmarks.report import table

    def g(p: dict[str, Any], key: str, sub: str | None = None) -> Any:
        v = p.get(key)
        if sub is not None and isinstance(v, dict):
            v = v.get(sub)
        return v

    rows = []
    for p in res["points"]:
        if not p.get("ok"):
            rows.append([p["vms"], "failed", f"{p.get('vms_up', 0)}/{p['vms']} up", "–", "–",
                         "–", "–", "–", "–", "–", "–", "–", "–"])
            continue
        rows.append([p["vms"], p["up_s"], p.get("up_vs_smallest"), p["up_per_vm_s"],
                     p["down_s"], g(p, "pss_kernel_mib", "median"),
                     g(p, "pss_driver_mib", "median"), p.get("pss_per_vm_beyond_ram_mib"),
                     p["pss_host_mib"], p.get("pss_forkserver_mib"),
                     p.get("policy_round_ms"), p["dommemstat_p50_ms"], p["dommemstat_p99_ms"]])
    la = ", ".join(f"{x:.1f}" for x in res["load_average"])
    if res.get("load_average_start"):
        la = f"{res['load_average_start'][0]:.1f} at the start (1 min), {la} at the end"
    out = [f"First N VMs of the `fleet` topology (64 MiB each, mixed workloads, policy mom, "
           f"policy interval {res['policy_interval_s']} s). Reference (same run): a bare "
           f"`python -c pass` starts and exits in {res['interpreter_start_s'] * 1e3:.0f} ms. "
           f"Load average: {la} (the benchmark's own VMs add to it).", "",
           table(["VMs", "up s", "up ÷ smallest", "up s per VM", "down s",
                  "kernel PSS MiB", "driver PSS MiB", "per VM beyond guest RAM MiB",
                  "hypervisor PSS MiB", "fork server PSS MiB",
                  "policy round ms CPU", "dommemstat p50 ms", "p99 ms"], rows)]
    if res["failed"]:
        out += ["", "Failed points:", ""]
        out += [f"- {f['vms']} VMs: {f['error']}" for f in res["failed"]]
    return "\n".join(out)


def plot(res: dict[str, Any], path: Path) -> None:
    """Four panels against VM count: up/down time, PSS, policy round CPU, control latency."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [p for p in res["points"] if p.get("ok")]
    failed = [p for p in res["points"] if not p.get("ok")]
    x = [p["vms"] for p in ok]
    fig, axes = plt.subplots(2, 2, figsize=(12, 8.5))
    ax = axes[0][0]
    ax.plot(x, [p["up_s"] for p in ok], "o-", label="up (launch → all running)")
    ax.plot(x, [p["down_s"] for p in ok], "s-", label="down (shutdown → exited)")
    ax.plot(x, [p.get("first_up_s") for p in ok], "^:", label="first VM running")
    for p in failed:
        ax.axvline(p["vms"], color="r", ls="--", lw=0.8)
        ax.annotate(f"{p['vms']} VMs failed ({p.get('vms_up', 0)} up)", (p["vms"], 0),
                    color="r", fontsize=7, rotation=90, va="bottom")
    ax.set_ylabel("seconds")
    ax.set_title("host start and stop")
    ax = axes[0][1]
    ax.plot(x, [(p["pss_kernel_mib"] or {}).get("median") for p in ok], "o-",
            label="guest kernel (median per VM)")
    ax.plot(x, [(p["pss_driver_mib"] or {}).get("median") for p in ok], "s-",
            label="balloon driver (median per VM)")
    ax.plot(x, [p["pss_host_mib"] for p in ok], "^-", label="hypervisor")
    ax.plot(x, [p["pss_per_vm_mib"] for p in ok], "x--", label="kernel + driver per VM")
    ax.plot(x, [p.get("pss_per_vm_beyond_ram_mib") for p in ok], "+:",
            label="per VM beyond guest RAM, fork server share included")
    ax.set_ylabel("PSS MiB")
    ax.set_title("memory (proportional set size)")
    ax = axes[1][0]
    ax.plot(x, [p.get("policy_round_ms") for p in ok], "o-", label="mom policy round")
    ax.set_ylabel("host CPU ms per round")
    ax.set_title("policy round")
    ax = axes[1][1]
    ax.plot(x, [p["dommemstat_p50_ms"] for p in ok], "o-", label="p50")
    ax.plot(x, [p["dommemstat_p99_ms"] for p in ok], "s-", label="p99")
    ax.set_ylabel("ms per round trip")
    ax.set_title("dommemstat latency while the workloads run")
    for ax in axes.flat:
        ax.set_xscale("log", base=2)
        ax.set_xlabel("VMs")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    start = res.get("load_average_start") or res["load_average"]
    fig.suptitle(f"balloonlab: cost against VM count, fleet cuts (load average {start[0]:.1f} "
                 f"on {os.cpu_count()} cores at the start)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
