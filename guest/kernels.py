"""Numba kernels of the guest kernel: buddy allocator, clock reclaim scans, vCPU loops.

Everything here is array-in/array-out over guest page frame numbers (gpfns, units of
4096-byte pages).  The stateful Python wrappers live in :mod:`guest.mm`; plain-Python twins
of every kernel live in ``guest/testing/naive.py`` and are checked against these with
hypothesis.

Buddy allocator layout (all arrays indexed by gpfn unless noted):

``nxt``/``prv`` (int64)
    intrusive doubly-linked free lists; meaningful only for the head page of a free block.
``forder`` (int8)
    the order of the free block this page heads, or -1 (not a free-block head, or isolated).
``state`` (uint8)
    page state, one of the ``PG_*`` constants below, kept for *every* page.
``head``/``tail``/``nfree`` (int64[NR_ORDERS])
    per-order list ends and block counts.
``cnt`` (int64[3])
    ``[free pages on the lists, of which reported, isolated pages]``.

As in Linux's ``mm/page_reporting.c``, unreported blocks sit at the head of each free list and
reported blocks at the tail: allocation takes from the head (already-backed memory first) and
the reporting scan stops at the first reported block.  A block that merges with its buddy is no
longer reported (the host has not discarded the merged whole).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import numpy as np
from numba import njit

from protocol.constants import EPT_NOT_PRESENT, MAX_ORDER, PAGE_SIZE

PAGE_WORDS = PAGE_SIZE // 8  # RAM is viewed as uint64 words
NR_ORDERS = MAX_ORDER + 1

# Page states (uint8).
PG_FREE = 0  # on a free list, not reported
PG_KERNEL = 1  # reserved for the guest kernel itself
PG_ANON = 2  # mapped by a task
PG_CACHE = 3  # page cache: holds one disk block (guest.mm's page cache section)
PG_BALLOON = 4  # in the balloon list: handed to the host, must not be touched
PG_REPORTED = 5  # on a free list, reported to the host (host discarded it)
PG_ISOLATED = 6  # taken off the free lists while a free-page report is in flight

# cnt[] slots.
CNT_FREE = 0
CNT_REPORTED = 1
CNT_ISOLATED = 2

# vCPU loop exit codes.
EXIT_DONE = 0  # reached `stop`
EXIT_GUEST_FAULT = 1  # pt[vpn] < 0: arg = vpn
EXIT_EPT = 2  # EPT entry not present: arg = gpfn

# Options of the buddy and reclaim kernels, which never allocate.  They call each other with
# many array arguments (the free-list arrays), and with Numba's runtime on every such call
# increfs and decrefs each array: atomic operations that cost ~40 ns per call, 20-50 x the
# list operation itself (measured: list add + del 107 ns with them, 1.6 ns without).  A
# kernel compiled without the runtime (``_nrt=False``) cannot allocate, return or slice an
# array, which these do not need.
_F = TypeVar("_F", bound=Callable[..., Any])


def _noalloc(fn: _F) -> _F:
    """``@njit(cache=True)`` without Numba's runtime, for the buddy and reclaim kernels."""
    # ``_nrt`` is a private option of njit that numba's type stubs do not list.
    return njit(cache=True, _nrt=False)(fn)  # type: ignore[call-overload]

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)


# --------------------------------------------------------------------------- free lists


@_noalloc
def _list_add(g, o, to_tail, nxt, prv, forder, head, tail, nfree):
    forder[g] = o
    if to_tail:
        t = tail[o]
        prv[g] = t
        nxt[g] = -1
        if t >= 0:
            nxt[t] = g
        else:
            head[o] = g
        tail[o] = g
    else:
        h = head[o]
        nxt[g] = h
        prv[g] = -1
        if h >= 0:
            prv[h] = g
        else:
            tail[o] = g
        head[o] = g
    nfree[o] += 1


@_noalloc
def _list_del(g, nxt, prv, forder, head, tail, nfree):
    o = forder[g]
    p = prv[g]
    n = nxt[g]
    if p >= 0:
        nxt[p] = n
    else:
        head[o] = n
    if n >= 0:
        prv[n] = p
    else:
        tail[o] = p
    nxt[g] = -1
    prv[g] = -1
    forder[g] = -1
    nfree[o] -= 1


