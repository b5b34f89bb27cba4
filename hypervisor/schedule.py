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

The topology loader (``hypervisor.topology``) validates the entries; the host
(``Host.run_schedule``) runs each through the same handler as the control channel's method
of the same name (so a scheduled ``set_balloon`` is exactly what ``balloonlab set-balloon``
does) and emits a ``schedule`` event with the entry and its outcome. This module holds what
both share and imports neither.

Seeds: every guest's workload random streams derive from the host's ``seed``, the VM's name
and its restart count (:func:`guest_seed`), so two runs with the same seed replay the same
access streams, VMs of one run differ, and a restarted VM does not replay its first life.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from hypervisor.units import format_size_exact

__all__ = [
    "ACTIONS",
    "OPTIONAL",
    "ScheduleEntry",
    "guest_seed",
]

#: Actions a schedule entry can take, with the keys each one needs besides ``at``/``action``.
ACTIONS: dict[str, tuple[str, ...]] = {
    "set_balloon": ("vm", "size"),
    "setmem": ("vm", "size"),
    "set_policy": ("name",),
}
OPTIONAL: dict[str, tuple[str, ...]] = {"set_policy": ("params",)}


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
