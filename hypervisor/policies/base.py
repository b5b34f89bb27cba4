"""The policy interface: samples in, balloon targets out.

A policy is a plain object that the hypervisor calls every ``policy_interval`` with the
newest host sample, the newest sample of every VM and the samples before them. It returns a
:class:`Decision` for each VM whose balloon target should change, and nothing else. Policies
are pure: no IO, no threads, no global state; whatever they remember between calls (moving
averages, back-off timers) lives in the policy object, keyed by VM name.

Units: memory amounts are pages of 4096 bytes unless a field says bytes; times are seconds
(the same clock as the samples' ``time``); rates and thresholds are fractions in [0, 1].

A *balloon target* is the number of pages taken away from the guest. Every target a policy
returns is clamped so that the guest keeps between ``min_pages`` and ``max_pages`` of usable
memory (``memory_pages - target``), and so that it is never negative nor above
``memory_pages`` (:func:`clamp_balloon`).

This module also holds the parts the adaptive policies share: parameter checking
(:func:`resolve_params`), host free memory (:func:`host_free_fraction`), history look-ups and
:class:`GuestGuard`, which implements the two guest-protection rules (driver out of puff,
guest pressure) documented in docs/policies.md.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import ClassVar, TypeAlias

__all__ = [
    "Decision",
    "GuestGuard",
    "History",
    "HostSample",
    "Policy",
    "VmSample",
    "balloon_bounds",
    "clamp_balloon",
    "host_free_fraction",
    "index_vms",
    "previous_vm_sample",
    "recent_host_samples",
    "recent_vm_samples",
    "resolve_params",
    "round_half_up",
]


def _check_count(owner: str, name: str, value: object, *, optional: bool = False) -> None:
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{owner}.{name} must be an int, got {value!r}")
    if value < 0:
        raise ValueError(f"{owner}.{name} must be >= 0, got {value}")


def _check_time(owner: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{owner}.time must be a finite number of seconds, got {value!r}")


@dataclass(frozen=True, kw_only=True)
class HostSample:
    """The host's frame budget at ``time`` (frames are 4096-byte host pages)."""

    time: float
    frames_total: int
    frames_free: int
    swap_slots_total: int
    swap_slots_free: int

    def __post_init__(self) -> None:
        _check_time("HostSample", self.time)
        for f in fields(self):
            if f.name != "time":
                _check_count("HostSample", f.name, getattr(self, f.name))
        if self.frames_total < 1:
            raise ValueError("HostSample.frames_total must be >= 1")
        if self.frames_free > self.frames_total:
            raise ValueError(
                f"HostSample.frames_free {self.frames_free} exceeds frames_total "
                f"{self.frames_total}"
            )
        if self.swap_slots_free > self.swap_slots_total:
            raise ValueError(
                f"HostSample.swap_slots_free {self.swap_slots_free} exceeds swap_slots_total "
                f"{self.swap_slots_total}"
            )


@dataclass(frozen=True, kw_only=True)
class VmSample:
    """One VM at ``time``: sizes in pages, ``swap_in``/``swap_out`` in bytes (cumulative)."""

    name: str
    time: float
    memory_pages: int  # logical guest RAM
    target_pages: int  # current balloon target
    balloon_pages: int  # driver's `actual`
    backed_pages: int  # frames it holds now
    host_swapped_pages: int
    free_pages: int | None  # guest MEMFREE / 4096 (None before first stats)
    available_pages: int | None  # guest AVAIL / 4096
    swap_in: int  # cumulative guest swap-in, bytes
    swap_out: int  # cumulative guest swap-out, bytes
    alloc_stalls: int
    major_faults: int
    out_of_puff: bool  # driver reported a stall since the last sample
    active_sampled: int  # accessed-bit sample for `share`: pages whose bit was cleared
    active_touched: int  # ... and how many of them were touched again
    min_pages: int
    max_pages: int
    shares: int

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"VmSample.name must be a non-empty str, got {self.name!r}")
        owner = f"VmSample({self.name})"
        _check_time(owner, self.time)
        for f in fields(self):
            if f.name in ("name", "time", "out_of_puff"):
                continue
            _check_count(owner, f.name, getattr(self, f.name),
                         optional=f.name in ("free_pages", "available_pages"))
        if not isinstance(self.out_of_puff, bool):
            raise ValueError(f"{owner}.out_of_puff must be a bool, got {self.out_of_puff!r}")
        for name in ("target_pages", "balloon_pages", "min_pages"):
            if getattr(self, name) > self.memory_pages:
                raise ValueError(
                    f"{owner}.{name} {getattr(self, name)} exceeds memory_pages "
                    f"{self.memory_pages}"
                )
        if self.min_pages > self.max_pages:
            raise ValueError(
                f"{owner}.min_pages {self.min_pages} exceeds max_pages {self.max_pages}"
            )
        if self.active_touched > self.active_sampled:
            raise ValueError(
                f"{owner}.active_touched {self.active_touched} exceeds active_sampled "
                f"{self.active_sampled}"
            )

    @property
    def usable_pages(self) -> int:
        """Guest memory outside the balloon now (MoM's ``balloon_cur``)."""
        return self.memory_pages - self.balloon_pages


