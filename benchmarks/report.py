"""Output of the benchmarks: JSON files, markdown tables, the kernel-cost PNG, the machine.

Units follow the benchmarks: GiB/s, pages/s, ns per element, seconds.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
from pathlib import Path
from typing import Any


def machine() -> dict[str, Any]:
    """What the numbers were measured on: cores, memory, kernel, CPU model, versions."""
    import numba
    import numpy

    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) * 1024
    except OSError:
        pass
    thp = None
    try:
        thp = Path("/sys/kernel/mm/transparent_hugepage/shmem_enabled").read_text().strip()
    except OSError:
        pass
    return {"nproc": os.cpu_count(), "memory_bytes": mem, "kernel": platform.release(),
            "cpu": cpu, "python": platform.python_version(), "numba": numba.__version__,
            "numpy": numpy.__version__, "shmem_thp": thp, "git": _git_rev()}


def _git_rev() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, cwd=Path(__file__).resolve().parent, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def write_json(result: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1, sort_keys=False, default=str) + "\n")


def _f(x: Any, digits: int = 2) -> str:
    if x is None:
        return "–"
    if isinstance(x, bool):
        return "yes" if x else "**no**"
    if isinstance(x, float):
        if abs(x) >= 1000:
            return f"{x:,.0f}"
        return f"{x:.{digits}f}"
    return str(x)


def table(headers: list[str], rows: list[list[Any]]) -> str:
    out = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    out += ["| " + " | ".join(_f(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def machine_markdown(m: dict[str, Any]) -> str:
    mem = f"{m['memory_bytes'] / (1 << 30):.1f} GiB" if m.get("memory_bytes") else "?"
    return table(["nproc", "memory", "kernel", "CPU", "Python", "numba", "numpy", "shmem THP"],
                 [[m["nproc"], mem, m["kernel"], m["cpu"], m["python"], m["numba"],
                   m["numpy"], m.get("shmem_thp")]])


def kernels_markdown(res: dict[str, Any]) -> str:
    rows = []
    for s in res["summary"]:
        if s.get("log2") is None:
            rows.append([s["name"], "–", "–", "–", "–", "–", "–", "–"])
            continue
        rows.append([f"`{s['name']}`", f"2^{s['log2']}", s["kernel_ns_per_elem"],
                     s.get("numpy_ns_per_elem"), s.get("ratio_kernel_vs_numpy"),
                     s.get("ratio_kernel_vs_naive"), s.get("kernel_gib_s"),
                     s.get("ratio_bandwidth_vs_read")])
    head = (f"Read bandwidth (numpy sum, same run): **{res['read_gib_s']:.1f} GiB/s**. "
            "Ratios > 1 mean the kernel is faster; naive ratios beyond "
            f"2^{res['naive_max_log2']} are extrapolated per element.\n\n")
    return head + table(["kernel", "size", "kernel ns/elem", "numpy ns/elem",
                         "× numpy", "× naive", "GiB/s", "÷ read BW"], rows)


def reclaim_markdown(res: dict[str, Any]) -> str:
    refs = res["references"]
    ref_rows = [[k, v["gib_s"], v["gib_s_min"], v["gib_s_max"], v["pages_s"], v["calls"]]
                for k, v in refs.items()]
    out = [f"VM size {res['vm_bytes'] / (1 << 20):.0f} MiB, {res['repeats']} repeat(s).", "",
           "References (same run):", "",
           table(["reference", "GiB/s (median)", "min", "max", "pages/s", "calls"], ref_rows),
           "", "End to end:", ""]
    rows = []
    for sc, r in res["scenarios"].items():
        t0 = r["trials"][0]
        rows.append([sc, t0["target_pages"], r["inflate_gib_s"]["median"],
                     r["inflate_gib_s"]["min"], r["inflate_gib_s"]["max"],
                     r["inflate_pages_s"]["median"], r["released_gib_s"]["median"],
                     r["deflate_gib_s"]["median"], r["refault_gib_s"]["median"],
                     r["deflate_refault_gib_s"]["median"]])
    out.append(table(["scenario", "target pages", "inflate GiB/s", "min", "max",
                      "inflate pages/s", "released GiB/s", "deflate GiB/s",
                      "refault GiB/s", "deflate+refault GiB/s"], rows))
    out += ["", "Ratios (medians):", "",
            table(["ratio", "value", "target"], [
                ["e2e inflate / punch limit", res["ratio_e2e_to_limit"], "≥ 0.85"],
                ["e2e inflate / mapped punch limit", res.get("ratio_e2e_to_mapped_limit"),
                 "≥ 0.85"],
                ["ranges / virtio", res["ratio_ranges_to_virtio"], "≥ 5"],
                ["e2e / per-page punch", res["ratio_e2e_to_per_page"], "(> 1)"],
                ["deflate+refault / first touch",
                 res["ratio_deflate_refault_to_first_touch"], "≥ 0.5"],
            ])]
    return "\n".join(out)


def plot_kernels(res: dict[str, Any], path: Path) -> None:
    """Cost (ns/element) against size, one panel per package; numpy dashed; the cost of
    reading one byte at the same-run read bandwidth as a reference line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pkgs = ["protocol", "hypervisor", "guest"]
    fig, axes = plt.subplots(1, 3, figsize=(16, 5.5), sharey=True)
    byte_ns = 1e9 / (res["read_gib_s"] * (1 << 30))
    for ax, pkg in zip(axes, pkgs):
        cases = [c for c in res["cases"] if c["package"] == pkg]
        for i, c in enumerate(cases):
            ran = [r for r in c["sizes"] if "kernel" in r]
            if not ran:
                continue
            color = f"C{i % 10}"
            x = [r["n"] for r in ran]
            ax.plot(x, [r["kernel_ns_per_elem"] for r in ran], "o-", color=color,
                    label=c["name"].split(".", 1)[1])
            npy = [r for r in ran if "numpy_ns_per_elem" in r]
            if npy:
                ax.plot([r["n"] for r in npy], [r["numpy_ns_per_elem"] for r in npy], "--",
                        color=color, alpha=0.6)
            nv = [r for r in ran if "naive_ns_per_elem" in r]
            if nv:
                ax.plot([r["n"] for r in nv], [r["naive_ns_per_elem"] for r in nv], "x:",
                        color=color, alpha=0.6)
        ax.axhline(byte_ns, color="k", lw=0.8, ls="-.", label="read 1 B at read BW")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(pkg)
        ax.set_xlabel("size (elements)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, loc="upper left")
    axes[0].set_ylabel("ns per element (solid: Numba, dashed: numpy, dotted x: naive)")
    fig.suptitle("balloonlab kernels: cost against size")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def protocol_markdown(res: dict[str, Any]) -> str:
    """The codec benchmark: project path vs bare msgpack, per workload (and per stage)."""
    names = [k for k in res if k not in ("target", "machine", "benchmark")]
    rows = []
    for n in names:
        r = res[n]
        o, g = r["overhead_ratio"], r["generic_path_ratio"]
        rows.append([n, r["pages_per_batch"], f"{r['project_pages_per_s']:.3e}",
                     f"{r['msgpack_pages_per_s']:.3e}", o["median"], o["min"], o["max"],
                     g["median"]])
    out = ["Encode + decode of one inflate batch: the project path (build the message, "
           "`to_frame`, `FrameBuffer.feed` / `next_frame_span`, the connection's decoder) "
           "against `msgpack.packb` + `unpackb` of the same map, interleaved in the same run. "
           "Ratio = project time / msgpack time (lower is better).", "",
           table(["workload", "pages", "project pages/s", "msgpack pages/s",
                  "ratio (median)", "min", "max", "generic path ratio"], rows)]
    t = res["target"]
    out += ["", f"Target: pfns-4096 median ratio ≤ {t['limit']}: "
            f"**{t['pfns-4096 median ratio']:.2f}, {'met' if t['met'] else 'missed'}**."]
    if all("stages_us" in res[n] for n in names) and names:
        stages = list(res[names[0]]["stages_us"])
        out += ["", "Per stage (µs per message, min over repeats):", "",
                table(["stage", *names],
                      [[st, *(res[n]["stages_us"][st] for n in names)] for st in stages])]
    return "\n".join(out)
