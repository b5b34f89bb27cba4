"""Tests of hypervisor.policies: every rule number by number, plus hypothesis properties.

Expected values are computed by hand in the comments (pages; host of 10000 frames unless
stated), from the rules written down in docs/policies.md.
"""

from __future__ import annotations

import math
import sys
import textwrap
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hypervisor.policies import (
    BUILTIN_POLICIES,
    Decision,
    HostSample,
    MomPolicy,
    NonePolicy,
    Policy,
    SharePolicy,
    StaticPolicy,
    VmSample,
    load_policy,
)
from hypervisor.policies.base import balloon_bounds, host_free_fraction

# -- sample builders --------------------------------------------------------------------


def host(free: int, *, total: int = 10000, t: float = 100.0) -> HostSample:
    return HostSample(time=t, frames_total=total, frames_free=free,
                      swap_slots_total=5000, swap_slots_free=5000)


def vm(name: str = "web", **kw: object) -> VmSample:
    memory = kw.pop("memory_pages", 1000)
    fields: dict[str, object] = dict(
        name=name, time=100.0, memory_pages=memory, target_pages=0, balloon_pages=0,
        backed_pages=memory, host_swapped_pages=0, free_pages=500, available_pages=500,
        swap_in=0, swap_out=0, alloc_stalls=0, major_faults=0, out_of_puff=False,
        active_sampled=100, active_touched=100, min_pages=0, max_pages=memory, shares=1000,
    )
    fields.update(kw)
    return VmSample(**fields)  # type: ignore[arg-type]


def ballooned(balloon: int, **kw: object) -> VmSample:
    """A VM whose balloon already holds ``balloon`` pages and whose target agrees."""
    return vm(target_pages=balloon, balloon_pages=balloon, **kw)


def one(decisions: list[Decision]) -> Decision:
    assert len(decisions) == 1, decisions
    return decisions[0]


# -- load_policy and parameters ---------------------------------------------------------


def test_builtin_names_resolve_to_their_classes() -> None:
    assert set(BUILTIN_POLICIES) == {"none", "static", "mom", "share"}
    for name, cls in BUILTIN_POLICIES.items():
        policy = load_policy(name, None)
        assert type(policy) is cls and policy.name == name