@dataclass(frozen=True, kw_only=True)
class Decision:
    """Set ``vm``'s balloon target to ``target_pages``; ``reason`` is shown to the operator."""

    vm: str
    target_pages: int
    reason: str

    def __post_init__(self) -> None:
        if not isinstance(self.vm, str) or not self.vm:
            raise ValueError(f"Decision.vm must be a non-empty str, got {self.vm!r}")
        _check_count(f"Decision({self.vm})", "target_pages", self.target_pages)
        if not isinstance(self.reason, str) or not self.reason:
            raise ValueError(f"Decision({self.vm}).reason must be a non-empty str")


History: TypeAlias = Sequence[tuple[HostSample, Sequence[VmSample]]]


class Policy(ABC):
    """Base class of every policy; subclasses set ``name`` and override :meth:`decide`.

    ``DEFAULTS`` lists every parameter a policy accepts with its default value; the value's
    type is the parameter's type (an int default accepts ints, a float default ints or
    floats). Unknown or ill-typed parameters raise ``ValueError`` naming them.
    """

    name: ClassVar[str] = ""
    DEFAULTS: ClassVar[Mapping[str, object]] = {}

    def __init__(self, params: Mapping[str, object] | None = None) -> None:
        self.params: dict[str, object] = resolve_params(
            self.name or type(self).__name__, self.DEFAULTS, params
        )

    @abstractmethod
    def decide(
        self,
        host: HostSample,
        vms: Sequence[VmSample],
        history: History,
    ) -> list[Decision]:
        """Return a Decision for each VM whose balloon target should change.

        ``history`` holds earlier (host, vms) samples, oldest first; it may also end with
        the current sample (look-ups only use samples strictly older than the current one).
        """

    def param_float(self, key: str) -> float:
        """A resolved numeric parameter as float (ints were accepted for float defaults)."""
        value = self.params[key]
        assert isinstance(value, (int, float)) and not isinstance(value, bool), key
        return float(value)

    def param_int(self, key: str) -> int:
        value = self.params[key]
        assert isinstance(value, int) and not isinstance(value, bool), key
        return value

    def param_bool(self, key: str) -> bool:
        value = self.params[key]
        assert isinstance(value, bool), key
        return value

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.params!r})"


def resolve_params(
    owner: str, defaults: Mapping[str, object], params: Mapping[str, object] | None
) -> dict[str, object]:
    """Merge ``params`` over ``defaults``, checking names and types; returns a new dict."""
    resolved = dict(defaults)
    if params is None:
        return resolved
    if not isinstance(params, Mapping):
        raise ValueError(f"policy {owner!r}: params must be a mapping, got {params!r}")
    for key, value in params.items():
        if key not in defaults:
            known = ", ".join(sorted(defaults)) or "none"
            raise ValueError(
                f"policy {owner!r}: unknown parameter {key!r} (accepted: {known})"
            )
        default = defaults[key]
        if isinstance(default, bool):
            ok = isinstance(value, bool)
            kind = "a bool"
        elif isinstance(default, int):
            ok = isinstance(value, int) and not isinstance(value, bool)
            kind = "an int"
        elif isinstance(default, float):
            ok = (
                isinstance(value, (int, float))
                and not isinstance(value, bool)
                and math.isfinite(value)
            )
            value = float(value) if ok else value  # type: ignore[arg-type]
            kind = "a finite number"
        elif isinstance(default, Mapping):
            ok = isinstance(value, Mapping)
            value = dict(value) if ok else value  # type: ignore[call-overload]
            kind = "a mapping"
        else:
            ok = isinstance(value, type(default))
            kind = f"a {type(default).__name__}"
        if not ok:
            raise ValueError(f"policy {owner!r}: parameter {key!r} must be {kind}, got {value!r}")
        resolved[key] = value
    return resolved


