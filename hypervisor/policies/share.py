"""The ``share`` policy: VMware ESX shares with an idle memory tax (Waldspurger, OSDI 2002).

Each VM is charged per page by its *adjusted shares-per-page ratio*

    rho = S / (P * (f + k * (1 - f))),   k = 1 / (1 - tau)

with ``S`` its shares, ``P`` its allocation in pages (``memory_pages - target_pages``), ``f``
the estimated fraction of its memory that is active and ``tau`` the idle memory tax rate
(0.75 by default, so an idle page costs k = 4 times an active one). Memory is reclaimed
from the VM paying the least per page -- lowest rho (min-funding revocation) -- and given to
the VM with the highest rho.

``f`` is estimated by statistical sampling as in ESX: every period the host clears the
accessed bits of ``active_sampled`` random backed pages of the VM and counts how many were
touched again (``active_touched``). The policy keeps two exponentially weighted moving
averages of ``touched / sampled`` per VM, a slow one and a fast one, and uses their maximum:
it reacts at once when a working set grows and slowly when it shrinks. A VM is not reclaimed
from before its first sample: until then nothing says whether its memory is idle (the VMs of
a host that just booted would otherwise be picked by their sizes alone); and while any VM
that reports guest stats has no sample yet, nothing is reclaimed at all, so that a VM
measured early does not pay for one that booted later. It can still be
given memory back. With ``warmup`` > 0 (off by default), a VM the policy saw booting (samples
without guest stats yet) is sampled for ``warmup`` seconds after its first guest stats before
a sample counts: the host picks the pages to sample when a period starts, and a period that
started while the guest was booting sampled pages its tasks had not touched yet, so a busy VM
can read as idle. Set it to at least the host's sampling period when VMs boot with the
policy already running and the first seconds' decisions matter less than their victims.

Host states, in fractions of ``frames_total`` (host free as in :func:`host_free_fraction`):

* free < ``low_free`` (10 %): reclaim ``low_free * total - free`` pages (minus inflations
  still in flight), lowest rho first, at most ``max_step_percent`` (5 %) of a VM's memory
  per VM per step;
* free > ``high_free`` (20 %): give back ``free - high_free * total`` pages (minus
  deflations in flight), highest rho first, with the same per-VM step cap;
* in between: nothing (hysteresis, so reclaim and give-back never alternate).

Steps smaller than ``min_step_percent`` (0.25 %) of a VM's memory are skipped; when the
whole remaining need is that small for the VM whose turn it is, nothing moves this round.
Before the rule, :class:`GuestGuard` handles stalled drivers and guests under pressure; see
docs/policies.md.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar

from .base import (
    Decision,
    GuestGuard,
    History,
    HostSample,
    Policy,
    VmSample,
    balloon_bounds,
    check_range,
    host_free_fraction,
    index_vms,
)


@dataclass
class _Activity:
    slow: float
    fast: float
    last_time: float

    @property
    def estimate(self) -> float:
        return max(self.slow, self.fast)


class SharePolicy(Policy):
    """ESX-style proportional shares with an idle memory tax."""

    name = "share"
    DEFAULTS: ClassVar[Mapping[str, object]] = {
        "tax_rate": 0.75,  # ESX Mem.IdleTax default
        "low_free": 0.10,
        "high_free": 0.20,
        "max_step_percent": 0.05,
        "min_step_percent": 0.0025,
        # Gains of the two EWMAs of the active fraction (per sample).
        "slow_gain": 0.1,
        "fast_gain": 0.5,
        # Active fraction assumed before the first sample: 1.0 taxes nobody unmeasured.
        "initial_active": 1.0,
        # Seconds after a booting VM's first guest stats before its samples count (0: off).
        "warmup": 0.0,
        "swap_debt": True,
        "stall_backoff": 10.0,
        "pressure_deflate_factor": 0.5,
        # False: no guest-protection rules (GuestGuard), shares and the tax alone decide, as
        # in ESX (which has none); for experiments that reproduce the paper.
        "guest_guard": True,
    }

    def __init__(self, params: Mapping[str, object] | None = None) -> None:
        super().__init__(params)
        p = self.params
        # tau = 1 would make k infinite: every idle page infinitely expensive.
        check_range(self.name, p, "tax_rate", 0.0, 1.0, hi_open=True)
        check_range(self.name, p, "low_free", 0.0, 1.0)
        check_range(self.name, p, "high_free", self.param_float("low_free"), 1.0)
        check_range(self.name, p, "max_step_percent", 0.0, 1.0, lo_open=True)
        check_range(self.name, p, "min_step_percent", 0.0,
                    self.param_float("max_step_percent"))
        check_range(self.name, p, "slow_gain", 0.0, 1.0, lo_open=True)
        check_range(self.name, p, "fast_gain", 0.0, 1.0, lo_open=True)
        check_range(self.name, p, "initial_active", 0.0, 1.0)
        check_range(self.name, p, "warmup", 0.0, 1e9)
        check_range(self.name, p, "stall_backoff", 0.0, 1e9)
        check_range(self.name, p, "pressure_deflate_factor", 0.0, 1.0, hi_open=True)
        self.tax_rate = self.param_float("tax_rate")
        self.k = 1.0 / (1.0 - self.tax_rate)
        self.low_free = self.param_float("low_free")
        self.high_free = self.param_float("high_free")
        self.max_step = self.param_float("max_step_percent")
        self.min_step = self.param_float("min_step_percent")
        self.slow_gain = self.param_float("slow_gain")
        self.fast_gain = self.param_float("fast_gain")
        self.initial_active = self.param_float("initial_active")
        self.warmup = self.param_float("warmup")
        #: Per VM seen booting: when its first guest stats came (None: not yet).
        self._ready_at: dict[str, float | None] = {}
        self.swap_debt = self.param_bool("swap_debt")
        self.guard = GuestGuard(
            backoff=self.param_float("stall_backoff"),
            deflate_factor=self.param_float("pressure_deflate_factor"),
        )
        self._activity: dict[str, _Activity] = {}
        self.guest_guard = self.param_bool("guest_guard")

    # -- active memory estimate ---------------------------------------------------------

    def observe(self, vm: VmSample) -> None:
        """Fold ``vm``'s accessed-bit sample into its moving averages (once per sample)."""
        if vm.free_pages is None:
            self._ready_at.setdefault(vm.name, None)  # booting: no guest stats yet
        elif vm.name in self._ready_at and self._ready_at[vm.name] is None:
            self._ready_at[vm.name] = vm.time
        if self.warmup > 0 and vm.name in self._ready_at:
            ready = self._ready_at[vm.name]
            if ready is None or vm.time < ready + self.warmup:
                return
        if vm.active_sampled == 0:
            return
        x = vm.active_touched / vm.active_sampled
        act = self._activity.get(vm.name)
        if act is None:
            self._activity[vm.name] = _Activity(slow=x, fast=x, last_time=vm.time)
        elif vm.time > act.last_time:
            act.slow += self.slow_gain * (x - act.slow)
            act.fast += self.fast_gain * (x - act.fast)
            act.last_time = vm.time

    def active_fraction(self, name: str) -> float:
        """Estimated active fraction f of ``name``'s memory: max(slow, fast) EWMA."""
        act = self._activity.get(name)
        return self.initial_active if act is None else act.estimate

    def rho(self, vm: VmSample) -> float:
        """Adjusted shares-per-page ratio of ``vm`` at its current target."""
        pages = vm.memory_pages - vm.target_pages
        if pages <= 0:
            return math.inf  # nothing left to reclaim: never the victim
        f = self.active_fraction(vm.name)
        return vm.shares / (pages * (f + self.k * (1.0 - f)))

    def _why_rho(self, vm: VmSample, rho: float) -> str:
        f = self.active_fraction(vm.name)
        return (
            f"rho {rho:.4g} = S {vm.shares} / (P {vm.memory_pages - vm.target_pages} * "
            f"(f {f:.2f} + k {self.k:g} * (1 - f)))"
        )

    # -- decisions ----------------------------------------------------------------------

    def decide(
        self, host: HostSample, vms: Sequence[VmSample], history: History
    ) -> list[Decision]:
        now = host.time
        by_name = index_vms(vms)
        self.guard.forget_missing(set(by_name))
        for name in list(self._activity):
            if name not in by_name:
                del self._activity[name]
        for name in list(self._ready_at):
            if name not in by_name:
                del self._ready_at[name]
        for vm in by_name.values():
            self.observe(vm)

        decisions: list[Decision] = []
        free_vms: list[VmSample] = []
        for vm in by_name.values():
            handled, forced = (self.guard.react(now, vm, history) if self.guest_guard
                               else (False, None))
            if handled:
                if forced is not None:
                    decisions.append(forced)
            else:
                free_vms.append(vm)

        free_frac = host_free_fraction(host, vms, swap_debt=self.swap_debt)
        free = free_frac * host.frames_total
        rhos = {vm.name: self.rho(vm) for vm in free_vms}
        if free_frac < self.low_free:
            in_flight = sum(max(0, vm.target_pages - vm.balloon_pages) for vm in vms)
            need = math.ceil(self.low_free * host.frames_total - free) - in_flight
            # Rank only when every VM that reports guest stats has been measured: a VM
            # sampled first would otherwise pay for one whose idleness is not known yet.
            waiting = [v for v in vms if v.free_pages is not None
                       and v.name not in self._activity]
            measured = [] if waiting else [v for v in free_vms if v.name in self._activity]
            order = sorted(measured, key=lambda v: (rhos[v.name], v.name))
            head = (
                f"share: host free {free_frac:.1%} < {self.low_free:.0%}: reclaim from "
                f"lowest rho"
            )
            decisions += self._move(now, order, need, +1, head, rhos)
        elif free_frac > self.high_free:
            in_flight = sum(max(0, vm.balloon_pages - vm.target_pages) for vm in vms)
            spare = math.floor(free - self.high_free * host.frames_total) - in_flight
            order = sorted(free_vms, key=lambda v: (-rhos[v.name], v.name))
            head = (
                f"share: host free {free_frac:.1%} > {self.high_free:.0%}: give to "
                f"highest rho"
            )
            decisions += self._move(now, order, spare, -1, head, rhos)
        return decisions

    def _move(
        self,
        now: float,
        order: list[VmSample],
        amount: int,
        sign: int,
        head: str,
        rhos: Mapping[str, float],
    ) -> list[Decision]:
        """Inflate (sign +1) or deflate (-1) balloons in ``order`` by ``amount`` pages total."""
        out = []
        for vm in order:
            if amount <= 0:
                break
            lo, hi = balloon_bounds(vm)
            base = min(max(vm.target_pages, lo), hi)
            cap = max(1, math.floor(self.max_step * vm.memory_pages))
            if sign > 0:
                hold_cap, _ = self.guard.cap(now, vm.name, hi)
                room = hold_cap - base
            else:
                room = base - lo
            step = min(amount, cap, room)
            if step <= 0:
                continue
            if step < self.min_step * vm.memory_pages:
                if step == amount:
                    # What is left is too small to be worth a balloon operation on this VM;
                    # it is not handed on to a VM further down the order (a smaller VM,
                    # whose own threshold it passes, would be taxed out of turn).
                    break
                continue
            target = base + sign * step
            amount -= step
            verb = "inflate" if sign > 0 else "deflate"
            bound = (
                f"step cap {cap}" if step == cap else
                f"VM bound {hi if sign > 0 else lo}" if step == room else
                "rest of the need"
            )
            reason = (
                f"{head} ({self._why_rho(vm, rhos[vm.name])}): {verb} {step} pages "
                f"({bound}): balloon {vm.target_pages} -> {target}"
            )
            if target != vm.target_pages:
                self.guard.settle(now, vm.name, target)
                out.append(Decision(vm=vm.name, target_pages=target, reason=reason))
        return out
