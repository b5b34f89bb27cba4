"""Timed host actions (``[[schedule]]`` in a topology) and the seeds of the guests' workloads.

A schedule entry runs one control action at a time after the host started::

    [[schedule]]
    at = "10s"                # seconds after the host started
    action = "set_balloon"    # set_balloon | setmem | set_policy
    vm = "a"
    size = "64MiB"            # set_balloon: balloon target; setmem: the VM's logical size

    [[schedule]]
    at = "30s"
    action = "set_policy"
    name = "mom"              # a policy, as `host.policy`
    params = { pressure_threshold = 0.25 }

The host runs each entry through the same handler as the control channel's method of the
same name (so a scheduled ``set_balloon`` is exactly what ``balloonlab set-balloon`` does)
and emits a ``schedule`` event with the entry and its outcome.

Seeds: every guest's workload random streams derive from the host's ``seed``, the VM's name
and its restart count (:func:`guest_seed`), so two runs with the same seed replay the same
access streams, VMs of one run differ, and a restarted VM does not replay its first life.
"""

from __future__ import annotations

import asyncio
import difflib
import hashlib
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from hypervisor.units import PAGE_SIZE, format_size_exact

if TYPE_CHECKING:  # pragma: no cover
    from hypervisor.host import Host
    from hypervisor.topology import HostConfig, VmConfig, _Ctx

__all__ = [
    "ACTIONS",
    "ScheduleEntry",
    "guest_seed",
    "parse_schedule",
    "run_schedule",
    "schedule_toml",
]

#: Actions a schedule entry can take, with the keys each one needs besides ``at``/``action``.
ACTIONS: dict[str, tuple[str, ...]] = {
    "set_balloon": ("vm", "size"),
    "setmem": ("vm", "size"),
    "set_policy": ("name",),
}
_OPTIONAL: dict[str, tuple[str, ...]] = {"set_policy": ("params",)}


@dataclass(frozen=True, kw_only=True)
class ScheduleEntry:
    """One timed action: ``at`` seconds after the host started; ``size`` in bytes."""

    at: float
    action: str
    vm: str | None = None
    size: int | None = None
    name: str | None = None
    params: Mapping[str, object] = field(default_factory=dict)

    def describe(self) -> str:
        """One line for events and logs, e.g. ``set_balloon a 64MiB``."""
        if self.action == "set_policy":
            extra = " ".join(f"{k}={v}" for k, v in self.params.items())
            return f"set_policy {self.name}" + (f" {extra}" if extra else "")
        assert self.size is not None
        return f"{self.action} {self.vm} {format_size_exact(self.size)}"

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"at": self.at, "action": self.action}
        if self.action == "set_policy":
            out["name"] = self.name
            if self.params:
                out["params"] = dict(self.params)
        else:
            out["vm"] = self.vm
            out["size"] = self.size
        return out


def guest_seed(host_seed: int, vm: str, restarts: int) -> int:
    """The workload seed of *vm*'s guest in its ``restarts``-th restart (0: first boot).

    A hash, so that nearby host seeds or VM names do not give related streams; 48 bits, well
    inside what numpy's ``default_rng`` and the guest's per-task offsets accept."""
    digest = hashlib.blake2b(f"{host_seed}\0{vm}\0{restarts}".encode(), digest_size=6).digest()
    return int.from_bytes(digest, "big")


def parse_schedule(ctx: _Ctx, raw: Any, host: HostConfig,
                   vms: Sequence[VmConfig]) -> tuple[ScheduleEntry, ...]:
    """Validate the ``schedule`` array of tables; errors name ``schedule[i].key``."""
    if not isinstance(raw, list):
        raise ctx.error("schedule", "expected an array of tables: write [[schedule]], "
                        "not [schedule]")
    by_name = {v.name: v for v in vms}
    out = []
    for i, item in enumerate(raw):
        # Each entry on its own: a bad one does not hide the problems of the next.
        entry = ctx.collect(_parse_entry, ctx, f"schedule[{i}]", item, by_name)
        if entry is not None:
            out.append(entry)
    return tuple(out)