def check_range(owner: str, params: Mapping[str, object], key: str,
                lo: float, hi: float, *, lo_open: bool = False, hi_open: bool = False) -> None:
    """Raise ValueError unless ``params[key]`` lies in the interval from lo to hi."""
    v = params[key]
    assert isinstance(v, (int, float))
    if (v <= lo if lo_open else v < lo) or (v >= hi if hi_open else v > hi):
        left = "(" if lo_open else "["
        right = ")" if hi_open else "]"
        raise ValueError(
            f"policy {owner!r}: parameter {key!r} = {v} is outside {left}{lo}, {hi}{right}"
        )


def round_half_up(x: float) -> int:
    """Nearest integer, halves rounded up (not banker's rounding): pages are counted."""
    return math.floor(x + 0.5)


def balloon_bounds(vm: VmSample) -> tuple[int, int]:
    """Smallest and largest balloon target that respects the VM's min/max usable pages."""
    lo = max(0, vm.memory_pages - vm.max_pages)
    hi = vm.memory_pages - vm.min_pages
    return lo, hi


def clamp_balloon(vm: VmSample, target: int) -> int:
    """Clamp a balloon target into :func:`balloon_bounds`."""
    lo, hi = balloon_bounds(vm)
    return min(max(target, lo), hi)


def index_vms(vms: Sequence[VmSample]) -> dict[str, VmSample]:
    """Map name -> sample; a name given twice is an error (the host sent a broken sample)."""
    out: dict[str, VmSample] = {}
    for vm in vms:
        if vm.name in out:
            raise ValueError(f"VM {vm.name!r} appears twice in one sample")
        out[vm.name] = vm
    return out


def host_free_fraction(host: HostSample, vms: Sequence[VmSample], *, swap_debt: bool) -> float:
    """Free host memory as a fraction of ``frames_total``; may be negative with ``swap_debt``.

    Host swap is not free memory: a frame in host swap is a frame the host owes to a guest
    that will fault it back in. With ``swap_debt`` those pages are subtracted from the free
    frames, so a host that keeps going only by swapping shows as (critically) short.
    """
    free = host.frames_free
    if swap_debt:
        free -= sum(vm.host_swapped_pages for vm in vms)
    return free / host.frames_total


def recent_host_samples(
    host: HostSample, vms: Sequence[VmSample], history: History, n: int
) -> list[tuple[HostSample, Sequence[VmSample]]]:
    """The current host sample and up to ``n - 1`` older ones, newest first."""
    out: list[tuple[HostSample, Sequence[VmSample]]] = [(host, vms)]
    last = host.time
    for h, hv in reversed(history):
        if len(out) >= n:
            break
        if h.time < last:
            out.append((h, hv))
            last = h.time
    return out


def recent_vm_samples(vm: VmSample, history: History, n: int) -> list[VmSample]:
    """``vm`` and up to ``n - 1`` older samples of the same VM, newest first."""
    out = [vm]
    last = vm.time
    for _, hv in reversed(history):
        if len(out) >= n:
            break
        for s in hv:
            if s.name == vm.name and s.time < last:
                out.append(s)
                last = s.time
                break
    return out


def previous_vm_sample(vm: VmSample, history: History) -> VmSample | None:
    """The newest sample of the same VM strictly older than ``vm``, if any."""
    found = recent_vm_samples(vm, history, 2)
    return found[1] if len(found) == 2 else None


