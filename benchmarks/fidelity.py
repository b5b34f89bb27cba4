"""``balloonlab bench fidelity``: one workload in one VM, modelled throughput under four memory
regimes, with the pathology counters beside, plus what the modelled-time bookkeeping costs.

The four regimes give the guest the same memory in three different ways (``ssd`` for both
swap devices, the ``[cost]`` defaults otherwise):

- ``spare``: memory to spare (the VM and the host hold the whole working set);
- ``guest_swap``: the VM is configured with ``mem`` only, so the guest swaps to its own device;
- ``host_swap``: the VM is configured large, the host has only ``mem`` for it, so the host
  swaps behind the guest's back;
- ``ballooned``: the VM is configured large and ballooned down to ``mem`` at boot (the host
  has room: nothing is host-swapped), so the guest swaps to its own device.

Each regime is a fresh host (real processes).  After a warm-up the benchmark takes two
``dommemstat`` samples ``window`` seconds apart: modelled throughput is accesses per modelled
second between them (``Δops / Δmodelled_seconds``), and wall throughput the same per wall
second; the pathology counters and guest/host swap traffic are the window's differences.
Modelled time depends only on events, so the regimes compare whatever the machine's load;
wall throughput is shown for scale only.

The bookkeeping cost is :mod:`benchmarks.modelled`'s same-run ratio: the vCPU loop's
accesses/s with the modelled-time charging after each quantum over without it.

Units: sizes in MiB, throughput in accesses per second, times in seconds.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from balloonlab import launcher
from balloonlab.client import ControlClient
from benchmarks import modelled
from hypervisor.topology import parse_topology

MIB = 1 << 20
#: The regimes, in table order: (key, label).
REGIMES: tuple[tuple[str, str], ...] = (
    ("spare", "(a) memory to spare"),
    ("guest_swap", "(b) guest swap on ssd"),
    ("host_swap", "(c) host swap on ssd"),
    ("ballooned", "(d) ballooned to the same size"),
)
#: Quick (default) and ``--full`` parameters: the workload's working set, the memory the
#: guest gets under pressure, the configured size of the large VM, warm-up and window (s).
QUICK = {"wss_mib": 48, "mem_mib": 36, "vm_mib": 96, "warmup_s": 6.0, "window_s": 8.0,
         "loop_log2": 20, "loop_repeats": 11}
FULL = {"wss_mib": 192, "mem_mib": 144, "vm_mib": 384, "warmup_s": 20.0, "window_s": 30.0,
        "loop_log2": 22, "loop_repeats": 21}
#: The workload: zipf-distributed accesses (a hot head, a long cold tail), 30 % writes.
WORKLOAD: dict[str, Any] = {"workload": "zipf", "skew": 0.9, "write_ratio": 0.3}
#: The guest kernel's image in every regime (small, so that it differs little between a
#: small and a large VM; its memmap still follows the configured size).
KERNEL_IMAGE_MIB = 1
#: dommemstat counters whose window differences the table shows.
COUNTERS = ("ops", "swap_in", "swap_out", "major_fault", "double_paging", "false_swap_reads",
            "host_swap_reads", "host_swap_reads_noncontig")


def topology_text(regime: str, p: dict[str, Any], name: str, run_dir: Path) -> str:
    """The topology of one regime (sizes from ``p``, see :data:`QUICK`)."""
    wss, mem, big = p["wss_mib"], p["mem_mib"], p["vm_mib"]
    vm_mib = mem if regime == "guest_swap" else big
    # The host holds the VM whole, except under host swap, where it has ``mem`` for it.
    host_mib = mem if regime == "host_swap" else vm_mib + 64
    balloon = f'initial_balloon = "{big - mem}MiB"\n' if regime == "ballooned" else ""
    wl = "".join(f"{k} = {v!r}\n".replace("'", '"') for k, v in WORKLOAD.items())
    return (
        f'[host]\nname = "{name}"\nmemory = "{host_mib}MiB"\nswap = "{2 * big}MiB"\n'
        f'policy = "none"\nrun_dir = "{run_dir}"\n\n'
        f'[[vm]]\nname = "vm"\nmemory = "{vm_mib}MiB"\nguest_swap = "{2 * wss}MiB"\n'
        f'kernel_image = "{KERNEL_IMAGE_MIB}MiB"\nstats_interval = "250ms"\n'
        f'min_memory = "{min(mem, vm_mib) // 2}MiB"\n{balloon}'
        f'[[vm.task]]\nsize = "{wss}MiB"\n{wl}\n'
        '[cost]\nguest_swap_device = "ssd"\nhost_swap_device = "ssd"\n')


def _stat(c: ControlClient) -> dict[str, Any]:
    st: dict[str, Any] = c.call("dommemstat", vm="vm")
    st["_wall"] = time.monotonic()
    return st


def _wait_reported(c: ControlClient, timeout: float) -> dict[str, Any]:
    end = time.monotonic() + timeout
    while True:
        st = _stat(c)
        if st.get("modelled_seconds") and st.get("ops"):
            return st
        if time.monotonic() > end:
            raise RuntimeError("the guest reported no modelled time")
        time.sleep(0.1)


def measure_regime(regime: str, p: dict[str, Any], workdir: Path,
                   say: Callable[[str], None]) -> dict[str, Any]:
    """One fresh host in ``regime``: the window's throughputs and counter differences."""
    d = workdir / regime
    d.mkdir(parents=True)
    text = topology_text(regime, p, f"fid{os.getpid()}{regime.replace('_', '')}", d / "run")
    topo_file = d / "topology.toml"
    topo_file.write_text(text)
    topo = parse_topology(text, str(topo_file))
    h = launcher.launch(topo, topo_file=topo_file, output=d / "host.out", log_level="WARNING")
    try:
        launcher.wait_ready(h, 120.0, lambda m: say(f"{regime}: {m}"))
        c = ControlClient(h.run_dir, timeout=30.0)
        try:
            _wait_reported(c, 60.0)
            say(f"{regime}: warming up for {p['warmup_s']:.0f} s")
            time.sleep(p["warmup_s"])
            s0 = _stat(c)
            say(f"{regime}: measuring for {p['window_s']:.0f} s")
            time.sleep(p["window_s"])
            s1 = _stat(c)
            say(f"{regime}: stopping")
        finally:
            c.close()
        status = h.stop(launcher.SHUTDOWN_TIMEOUT, keep_output=True)
    finally:
        if not h.stopped:
            h.stop(launcher.SHUTDOWN_TIMEOUT, keep_output=True)
    d_ops = int(s1["ops"]) - int(s0["ops"])
    d_ns = round((float(s1["modelled_seconds"]) - float(s0["modelled_seconds"])) * 1e9)
    d_wall = s1["_wall"] - s0["_wall"]
    delta = {k: (int(s1.get(k) or 0) - int(s0.get(k) or 0)) for k in COUNTERS}
    return {
        "regime": regime,
        "modelled_throughput": d_ops * 1e9 / d_ns if d_ns > 0 else None,
        "wall_throughput": d_ops / d_wall if d_wall > 0 else None,
        "modelled_seconds": d_ns / 1e9,
        "wall_seconds": d_wall,
        "delta": delta,
        "guest_memory_mib": int(s1["actual"]) / MIB,
        "backed_mib": int(s1["backed_pages"]) * 4096 / MIB,
        "host_swapped_mib": int(s1["host_swapped_pages"]) * 4096 / MIB,
        "corrupted_reads": int(s1.get("corrupted_reads") or 0),
        "exit_status": status,
        "ok": status == 0 and not s1.get("corrupted_reads") and d_ops > 0,
    }


