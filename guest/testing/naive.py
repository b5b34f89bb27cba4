"""Plain-Python twins of the Numba kernels in guest/kernels.py.

They follow the same rules (list order included) with Python lists and dicts, so the
kernels can be compared result for result.  Slow and obvious on purpose.
"""

from __future__ import annotations

from guest.kernels import (
    EXIT_DONE,
    EXIT_EPT,
    EXIT_GUEST_FAULT,
    FILE_STAMP_TASK,
    MAX_ORDER,
    PG_ANON,
    PG_CACHE,
    PG_FREE,
    PG_ISOLATED,
    PG_REPORTED,
)

MASK64 = (1 << 64) - 1


class NaiveBuddy:
    """Buddy allocator with one Python list per order (index 0 is the list head)."""

    def __init__(self, npages: int) -> None:
        self.npages = npages
        self.state = [PG_FREE] * npages
        self.lists: list[list[int]] = [[] for _ in range(MAX_ORDER + 1)]
        self.order_of: dict[int, int] = {}  # free block head -> order
        g = 0
        while g < npages:
            o = MAX_ORDER
            while o > 0 and (g % (1 << o) or g + (1 << o) > npages):
                o -= 1
            self._add(g, o, tail=True)
            g += 1 << o

    # list helpers
    def _add(self, g: int, o: int, tail: bool) -> None:
        self.order_of[g] = o
        if tail:
            self.lists[o].append(g)
        else:
            self.lists[o].insert(0, g)

    def _del(self, g: int) -> None:
        o = self.order_of.pop(g)
        self.lists[o].remove(g)

    # counts
    def free_pages(self) -> int:
        return sum(1 for s in self.state if s in (PG_FREE, PG_REPORTED))

    def reported_pages(self) -> int:
        return sum(1 for s in self.state if s == PG_REPORTED)

    def isolated_pages(self) -> int:
        return sum(1 for s in self.state if s == PG_ISOLATED)

    # operations
    def alloc_block(self, o: int, new_state: int) -> int:
        k = next((k for k in range(o, MAX_ORDER + 1) if self.lists[k]), None)
        if k is None:
            return -1
        g = self.lists[k][0]
        self._del(g)
        rep = self.state[g] == PG_REPORTED
        while k > o:
            k -= 1
            self._add(g + (1 << k), k, tail=rep)
        for p in range(g, g + (1 << o)):
            self.state[p] = new_state
        return g

    def free_block(self, g: int, o: int, putback_reported: bool = False) -> None:
        size = 1 << o
        for p in range(g, g + size):
            self.state[p] = PG_FREE
        merged = False
        while o < MAX_ORDER:
            b = g ^ (1 << o)
            if b + (1 << o) > self.npages or self.order_of.get(b) != o:
                break
            if self.state[b] == PG_REPORTED:
                for p in range(b, b + (1 << o)):
                    self.state[p] = PG_FREE
            self._del(b)
            g = min(g, b)
            o += 1
            merged = True
        if putback_reported and not merged:
            for p in range(g, g + size):
                self.state[p] = PG_REPORTED
            self._add(g, o, tail=True)
        else:
            self._add(g, o, tail=False)

    def free_range(self, start: int, count: int, putback_reported: bool = False) -> None:
        g, end = start, start + count
        while g < end:
            o = MAX_ORDER
            while o > 0 and (g % (1 << o) or g + (1 << o) > end):
                o -= 1
            self.free_block(g, o, putback_reported)
            g += 1 << o

    def alloc_many(self, count: int, max_order: int, new_state: int) -> list[tuple[int, int]]:
        runs: list[list[int]] = []
        rem, o = count, max_order
        while rem > 0 and o >= 0:
            if (1 << o) > rem:
                o -= 1
                continue
            g = self.alloc_block(o, new_state)
            if g < 0:
                o -= 1
                continue
            if runs and runs[-1][0] + runs[-1][1] == g:
                runs[-1][1] += 1 << o
            else:
                runs.append([g, 1 << o])
            rem -= 1 << o
        return [(a, b) for a, b in runs]

    def isolate_free(self, min_order: int, max_runs: int) -> list[tuple[int, int]]:
        out: list[tuple[int, int]] = []
        for o in range(MAX_ORDER, min_order - 1, -1):
            for g in list(self.lists[o]):
                if len(out) >= max_runs or self.state[g] != PG_FREE:
                    break
                self._del(g)
                for p in range(g, g + (1 << o)):
                    self.state[p] = PG_ISOLATED
                out.append((g, 1 << o))
            if len(out) >= max_runs:
                break
        return out


