"""The ``mom`` policy: oVirt MoM's auto-balloon rules (``doc/balloon.rules``), in pages.

Every interval the host's free memory decides the regime for all guests at once:

* host free < ``pressure_threshold`` (20 %): **shrink** every guest. Each guest should keep
  ``min_guest_free_percent`` (20 %) of its memory free, scaled down by host pressure
  (``20 % * host_free / 20 %``); at or below ``pressure_critical`` (5 %) the goal becomes
  ``host_free - 5 %`` -- negative, which forces the guest to reclaim or swap. A guest
  shrinks by at most ``max_balloon_change_percent`` (5 %) of its current memory per step,
  never below ``used + goal * current`` nor ``min_pages``.
* otherwise: **grow** every ballooned guest by 5 % of its current memory per step, at least
  to ``used + 20 % * current``, never above ``max_pages``.
* a step that changes the guest's memory by no more than ``min_balloon_change_percent``
  (0.25 %) of its current memory is skipped.

Terms, as MoM's: a guest's *current* memory is ``memory_pages - balloon_pages`` (MoM's
``balloon_cur``), ``used = avg(current) - avg(free_pages)`` over the last
``stat_avg_samples`` samples (MoM's ``StatAvg`` over ``sample-history-length`` = 10), host
free is the average over as many host samples of :func:`host_free_fraction`.

An average alone reacts late: when a guest's working set jumps, the host's frames can be
all in use while a 10-sample mean of the free fraction still reads above 20 %, and the host
swaps for seconds before the first balloon target. With ``react_to_current`` (the default)
the rule takes the *lower* of the average and the current host free fraction, and the
*higher* of a guest's average and current ``used``: pressure is acted on at the first sample
that shows it, relief (and a guest shrinking) only once the average agrees.

Before MoM's rule, :class:`GuestGuard` handles stalled drivers and guests under pressure.
The full derivation, with citations, is in docs/policies.md.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import ClassVar

from .base import (
    Decision,
    GuestGuard,
    History,
    HostSample,
    Policy,
    VmSample,
    check_range,
    clamp_balloon,
    host_free_fraction,
    index_vms,
    recent_host_samples,
    recent_vm_samples,
    round_half_up,
)


class MomPolicy(Policy):
    """oVirt MoM's balloon.rules plus the shared stall / guest-pressure guard."""

    name = "mom"
    DEFAULTS: ClassVar[Mapping[str, object]] = {
        # Constants of MoM's doc/balloon.rules, same names and values.
        "pressure_threshold": 0.20,
        "pressure_critical": 0.05,
        "min_guest_free_percent": 0.20,
        "max_balloon_change_percent": 0.05,
        "min_balloon_change_percent": 0.0025,
        # MoM hard-codes `(+ -0.05 host_free_percent)` as the critical guest-free goal.
        "critical_guest_free_offset": -0.05,
        # MoM's `sample-history-length` (doc/mom-balloon.conf): StatAvg window.
        "stat_avg_samples": 10,
        # Act on the current sample when it is worse than the average (see the module doc).
        "react_to_current": True,
        # Count host-swapped pages as negative free memory (see host_free_fraction).
        "swap_debt": True,
        # GuestGuard: seconds without inflation after a stall or guest pressure.
        "stall_backoff": 10.0,
        "pressure_deflate_factor": 0.5,
    }

    def __init__(self, params: Mapping[str, object] | None = None) -> None:
        super().__init__(params)
        p = self.params
        for key in ("pressure_threshold", "min_guest_free_percent"):
            check_range(self.name, p, key, 0.0, 1.0)
        check_range(self.name, p, "pressure_critical", 0.0,
                    self.param_float("pressure_threshold"))
        check_range(self.name, p, "max_balloon_change_percent", 0.0, 1.0, lo_open=True,
                    hi_open=True)
        check_range(self.name, p, "min_balloon_change_percent", 0.0,
                    self.param_float("max_balloon_change_percent"), hi_open=True)
        check_range(self.name, p, "critical_guest_free_offset", -1.0, 0.0)
        check_range(self.name, p, "stat_avg_samples", 1, 10_000)
        check_range(self.name, p, "stall_backoff", 0.0, 1e9)
        check_range(self.name, p, "pressure_deflate_factor", 0.0, 1.0, hi_open=True)
        self.pressure_threshold = self.param_float("pressure_threshold")
        self.pressure_critical = self.param_float("pressure_critical")
        self.min_guest_free = self.param_float("min_guest_free_percent")
        self.max_change = self.param_float("max_balloon_change_percent")
        self.min_change = self.param_float("min_balloon_change_percent")
        self.critical_offset = self.param_float("critical_guest_free_offset")
        self.avg_samples = self.param_int("stat_avg_samples")
        self.react_to_current = self.param_bool("react_to_current")
        self.swap_debt = self.param_bool("swap_debt")
        self.guard = GuestGuard(
            backoff=self.param_float("stall_backoff"),
            deflate_factor=self.param_float("pressure_deflate_factor"),
        )

    def host_free(self, host: HostSample, vms: Sequence[VmSample], history: History) -> float:
        """MoM's ``host_free_percent``: StatAvg of the host's free fraction (with
        ``react_to_current``, the current fraction when that is lower)."""
        recent = recent_host_samples(host, vms, history, self.avg_samples)
        values = [host_free_fraction(h, hv, swap_debt=self.swap_debt) for h, hv in recent]
        avg = sum(values) / len(values)
        return min(avg, values[0]) if self.react_to_current else avg

    def decide(
        self, host: HostSample, vms: Sequence[VmSample], history: History
    ) -> list[Decision]:
        now = host.time
        by_name = index_vms(vms)
        self.guard.forget_missing(set(by_name))
        host_free = self.host_free(host, vms, history)
        pressure = host_free < self.pressure_threshold
        if not pressure:
            goal = self.min_guest_free
            regime = f"host free {host_free:.1%} >= {self.pressure_threshold:.0%}"
        elif host_free <= self.pressure_critical:
            goal = host_free + self.critical_offset
            regime = (
                f"host free {host_free:.1%} <= {self.pressure_critical:.0%} (critical)"
            )
        else:
            goal = self.min_guest_free * host_free / self.pressure_threshold
            regime = f"host free {host_free:.1%} < {self.pressure_threshold:.0%}"

        decisions: list[Decision] = []
        for vm in by_name.values():
            handled, forced = self.guard.react(now, vm, history)
            if handled:
                if forced is not None:
                    decisions.append(forced)
                continue
            proposal = self._rule(vm, history, pressure, goal, regime)
            if proposal is None:
                continue
            size, reason = proposal
            target = clamp_balloon(vm, vm.memory_pages - size)
            if target != vm.memory_pages - size:
                reason += f", clamped by min/max_pages to balloon {target}"
            target, note = self.guard.cap(now, vm.name, target)
            if target != vm.target_pages:
                self.guard.settle(now, vm.name, target)
                decisions.append(Decision(vm=vm.name, target_pages=target, reason=reason + note))
        return decisions

    def _rule(
        self, vm: VmSample, history: History, pressure: bool, goal: float, regime: str
    ) -> tuple[int, str] | None:
        """MoM's shrink_guest / grow_guest: the new guest size in pages, and why; or None."""
        if vm.free_pages is None:
            return None  # no guest stats yet: MoM has nothing to compute `used` from
        cur = vm.usable_pages
        recent = [s for s in recent_vm_samples(vm, history, self.avg_samples)
                  if s.free_pages is not None]
        avg_cur = sum(s.usable_pages for s in recent) / len(recent)
        avg_free = sum(s.free_pages or 0 for s in recent) / len(recent)
        used = avg_cur - avg_free
        if self.react_to_current:
            used = max(used, cur - vm.free_pages)
        free_now = vm.free_pages / cur if cur else 0.0
        floor = max(float(vm.min_pages), used + goal * cur)
        if pressure:
            size = cur * (1.0 - self.max_change)
            step = f"step capped at {self.max_change:.0%}"
            if size < floor:
                size, step = floor, f"floor = used {used:.0f} + ({goal:.1%} x {cur})"
            # MoM only ever shrinks under pressure.
            if size > cur:
                return None
            action = f"shrink guest free {free_now:.0%} -> {goal:.0%}"
        else:
            bmax = min(vm.max_pages, vm.memory_pages)
            if cur >= bmax:
                return None
            size = cur * (1.0 + self.max_change)
            step = f"step capped at {self.max_change:.0%}"
            if size < floor:
                size, step = floor, f"raised to keep {goal:.0%} free over used {used:.0f}"
            if size > bmax:
                size, step = float(bmax), f"capped at max_pages {bmax}"
            action = "grow guest"
        if not abs(size - cur) > self.min_change * cur:
            return None  # MoM's change_big_enough: not worth a balloon operation
        new = round_half_up(size)
        if new == cur:
            return None
        reason = (
            f"mom: {regime}: {action}, {step}: guest {cur} -> {new} pages, "
            f"balloon {vm.balloon_pages} -> {vm.memory_pages - new}"
        )
        return new, reason