def run_fidelity(params: dict[str, Any], progress: Callable[[str], None] | None = None,
                 regimes: tuple[str, ...] | None = None) -> dict[str, Any]:
    """The four regimes (or ``regimes``), then the bookkeeping ratio."""
    say = progress or (lambda _m: None)
    chosen = [r for r, _ in REGIMES if regimes is None or r in regimes]
    steps = len(chosen) + 1
    points = []
    with tempfile.TemporaryDirectory(prefix="bl-fidelity-") as tmp:
        for i, regime in enumerate(chosen, 1):
            def stage(msg: str, i: int = i) -> None:
                say(f"[{i}/{steps}] {msg}")

            stage(regime)
            points.append(measure_regime(regime, params, Path(tmp), stage))
    say(f"[{steps}/{steps}] vCPU loop with and without modelled-time charging")
    times = modelled.timings(params["loop_log2"], params["loop_repeats"])
    best = {k: min(v) for k, v in times.items()}
    n = 1 << params["loop_log2"]
    per_q = modelled.bookkeeping_ns()
    quantum_ns = best["off"] * 1e9 / n * min(n, modelled.K.QUANTUM)
    loop = {"accesses": n, "repeats": params["loop_repeats"],
            "off_accesses_per_s": n / best["off"], "on_accesses_per_s": n / best["on"],
            "slowdown": best["on"] / best["off"] - 1,
            "slowdown_paired_median": modelled.paired_ratio(times) - 1,
            "bookkeeping_ns_per_quantum": per_q,
            "bookkeeping_share": per_q / quantum_ns,
            "load_average": os.getloadavg()[0]}
    return {"benchmark": "fidelity", "params": params, "workload": WORKLOAD,
            "points": points, "loop": loop,
            "ok": all(pt["ok"] for pt in points)}