def naive_clock_scan(state, guest_acc, hand, max_steps, max_victims):
    """Returns (victims list, new hand, scanned); mutates guest_acc like the kernel."""
    n = len(state)
    victims: list[int] = []
    scanned = steps = 0
    while steps < max_steps and len(victims) < max_victims:
        g = hand
        hand = (hand + 1) % n
        steps += 1
        if state[g] != PG_ANON:
            continue
        scanned += 1
        if guest_acc[g]:
            guest_acc[g] = 0
            continue
        victims.append(g)
    return victims, hand, scanned


def naive_stamp(task: int, vpn: int, count: int) -> int:
    golden, m1, m2 = 0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB
    x = ((task * golden) & MASK64) ^ ((vpn * m2) & MASK64) ^ ((count * m1) & MASK64)
    x = (x + golden) & MASK64
    x = ((x ^ (x >> 30)) * m1) & MASK64
    x = ((x ^ (x >> 27)) * m2) & MASK64
    x ^= x >> 31
    return x or 1


def naive_vcpu_run(ram_pages, pt, wcount, vpns, writes, start, stop, ept, host_acc,
                   guest_acc, needs_zero, task):
    """ram_pages: list of lists of 512 Python ints (one per guest page)."""
    ops = corrupted = 0
    for i in range(start, stop):
        v = vpns[i]
        g = pt[v]
        if g < 0:
            return EXIT_GUEST_FAULT, i, v, ops, corrupted
        if not ept[g]:
            return EXIT_EPT, i, g, ops, corrupted
        if needs_zero[g]:
            ram_pages[g] = [0] * 512
            needs_zero[g] = 0
        guest_acc[g] = 1
        host_acc[g] = 1
        if writes[i]:
            wcount[v] += 1
            ram_pages[g][0] = naive_stamp(task, v, wcount[v])
        else:
            expect = naive_stamp(task, v, wcount[v]) if wcount[v] else 0
            if ram_pages[g][0] != expect:
                corrupted += 1
        ops += 1
    return EXIT_DONE, stop, 0, ops, corrupted


def naive_lookahead(pt, vpns, start, stop, ept, cap):
    out: list[int] = []
    for i in range(start, stop):
        g = pt[vpns[i]]
        if g >= 0 and not ept[g] and g not in out:
            out.append(g)
            if len(out) == cap:
                break
    return out


def naive_cache_scan(state, guest_acc, dirty, cache_block, hand, max_steps, max_victims,
                     cap_dirty):
    """Returns (clean victims, dirty victims, new hand, scanned); mutates guest_acc."""
    n = len(state)
    clean: list[int] = []
    dirt: list[int] = []
    scanned = steps = 0
    while steps < max_steps and len(clean) < max_victims:
        g = hand
        hand = (hand + 1) % n
        steps += 1
        if state[g] != PG_CACHE or cache_block[g] < 0:
            continue
        scanned += 1
        if guest_acc[g]:
            guest_acc[g] = 0
        elif not dirty[g]:
            clean.append(g)
        elif len(dirt) < cap_dirty:
            dirt.append(g)
    return clean, dirt, hand, scanned


def naive_cache_run(ram_pages, bmap, bcount, dirty, clean, blocks, writes, start, stop, ept,
                    host_acc, guest_acc, needs_zero):
    """ram_pages: list of lists of 512 Python ints (one per guest page)."""
    ops = corrupted = 0
    for i in range(start, stop):
        b = blocks[i]
        g = bmap[b]
        if g < 0:
            return EXIT_GUEST_FAULT, i, b, ops, corrupted
        if not ept[g]:
            return EXIT_EPT, i, g, ops, corrupted
        if needs_zero[g]:
            ram_pages[g] = [0] * 512
            needs_zero[g] = 0
        guest_acc[g] = 1
        host_acc[g] = 1
        if writes[i]:
            bcount[b] += 1
            ram_pages[g][0] = naive_stamp(FILE_STAMP_TASK, b, bcount[b])
            dirty[g] = 1
            clean[g] = 0
        else:
            expect = naive_stamp(FILE_STAMP_TASK, b, bcount[b]) if bcount[b] else 0
            if ram_pages[g][0] != expect:
                corrupted += 1
        ops += 1
    return EXIT_DONE, stop, 0, ops, corrupted