@_noalloc
def buddy_init(npages, nxt, prv, forder, state, head, tail, nfree, cnt):
    """Put every page on the free lists as the largest aligned blocks that fit."""
    nxt[:] = -1
    prv[:] = -1
    forder[:] = -1
    state[:] = PG_FREE
    head[:] = -1
    tail[:] = -1
    nfree[:] = 0
    cnt[:] = 0
    g = 0
    while g < npages:
        o = MAX_ORDER
        while o > 0 and ((g & ((1 << o) - 1)) != 0 or g + (1 << o) > npages):
            o -= 1
        _list_add(g, o, True, nxt, prv, forder, head, tail, nfree)
        g += 1 << o
    cnt[CNT_FREE] = npages


@_noalloc
def _free_block(g, o, putback_reported, npages, nxt, prv, forder, state, head, tail, nfree, cnt):
    """Free the aligned block (g, order o), merging with free buddies.

    With ``putback_reported`` the block comes back from a free-page report: it is marked
    reported unless it merged (Linux's page_reporting_drain does the same)."""
    size = 1 << o
    for k in range(g, g + size):
        state[k] = PG_FREE
    cnt[CNT_FREE] += size
    merged = False
    while o < MAX_ORDER:
        b = g ^ (1 << o)
        if b + (1 << o) > npages or forder[b] != o:
            break
        if state[b] == PG_REPORTED:
            for k in range(b, b + (1 << o)):
                state[k] = PG_FREE
            cnt[CNT_REPORTED] -= 1 << o
        _list_del(b, nxt, prv, forder, head, tail, nfree)
        if b < g:
            g = b
        o += 1
        merged = True
    if putback_reported and not merged:
        for k in range(g, g + size):
            state[k] = PG_REPORTED
        cnt[CNT_REPORTED] += size
        _list_add(g, o, True, nxt, prv, forder, head, tail, nfree)
    else:
        _list_add(g, o, False, nxt, prv, forder, head, tail, nfree)
    return o


@_noalloc
def alloc_block(o, new_state, nxt, prv, forder, state, head, tail, nfree, cnt):
    """Allocate one block of order ``o`` (splitting a larger one); return its gpfn or -1."""
    k = o
    g = -1
    while k < NR_ORDERS:
        if head[k] >= 0:
            g = head[k]
            break
        k += 1
    if g < 0:
        return -1
    _list_del(g, nxt, prv, forder, head, tail, nfree)
    rep = state[g] == PG_REPORTED
    while k > o:
        # Linux's expand(): keep the low half, put the high half back on the list below.
        k -= 1
        _list_add(g + (1 << k), k, rep, nxt, prv, forder, head, tail, nfree)
    size = 1 << o
    for p in range(g, g + size):
        state[p] = new_state
    cnt[CNT_FREE] -= size
    if rep:
        cnt[CNT_REPORTED] -= size
    return g


@_noalloc
def alloc_many(count, max_order, new_state, out, nxt, prv, forder, state, head, tail, nfree, cnt):
    """Allocate up to ``count`` pages, highest orders first, into runs ``out[n] = (gpfn, len)``.

    Adjacent blocks are coalesced into one run.  Stops early when memory runs out or ``out``
    is full.  Returns ``(runs written, pages allocated)``.

    Same result, page for page and list for list, as calling :func:`alloc_block` once per
    block of order ``o``: when the smallest non-empty list at or above ``o`` holds order
    ``k > o`` and at least ``2**k`` pages are still wanted, the ``2**(k-o)`` splits would hand
    out the whole block in address order and leave the lists below ``k`` empty again, as they
    were.  So the block is taken whole, with no per-page list work (this is what makes
    order-0 balloon fills cheap)."""
    rem = count
    n = 0
    o = max_order
    cap = out.shape[0]
    while rem > 0 and o >= 0:
        size = 1 << o
        if size > rem:
            o -= 1
            continue
        k = o
        while k < NR_ORDERS and head[k] < 0:
            k += 1
        if k == NR_ORDERS:
            o -= 1  # no block of order >= o is left anywhere
            continue
        joins = n > 0 and out[n - 1, 0] + out[n - 1, 1] == head[k]
        if k > o and (1 << k) <= rem and (joins or n < cap):
            g = head[k]
            size = 1 << k
            rep = state[g] == PG_REPORTED
            _list_del(g, nxt, prv, forder, head, tail, nfree)
            for p in range(g, g + size):
                state[p] = new_state
            cnt[CNT_FREE] -= size
            if rep:
                cnt[CNT_REPORTED] -= size
        else:
            g = alloc_block(o, new_state, nxt, prv, forder, state, head, tail, nfree, cnt)
        if n > 0 and out[n - 1, 0] + out[n - 1, 1] == g:
            out[n - 1, 1] += size
        else:
            if n == cap:
                # out is full: give the block back and stop
                _free_block(g, o, False, state.shape[0], nxt, prv, forder, state, head, tail,
                            nfree, cnt)
                break
            out[n, 0] = g
            out[n, 1] = size
            n += 1
        rem -= size
    return n, count - rem