def _fmt(v: float | None, spec: str = ",.0f") -> str:
    return "–" if v is None else format(v, spec)


def markdown(res: dict[str, Any]) -> str:
    p = res["params"]
    labels = dict(REGIMES)
    spare = next((pt["modelled_throughput"] for pt in res["points"]
                  if pt["regime"] == "spare"), None)
    lines = [
        f"One VM, one task: zipf (skew {WORKLOAD['skew']}) over {p['wss_mib']} MiB, "
        f"{int(100 * WORKLOAD['write_ratio'])} % writes; under pressure the guest has "
        f"{p['mem_mib']} MiB (a large VM is {p['vm_mib']} MiB). Window {p['window_s']:.0f} s "
        f"after {p['warmup_s']:.0f} s of warm-up; counters are the window's, in pages.",
        "",
        "| regime | modelled accesses/s | vs (a) | wall accesses/s | guest swap in/out | "
        "host swap reads (non-contig.) | double paging | false reads |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for pt in res["points"]:
        d = pt["delta"]
        mt = pt["modelled_throughput"]
        rel = f"{mt / spare:.3f}" if mt and spare else "–"
        lines.append(
            f"| {labels[pt['regime']]} | {_fmt(mt)} | {rel} | {_fmt(pt['wall_throughput'])} | "
            f"{d['swap_in'] // 4096:,} / {d['swap_out'] // 4096:,} | "
            f"{d['host_swap_reads']:,} ({d['host_swap_reads_noncontig']:,}) | "
            f"{d['double_paging']:,} | {d['false_swap_reads']:,} |"
            + ("" if pt["ok"] else " (failed)"))
    lp = res["loop"]
    lines += [
        "",
        f"Bookkeeping: the vCPU loop over 2^{p['loop_log2']} accesses runs at "
        f"{lp['off_accesses_per_s'] / 1e6:.1f} M accesses/s without modelled-time charging "
        f"and {lp['on_accesses_per_s'] / 1e6:.1f} M with it, same run, fastest of "
        f"{lp['repeats']}: {100 * lp['slowdown']:+.1f} % (median of the back-to-back pairs: "
        f"{100 * lp['slowdown_paired_median']:+.1f} %; target: at most +10 %; load average "
        f"{lp['load_average']:.1f}). The charging alone, timed by itself, is "
        f"{lp['bookkeeping_ns_per_quantum']:.0f} ns per quantum of "
        f"{modelled.K.QUANTUM} accesses: {100 * lp['bookkeeping_share']:.3f} % of the "
        "quantum's time.",
    ]
    return "\n".join(lines)
