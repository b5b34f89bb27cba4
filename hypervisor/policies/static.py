"""The ``static`` policy: one fixed balloon target per VM, applied once.

Params: ``targets`` maps VM name -> balloon target in pages. A VM without an entry gets the
balloon that leaves it exactly ``max_pages`` usable (``memory_pages - max_pages``, at least 0).
Each VM is decided the first time the policy sees it; later manual changes are left alone.
Targets are clamped to the VM's min/max bounds like every policy's.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import ClassVar

from .base import (
    Decision,
    History,
    HostSample,
    Policy,
    VmSample,
    balloon_bounds,
    clamp_balloon,
    index_vms,
)


class StaticPolicy(Policy):
    """Set each VM's balloon once, from ``params["targets"]`` or from its ``max_pages``."""

    name = "static"
    DEFAULTS: ClassVar[Mapping[str, object]] = {"targets": {}}

    def __init__(self, params: Mapping[str, object] | None = None) -> None:
        super().__init__(params)
        targets = self.params["targets"]
        assert isinstance(targets, dict)
        for vm, pages in targets.items():
            if not isinstance(vm, str) or not vm:
                raise ValueError(f"policy 'static': target VM name must be a str, got {vm!r}")
            if isinstance(pages, bool) or not isinstance(pages, int) or pages < 0:
                raise ValueError(
                    f"policy 'static': target for VM {vm!r} must be an int >= 0 pages, "
                    f"got {pages!r}"
                )
        self.targets: dict[str, int] = dict(targets)
        self._applied: set[str] = set()

    def decide(
        self, host: HostSample, vms: Sequence[VmSample], history: History
    ) -> list[Decision]:
        decisions = []
        for vm in index_vms(vms).values():
            if vm.name in self._applied:
                continue
            self._applied.add(vm.name)
            if vm.name in self.targets:
                wanted = self.targets[vm.name]
                why = f"static: params target {wanted} pages"
            else:
                wanted = max(0, vm.memory_pages - vm.max_pages)
                why = (
                    f"static: memory {vm.memory_pages} - max_pages {vm.max_pages} = "
                    f"{wanted} pages"
                )
            target = clamp_balloon(vm, wanted)
            if target != wanted:
                lo, hi = balloon_bounds(vm)
                why += f", clamped to [{lo}, {hi}] by min/max_pages -> {target}"
            if target != vm.target_pages:
                decisions.append(Decision(vm=vm.name, target_pages=target, reason=why))
        return decisions
