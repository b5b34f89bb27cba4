"""``balloonlab bench kernels``: every Numba kernel against numpy and its naive Python twin.

Units: a size is a number of frames (4096-byte pages) — the length of the byte map or PFN set
the kernel works over; costs are nanoseconds per element (``elems`` of a case: frames, pfns,
pages covered by runs, or memory accesses for the vCPU loop); bandwidth in GiB/s.

Each :class:`Case` builds its inputs once per size (untimed), resets any state the kernel
mutates before every timed call (untimed), and runs three formulations of the same work:

* ``kernel`` — the project's public wrapper around the ``@njit`` kernel (warmed up first, so
  JIT compilation or cache loading is never timed);
* ``numpy`` — a vectorised numpy formulation (``None`` where the algorithm is inherently
  sequential pointer chasing — the buddy free lists — and no honest one exists);
* ``naive`` — the plain-Python twin from ``<package>/testing/naive.py`` or a twin kept here;
  run only up to ``naive_max_log2`` and extrapolated per element.

All three must agree on a small size before anything is timed (:func:`cross_check`), so a
fast result is never a wrong one. Streaming kernels also get a bandwidth figure: bytes they
read per element over their time, against the numpy read-bandwidth reference of the same run.

Why one module of this size: most of it is the table of cases, one per kernel formulation
with its inputs, numpy twin and naive twin side by side, so that a reader compares the three
formulations of a kernel on one screen.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from types import ModuleType
from typing import Any

import numpy as np

from benchmarks import references
from guest import kernels as GK
from guest.cost import DEFAULT_COST
from guest.kernel import QUANTUM
from guest.mm import BuddyAllocator, MemoryManager, TaskMem, VmStats
from guest.testing import naive as _naive_guest
from hypervisor import kernels as HK
from hypervisor.testing import naive as _naive_hv
from protocol import pfn as P
from protocol.testing import naive as _naive_pfn

GIB = float(1 << 30)
#: Each timed sample of a non-mutating kernel loops until it lasts this long, so that small
#: sizes are not dominated by timer resolution.
MIN_SAMPLE_S = 0.002
#: Size at which the three formulations are cross-checked before timing.
CHECK_LOG2 = 12
#: Above this size every formulation is timed at most ``LARGE_REPEATS`` times: one call
#: already lasts long enough to swamp timer noise, and the sweep to 2^28 must stay short.
LARGE_LOG2 = 24
LARGE_REPEATS = 2
#: Random-access kernels stop here (see ``Case.max_log2``).
RANDOM_MAX_LOG2 = 24
RANDOM_SKIP = (f"random access: cost per element is flat beyond the last-level cache, "
               f"shown up to 2^{RANDOM_MAX_LOG2}")

Ctx = dict[str, Any]


# --------------------------------------------------------------------------------------
# naive twins: the plain-Python references shipped in each package's ``testing`` module
# --------------------------------------------------------------------------------------

NAIVE_PFN: ModuleType = _naive_pfn
NAIVE_HV: ModuleType = _naive_hv
NAIVE_GUEST: ModuleType = _naive_guest


def _naive_lookahead(pt: list[int], vpns: list[int], ept: list[int], cap: int) -> list[int]:
    # The tests' twin uses `g not in out` on a list (quadratic); a set keeps it linear so the
    # per-element extrapolation is fair.
    out: list[int] = []
    seen: set[int] = set()
    for v in vpns:
        g = pt[v]
        if g >= 0 and not ept[g] and g not in seen:
            seen.add(g)
            out.append(g)
            if len(out) == cap:
                break
    return out


def _naive_first_not_in_state(runs: list[tuple[int, int]], want: int, state: list[int]) -> int:
    for first, count in runs:
        for g in range(first, first + count):
            if state[g] != want:
                return g
    return -1


# --------------------------------------------------------------------------------------
# input builders and numpy formulations
# --------------------------------------------------------------------------------------


def run_pattern(n: int, rng: np.random.Generator, mean_len: int = 16) -> np.ndarray:
    """A uint8 map of ``n`` entries, about half set, in runs of geometric length."""
    k = max(4, 2 * n // mean_len + 16)
    lens = rng.geometric(1.0 / mean_len, size=k)
    while lens.sum() < n:
        lens = np.concatenate((lens, rng.geometric(1.0 / mean_len, size=k)))
    vals = (np.arange(lens.shape[0]) & 1).astype(np.uint8)
    return np.repeat(vals, lens)[:n].copy()


def np_runs_of_set(state: np.ndarray) -> np.ndarray:
    b = np.zeros(state.shape[0] + 2, dtype=np.int8)
    b[1:-1] = state != 0
    d = np.diff(b)
    starts = np.flatnonzero(d == 1)
    ends = np.flatnonzero(d == -1)
    return np.stack((starts, ends - starts), axis=1).astype(np.uint64)


def np_pfns_to_runs(pfns: np.ndarray) -> np.ndarray:
    g = np.unique(pfns).astype(np.int64)
    if g.size == 0:
        return np.empty((0, 2), np.uint64)
    breaks = np.flatnonzero(np.diff(g) != 1) + 1
    starts = np.concatenate(([0], breaks))
    ends = np.concatenate((breaks, [g.size]))
    return np.stack((g[starts], ends - starts), axis=1).astype(np.uint64)


def np_runs_to_pfns(runs: np.ndarray) -> np.ndarray:
    first = runs[:, 0].astype(np.int64)
    count = runs[:, 1].astype(np.int64)
    offs = np.cumsum(count) - count
    total = int(count.sum())
    return (np.arange(total, dtype=np.int64) + np.repeat(first - offs, count)).astype(np.uint32)


def np_runs_mask(n: int, runs: np.ndarray) -> np.ndarray:
    """Boolean mask of the pages the runs cover, by a +1/-1 difference array and a cumsum."""
    d = np.zeros(n + 1, dtype=np.int32)
    first = runs[:, 0].astype(np.int64)
    np.add.at(d, first, 1)
    np.add.at(d, first + runs[:, 1].astype(np.int64), -1)
    return np.cumsum(d[:-1]) > 0


def np_check_pfns(pfns: np.ndarray, limit: int, state: np.ndarray, want_clear: bool) -> bool:
    if pfns.size == 0:
        return True
    if int(pfns.max()) >= limit:
        return False
    if np.unique(pfns).size != pfns.size:
        return False
    return bool(np.all((state[pfns] != 0) == want_clear))


def np_map_alloc(state: np.ndarray, n: int, hint: int, mark: int) -> tuple[np.ndarray, int]:
    size = state.shape[0]
    order = np.concatenate((np.arange(hint % size, size), np.arange(0, hint % size)))
    free = order[state[order] == 0][:n]
    state[free] = mark
    nxt = (int(free[-1]) + 1) % size if free.size == n and n else hint % size
    if free.size < n:
        nxt = hint % size  # swept the whole map: the hand is back where it started
    return free, nxt


def np_map_free(state: np.ndarray, idx: np.ndarray) -> bool:
    if idx.size and (idx.min() < 0 or idx.max() >= state.shape[0]):
        return False
    if np.unique(idx).size != idx.size or np.any(state[idx] == 0):
        return False
    state[idx] = 0
    return True


def np_hv_clock_scan(state: np.ndarray, owner_vm: np.ndarray, owner_gpfn: np.ndarray,
                     accessed: list[np.ndarray], hand: int, want: int) -> tuple[np.ndarray, int]:
    """Second chance without a loop: sweep 1 takes unaccessed USED frames in clock order and
    clears the accessed bytes it passes; if that is not enough, sweep 2 finds every remaining
    USED frame unaccessed (sweep 1 cleared them) and takes them in order."""
    size = state.shape[0]
    if size == 0 or want == 0:
        return np.empty(0, dtype=np.int64), hand
    h = hand % size
    order = np.concatenate((np.arange(h, size), np.arange(0, h)))
    used = order[state[order] == 1]
    acc = np.empty(used.shape[0], dtype=np.uint8)
    vms = owner_vm[used]
    for v, a in enumerate(accessed):  # gather the accessed byte of each frame's guest page
        sel = vms == v
        acc[sel] = a[owner_gpfn[used[sel]]]
    cold = np.flatnonzero(acc == 0)
    if cold.shape[0] >= want:
        last = cold[want - 1]
        victims = used[cold[:want]]
        passed = used[: last + 1]
        pos = int(np.flatnonzero(order == victims[-1])[0]) + 1
    else:
        second = np.setdiff1d(np.arange(used.shape[0]), cold, assume_unique=True)
        take = second[: want - cold.shape[0]]
        victims = np.concatenate((used[cold], used[take]))
        passed = used
        pos = (int(np.flatnonzero(order == used[take[-1]])[0]) + 1) if take.size else 0
        if take.size < want - cold.shape[0]:
            pos = 0  # two full sweeps: the hand ends where it began
    for v, a in enumerate(accessed):
        sel = owner_vm[passed] == v
        a[owner_gpfn[passed[sel]]] = 0
    state[victims] = 2
    new_hand = (h + pos) % size
    return victims, new_hand


def np_guest_clock_scan(state: np.ndarray, guest_acc: np.ndarray) -> tuple[np.ndarray, int, int]:
    """One full pass from hand 0 with room for every victim (how the case calls it)."""
    anon = state == GK.PG_ANON
    victims = np.flatnonzero(anon & (guest_acc == 0))
    guest_acc[anon] = 0
    return victims, 0, int(np.count_nonzero(anon))


# The vCPU stamp, vectorised: one formulation, shared with benchmarks/guest.py.
from benchmarks.guest import stamp_np as np_stamp  # noqa: E402


def np_vcpu_run(c: Ctx) -> tuple[int, int, int, int, int]:
    """The vCPU loop for a stream whose pages are all mapped and present: sort accesses by
    vpn (stable), number each page's writes with a segmented cumsum, then a read is corrupted
    only if no earlier write of the batch covers it and RAM does not hold the stamp of the
    page's write count before the batch."""
    ram, pt, wcount, vpns, writes = c["ram"], c["pt"], c["wcount"], c["vpns"], c["writes"]
    task = c["task"]
    g = pt[vpns]
    if np.any(g < 0) or np.any(c["ept"][g] == 0):
        raise ValueError("np_vcpu_run handles fully mapped, present streams only")
    n = vpns.shape[0]
    order = np.argsort(vpns, kind="stable")
    vs = vpns[order]
    ws = writes[order].astype(np.int64)
    cw = np.cumsum(ws)
    head = np.ones(n, dtype=bool)
    head[1:] = vs[1:] != vs[:-1]
    first = np.maximum.accumulate(np.where(head, np.arange(n), 0))
    incl = cw - (cw[first] - ws[first])  # writes to this vpn up to and including this access
    base0 = wcount[vs]
    gs = pt[vs] * GK.PAGE_WORDS
    reads_fresh = (ws == 0) & (incl == 0)
    expect = np.where(base0[reads_fresh] > 0,
                      np_stamp(task, vs[reads_fresh], base0[reads_fresh]), np.uint64(0))
    corrupted = int(np.count_nonzero(ram[gs[reads_fresh]] != expect))
    tail = np.ones(n, dtype=bool)
    tail[:-1] = vs[1:] != vs[:-1]
    total = incl[tail]
    wrote = total > 0
    pages = vs[tail][wrote]
    final = base0[tail][wrote] + total[wrote]
    ram[gs[tail][wrote]] = np_stamp(task, pages, final)
    wcount[pages] = final
    c["guest_acc"][g] = 1
    c["host_acc"][g] = 1
    return GK.EXIT_DONE, n, 0, n, corrupted