@_noalloc
def free_range(start, count, putback_reported, npages, nxt, prv, forder, state, head, tail,
               nfree, cnt):
    """Free pages [start, start+count) as maximal aligned blocks (buddies merge)."""
    g = start
    end = start + count
    while g < end:
        o = MAX_ORDER
        while o > 0 and ((g & ((1 << o) - 1)) != 0 or g + (1 << o) > end):
            o -= 1
        _free_block(g, o, putback_reported, npages, nxt, prv, forder, state, head, tail,
                    nfree, cnt)
        g += 1 << o


@_noalloc
def free_runs(runs, from_isolated, mark_reported, npages, nxt, prv, forder, state, head, tail,
              nfree, cnt):
    """Free every run of ``runs`` (int64[n, 2]).  Caller has validated them."""
    for i in range(runs.shape[0]):
        if from_isolated:
            cnt[CNT_ISOLATED] -= runs[i, 1]
        free_range(runs[i, 0], runs[i, 1], mark_reported, npages, nxt, prv, forder, state,
                   head, tail, nfree, cnt)


@_noalloc
def free_pages(gpfns, npages, nxt, prv, forder, state, head, tail, nfree, cnt):
    """Free single pages (order 0 each; buddies merge)."""
    for i in range(gpfns.shape[0]):
        _free_block(gpfns[i], 0, False, npages, nxt, prv, forder, state, head, tail, nfree, cnt)


@_noalloc
def isolate_free(min_order, max_runs, out, nxt, prv, forder, state, head, tail, nfree, cnt):
    """Take unreported free blocks of order >= min_order off the lists (highest first).

    Returns the number of runs written to ``out``; their pages become ISOLATED."""
    n = 0
    o = MAX_ORDER
    while o >= min_order and n < max_runs:
        g = head[o]
        while g >= 0 and n < max_runs:
            if state[g] != PG_FREE:
                break  # reported blocks sit at the tail
            nx = nxt[g]
            _list_del(g, nxt, prv, forder, head, tail, nfree)
            size = 1 << o
            for k in range(g, g + size):
                state[k] = PG_ISOLATED
            cnt[CNT_FREE] -= size
            cnt[CNT_ISOLATED] += size
            out[n, 0] = g
            out[n, 1] = size
            n += 1
            g = nx
        o -= 1
    return n


# The same byte-mask constants as protocol.pfn's word scans, kept here: Numba's on-disk
# cache of a kernel is invalidated by changes to its own file only, not to the files of the
# functions it calls.
_LO7 = np.uint64(0x7F7F7F7F7F7F7F7F)
_HI = np.uint64(0x8080808080808080)
_BYTES = np.uint64(0x0101010101010101)


@_noalloc
def first_not_in_state(runs, want, state):
    """First gpfn of ``runs`` whose state is not ``want``, or -1.

    Head and tail bytes of each run one at a time; the aligned middle eight pages per
    uint64 load, XORed with ``want`` in every byte (a nonzero byte is a mismatch)."""
    words = state[: state.shape[0] & ~7].view(np.uint64)
    pat = np.uint64(want) * _BYTES
    for r in range(runs.shape[0]):
        g = np.int64(runs[r, 0])
        e = g + np.int64(runs[r, 1])
        if e - g < 24:  # short: bytes (a word loop would only add mispredicted exits)
            while g < e:
                if state[g] != want:
                    return g
                g += 1
            continue
        while g < e and (g & 7):
            if state[g] != want:
                return g
            g += 1
        wi = g >> 3
        we = e >> 3
        while wi < we:
            x = words[wi] ^ pat
            if x:
                m = (((x & _LO7) + _LO7) | x) & _HI  # high bit of each nonzero byte
                k = 0
                while not (m >> np.uint64(8 * k + 7)) & np.uint64(1):
                    k += 1
                return (wi << 3) + k
            wi += 1
        g = max(g, wi << 3)
        while g < e:
            if state[g] != want:
                return g
            g += 1
    return -1


