"""How fast the adaptive policies react: mom acts on the sample that first shows pressure
(not once a 10-sample average catches up), and share taxes a VM only once it has measured
how idle it is. Hand-computed values in the comments (pages; host of 10000 frames)."""

from __future__ import annotations

from hypervisor.policies import HostSample, MomPolicy, SharePolicy, VmSample


def host(free: int, t: float) -> HostSample:
    return HostSample(time=t, frames_total=10000, frames_free=free,
                      swap_slots_total=5000, swap_slots_free=5000)


def vm(name: str, t: float, **kw: object) -> VmSample:
    fields: dict[str, object] = dict(
        name=name, time=t, memory_pages=1000, target_pages=0, balloon_pages=0,
        backed_pages=1000, host_swapped_pages=0, free_pages=500, available_pages=500,
        swap_in=0, swap_out=0, alloc_stalls=0, major_faults=0, out_of_puff=False,
        active_sampled=100, active_touched=100, min_pages=0, max_pages=1000, shares=1000,
    )
    fields.update(kw)
    return VmSample(**fields)  # type: ignore[arg-type]


def calm_history(n: int) -> list:
    """``n`` one-second samples of a host with 50 % free and a guest with 500 pages free."""
    return [(host(5000, float(t)), [vm("a", float(t))]) for t in range(n)]


def test_mom_shrinks_at_the_first_sample_under_pressure() -> None:
    hist = calm_history(9)
    now = host(0, 9.0)  # every frame in use: a working set just jumped
    # The 10-sample average is (9 * 50 % + 0 %) / 10 = 45 %: no pressure by the average.
    assert MomPolicy({"react_to_current": False}).decide(now, [vm("a", 9.0)], hist) == []
    # Current free 0 % <= 5 %: critical, goal 0 % - 5 % = -5 %, used 500, floor 450;
    # the 5 % step (950) is above the floor: balloon 50, at once.
    d = MomPolicy().decide(now, [vm("a", 9.0)], hist)
    assert [(x.vm, x.target_pages) for x in d] == [("a", 50)]
    assert "host free 0.0% <= 5% (critical)" in d[0].reason


def test_mom_does_not_let_go_until_the_average_agrees() -> None:
    # Under pressure for nine samples, then one calm sample: the average (9 * 10 % + 50 %)
    # / 10 = 14 % < 20 % still rules, so mom keeps shrinking instead of growing back.
    hist = [(host(1000, float(t)), [vm("a", float(t), target_pages=100, balloon_pages=100)])
            for t in range(9)]
    cur = vm("a", 9.0, target_pages=100, balloon_pages=100)
    d = MomPolicy().decide(host(5000, 9.0), [cur], hist)
    assert d and d[0].target_pages > 100 and "< 20%" in d[0].reason


def test_mom_guest_used_follows_a_growing_guest_at_once() -> None:
    # The guest's free fell from 500 pages to 0 this second: its task grew into all of it.
    hist = [(host(1500, float(t)), [vm("a", float(t))]) for t in range(9)]
    now = [vm("a", 9.0, free_pages=0)]
    # Host free 15 %: goal = 20 % * 15 % / 20 % = 15 %. Current used 1000: the floor
    # 1000 + 150 is above the guest's 1000 pages, so mom takes nothing from it.
    assert MomPolicy().decide(host(1500, 9.0), now, hist) == []
    # The average alone (used 1000 - (9 * 500 + 0) / 10 = 550, floor 700) would take a
    # 5 % step from a guest that has no free page left.
    old = MomPolicy({"react_to_current": False}).decide(host(1500, 9.0), now, hist)
    assert [(x.vm, x.target_pages) for x in old] == [("a", 50)]


