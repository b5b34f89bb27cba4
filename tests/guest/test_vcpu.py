"""vCPU loop, look-ahead and clock-scan kernels against their plain-Python twins."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from guest import kernels as K
from guest.testing.naive import naive_clock_scan, naive_lookahead, naive_stamp, naive_vcpu_run


@settings(deadline=None)  # the first call loads the kernel from Numba's cache
@given(st.integers(0, 2**31), st.integers(0, 2**40), st.integers(0, 2**62))
def test_stamp_matches_twin_and_is_never_zero(task, vpn, count) -> None:
    s = int(K.stamp(task, vpn, count))
    assert s == naive_stamp(task, vpn, count)
    assert s != 0


@st.composite
def vcpu_case(draw):
    npages = draw(st.integers(1, 12))
    nvpn = draw(st.integers(1, 16))
    # page table: present (distinct gpfns), absent (-1) or swapped (-(slot+2))
    gp = draw(st.permutations(range(npages)))
    pt = []
    for v in range(nvpn):
        kind = draw(st.sampled_from(["present", "absent", "swapped"]))
        if kind == "present" and v < npages:
            pt.append(gp[v])
        elif kind == "swapped":
            pt.append(-(draw(st.integers(0, 5)) + 2))
        else:
            pt.append(-1)
    ept = draw(st.lists(st.integers(0, 1), min_size=npages, max_size=npages))
    needs_zero = draw(st.lists(st.integers(0, 1), min_size=npages, max_size=npages))
    n = draw(st.integers(0, 40))
    vpns = draw(st.lists(st.integers(0, nvpn - 1), min_size=n, max_size=n))
    writes = draw(st.lists(st.integers(0, 1), min_size=n, max_size=n))
    wcount = draw(st.lists(st.integers(0, 3), min_size=nvpn, max_size=nvpn))
    # page contents: mostly the right stamp, sometimes garbage (to count corruption)
    task = draw(st.integers(0, 5))
    ram = [[draw(st.integers(0, 3)) for _ in range(2)] + [7] * 510 for _ in range(npages)]
    for v, g in enumerate(pt):
        if g >= 0 and draw(st.booleans()):
            ram[g][0] = naive_stamp(task, v, wcount[v]) if wcount[v] else 0
    start = draw(st.integers(0, n))
    return npages, pt, ept, needs_zero, vpns, writes, wcount, task, ram, start


@settings(max_examples=300, deadline=None)
@given(vcpu_case())
def test_vcpu_run_matches_twin(case) -> None:
    npages, pt, ept, needs_zero, vpns, writes, wcount, task, ram, start = case
    n = len(vpns)
    a_ram = np.array(ram, dtype=np.uint64).reshape(-1)
    a_pt = np.array(pt, np.int64)
    a_wc = np.array(wcount, np.int64)
    a_ept = np.array(ept, np.uint8)
    a_nz = np.array(needs_zero, np.uint8)
    h_acc = np.zeros(npages, np.uint8)
    g_acc = np.zeros(npages, np.uint8)
    got = K.vcpu_run(a_ram, a_pt, a_wc, np.array(vpns, np.int64), np.array(writes, np.uint8),
                     start, n, a_ept, h_acc, g_acc, a_nz, task)
    r_ram = [list(p) for p in ram]
    r_wc = list(wcount)
    r_nz = list(needs_zero)
    r_h = [0] * npages
    r_g = [0] * npages
    want = naive_vcpu_run(r_ram, pt, r_wc, vpns, writes, start, n, ept, r_h, r_g, r_nz, task)
    assert tuple(int(x) for x in got) == want
    assert a_ram.reshape(npages, 512).tolist() == r_ram
    assert a_wc.tolist() == r_wc
    assert a_nz.tolist() == r_nz
    assert h_acc.tolist() == r_h and g_acc.tolist() == r_g


def test_fresh_pages_read_zero_and_writes_read_back() -> None:
    npages = 4
    ram = np.full(npages * 512, 0xDEAD, np.uint64)  # old contents of recycled pages
    pt = np.array([0, 1, 2, 3], np.int64)
    wc = np.zeros(4, np.int64)
    nz = np.ones(4, np.uint8)
    ept = np.ones(4, np.uint8)
    acc = np.zeros(4, np.uint8)
    vpns = np.array([0, 1, 2, 3, 0, 0, 1, 2, 3, 0], np.int64)
    writes = np.array([0, 0, 0, 0, 1, 0, 0, 0, 0, 0], np.uint8)
    code, i, _, ops, bad = K.vcpu_run(ram, pt, wc, vpns, writes, 0, 10, ept, acc, acc.copy(),
                                      nz, 3)
    assert (code, i, ops, bad) == (K.EXIT_DONE, 10, 10, 0)
    assert ram[512:].reshape(3, 512)[:, 1:].max() == 0  # zeroed whole page
    ram[0] ^= np.uint64(1)  # flip a bit behind the guest's back
    *_, bad = K.vcpu_run(ram, pt, wc, vpns[:1], writes[:1], 0, 1, ept, acc, acc.copy(), nz, 3)
    assert bad == 1


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_lookahead_matches_twin(data) -> None:
    npages = data.draw(st.integers(1, 20))
    nvpn = data.draw(st.integers(1, 20))
    pt = data.draw(st.lists(st.integers(-3, npages - 1), min_size=nvpn, max_size=nvpn))
    ept = data.draw(st.lists(st.integers(0, 1), min_size=npages, max_size=npages))
    vpns = data.draw(st.lists(st.integers(0, nvpn - 1), max_size=50))
    start = data.draw(st.integers(0, len(vpns)))
    cap = data.draw(st.integers(1, 8))
    mark = np.zeros(npages, np.uint8)
    out = np.empty(cap, np.int64)
    k = K.lookahead_not_present(np.array(pt, np.int64), np.array(vpns, np.int64), start,
                                len(vpns), np.array(ept, np.uint8), mark, out)
    assert out[:k].tolist() == naive_lookahead(pt, vpns, start, len(vpns), ept, cap)
    assert not mark.any()


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_clock_scan_matches_twin(data) -> None:
    n = data.draw(st.integers(1, 40))
    state = data.draw(st.lists(st.sampled_from([K.PG_FREE, K.PG_ANON, K.PG_KERNEL]),
                               min_size=n, max_size=n))
    acc = data.draw(st.lists(st.integers(0, 1), min_size=n, max_size=n))
    hand = data.draw(st.integers(0, n - 1))
    steps = data.draw(st.integers(0, 3 * n))
    maxv = data.draw(st.integers(1, 10))
    a_acc = np.array(acc, np.uint8)
    out = np.empty(maxv, np.int64)
    k, h, scanned = K.clock_scan(np.array(state, np.uint8), a_acc, hand, steps, maxv, out)
    r_acc = list(acc)
    victims, rh, rs = naive_clock_scan(state, r_acc, hand, steps, maxv)
    assert (out[:k].tolist(), int(h), int(scanned)) == (victims, rh, rs)
    assert a_acc.tolist() == r_acc