def test_dotted_path_loads_a_builtin_and_a_user_policy(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    assert isinstance(load_policy("hypervisor.policies.mom:MomPolicy", None), MomPolicy)
    (tmp_path / "my_lab_policy.py").write_text(textwrap.dedent("""
        from hypervisor.policies import Decision, Policy

        class HalfPolicy(Policy):
            name = "half"
            DEFAULTS = {"fraction": 0.5}

            def decide(self, host, vms, history):
                share = self.params["fraction"]
                return [Decision(vm=v.name, target_pages=int(v.memory_pages * share),
                                 reason="half")
                        for v in vms]
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    policy = load_policy("my_lab_policy:HalfPolicy", {"fraction": 0.25})
    assert one(policy.decide(host(5000), [vm()], [])).target_pages == 250
    sys.modules.pop("my_lab_policy", None)


@pytest.mark.parametrize("spec, fragment", [
    ("bogus", "unknown policy 'bogus'"),
    ("", "non-empty"),
    ("no_such_module_xyz:Policy", "cannot import module 'no_such_module_xyz'"),
    ("hypervisor.policies.mom:Nope", "has no attribute 'Nope'"),
    ("collections:OrderedDict", "not a subclass"),
    ("hypervisor.policies.mom:", "unknown policy"),
    ("a:b:c", "unknown policy"),
])
def test_load_policy_rejects_bad_specs_naming_them(spec: str, fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment):
        load_policy(spec, None)


@pytest.mark.parametrize("name, params, fragment", [
    ("mom", {"pressure_treshold": 0.1}, "unknown parameter 'pressure_treshold'"),
    ("mom", {"pressure_threshold": "high"}, "must be a finite number"),
    ("mom", {"pressure_threshold": 1.5}, "outside"),
    ("mom", {"pressure_critical": 0.3}, "pressure_critical"),
    ("mom", {"stat_avg_samples": 0}, "stat_avg_samples"),
    ("mom", {"stat_avg_samples": 2.5}, "must be an int"),
    ("mom", {"swap_debt": 1}, "must be a bool"),
    ("share", {"tax_rate": 1.0}, "tax_rate"),
    ("share", {"high_free": 0.05}, "high_free"),
    ("static", {"targets": {"web": -1}}, "int >= 0"),
    ("static", {"targets": {"web": True}}, "int >= 0"),
    ("static", {"targets": [1, 2]}, "must be a mapping"),
    ("none", {"anything": 1}, "unknown parameter 'anything'"),
])
def test_bad_params_are_rejected_with_the_parameter_named(name: str, params: dict,
                                                          fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment):
        load_policy(name, params)


def test_params_are_copied_and_ints_accepted_for_floats() -> None:
    params = {"targets": {"web": 10}}
    policy = StaticPolicy(params)
    params["targets"]["web"] = 99
    assert policy.targets == {"web": 10}
    assert MomPolicy({"pressure_threshold": 1}).pressure_threshold == 1.0


@pytest.mark.parametrize("kw, fragment", [
    (dict(balloon_pages=1001), "balloon_pages 1001 exceeds memory_pages"),
    (dict(min_pages=600, max_pages=500), "min_pages 600 exceeds max_pages"),
    (dict(active_touched=101), "active_touched"),
    (dict(free_pages=-1), "free_pages must be >= 0"),
    (dict(shares=1.5), "shares must be an int"),
    (dict(out_of_puff=1), "out_of_puff must be a bool"),
    (dict(name=""), "name"),
])
def test_samples_validate_themselves(kw: dict, fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment):
        vm(**kw)


def test_host_sample_and_decision_validate_themselves() -> None:
    with pytest.raises(ValueError, match="frames_free 11 exceeds frames_total 10"):
        host(11, total=10)
    with pytest.raises(ValueError, match="frames_total must be >= 1"):
        host(0, total=0)
    with pytest.raises(ValueError, match="target_pages must be >= 0"):
        Decision(vm="web", target_pages=-1, reason="x")
    with pytest.raises(ValueError, match="reason"):
        Decision(vm="web", target_pages=1, reason="")


def test_duplicate_vm_names_are_rejected() -> None:
    with pytest.raises(ValueError, match="'web' appears twice"):
        MomPolicy().decide(host(5000), [vm(), vm()], [])


def test_a_user_policy_without_decide_is_refused_by_name() -> None:
    import sys
    import types

    mod = types.ModuleType("user_policies_nodecide")

    class Lazy(Policy):
        name = "lazy"

    mod.Lazy = Lazy  # type: ignore[attr-defined]
    sys.modules[mod.__name__] = mod
    try:
        with pytest.raises(ValueError, match="Lazy does not implement decide"):
            load_policy("user_policies_nodecide:Lazy")
    finally:
        del sys.modules[mod.__name__]


def test_base_policy_must_be_overridden() -> None:
    with pytest.raises(TypeError, match=r"abstract method 'decide'|abstract method decide"):
        Policy()  # type: ignore[abstract]


def test_host_free_counts_host_swap_as_debt() -> None:
    vms = [vm("a", host_swapped_pages=700), vm("b", host_swapped_pages=300)]
    assert host_free_fraction(host(2500), vms, swap_debt=True) == pytest.approx(0.15)
    assert host_free_fraction(host(2500), vms, swap_debt=False) == pytest.approx(0.25)
    assert host_free_fraction(host(500), vms, swap_debt=True) == pytest.approx(-0.05)


# -- none -------------------------------------------------------------------------------


def test_none_never_decides_even_under_critical_pressure() -> None:
    assert NonePolicy().decide(host(0), [vm(alloc_stalls=9, out_of_puff=True)], []) == []


# -- static -----------------------------------------------------------------------------


def test_static_targets_from_params_then_from_max_pages_once() -> None:
    policy = StaticPolicy({"targets": {"web": 300}})
    vms = [vm("web"), vm("db", max_pages=700), vm("idle")]
    decisions = policy.decide(host(5000), vms, [])
    # web: from params 300; db: 1000 - 700 = 300; idle: max_pages == memory -> 0 == target.
    assert [(d.vm, d.target_pages) for d in decisions] == [("web", 300), ("db", 300)]
    assert "params target 300" in decisions[0].reason
    assert "memory 1000 - max_pages 700 = 300" in decisions[1].reason
    # Applied once: the operator may change targets afterwards.
    assert policy.decide(host(5000, t=101), [vm("web"), vm("db")], []) == []
    # A VM seen for the first time later is decided then.
    late = one(policy.decide(host(5000, t=102), [vm("late", max_pages=900)], []))
    assert late.target_pages == 100


def test_static_clamps_param_targets_to_min_and_max_pages() -> None:
    policy = StaticPolicy({"targets": {"a": 950, "b": 10}})
    d = policy.decide(host(5000), [vm("a", min_pages=200), vm("b", max_pages=800)], [])
    # a: keeps >= 200 usable -> balloon <= 800; b: keeps <= 800 usable -> balloon >= 200.
    assert [(x.vm, x.target_pages) for x in d] == [("a", 800), ("b", 200)]
    assert "clamped to [0, 800]" in d[0].reason and "clamped to [200, 1000]" in d[1].reason


def test_static_skips_vms_already_at_target() -> None:
    assert StaticPolicy({"targets": {"web": 300}}).decide(host(5000), [ballooned(300)], []) == []


# -- mom: no pressure (grow) ------------------------------------------------------------


def test_mom_no_pressure_unballooned_guest_is_left_alone() -> None:
    assert MomPolicy().decide(host(3000), [vm()], []) == []


def test_mom_no_pressure_grows_guest_by_five_percent() -> None:
    # host free 30% >= 20%. cur = 1000 - 400 = 600, used = 600 - 300 = 300,
    # floor = 300 + 0.2*600 = 420; size = 600*1.05 = 630 -> balloon 370.
    d = one(MomPolicy().decide(host(3000), [ballooned(400, free_pages=300)], []))
    assert d.target_pages == 370
    assert "host free 30.0% >= 20%" in d.reason and "600 -> 630" in d.reason


def test_mom_no_pressure_grows_needy_guest_to_its_free_floor() -> None:
    # cur 600, free 10 -> used 590, floor = 590 + 120 = 710 > 630 -> balloon 290.
    d = one(MomPolicy().decide(host(3000), [ballooned(400, free_pages=10)], []))
    assert d.target_pages == 290 and "keep 20% free" in d.reason


def test_mom_no_pressure_growth_stops_at_max_pages() -> None:
    # max_pages 620: size 630 capped at 620 -> balloon 380.
    d = one(MomPolicy().decide(host(3000), [ballooned(400, free_pages=300, max_pages=620)], []))
    assert d.target_pages == 380 and "max_pages 620" in d.reason
    # Guest already at max_pages: nothing to grow.
    assert MomPolicy().decide(host(3000), [ballooned(380, max_pages=620)], []) == []


# -- mom: pressure (shrink) --------------------------------------------------------------


def test_mom_pressure_shrinks_by_capped_step() -> None:
    # host free 12%: goal = 0.20 * 0.12 / 0.20 = 12%. cur 1000, used 500,
    # floor = 500 + 120 = 620; size = 1000 * 0.95 = 950 -> balloon 50.
    d = one(MomPolicy().decide(host(1200), [vm(free_pages=500)], []))
    assert d.target_pages == 50
    assert "host free 12.0% < 20%: shrink guest free 50% -> 12%, step capped at 5%" in d.reason


def test_mom_pressure_stops_at_scaled_guest_free_floor() -> None:
    # free 150 -> used 850, floor = 850 + 120 = 970 > 950 -> size 970 -> balloon 30.
    assert one(MomPolicy().decide(host(1200), [vm(free_pages=150)], [])).target_pages == 30
    # free 60 -> used 940, floor 1060 > cur: MoM never grows a guest under pressure.
    assert MomPolicy().decide(host(1200), [vm(free_pages=60)], []) == []


def test_mom_critical_pressure_forces_negative_guest_free() -> None:
    # host free 4% <= 5%: goal = 0.04 - 0.05 = -1%. free 30 -> used 970,
    # floor = 970 - 10 = 960 > 950 -> balloon 40 (the guest must reclaim 10 used pages).
    d = one(MomPolicy().decide(host(400), [vm(free_pages=30)], []))
    assert d.target_pages == 40 and "(critical)" in d.reason
    # Exactly 5% is critical too: goal 0; used 970 -> floor 970 -> balloon 30.
    assert one(MomPolicy().decide(host(500), [vm(free_pages=30)], [])).target_pages == 30
    # Just above 5% is not: goal = 0.2 * 0.06 / 0.2 = 6%, floor 1030 > cur: no change.
    assert MomPolicy().decide(host(600), [vm(free_pages=30)], []) == []


def test_mom_skips_changes_not_above_a_quarter_percent() -> None:
    # min change = 0.25% of 1000 = 2.5 pages. free 122: used 878, floor 998 -> 2 pages: skip.
    assert MomPolicy().decide(host(1200), [vm(free_pages=122)], []) == []
    # free 124: used 876, floor 996 -> 4 pages > 2.5 -> balloon 4.
    assert one(MomPolicy().decide(host(1200), [vm(free_pages=124)], [])).target_pages == 4


def test_mom_respects_min_and_max_pages_under_pressure() -> None:
    # min_pages 980: floor = max(980, 620) -> size 980 -> balloon 20.
    assert one(MomPolicy().decide(host(1200), [vm(min_pages=980)], [])).target_pages == 20
    # max_pages 800: MoM's 950 is clamped to usable <= 800 -> balloon 200.
    d = one(MomPolicy().decide(host(1200), [vm(max_pages=800)], []))
    assert d.target_pages == 200 and "clamped by min/max_pages" in d.reason


def test_mom_host_swap_counts_against_host_free() -> None:
    # frames free 25%, but 1000 pages in host swap -> 15%: goal = 0.2*0.15/0.2 = 15%,
    # used 500, floor 650 < 950 -> balloon 50. Without swap debt: no pressure, no change.
    v = vm(host_swapped_pages=1000)
    assert one(MomPolicy().decide(host(2500), [v], [])).target_pages == 50
    assert MomPolicy({"swap_debt": False}).decide(host(2500), [v], []) == []


def test_mom_averages_stats_over_history_like_statavg() -> None:
    policy = MomPolicy({"stat_avg_samples": 3, "react_to_current": False})
    hist = [(host(1200, t=98.0), [vm(time=98.0, free_pages=100)]),
            (host(1200, t=99.0), [vm(time=99.0, free_pages=150)])]
    # avg free (100 + 150 + 200) / 3 = 150 -> used 850, floor 970 -> balloon 30.
    # (Current sample alone: used 800, floor 920 < 950 -> balloon 50.)
    now = vm(free_pages=200)
    assert one(policy.decide(host(1200), [now], hist)).target_pages == 30
    single = MomPolicy({"stat_avg_samples": 1})
    assert one(single.decide(host(1200), [now], hist)).target_pages == 50
    # Host free is averaged too: (30% + 30% + 12%) / 3 = 24% -> no pressure.
    calm = [(host(3000, t=98.0), [vm(time=98.0)]), (host(3000, t=99.0), [vm(time=99.0)])]
    assert policy.decide(host(1200), [vm()], calm) == []
    # History that also ends with the current sample is not counted twice.
    assert one(policy.decide(host(1200), [now], [*hist, (host(1200), [now])])).target_pages == 30


def test_mom_waits_for_first_guest_stats() -> None:
    assert MomPolicy().decide(host(1200), [vm(free_pages=None)], []) == []


def test_mom_only_returns_changes() -> None:
    # The rule wants balloon 50 and the target already is 50: no decision.
    assert MomPolicy().decide(host(1200), [vm(free_pages=500, target_pages=50)], []) == []


# -- guest guard (both adaptive policies) -------------------------------------------------


@pytest.mark.parametrize("cls", [MomPolicy, SharePolicy])
def test_out_of_puff_resets_target_and_backs_off(cls: type[Policy]) -> None:
    policy = cls({"stall_backoff": 10.0})
    # Target 300 but the driver stalled at 120 pages: reset to 120.
    stalled = vm(target_pages=300, balloon_pages=120, out_of_puff=True, free_pages=500)
    d = one(policy.decide(host(400, t=100.0), [stalled], []))
    assert d.target_pages == 120 and "out of puff at balloon 120" in d.reason
    # Inside the back-off, host pressure would inflate it but may not.
    later = vm(time=105.0, target_pages=120, balloon_pages=120, free_pages=500)
    assert policy.decide(host(400, t=105.0), [later], []) == []
    # After it, the normal rule applies again.
    after = replace(later, time=111.0)
    assert one(policy.decide(host(400, t=111.0), [after], [])).target_pages > 120


@pytest.mark.parametrize("cls", [MomPolicy, SharePolicy])
def test_guest_pressure_halves_the_balloon(cls: type[Policy]) -> None:
    policy = cls()
    prev = ballooned(400, time=99.0, alloc_stalls=3, swap_in=4096)
    now_ = ballooned(400, alloc_stalls=5, swap_in=4096)
    d = one(policy.decide(host(400), [now_], [(host(400, t=99.0), [prev])]))
    assert d.target_pages == 200
    assert d.reason.startswith("guest pressure (alloc_stalls 3 -> 5)")
    # swap_in rising alone also counts; deflation starts from the smaller of target/balloon.
    prev2 = vm(time=99.0, target_pages=400, balloon_pages=300)
    now2 = vm(target_pages=400, balloon_pages=300, swap_in=8192)
    d2 = one(cls().decide(host(400), [now2], [(host(400, t=99.0), [prev2])]))
    assert d2.target_pages == 150 and "swap_in 0 -> 8192 B" in d2.reason


def test_share_without_guest_guard_ignores_guest_pressure() -> None:
    # ESX has no guest-pressure rule: with guest_guard off, a pressured VM is priced like any
    # other; the host has 40 % free (above high_free) so the rule gives back, no halving.
    policy = SharePolicy({"guest_guard": False})
    prev = ballooned(400, time=99.0, alloc_stalls=3, swap_in=4096)
    now_ = ballooned(400, alloc_stalls=5, swap_in=4096)
    decisions = policy.decide(host(4000), [now_], [(host(4000, t=99.0), [prev])])
    assert all(not d.reason.startswith("guest pressure") for d in decisions)
    assert one(decisions).target_pages > 200
    # ...and with the guard (the default) the same samples halve the balloon.
    guarded = one(SharePolicy().decide(host(4000), [now_], [(host(4000, t=99.0), [prev])]))
    assert guarded.target_pages == 200


def test_guest_pressure_deflate_respects_max_pages() -> None:
    # max_pages 700 -> balloon >= 300: halving 400 gives 200, clamped to 300.
    prev = ballooned(400, time=99.0, max_pages=700)
    now_ = ballooned(400, max_pages=700, alloc_stalls=1)
    d = one(MomPolicy().decide(host(400), [now_], [(host(400, t=99.0), [prev])]))
    assert d.target_pages == 300


def test_mom_growth_during_backoff_lowers_the_ceiling() -> None:
    policy = MomPolicy({"stall_backoff": 10.0})
    policy.decide(host(400, t=100.0), [ballooned(400, out_of_puff=True)], [])
    # No pressure: MoM grows the guest (balloon 400 -> 370), allowed during back-off.
    d = one(policy.decide(host(3000, t=101.0), [ballooned(400, time=101.0, free_pages=300)], []))
    assert d.target_pages == 370
    # Pressure again inside the back-off: no rise above 370.
    assert policy.decide(host(400, t=102.0), [ballooned(370, time=102.0)], []) == []


# -- share --------------------------------------------------------------------------------


def share_pair(**b: object) -> list[VmSample]:
    a = vm("a", memory_pages=4000, active_touched=100)  # all active: f = 1
    bb = vm("b", memory_pages=4000, active_touched=0)  # all idle: f = 0
    return [a, replace(bb, **b)] if b else [a, bb]


def test_share_rho_is_waldspurgers_formula() -> None:
    policy = SharePolicy()
    a, b = share_pair()
    for v in (a, b):
        policy.observe(v)
    # k = 1 / (1 - 0.75) = 4. a: 1000 / (4000 * 1) = 0.25; b: 1000 / (4000 * 4) = 0.0625.
    assert policy.rho(a) == pytest.approx(0.25)
    assert policy.rho(b) == pytest.approx(0.0625)
    half = vm("c", memory_pages=4000, active_touched=50, target_pages=2000)
    policy.observe(half)
    # c: P 2000, f 0.5: 1000 / (2000 * (0.5 + 4 * 0.5)) = 0.2.
    assert policy.rho(half) == pytest.approx(0.2)
    # tau = 0: pure proportional share, rho = S / P.
    pure = SharePolicy({"tax_rate": 0.0})
    pure.observe(b)
    assert pure.rho(b) == pytest.approx(0.25)


def test_share_reclaims_from_lowest_rho_first() -> None:
    # host free 8.5%: need = 1000 - 850 = 150 pages, all from idle b (rho 0.0625).
    d = one(SharePolicy().decide(host(850), share_pair(), []))
    assert (d.vm, d.target_pages) == ("b", 150)
    assert "reclaim from lowest rho" in d.reason and "rho 0.0625" in d.reason


def test_share_step_cap_spills_over_to_next_lowest_rho() -> None:
    # need = 1000 - 500 = 500; cap = 5% of 4000 = 200 per VM: b 200, then a 200.
    d = SharePolicy().decide(host(500), share_pair(), [])
    assert [(x.vm, x.target_pages) for x in d] == [("b", 200), ("a", 200)]
    assert "step cap 200" in d[0].reason


def test_share_respects_min_pages_when_reclaiming() -> None:
    # b must keep 3900 usable -> balloon <= 100: b gives 100, a gives the other 50.
    d = SharePolicy().decide(host(850), share_pair(min_pages=3900), [])
    assert [(x.vm, x.target_pages) for x in d] == [("b", 100), ("a", 50)]
    assert "VM bound 100" in d[0].reason


def test_share_counts_inflations_in_flight() -> None:
    # b's balloon is 100 short of its 300 target: need = 150 - 200 < 0 -> nothing.
    vms = share_pair(target_pages=300, balloon_pages=100)
    assert SharePolicy().decide(host(850), vms, []) == []


def test_share_gives_back_to_highest_rho_when_host_has_spare() -> None:
    a, b = share_pair()
    a = replace(a, target_pages=100, balloon_pages=100)
    b = replace(b, target_pages=1000, balloon_pages=1000)
    # host free 30% > 20%: spare = 3000 - 2000 = 1000. rho a = 1000/3900 = 0.256,
    # b = 1000/(3000*4) = 0.083. a gets its whole balloon back (100), b a capped 200.
    d = SharePolicy().decide(host(3000), [a, b], [])
    assert [(x.vm, x.target_pages) for x in d] == [("a", 0), ("b", 800)]
    assert "give to highest rho" in d[0].reason


def test_share_give_back_respects_max_pages_and_hysteresis() -> None:
    a, b = share_pair()
    b = replace(b, target_pages=600, balloon_pages=600, max_pages=3500)  # balloon >= 500
    d = one(SharePolicy().decide(host(3000), [a, b], []))
    assert (d.vm, d.target_pages) == ("b", 500)
    # Between low_free and high_free nothing moves.
    assert SharePolicy().decide(host(1500), [a, b], []) == []


def test_share_skips_steps_under_a_quarter_percent() -> None:
    # need = 1000 - 995 = 5 pages < 0.25% of 4000 = 10: not worth a balloon operation.
    assert SharePolicy().decide(host(995), share_pair(), []) == []


def test_share_active_fraction_is_max_of_slow_and_fast_ewma() -> None:
    policy = SharePolicy()  # slow gain 0.1, fast gain 0.5
    assert policy.active_fraction("x") == 1.0  # unmeasured: no tax
    policy.observe(vm("x", time=1.0, active_touched=80))
    assert policy.active_fraction("x") == pytest.approx(0.8)
    # sample 0.2: slow 0.8 + 0.1*(0.2-0.8) = 0.74, fast 0.8 + 0.5*(-0.6) = 0.5 -> 0.74.
    policy.observe(vm("x", time=2.0, active_touched=20))
    assert policy.active_fraction("x") == pytest.approx(0.74)
    # The same sample time again is not folded in twice.
    policy.observe(vm("x", time=2.0, active_touched=20))
    assert policy.active_fraction("x") == pytest.approx(0.74)
    # sample 1.0: slow 0.766, fast 0.75 -> 0.766.
    policy.observe(vm("x", time=3.0, active_touched=100))
    assert policy.active_fraction("x") == pytest.approx(0.766)
    # A jump in activity shows at once through the fast average.
    up = SharePolicy()
    up.observe(vm("y", time=1.0, active_touched=20))
    up.observe(vm("y", time=2.0, active_touched=100))
    assert up.active_fraction("y") == pytest.approx(0.6)  # fast 0.2 + 0.5*0.8; slow 0.28


def test_share_forgets_vms_that_are_gone() -> None:
    policy = SharePolicy()
    policy.decide(host(1500), [vm("x", active_touched=10)], [])
    policy.decide(host(1500, t=101.0), [vm("y")], [])
    assert policy.active_fraction("x") == 1.0


# -- properties ---------------------------------------------------------------------------


@st.composite
def vm_samples(draw: st.DrawFn, name: str, t: float = 100.0) -> VmSample:
    memory = draw(st.integers(1, 5000))
    min_pages = draw(st.integers(0, memory))
    max_pages = draw(st.integers(min_pages, memory + 100))
    balloon = draw(st.integers(0, memory))
    sampled = draw(st.integers(0, 100))
    return VmSample(
        name=name, time=t, memory_pages=memory,
        target_pages=draw(st.integers(0, memory)), balloon_pages=balloon,
        backed_pages=draw(st.integers(0, memory)),
        host_swapped_pages=draw(st.integers(0, 200)),
        free_pages=draw(st.none() | st.integers(0, memory - balloon)),
        available_pages=None, swap_in=draw(st.integers(0, 10)) * 4096, swap_out=0,
        alloc_stalls=draw(st.integers(0, 3)), major_faults=0,
        out_of_puff=draw(st.booleans()), active_sampled=sampled,
        active_touched=draw(st.integers(0, sampled)), min_pages=min_pages,
        max_pages=max_pages, shares=draw(st.integers(0, 4000)),
    )


@st.composite
def rounds(draw: st.DrawFn) -> tuple[HostSample, list[VmSample], list]:
    n = draw(st.integers(1, 4))
    now = [draw(vm_samples(f"vm{i}")) for i in range(n)]
    past = [draw(vm_samples(f"vm{i}", t=99.0)) for i in range(n)]
    total = draw(st.integers(1, 50000))
    h = HostSample(time=100.0, frames_total=total, frames_free=draw(st.integers(0, total)),
                   swap_slots_total=0, swap_slots_free=0)
    ph = replace(h, time=99.0, frames_free=draw(st.integers(0, total)))
    return h, now, [(ph, past)]


POLICY_PARAMS = st.sampled_from([
    ("static", None), ("static", {"targets": {"vm0": 10**6, "vm1": 0}}), ("mom", None),
    ("mom", {"stat_avg_samples": 1, "swap_debt": False}), ("share", None),
    ("share", {"tax_rate": 0.0, "max_step_percent": 1.0, "min_step_percent": 0.0}),
])


@settings(max_examples=300, deadline=None)
@given(POLICY_PARAMS, rounds())
def test_decisions_are_changes_within_bounds(spec: tuple, r: tuple) -> None:
    h, vms, hist = r
    decisions = load_policy(*spec).decide(h, vms, hist)
    by_name = {v.name: v for v in vms}
    assert len({d.vm for d in decisions}) == len(decisions)
    for d in decisions:
        v = by_name[d.vm]
        lo, hi = balloon_bounds(v)
        assert lo <= d.target_pages <= hi
        assert 0 <= d.target_pages <= v.memory_pages
        assert d.target_pages != v.target_pages
        assert d.reason


@settings(max_examples=100, deadline=None)
@given(rounds())
def test_none_never_decides(r: tuple) -> None:
    assert NonePolicy().decide(*r) == []


@settings(max_examples=150, deadline=None)
@given(st.sampled_from(["mom", "share"]), vm_samples("vm0"), st.data())
def test_stalled_vm_target_never_rises_during_backoff(name: str, first: VmSample,
                                                      data: st.DataObject) -> None:
    lo, hi = balloon_bounds(first)
    first = replace(first, out_of_puff=True,
                    target_pages=data.draw(st.integers(lo, hi), label="target"))
    policy = load_policy(name, {"stall_backoff": 10.0})
    total = data.draw(st.integers(1, 20000), label="total")
    history: list[tuple[HostSample, Sequence[VmSample]]] = []
    current = first
    highest = first.target_pages
    for step in range(6):
        t = 100.0 + step * 1.5  # all inside the 10 s back-off
        h = HostSample(time=t, frames_total=total,
                       frames_free=data.draw(st.integers(0, total), label="free"),
                       swap_slots_total=0, swap_slots_free=0)
        decisions = policy.decide(h, [current], history)
        history.append((h, [current]))
        target = decisions[0].target_pages if decisions else current.target_pages
        assert target <= highest
        highest = target
        balloon = data.draw(st.integers(0, current.memory_pages), label="balloon")
        current = replace(current, time=t + 1.5, target_pages=target, balloon_pages=balloon,
                          out_of_puff=data.draw(st.booleans(), label="puff"),
                          free_pages=None if current.free_pages is None else
                          min(current.free_pages, current.memory_pages - balloon))


def test_guest_counters_going_down_after_restart_are_not_pressure() -> None:
    prev = ballooned(400, time=99.0, alloc_stalls=50, swap_in=1 << 20)
    now_ = ballooned(400, alloc_stalls=0, swap_in=0, free_pages=300)
    # No guard: MoM's shrink rule runs (host 12%: cur 600, used 300, floor 372,
    # size 570 -> balloon 430).
    d = one(MomPolicy().decide(host(1200), [now_], [(host(1200, t=99.0), [prev])]))
    assert d.target_pages == 430 and d.reason.startswith("mom:")


def test_mom_shrinks_step_by_step_down_to_the_guest_free_floor() -> None:
    # Constant 12% host free; the guest uses 500 pages and every ballooned page comes out
    # of its free memory. Each step is 5% of the current size until the floor
    # used + 12% * cur stops it; the fixed point is 500 / 0.88 = 568.2 pages.
    policy = MomPolicy({"stat_avg_samples": 1})
    balloon, sizes = 0, [1000]
    for step in range(40):
        cur = 1000 - balloon
        sample = ballooned(balloon, time=float(step), free_pages=cur - 500)
        decisions = policy.decide(host(1200, t=float(step)), [sample], [])
        if not decisions:
            break
        balloon = one(decisions).target_pages
        new = 1000 - balloon
        expected = max(math.floor(cur * 0.95 + 0.5), math.floor(500 + 0.12 * cur + 0.5))
        assert new == expected
        sizes.append(new)
    else:
        pytest.fail("MoM did not settle")
    assert sizes[1:4] == [950, 903, 858]  # 1000*.95, 950*.95 = 902.5 -> 903, 857.85 -> 858
    assert 568 <= sizes[-1] <= 571