# --------------------------------------------------------------------------- reclaim


@_noalloc
def clock_scan(state, guest_acc, hand, max_steps, max_victims, out):
    """Second-chance clock over anon pages.

    An accessed anon page loses its bit and survives this pass; an unaccessed one becomes a
    victim.  Returns ``(victims, new hand, anon pages scanned)``."""
    npages = state.shape[0]
    n = 0
    scanned = 0
    steps = 0
    # Branch-free per page (state and accessed bits are data the branch predictor cannot
    # learn): an anon page's accessed byte is cleared unconditionally, the victim slot is
    # written always and kept only for a cold anon page.  The scan goes in straight
    # segments up to the end of the map, so the wrap test leaves the inner loop.
    if npages == 0:
        return n, hand, scanned
    hand %= npages  # a segment must start inside the map
    while steps < max_steps and n < max_victims:
        seg = min(npages - hand, max_steps - steps)
        g = hand
        stop = hand + seg
        while g < stop and n < max_victims:
            anon = state[g] == PG_ANON
            a = guest_acc[g]
            guest_acc[g] = np.uint8(0) if anon else a
            out[n] = g
            n += anon & (a == 0)
            scanned += anon
            g += 1
        steps += g - hand
        hand = g
        if hand == npages:
            hand = 0
    return n, hand, scanned


# --------------------------------------------------------------------------- vCPU


@njit(cache=True, inline="always")
def stamp(task, vpn, count):
    """64-bit stamp of the ``count``-th write by ``task`` to ``vpn``; never 0 (splitmix64)."""
    x = (np.uint64(task) * _GOLDEN) ^ (np.uint64(vpn) * _MIX2) ^ (np.uint64(count) * _MIX1)
    x = x + _GOLDEN
    x = (x ^ (x >> np.uint64(30))) * _MIX1
    x = (x ^ (x >> np.uint64(27))) * _MIX2
    x = x ^ (x >> np.uint64(31))
    if x == np.uint64(0):
        x = np.uint64(1)
    return x


@njit(cache=True, inline="always")
def _touch_present(ram, g, needs_zero, guest_acc, host_acc):
    """The start of an access to present page ``g``: lazy zeroing of a freshly allocated
    page (after the EPT check, so only present memory is written), then the accessed bits
    (tested first: the host clears its bits, and writing them unchanged would dirty the
    shared cache line). Returns the index of the page's first word in ``ram``."""
    base = g * PAGE_WORDS
    if needs_zero[g] != 0:
        ram[base:base + PAGE_WORDS] = 0
        needs_zero[g] = 0
    if guest_acc[g] == 0:
        guest_acc[g] = 1
    if host_acc[g] == 0:
        host_acc[g] = 1
    return base


@njit(cache=True, inline="always")
def _read_is_wrong(ram, base, task, key, count):
    """A checked read: 1 when the page's first word is not the stamp of the ``count``-th
    write to ``key`` (0 when never written), else 0."""
    expect = np.uint64(0)
    if count != 0:
        expect = stamp(task, key, count)
    return 1 if ram[base] != expect else 0


@njit(cache=True)
def vcpu_run(ram, pt, wcount, vpns, writes, start, stop, ept, host_acc, guest_acc, needs_zero,
             task):
    """Run accesses ``vpns[start:stop]`` of one task; return
    ``(exit code, index reached, exit arg, ops done, corrupted reads)``.

    Per access: page table (guest fault exit), EPT present check (EPT exit), lazy zeroing of a
    freshly allocated page (after the EPT check, so only present memory is written), accessed
    bits, then a stamped write or a checked read of the page's first word."""
    ops = 0
    corrupted = 0
    i = start
    while i < stop:
        v = vpns[i]
        g = pt[v]
        if g < 0:
            return EXIT_GUEST_FAULT, i, v, ops, corrupted
        if ept[g] == EPT_NOT_PRESENT:
            return EXIT_EPT, i, g, ops, corrupted
        base = _touch_present(ram, g, needs_zero, guest_acc, host_acc)
        if writes[i]:
            c = wcount[v] + 1
            wcount[v] = c
            ram[base] = stamp(task, v, c)
        else:
            corrupted += _read_is_wrong(ram, base, task, v, wcount[v])
        ops += 1
        i += 1
    return EXIT_DONE, i, 0, ops, corrupted