def test_share_does_not_reclaim_from_unmeasured_vms() -> None:
    # Host free 5 % < 10 %: share must reclaim 500 pages. Neither VM has an accessed-bit
    # sample yet (active_sampled 0): nothing says which is idle, so nothing is reclaimed.
    fresh = [vm("a", 1.0, active_sampled=0, active_touched=0),
             vm("b", 1.0, active_sampled=0, active_touched=0)]
    policy = SharePolicy()
    assert policy.decide(host(500, 1.0), fresh, []) == []
    # b is measured busy (100 of 100 touched) but a, which reports guest stats, is not
    # measured yet: b must not pay for a VM whose idleness is unknown. Still nothing.
    later = [vm("a", 5.0, active_sampled=0, active_touched=0), vm("b", 5.0)]
    assert policy.decide(host(500, 5.0), later, []) == []
    # A VM still booting (no guest stats) is not waited for.
    booting = [vm("a", 6.0, active_sampled=0, active_touched=0, free_pages=None),
               vm("b", 6.0, active_touched=0)]
    d = policy.decide(host(500, 6.0), booting, [])
    assert [x.vm for x in d] == ["b"] and d[0].target_pages == 50
    # Once both are measured, the idle one (a: 0 of 100 touched) pays first.
    both = [vm("a", 7.0, active_touched=0), vm("b", 7.0, target_pages=50, balloon_pages=50)]
    d = SharePolicy().decide(host(500, 7.0), both, [])
    assert d and d[0].vm == "a"


def test_share_does_not_hand_a_tiny_need_to_the_next_vm() -> None:
    # Host free 24.8 % under low_free 25 %: need = 2500 - 2480 = 20 pages. The idle VM b
    # (rho lowest) skips it: 20 < 0.25 % of its 10000 pages. The active VM a would pass
    # its own threshold (0.25 % of 1000 = 2.5) but must not be taxed out of turn.
    vms = [vm("a", 5.0, memory_pages=1000, max_pages=1000),
           vm("b", 5.0, memory_pages=10000, max_pages=10000, backed_pages=10000,
              active_touched=0)]
    assert SharePolicy({"low_free": 0.25, "high_free": 0.4}).decide(host(2480, 5.0), vms, []) == []
    # A need worth b's while still goes to b alone.
    d = SharePolicy({"low_free": 0.25, "high_free": 0.4}).decide(host(2400, 5.0), vms, [])
    assert [(x.vm, x.target_pages) for x in d] == [("b", 100)]


def test_share_does_not_measure_a_booting_vm_before_its_warmup() -> None:
    # The host picked the pages to sample while the VM booted: none of them is touched
    # (0 of 100) although the VM's task is busy. A VM seen without guest stats is measured
    # only `warmup` (here 5 s) after its first stats, so this sample cannot make it look idle.
    policy = SharePolicy({"low_free": 0.25, "high_free": 0.4, "warmup": 5.0})
    boot = [vm("a", 1.0, free_pages=None, active_sampled=0, active_touched=0)]
    assert policy.decide(host(500, 1.0), boot, []) == []
    stats = [vm("a", 2.0, active_touched=0)]  # first stats, a sample armed during boot
    assert policy.decide(host(500, 2.0), stats, []) == []
    assert policy.decide(host(500, 6.9), [vm("a", 6.9, active_touched=0)], []) == []
    # 5 s after its first stats its samples count: now it is measured (idle) and taxed.
    d = policy.decide(host(500, 7.0), [vm("a", 7.0, active_touched=0)], [])
    assert [x.vm for x in d] == ["a"]
    # A VM first seen with stats (already running when the policy started) counts at once.
    fresh = SharePolicy({"low_free": 0.25, "high_free": 0.4, "warmup": 5.0})
    assert [x.vm for x in fresh.decide(host(500, 1.0), [vm("b", 1.0, active_touched=0)],
                                       [])] == ["b"]
    # Off by default: the first sample counts as soon as it comes.
    off = SharePolicy({"low_free": 0.25, "high_free": 0.4})
    assert off.decide(host(500, 1.0), boot, []) == []
    assert [x.vm for x in off.decide(host(500, 2.0), stats, [])] == ["a"]