def np_lookahead(pt: np.ndarray, vpns: np.ndarray, ept: np.ndarray, cap: int) -> np.ndarray:
    g = pt[vpns]
    g = g[(g >= 0)]
    g = g[ept[g] == 0]
    _, idx = np.unique(g, return_index=True)
    return g[np.sort(idx)][:cap]


def np_first_not_in_state(runs: np.ndarray, want: int, state: np.ndarray) -> int:
    pf = np_runs_to_pfns(runs.astype(np.uint64)).astype(np.int64)
    bad = np.flatnonzero(state[pf] != want)
    return int(pf[bad[0]]) if bad.size else -1


# --------------------------------------------------------------------------------------
# cases
# --------------------------------------------------------------------------------------


@dataclass
class Case:
    """One kernel's benchmark: builders, three formulations, and what it streams."""

    name: str
    package: str
    setup: Callable[[int, np.random.Generator], Ctx]
    kernel: Callable[[Ctx], Any]
    numpy: Callable[[Ctx], Any] | None
    naive: Callable[[Ctx], Any] | None
    reset: Callable[[Ctx], None] | None = None
    #: bytes of input the kernel reads per element, when it streams (else None)
    stream_bytes: float | None = None
    #: peak bytes per frame the case allocates (inputs, outputs, numpy temporaries)
    mem_per_frame: float = 16.0
    #: turn each formulation's result into something comparable with ==
    canon: Callable[[Any], Any] = lambda r: r
    note: str = ""
    naive_max_log2: int = 16
    #: the naive input (lists) is built from the ctx; kept apart so it is never timed
    naive_ctx: Callable[[Ctx], Ctx] | None = field(default=None)
    #: largest size worth timing, with the reason printed in the row beyond it (random
    #: access: the cost per element is flat once the inputs leave the last-level cache)
    max_log2: int | None = None
    skip_reason: str = ""