def _parse_entry(ctx: _Ctx, key: str, item: Any,
                 by_name: Mapping[str, VmConfig]) -> ScheduleEntry:
    t = ctx.table(item, key)
    if "action" not in t:
        raise ctx.error(f"{key}.action", f"missing: one of {', '.join(ACTIONS)}")
    action = ctx.enum(f"{key}.action", t["action"], tuple(ACTIONS))
    need = ACTIONS[action]
    ctx.check_keys(t, ("at", "action", *need, *_OPTIONAL.get(action, ())), key)
    if "at" not in t:
        raise ctx.error(f"{key}.at", "missing: when to act, after the host started "
                        "(e.g. at = \"10s\")")
    at = ctx.duration(f"{key}.at", t["at"])
    if at < 0:
        raise ctx.error(f"{key}.at", "must not be negative")
    for k in need:
        if k not in t:
            raise ctx.error(f"{key}.{k}", f"missing: {action} needs {' and '.join(need)}")
    if action == "set_policy":
        return _parse_set_policy(ctx, key, t, at)
    vm_name = ctx.string(f"{key}.vm", t["vm"])
    vm = by_name.get(vm_name)
    if vm is None:
        close = difflib.get_close_matches(vm_name, list(by_name), n=1, cutoff=0.6)
        raise ctx.error(f"{key}.vm", f"no VM {vm_name!r} in this topology "
                        f"(VMs: {', '.join(by_name)})", close[0] if close else None)
    size = ctx.size(f"{key}.size", t["size"])
    if size > vm.memory:
        raise ctx.error(f"{key}.size", f"{t['size']!r} is larger than VM {vm.name!r}'s "
                        f"memory ({format_size_exact(vm.memory)})")
    return ScheduleEntry(at=at, action=action, vm=vm.name, size=size)


def _parse_set_policy(ctx: _Ctx, key: str, t: Mapping[str, Any], at: float) -> ScheduleEntry:
    from hypervisor.topology import _POLICY_PATH_RE, BUILTIN_POLICIES, _check_plain

    name = ctx.string(f"{key}.name", t["name"])
    if name not in BUILTIN_POLICIES and not _POLICY_PATH_RE.fullmatch(name):
        close = difflib.get_close_matches(name, BUILTIN_POLICIES, n=1, cutoff=0.6)
        raise ctx.error(f"{key}.name", f"{name!r} is neither a built-in policy "
                        f"({', '.join(BUILTIN_POLICIES)}) nor a 'package.module:Class' path",
                        close[0] if close else None)
    params = dict(ctx.table(t.get("params", {}), f"{key}.params"))
    for k, v in params.items():
        _check_plain(ctx, f"{key}.params.{k}", v)
    if name in BUILTIN_POLICIES:
        from hypervisor.policies import load_policy

        try:
            load_policy(name, params)
        except ValueError as e:
            raise ctx.error(f"{key}.params", str(e)) from None
    return ScheduleEntry(at=at, action="set_policy", name=name, params=params)


def schedule_toml(entries: Sequence[ScheduleEntry]) -> list[str]:
    """TOML lines of *entries* (``[[schedule]]`` tables), read back equal by the parser."""
    from hypervisor.topology import _toml_duration, _toml_value

    out: list[str] = []
    for e in entries:
        out += ["", "[[schedule]]", f"at = {_toml_duration(e.at)}",
                f"action = {_toml_value(e.action)}"]
        if e.action == "set_policy":
            out.append(f"name = {_toml_value(e.name)}")
            if e.params:
                out.append(f"params = {_toml_value(dict(e.params))}")
        else:
            assert e.size is not None
            out += [f"vm = {_toml_value(e.vm)}", f"size = {_toml_value(format_size_exact(e.size))}"]
    return out


def _call(host: Host, e: ScheduleEntry) -> Any:
    """Run *e* through the control channel's handler of the same name."""
    ctl = host.control
    if e.action == "set_policy":
        return ctl.set_policy({"name": e.name, "params": dict(e.params)})
    assert e.size is not None
    if e.action == "setmem":
        return ctl.setmem({"vm": e.vm, "bytes": e.size})
    return ctl.set_balloon({"vm": e.vm, "pages": e.size // PAGE_SIZE})


async def run_schedule(host: Host, entries: Sequence[ScheduleEntry], start: float) -> None:
    """Run *entries* in time order, each at ``start + at`` (``time.monotonic`` clock).

    An action the host refuses (a VM that is gone, say) is reported in its event and does not
    stop the schedule."""
    for i, e in sorted(enumerate(entries), key=lambda p: (p[1].at, p[0])):
        delay = start + e.at - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        fields: dict[str, Any] = {"entry": i, "at": e.at, "action": e.action,
                                  "what": e.describe()}
        try:
            fields["result"] = _call(host, e)
            fields["ok"] = True
        except Exception as ex:  # a refused action is reported, not fatal
            fields["ok"] = False
            fields["error"] = getattr(ex, "message", None) or str(ex)
        host.emit("schedule", e.vm, **fields)