@njit(cache=True)
def lookahead_not_present(pt, vpns, start, stop, ept, mark, out):
    """Distinct gpfns mapped by ``vpns[start:stop]`` whose EPT entry is clear (up to len(out)).

    ``mark`` is a zeroed uint8 scratch array over gpfns; it is left zeroed."""
    n = 0
    cap = out.shape[0]
    for i in range(start, stop):
        g = pt[vpns[i]]
        if g >= 0 and ept[g] == EPT_NOT_PRESENT and mark[g] == 0:
            mark[g] = 1
            out[n] = g
            n += 1
            if n == cap:
                break
    for j in range(n):
        mark[out[j]] = 0
    return n


# --------------------------------------------------------------------------- page cache

#: The "task" a disk block's stamps are made with: file data belongs to the disk, not to the
#: task that wrote it (any task reading the block must see the last write).
FILE_STAMP_TASK = 0xF11E


@_noalloc
def cache_scan(state, guest_acc, dirty, cache_block, hand, max_steps, max_victims, out_clean,
               out_dirty):
    """Second-chance clock over page-cache pages, the inactive file list's stand-in.

    A cache page accessed since the last pass loses its bit and survives; an unaccessed one
    is a victim: clean ones go to ``out_clean`` (dropped without I/O), dirty ones to
    ``out_dirty`` while it has room (written back first).  Pages being filled
    (``cache_block < 0``) are skipped untouched.  Stops after ``max_steps`` pages or
    ``max_victims`` clean victims.  Returns ``(clean, dirty, new hand, cache pages
    scanned)``."""
    npages = state.shape[0]
    nc = 0
    nd = 0
    scanned = 0
    steps = 0
    capd = out_dirty.shape[0]
    if npages == 0:
        return nc, nd, hand, scanned
    hand %= npages
    while steps < max_steps and nc < max_victims:
        g = hand
        hand += 1
        if hand == npages:
            hand = 0
        steps += 1
        if state[g] != PG_CACHE or cache_block[g] < 0:
            continue
        scanned += 1
        if guest_acc[g] != 0:
            guest_acc[g] = 0
            continue
        if dirty[g] == 0:
            out_clean[nc] = g
            nc += 1
        elif nd < capd:
            out_dirty[nd] = g
            nd += 1
    return nc, nd, hand, scanned


@njit(cache=True)
def cache_run(ram, bmap, bcount, dirty, clean, blocks, writes, start, stop, ept, host_acc,
              guest_acc, needs_zero):
    """Run file accesses ``blocks[start:stop]`` (disk block numbers) through the page cache;
    return ``(exit code, index reached, exit arg, ops done, corrupted reads)``.

    ``bmap`` maps a block to the gpfn caching it (-1: not cached, a ``EXIT_GUEST_FAULT``
    exit with the block, for the memory manager to read it in); ``bcount`` counts the writes
    to each block, the truth its stamps are checked against.  Per access as
    :func:`vcpu_run`, plus: a write marks the page dirty (it is written back before the page
    is dropped) and no longer ``clean`` (an unmodified copy of its block)."""
    ops = 0
    corrupted = 0
    i = start
    while i < stop:
        b = blocks[i]
        g = bmap[b]
        if g < 0:
            return EXIT_GUEST_FAULT, i, b, ops, corrupted
        if ept[g] == EPT_NOT_PRESENT:
            return EXIT_EPT, i, g, ops, corrupted
        # (a write-allocated page is zeroed too: the write covers the whole page)
        base = _touch_present(ram, g, needs_zero, guest_acc, host_acc)
        if writes[i]:
            c = bcount[b] + 1
            bcount[b] = c
            ram[base] = stamp(FILE_STAMP_TASK, b, c)
            dirty[g] = 1
            clean[g] = 0
        else:
            corrupted += _read_is_wrong(ram, base, FILE_STAMP_TASK, b, bcount[b])
        ops += 1
        i += 1
    return EXIT_DONE, i, 0, ops, corrupted