def _runs_list(r: np.ndarray) -> list[tuple[int, int]]:
    return [(int(a), int(b)) for a, b in np.asarray(r).tolist()]


def _check_ok(r: Any) -> bool:
    if isinstance(r, P.BatchCheck):
        return r.ok
    if isinstance(r, tuple):
        return r[0] == 0
    return bool(r)


def _c_count_set(n: int, rng: np.random.Generator) -> Ctx:
    s = run_pattern(n, rng)
    return {"state": s, "elems": n}


#: Mean run length of the "[long]" cases: balloon batches are runs of buddy blocks (an
#: order-10 block is 1024 pages), so the run kernels see long runs in the real path.
LONG_RUN = 4096


def _c_runs(n: int, rng: np.random.Generator, mean_len: int = 16) -> Ctx:
    s = run_pattern(n, rng, mean_len)
    runs = P.runs_of_set(s)
    return {"state": s, "runs": runs, "elems": P.runs_total(runs), "n": n}


def _c_pfns_sorted(n: int, rng: np.random.Generator) -> Ctx:
    pfns = np.flatnonzero(run_pattern(2 * n, rng)).astype(np.uint32)
    return {"pfns": pfns, "elems": pfns.shape[0]}


def _c_check_pfns(n: int, rng: np.random.Generator) -> Ctx:
    return {"pfns": rng.permutation(n).astype(np.uint32), "state": np.zeros(n, np.uint8),
            "scratch": np.zeros(n, np.uint8), "n": n, "elems": n}


def _c_check_runs(n: int, rng: np.random.Generator, mean_len: int = 16) -> Ctx:
    c = _c_runs(n, rng, mean_len)
    c["state"] = np.zeros(n, np.uint8)
    c["scratch"] = np.zeros(n, np.uint8)
    return c


def _c_set_runs(n: int, rng: np.random.Generator) -> Ctx:
    c = _c_runs(n, rng)
    c["state"] = np.zeros(n, np.uint8)
    return c


def _c_map(n: int, rng: np.random.Generator) -> Ctx:
    s = rng.integers(0, 3, size=n, dtype=np.uint8)
    return {"state": s, "elems": n}


