"""``python -m benchmarks.modelled [LOG2] [REPEATS]``: what modelled time costs the vCPU loop.

The loop runs a stream of 2^LOG2 accesses (default 20; 30 % writes over the kernel cases'
pages, all present) in the guest kernel's quanta, without and with the memory manager's
modelled-time bookkeeping after each quantum (the ``guest.vcpu_run[quanta]`` and
``guest.vcpu_run[quanta+modelled]`` cases of ``balloonlab bench kernels``).  The two
alternate in one process and each keeps its fastest of REPEATS runs (default 21), so that a
loaded machine slows both alike; then the bookkeeping alone is timed per quantum, which a
loaded machine disturbs far less than the difference of two loop timings.  Units: accesses
per second, ns per access, ns per quantum.
"""

from __future__ import annotations

import sys
import time

import numpy as np

from benchmarks import kernels as K


def measure(log2: int = 20, repeats: int = 21) -> dict[str, float]:
    """Fastest seconds per run of each variant: ``{"off": s, "on": s}``."""
    times = timings(log2, repeats)
    return {k: min(v) for k, v in times.items()}


def paired_ratio(times: dict[str, list[float]]) -> float:
    """The median over repeats of on/off of the two runs of one repeat (back to back, so a
    burst of load mostly hits both): steadier than the ratio of two minima on a busy box."""
    return float(np.median(np.array(times["on"]) / np.array(times["off"])))


def timings(log2: int = 20, repeats: int = 21) -> dict[str, list[float]]:
    """Seconds of every run of each variant, in repeat order: ``{"off": [...], "on": [...]}``;
    the two variants alternate which goes first."""
    cases = {c.name: c for c in K.CASES}
    variants = {"off": cases["guest.vcpu_run[quanta]"],
                "on": cases["guest.vcpu_run[quanta+modelled]"]}
    n = 1 << log2
    ctx = variants["off"].setup(n, np.random.default_rng(1))
    for c in variants.values():  # warm up: load the JIT cache outside the timing
        c.reset(ctx)  # type: ignore[misc]
        c.kernel(ctx)
    out: dict[str, list[float]] = {k: [] for k in variants}
    for r in range(repeats):
        order = ("off", "on") if r % 2 == 0 else ("on", "off")
        for name in order:
            c = variants[name]
            c.reset(ctx)  # type: ignore[misc]
            t0 = time.perf_counter()
            res = c.kernel(ctx)
            dt = time.perf_counter() - t0
            if res[3] != n or res[4] != 0:
                raise AssertionError(f"{c.name}: {res} (expected {n} accesses, 0 corrupted)")
            out[name].append(dt)
    return out


def bookkeeping_ns(repeats: int = 7, calls: int = 100_000) -> float:
    """Fastest ns of one quantum's bookkeeping alone (what ``[quanta+modelled]`` adds per
    quantum), timed over ``calls`` calls: far less noisy than the loops' difference."""
    c = K._c_vcpu_quanta(1, np.random.default_rng(1))
    t, acct = c["task_mem"], c["acct"]
    charge = K.MemoryManager.charge
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(calls):
            t.accesses += K.QUANTUM
            charge(acct, t, acct.cost.accesses(K.QUANTUM))
        best = min(best, (time.perf_counter() - t0) / calls)
    return best * 1e9


def main(argv: list[str]) -> int:
    log2 = int(argv[0]) if argv else 20
    repeats = int(argv[1]) if len(argv) > 1 else 21
    best = measure(log2, repeats)
    n = 1 << log2
    for k, label in (("off", "without"), ("on", "with")):
        print(f"{label:7} modelled time: {n / best[k] / 1e6:8.2f} M accesses/s "
              f"({best[k] * 1e9 / n:.2f} ns/access)")
    print(f"difference: {100 * (best['on'] / best['off'] - 1):+.2f} % time per access")
    per_q = bookkeeping_ns()
    quantum_ns = best["off"] * 1e9 / n * K.QUANTUM
    print(f"bookkeeping alone: {per_q:.0f} ns per quantum of {K.QUANTUM} accesses = "
          f"{100 * per_q / quantum_ns:.3f} % of the quantum's {quantum_ns / 1e3:.0f} us")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