@dataclass
class _Hold:
    ceiling: int  # balloon target may not rise above this ...
    until: float  # ... until this time (host clock)
    cause: str


class GuestGuard:
    """The two guest-protection rules every adaptive policy applies before its own rule.

    * **Out of puff**: the driver could not get pages from the guest (``out_of_puff``). The
      target is reset to what the balloon holds (``min(target, balloon)``) and may not rise
      for ``backoff`` seconds: pushing harder only makes the guest reclaim or OOM.
    * **Guest pressure**: ``alloc_stalls`` or ``swap_in`` rose since the VM's previous sample:
      the guest is short of memory, so the balloon is deflated fast
      (``min(target, balloon) * deflate_factor``, default halved) and may not rise for
      ``backoff`` seconds.

    While a hold is active, the policy's own proposals are capped at the hold's ceiling and
    the ceiling follows every lower target set meanwhile, so the target never rises.
    """

    def __init__(self, *, backoff: float, deflate_factor: float) -> None:
        self.backoff = backoff
        self.deflate_factor = deflate_factor
        self._holds: dict[str, _Hold] = {}

    def held(self, name: str, now: float) -> _Hold | None:
        hold = self._holds.get(name)
        if hold is not None and now >= hold.until:
            del self._holds[name]
            return None
        return hold

    def forget_missing(self, names: set[str]) -> None:
        for name in list(self._holds):
            if name not in names:
                del self._holds[name]

    def react(self, now: float, vm: VmSample, history: History) -> tuple[bool, Decision | None]:
        """Apply the guard rules to ``vm``: (handled, decision).

        ``handled`` means a rule fired and the policy must leave this VM alone this round;
        the decision is None when the target already has the value the rule wants.
        """
        base = min(vm.target_pages, vm.balloon_pages)
        prev = previous_vm_sample(vm, history)
        if prev is not None and (
            vm.alloc_stalls > prev.alloc_stalls or vm.swap_in > prev.swap_in
        ):
            target = clamp_balloon(vm, math.floor(base * self.deflate_factor))
            what = []
            if vm.alloc_stalls > prev.alloc_stalls:
                what.append(f"alloc_stalls {prev.alloc_stalls} -> {vm.alloc_stalls}")
            if vm.swap_in > prev.swap_in:
                what.append(f"swap_in {prev.swap_in} -> {vm.swap_in} B")
            reason = (
                f"guest pressure ({', '.join(what)}): deflate balloon {base} -> {target} pages "
                f"(x{self.deflate_factor:g}), no inflation for {self.backoff:g}s"
            )
            return True, self._set_hold(now, vm, target, "guest pressure", reason)
        if vm.out_of_puff:
            target = clamp_balloon(vm, base)
            reason = (
                f"driver out of puff at balloon {vm.balloon_pages} pages (target "
                f"{vm.target_pages}): reset target to {target}, no inflation for "
                f"{self.backoff:g}s"
            )
            return True, self._set_hold(now, vm, target, "out of puff", reason)
        return False, None

    def _set_hold(
        self, now: float, vm: VmSample, target: int, cause: str, reason: str
    ) -> Decision | None:
        old = self.held(vm.name, now)
        ceiling = target if old is None else min(old.ceiling, target)
        self._holds[vm.name] = _Hold(ceiling=ceiling, until=now + self.backoff, cause=cause)
        if target == vm.target_pages:
            return None
        return Decision(vm=vm.name, target_pages=target, reason=reason)

    def cap(self, now: float, name: str, target: int) -> tuple[int, str]:
        """Cap a proposed target at the VM's hold ceiling: (target, note for the reason)."""
        hold = self.held(name, now)
        if hold is None or target <= hold.ceiling:
            return target, ""
        return hold.ceiling, (
            f"; held at {hold.ceiling} pages ({hold.cause} back-off, "
            f"{hold.until - now:.3g}s left)"
        )

    def settle(self, now: float, name: str, target: int) -> None:
        """Record a target set during a hold, so the ceiling never lets it rise again."""
        hold = self.held(name, now)
        if hold is not None and target < hold.ceiling:
            hold.ceiling = target