def _c_map_alloc(n: int, rng: np.random.Generator) -> Ctx:
    s0 = (rng.random(n) < 0.5).astype(np.uint8)
    return {"state0": s0, "state": s0.copy(), "want": n // 4, "elems": n}


def _c_map_free(n: int, rng: np.random.Generator) -> Ctx:
    idx = rng.choice(n, size=n // 2, replace=False).astype(np.int64)
    return {"state": np.ones(n, np.uint8), "idx": idx, "elems": idx.shape[0]}


def _c_hv_clock(n: int, rng: np.random.Generator) -> Ctx:
    acc0 = (rng.random(n) < 0.5).astype(np.uint8)
    acc = acc0.copy()
    return {"state": np.ones(n, np.uint8), "owner_vm": np.zeros(n, np.int32),
            "owner_gpfn": rng.permutation(n).astype(np.int64), "acc0": acc0, "acc": acc,
            "acc_list": HK.make_accessed_list([acc]), "want": n // 4, "elems": n}


def _c_guest_clock(n: int, rng: np.random.Generator) -> Ctx:
    state = np.where(rng.random(n) < 0.8, GK.PG_ANON, GK.PG_FREE).astype(np.uint8)
    acc0 = (rng.random(n) < 0.5).astype(np.uint8)
    return {"state": state, "acc0": acc0, "acc": acc0.copy(), "out": np.empty(n, np.int64),
            "elems": n}


#: vCPU loop: guest RAM of this many pages (64 MiB) whatever the stream length, so the size
#: axis is the number of accesses and RAM stays in the same cache regime.
VCPU_PAGES = 16384


def _c_vcpu(n: int, rng: np.random.Generator) -> Ctx:
    pages = min(VCPU_PAGES, max(n, 1))
    return {"ram": np.zeros(pages * GK.PAGE_WORDS, np.uint64),
            "pt": rng.permutation(pages).astype(np.int64),
            "wcount": np.zeros(pages, np.int64),
            "vpns": rng.integers(0, pages, size=n, dtype=np.int64),
            "writes": (rng.random(n) < 0.3).view(np.uint8),
            "ept": np.ones(pages, np.uint8), "host_acc": np.zeros(pages, np.uint8),
            "guest_acc": np.zeros(pages, np.uint8), "needs_zero": np.zeros(pages, np.uint8),
            "task": 7, "elems": n}


def _r_vcpu(c: Ctx) -> None:
    c["ram"][:] = 0
    c["wcount"][:] = 0


def _c_vcpu_quanta(n: int, rng: np.random.Generator) -> Ctx:
    c = _c_vcpu(n, rng)
    # the memory manager's bookkeeping needs only its stats and cost model
    c["acct"] = type("Acct", (), {})()
    c["acct"].stats, c["acct"].cost = VmStats(), DEFAULT_COST
    c["task_mem"] = TaskMem(7, 1)
    return c


def _vcpu_quanta(c: Ctx, modelled: bool) -> tuple[int, int, int, int, int]:
    """The stream in the guest kernel's quanta, as MemoryManager.run_quantum runs it; with
    ``modelled``, its modelled-time bookkeeping after each quantum (count, then multiply)."""
    n = c["vpns"].shape[0]
    t, acct = c["task_mem"], c["acct"]
    i = ops_all = bad_all = 0
    code = arg = 0
    while i < n:
        code, i, arg, ops, bad = GK.vcpu_run(
            c["ram"], c["pt"], c["wcount"], c["vpns"], c["writes"], i, min(n, i + QUANTUM),
            c["ept"], c["host_acc"], c["guest_acc"], c["needs_zero"], c["task"])
        ops_all += ops
        bad_all += bad
        if modelled:
            t.accesses += ops
            MemoryManager.charge(acct, t, acct.cost.accesses(ops))
    return int(code), int(i), int(arg), int(ops_all), int(bad_all)


def _c_lookahead(n: int, rng: np.random.Generator) -> Ctx:
    return {"pt": rng.permutation(n).astype(np.int64),
            "vpns": rng.integers(0, n, size=n, dtype=np.int64),
            "ept": (rng.random(n) < 0.5).astype(np.uint8), "mark": np.zeros(n, np.uint8),
            "out": np.empty(n, np.int64), "elems": n}


def _c_first_not(n: int, rng: np.random.Generator, mean_len: int = 16) -> Ctx:
    c = _c_runs(n, rng, mean_len)
    c["runs"] = c["runs"].astype(np.int64)
    c["state"] = np.full(n, GK.PG_ANON, np.uint8)
    return c


def _c_buddy(n: int, rng: np.random.Generator) -> Ctx:
    return {"b": BuddyAllocator(n), "n": n, "elems": n}


def _r_buddy(c: Ctx) -> None:
    GK.buddy_init(c["n"], *c["b"]._arrays())


def _c_buddy_used(n: int, rng: np.random.Generator) -> Ctx:
    """A buddy allocator with every page allocated; the runs to free are the whole space in
    random-length runs (what a balloon deflate hands back)."""
    c = _c_buddy(n, rng)
    c["runs"] = _split_random(n, rng)
    _r_buddy_used(c)
    return c


def _split_random(n: int, rng: np.random.Generator) -> np.ndarray:
    lens = rng.geometric(1 / 64, size=n // 16 + 16)
    ends = np.cumsum(lens)
    ends = ends[ends < n]
    starts = np.concatenate(([0], ends))
    stops = np.concatenate((ends, [n]))
    return np.stack((starts, stops - starts), axis=1).astype(np.int64)


def _r_buddy_used(c: Ctx) -> None:
    _r_buddy(c)
    b = c["b"]
    out = np.empty((c["n"] + GK.NR_ORDERS * 2, 2), np.int64)
    GK.alloc_many(c["n"], GK.MAX_ORDER, np.uint8(GK.PG_ANON), out, *b._arrays())


def _c_buddy_frag(n: int, rng: np.random.Generator) -> Ctx:
    c = _c_buddy(n, rng)
    _r_buddy_frag(c)
    return c


def _r_buddy_frag(c: Ctx) -> None:
    """Every page allocated, then every other page freed: n/2 free order-0 blocks."""
    _r_buddy_used(c)
    GK.free_pages(np.arange(0, c["n"], 2, dtype=np.int64), c["n"], *c["b"]._arrays())


def _k_set_runs(c: Ctx) -> np.ndarray:
    P.set_runs(c["state"], c["runs"], 1)
    return c["state"]


def _np_set_runs(c: Ctx) -> np.ndarray:
    c["state"][np_runs_mask(c["n"], c["runs"])] = 1
    return c["state"]


def _k_map_free(c: Ctx) -> bool:
    HK.map_free(c["state"], c["idx"])
    return True


def _r_hv_clock(c: Ctx) -> None:
    c["state"].fill(1)
    np.copyto(c["acc"], c["acc0"])


def _vcpu_quanta_kernel(on: bool) -> Callable[[Ctx], Any]:
    """The quanta kernel with the modelled-time bookkeeping ``on`` or off."""
    return lambda c: _vcpu_quanta(c, on)


def _k_buddy_init(c: Ctx) -> int:
    _r_buddy(c)
    return int(c["b"].cnt[0])


def _naive_buddy_all_used(n: int) -> Any:
    nb = NAIVE_GUEST.NaiveBuddy(n)
    nb.alloc_many(n, GK.MAX_ORDER, GK.PG_ANON)
    return nb


def _cases() -> list[Case]:
    cases = [
        Case("pfn.count_set", "protocol", _c_count_set,
             kernel=lambda c: P.count_set(c["state"]),
             numpy=lambda c: int(np.count_nonzero(c["state"])),
             naive=lambda c: sum(1 for v in c["l_state"] if v),
             naive_ctx=lambda c: {"l_state": c["state"].tolist()},
             stream_bytes=1, mem_per_frame=2),
        Case("pfn.runs_of_set", "protocol", _c_count_set,
             kernel=lambda c: P.runs_of_set(c["state"]),
             numpy=lambda c: np_runs_of_set(c["state"]),
             naive=lambda c: NAIVE_PFN.runs_of_set(c["l_state"]),
             naive_ctx=lambda c: {"l_state": c["state"].tolist()},
             canon=_runs_list, stream_bytes=1, mem_per_frame=24),
        Case("pfn.pfns_to_runs", "protocol", _c_pfns_sorted,
             kernel=lambda c: P.pfns_to_runs(c["pfns"]),
             numpy=lambda c: np_pfns_to_runs(c["pfns"]),
             naive=lambda c: NAIVE_PFN.pfns_to_runs(c["l_pfns"]),
             naive_ctx=lambda c: {"l_pfns": c["pfns"].tolist()},
             canon=_runs_list, stream_bytes=4, mem_per_frame=40),
        Case("pfn.runs_to_pfns", "protocol", _c_runs,
             kernel=lambda c: P.runs_to_pfns(c["runs"]),
             numpy=lambda c: np_runs_to_pfns(c["runs"]),
             naive=lambda c: NAIVE_PFN.runs_to_pfns(c["l_runs"]),
             naive_ctx=lambda c: {"l_runs": _runs_list(c["runs"])},
             canon=lambda r: list(map(int, r)), stream_bytes=4, mem_per_frame=28,
             note="streams its output: 4 bytes written per page"),
        Case("pfn.check_pfns", "protocol", _c_check_pfns,
             kernel=lambda c: P.check_pfns(c["pfns"], c["n"], c["state"], c["scratch"],
                                           want_clear=False),
             numpy=lambda c: np_check_pfns(c["pfns"], c["n"], c["state"], False),
             naive=lambda c: NAIVE_PFN.check_pfns(
                 c["l_pfns"], c["n"], c["l_state"], False),
             naive_ctx=lambda c: {"l_pfns": c["pfns"].tolist(), "l_state": c["state"].tolist(),
                                  "n": c["n"]},
             canon=_check_ok, mem_per_frame=24, max_log2=RANDOM_MAX_LOG2,
             skip_reason=RANDOM_SKIP,
             note="random access: a shuffled batch over a scratch bitmap"),
        Case("pfn.check_runs", "protocol", _c_check_runs,
             kernel=lambda c: P.check_runs(c["runs"], c["n"], c["state"], c["scratch"],
                                           want_clear=False),
             numpy=lambda c: np_check_pfns(np_runs_to_pfns(c["runs"]), c["n"], c["state"],
                                           False),
             naive=lambda c: NAIVE_PFN.check_runs(
                 c["l_runs"], c["n"], c["l_state"], False),
             naive_ctx=lambda c: {"l_runs": _runs_list(c["runs"]),
                                  "l_state": c["state"].tolist(), "n": c["n"]},
             canon=_check_ok, stream_bytes=2, mem_per_frame=24,
             note="reads state and scratch per page"),
        Case("pfn.set_runs", "protocol", _c_set_runs,
             kernel=_k_set_runs, numpy=_np_set_runs,
             naive=lambda c: NAIVE_PFN.set_runs(
                 c["l_state"], c["l_runs"], 1),
             naive_ctx=lambda c: {"l_runs": _runs_list(c["runs"]),
                                  "l_state": c["state"].tolist()},
             reset=lambda c: c["state"].fill(0),
             canon=lambda r: bytes(np.asarray(r, dtype=np.uint8)), stream_bytes=1,
             mem_per_frame=12, note="streams its output: 1 byte written per page"),
        Case("hv.map_count", "hypervisor", _c_map,
             kernel=lambda c: HK.map_count(c["state"], 1),
             numpy=lambda c: int(np.count_nonzero(c["state"] == 1)),
             naive=lambda c: NAIVE_HV.map_count(c["l_state"], 1),
             naive_ctx=lambda c: {"l_state": c["state"].tolist()},
             stream_bytes=1, mem_per_frame=3),
        Case("hv.map_alloc", "hypervisor", _c_map_alloc,
             kernel=lambda c: HK.map_alloc(c["state"], c["want"], 0, 1), canon=_alloc_canon,
             numpy=lambda c: np_map_alloc(c["state"], c["want"], 0, 1),
             naive=lambda c: NAIVE_HV.map_alloc(
                 c["l_state"], c["want"], 0, 1),
             naive_ctx=lambda c: {"l_state": c["state0"].tolist(), "want": c["want"]},
             reset=lambda c: np.copyto(c["state"], c["state0"]),
             stream_bytes=1, mem_per_frame=40,
             note="first fit of n/4 frames in a half-used map: scans about half of it"),
        Case("hv.map_free", "hypervisor", _c_map_free,
             kernel=_k_map_free,
             numpy=lambda c: np_map_free(c["state"], c["idx"]),
             naive=lambda c: NAIVE_HV.map_free(
                 c["l_state"], c["l_idx"]),
             naive_ctx=lambda c: {"l_state": [1] * c["state"].shape[0],
                                  "l_idx": c["idx"].tolist()},
             reset=lambda c: c["state"].fill(1), mem_per_frame=40,
             max_log2=RANDOM_MAX_LOG2, skip_reason=RANDOM_SKIP,
             note="n/2 random frames: random access"),
        Case("hv.clock_scan", "hypervisor", _c_hv_clock,
             kernel=lambda c: HK.clock_scan(
                 c["state"], c["owner_vm"], c["owner_gpfn"], c["acc_list"], 0, c["want"]),
             canon=_alloc_canon,
             numpy=lambda c: np_hv_clock_scan(c["state"], c["owner_vm"], c["owner_gpfn"],
                                              [c["acc"]], 0, c["want"]),
             naive=lambda c: NAIVE_HV.clock_scan(
                 c["l_state"], c["l_vm"], c["l_gpfn"], [c["l_acc"]], 0, c["want"]),
             naive_ctx=lambda c: {"l_state": [1] * c["state"].shape[0],
                                  "l_vm": c["owner_vm"].tolist(),
                                  "l_gpfn": c["owner_gpfn"].tolist(),
                                  "l_acc": c["acc0"].tolist(), "want": c["want"]},
             reset=_r_hv_clock,
             mem_per_frame=64,
             note="reverse map leads to a shuffled accessed array: random access"),
        Case("guest.clock_scan", "guest", _c_guest_clock,
             kernel=lambda c: _gclock_victims(c, GK.clock_scan(
                 c["state"], c["acc"], 0, c["state"].shape[0], c["state"].shape[0],
                 c["out"])),
             canon=_gclock_canon,
             numpy=lambda c: np_guest_clock_scan(c["state"], c["acc"]),
             naive=lambda c: NAIVE_GUEST.naive_clock_scan(
                 c["l_state"], c["l_acc"], 0, len(c["l_state"]), len(c["l_state"])),
             naive_ctx=lambda c: {"l_state": c["state"].tolist(), "l_acc": c["acc0"].tolist()},
             reset=lambda c: np.copyto(c["acc"], c["acc0"]),
             stream_bytes=2, mem_per_frame=40),
        Case("guest.vcpu_run", "guest", _c_vcpu,
             kernel=lambda c: tuple(int(x) for x in GK.vcpu_run(
                 c["ram"], c["pt"], c["wcount"], c["vpns"], c["writes"], 0,
                 c["vpns"].shape[0], c["ept"], c["host_acc"], c["guest_acc"],
                 c["needs_zero"], c["task"])),
             numpy=np_vcpu_run,
             naive=lambda c: NAIVE_GUEST.naive_vcpu_run(
                 c["l_ram"], c["l_pt"], c["l_wcount"], c["l_vpns"], c["l_writes"], 0,
                 len(c["l_vpns"]), c["l_ept"], c["l_hacc"], c["l_gacc"], c["l_nz"], c["task"]),
             naive_ctx=_vcpu_naive_ctx, reset=_r_vcpu, mem_per_frame=48,
             note=f"elements are memory accesses (30 % writes) over {VCPU_PAGES} pages"),
        *(Case(f"guest.vcpu_run[quanta{'+modelled' if on else ''}]", "guest", _c_vcpu_quanta,
               kernel=_vcpu_quanta_kernel(on),
               numpy=np_vcpu_run,
               naive=lambda c: NAIVE_GUEST.naive_vcpu_run(
                   c["l_ram"], c["l_pt"], c["l_wcount"], c["l_vpns"], c["l_writes"], 0,
                   len(c["l_vpns"]), c["l_ept"], c["l_hacc"], c["l_gacc"], c["l_nz"],
                   c["task"]),
               naive_ctx=_vcpu_naive_ctx, reset=_r_vcpu, mem_per_frame=48,
               note=f"as guest.vcpu_run, in quanta of {QUANTUM} accesses"
                    + (", with the modelled-time bookkeeping after each" if on else ""))
          for on in (False, True)),
        Case("guest.lookahead_not_present", "guest", _c_lookahead,
             kernel=lambda c: c["out"][:GK.lookahead_not_present(
                 c["pt"], c["vpns"], 0, c["vpns"].shape[0], c["ept"], c["mark"],
                 c["out"])],
             canon=lambda r: list(map(int, r)),
             numpy=lambda c: np_lookahead(c["pt"], c["vpns"], c["ept"], c["out"].shape[0]),
             naive=lambda c: _naive_lookahead(c["l_pt"], c["l_vpns"], c["l_ept"],
                                              len(c["l_vpns"])),
             naive_ctx=lambda c: {"l_pt": c["pt"].tolist(), "l_vpns": c["vpns"].tolist(),
                                  "l_ept": c["ept"].tolist()},
             mem_per_frame=64, note="random access through a shuffled page table"),
        Case("guest.first_not_in_state", "guest", _c_first_not,
             kernel=lambda c: int(GK.first_not_in_state(c["runs"], np.uint8(GK.PG_ANON),
                                                        c["state"])),
             numpy=lambda c: np_first_not_in_state(c["runs"], GK.PG_ANON, c["state"]),
             naive=lambda c: _naive_first_not_in_state(c["l_runs"], GK.PG_ANON,
                                                       c["l_state"]),
             naive_ctx=lambda c: {"l_runs": _runs_list(c["runs"]),
                                  "l_state": c["state"].tolist()},
             stream_bytes=1, mem_per_frame=24),
        Case("guest.buddy_init", "guest", _c_buddy,
             kernel=_k_buddy_init,
             numpy=None,
             naive=lambda c: NAIVE_GUEST.NaiveBuddy(c["n"]).free_pages(),
             naive_ctx=lambda c: {"n": c["n"]}, mem_per_frame=24,
             note="numpy: none (intrusive free lists)"),
        Case("guest.alloc_many[order0]", "guest", _c_buddy,
             kernel=lambda c: c["b"].alloc_many(c["n"] // 2, 0, GK.PG_BALLOON), canon=_runs_list,
             numpy=None,
             naive=lambda c: NAIVE_GUEST.NaiveBuddy(c["n"]).alloc_many(
                 c["n"] // 2, 0, GK.PG_BALLOON),
             naive_ctx=lambda c: {"n": c["n"]}, reset=_r_buddy, mem_per_frame=60,
             note="n/2 single pages (virtio-style balloon fill); numpy: none. Naive time "
                  "includes building its allocator"),
        Case("guest.alloc_many[order10]", "guest", _c_buddy,
             kernel=lambda c: c["b"].alloc_many(c["n"] // 2, GK.MAX_ORDER, GK.PG_BALLOON),
             canon=_runs_list,
             numpy=None,
             naive=lambda c: NAIVE_GUEST.NaiveBuddy(c["n"]).alloc_many(
                 c["n"] // 2, GK.MAX_ORDER, GK.PG_BALLOON),
             naive_ctx=lambda c: {"n": c["n"]}, reset=_r_buddy, mem_per_frame=60,
             note="n/2 pages, highest orders first (RANGES balloon fill); numpy: none. "
                  "Naive time includes building its allocator"),
        Case("guest.free_runs", "guest", _c_buddy_used,
             kernel=lambda c: (GK.free_runs(c["runs"], False, False, c["n"],
                                            *c["b"]._arrays()), int(c["b"].cnt[0]))[1],
             numpy=None,
             naive=lambda c: _naive_free_runs(c),
             naive_ctx=lambda c: {"runs": _runs_list(c["runs"]), "n": c["n"]},
             reset=_r_buddy_used, mem_per_frame=40,
             note="free the whole space in runs of ~64 pages (balloon deflate); numpy: none. "
                  "Naive time includes building its allocator"),
        Case("guest.isolate_free", "guest", _c_buddy_frag,
             kernel=lambda c: c["b"].isolate_free(0, c["n"]), canon=_runs_list,
             numpy=None,
             naive=lambda c: _naive_isolate(c),
             naive_ctx=lambda c: {"n": c["n"]}, reset=_r_buddy_frag, mem_per_frame=60,
             note="n/2 free order-0 blocks (fragmented guest); numpy: none. "
                  "Naive time includes building its allocator"),
    ]
    return cases


def _naive_free_runs(c: Ctx) -> int:
    nb = _naive_buddy_all_used(c["n"])
    for first, count in c["runs"]:
        nb.free_range(first, count)
    return nb.free_pages()


def _naive_isolate(c: Ctx) -> list[tuple[int, int]]:
    nb = _naive_buddy_all_used(c["n"])
    for g in range(0, c["n"], 2):
        nb.free_block(g, 0)
    return nb.isolate_free(0, c["n"])


# Results are turned into comparable Python values (``canon``) only when formulations are
# cross-checked, never inside a timed call: converting millions of numbers to Python objects
# costs far more than the kernels and used to dominate e.g. ``isolate_free`` and the clock
# scans.


def _alloc_canon(r: tuple[Any, int]) -> tuple[list[int], int]:
    return [int(x) for x in r[0]], int(r[1])


def _gclock_victims(c: Ctx, r: tuple[int, int, int]) -> tuple[np.ndarray, int, int]:
    n, hand, scanned = r
    return c["out"][:n], hand, scanned


def _gclock_canon(r: tuple[Any, int, int]) -> tuple[list[int], int, int]:
    return [int(x) for x in r[0]], int(r[1]), int(r[2])


def _vcpu_naive_ctx(c: Ctx) -> Ctx:
    pages = c["pt"].shape[0]
    return {"l_ram": [[0] * GK.PAGE_WORDS for _ in range(pages)], "l_pt": c["pt"].tolist(),
            "l_wcount": [0] * pages, "l_vpns": c["vpns"].tolist(),
            "l_writes": c["writes"].tolist(), "l_ept": [1] * pages, "l_hacc": [0] * pages,
            "l_gacc": [0] * pages, "l_nz": [0] * pages, "task": c["task"]}


def _with_long_runs(cases: list[Case], names: tuple[str, ...]) -> list[Case]:
    """Each case of ``names`` followed by a ``[long]`` twin: the same kernel on runs of mean
    length ``LONG_RUN`` (its ``setup`` must take ``mean_len``)."""
    out = []
    for c in cases:
        out.append(c)
        if c.name in names:
            def setup(n: int, rng: np.random.Generator, base: Any = c.setup) -> Ctx:
                return base(n, rng, LONG_RUN)
            out.append(replace(c, name=f"{c.name}[long]", setup=setup))
    return out


CASES: list[Case] = _with_long_runs(_cases(), ("pfn.check_runs", "guest.first_not_in_state"))


def case_names() -> list[str]:
    return [c.name for c in CASES]


# --------------------------------------------------------------------------------------
# running
# --------------------------------------------------------------------------------------


class CrossCheckError(AssertionError):
    """Two formulations of one kernel disagree: the benchmark refuses to time it."""


def _naive_available(case: Case) -> bool:
    mods = {"protocol": NAIVE_PFN, "hypervisor": NAIVE_HV, "guest": NAIVE_GUEST}
    return case.naive is not None and (mods[case.package] is not None or case.name in (
        "guest.lookahead_not_present", "guest.first_not_in_state"))


def cross_check(case: Case, log2: int = CHECK_LOG2, seed: int = 1) -> None:
    """Run every formulation once on the same small input and insist they agree."""
    n = 1 << log2
    results = {}
    for label in ("kernel", "numpy", "naive"):
        fn = getattr(case, label)
        if fn is None or (label == "naive" and not _naive_available(case)):
            continue
        ctx = case.setup(n, np.random.default_rng(seed))
        if label == "naive" and case.naive_ctx is not None:
            ctx = {**ctx, **case.naive_ctx(ctx)}
        results[label] = case.canon(fn(ctx))
    ref = results["kernel"]
    for label, r in results.items():
        if r != ref:
            raise CrossCheckError(f"{case.name}: the {label} formulation disagrees with the "
                                  f"kernel at n=2^{log2}")


@dataclass
class Measure:
    """Timings of one formulation at one size (seconds per call)."""

    min: float
    median: float
    max: float
    repeats: int
    inner: int  # calls per timed sample

    def as_dict(self) -> dict[str, float | int]:
        return {"min": self.min, "median": self.median, "max": self.max,
                "repeats": self.repeats, "inner": self.inner}


def _time(fn: Callable[[Ctx], Any], ctx: Ctx, reset: Callable[[Ctx], None] | None,
          repeats: int) -> Measure:
    if reset:
        reset(ctx)
    fn(ctx)  # warm-up: JIT compile / load from cache, fault inputs in
    inner = 1
    if reset is None:
        # Calibrate: loop small sizes so one sample lasts at least MIN_SAMPLE_S.
        t0 = time.perf_counter()
        fn(ctx)
        one = time.perf_counter() - t0
        inner = max(1, min(10_000, int(MIN_SAMPLE_S / max(one, 1e-9))))
    samples = []
    for _ in range(repeats):
        if reset:
            reset(ctx)
        t0 = time.perf_counter()
        for _ in range(inner):
            fn(ctx)
        samples.append((time.perf_counter() - t0) / inner)
    return Measure(min(samples), statistics.median(samples), max(samples), repeats, inner)


def sizes(min_log2: int, max_log2: int, step: int) -> list[int]:
    if not 1 <= min_log2 <= max_log2 <= 30:
        raise ValueError(f"need 1 <= min_log2 ({min_log2}) <= max_log2 ({max_log2}) <= 30")
    if step < 1:
        raise ValueError(f"step must be at least 1, got {step}")
    out = list(range(min_log2, max_log2 + 1, step))
    if out[-1] != max_log2:
        out.append(max_log2)
    return out


def run_kernels(*, min_log2: int = 16, max_log2: int = 28, step: int = 2, repeats: int = 5,
                naive_max_log2: int = 16, mem_budget: int = 3 << 30,
                only: Iterable[str] | None = None, seed: int = 1,
                progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run the kernel benchmark; returns the JSON-ready result (see docs/results.md)."""
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    logs = sizes(min_log2, max_log2, step)
    chosen = CASES
    if only:
        wanted = list(only)
        unknown = sorted(set(wanted) - set(case_names()))
        if unknown:
            raise ValueError(f"unknown kernel(s) {', '.join(unknown)}; choose from "
                             f"{', '.join(case_names())}")
        chosen = [c for c in CASES if c.name in wanted]
    read_bytes = min(256 << 20, max(8 << 20, (1 << max_log2) * 8))
    rb = references.read_bandwidth(read_bytes, max(repeats, 3))
    read_gib_s = rb.gib_s
    out_cases = []
    total_steps = len(chosen) * len(logs)
    step_no = 0
    for case in chosen:
        if progress:
            progress(f"[{step_no}/{total_steps}] {case.name}: cross-check")
        cross_check(case, min(CHECK_LOG2, min_log2), seed)
        rows = []
        for lg in logs:
            step_no += 1
            n = 1 << lg
            if case.max_log2 is not None and lg > case.max_log2:
                rows.append({"log2": lg, "n": n, "skipped": case.skip_reason})
                if progress:
                    progress(f"[{step_no}/{total_steps}] {case.name}: 2^{lg} skipped "
                             f"({case.skip_reason})")
                continue
            if n * case.mem_per_frame > mem_budget:
                rows.append({"log2": lg, "n": n, "skipped": "memory budget"})
                if progress:
                    progress(f"[{step_no}/{total_steps}] {case.name}: 2^{lg} skipped "
                             f"(memory budget)")
                continue
            if progress:
                progress(f"[{step_no}/{total_steps}] {case.name}: 2^{lg}")
            reps = repeats if lg <= LARGE_LOG2 else max(1, min(repeats, LARGE_REPEATS))
            ctx = case.setup(n, np.random.default_rng(seed))
            elems = int(ctx["elems"])
            row: dict[str, Any] = {"log2": lg, "n": n, "elems": elems}
            km = _time(case.kernel, ctx, case.reset, reps)
            row["kernel"] = km.as_dict()
            row["kernel_ns_per_elem"] = km.median / max(elems, 1) * 1e9
            if case.numpy is not None:
                ctx2 = case.setup(n, np.random.default_rng(seed))
                nm = _time(case.numpy, ctx2, case.reset, reps)
                del ctx2
                row["numpy"] = nm.as_dict()
                row["numpy_ns_per_elem"] = nm.median / max(elems, 1) * 1e9
                row["ratio_kernel_vs_numpy"] = nm.median / km.median
            if case.stream_bytes:
                bw = case.stream_bytes * elems / km.median / GIB
                row["kernel_gib_s"] = bw
                row["ratio_bandwidth_vs_read"] = bw / read_gib_s
            if lg <= naive_max_log2 and _naive_available(case):
                nctx = {**ctx, **(case.naive_ctx(ctx) if case.naive_ctx else {})}
                # the naive twin mutates its lists: rebuild them for every call
                nreset = None
                if case.reset is not None or case.naive_ctx is not None:
                    def nreset(c: Ctx, _case: Case = case, _ctx: Ctx = ctx) -> None:
                        if _case.naive_ctx is not None:
                            c.update(_case.naive_ctx(_ctx))
                nv = _time(case.naive, nctx, nreset, max(1, min(repeats, 3)))  # type: ignore[arg-type]
                row["naive"] = nv.as_dict()
                row["naive_ns_per_elem"] = nv.median / max(elems, 1) * 1e9
            del ctx
            rows.append(row)
        _add_naive_ratio(rows)
        out_cases.append({"name": case.name, "package": case.package,
                          "streaming": case.stream_bytes is not None,
                          "stream_bytes_per_elem": case.stream_bytes,
                          "has_numpy": case.numpy is not None, "note": case.note,
                          "sizes": rows})
    return {"benchmark": "kernels", "read_bandwidth": rb.as_dict(),
            "read_gib_s": read_gib_s, "repeats": repeats, "sizes_log2": logs,
            "naive_max_log2": naive_max_log2, "cases": out_cases,
            "summary": summarise(out_cases)}


def _add_naive_ratio(rows: list[dict[str, Any]]) -> None:
    """Naive is timed at small sizes only: extrapolate its per-element cost (the largest
    size it ran at) to every size, and mark the ratio as extrapolated where it is."""
    timed = [r for r in rows if "naive_ns_per_elem" in r]
    if not timed:
        return
    per = timed[-1]["naive_ns_per_elem"]
    for r in rows:
        if "kernel_ns_per_elem" not in r:
            continue
        r["ratio_kernel_vs_naive"] = (r.get("naive_ns_per_elem", per)
                                      / r["kernel_ns_per_elem"])
        r["naive_extrapolated"] = "naive_ns_per_elem" not in r


def summarise(cases: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per kernel at the largest size it ran: the ratios the issue asks for."""
    out = []
    for c in cases:
        ran = [r for r in c["sizes"] if "kernel" in r]
        if not ran:
            out.append({"name": c["name"], "log2": None})
            continue
        r = ran[-1]
        out.append({
            "name": c["name"], "log2": r["log2"], "streaming": c["streaming"],
            "kernel_ns_per_elem": r["kernel_ns_per_elem"],
            "numpy_ns_per_elem": r.get("numpy_ns_per_elem"),
            "ratio_kernel_vs_numpy": r.get("ratio_kernel_vs_numpy"),
            "ratio_kernel_vs_naive": r.get("ratio_kernel_vs_naive"),
            "kernel_gib_s": r.get("kernel_gib_s"),
            "ratio_bandwidth_vs_read": r.get("ratio_bandwidth_vs_read"),
            "meets_bandwidth_target": (None if r.get("ratio_bandwidth_vs_read") is None
                                       else r["ratio_bandwidth_vs_read"] >= 0.5),
            "meets_naive_target": (None if r.get("ratio_kernel_vs_naive") is None
                                   else r["ratio_kernel_vs_naive"] >= 50),
        })
    return out
