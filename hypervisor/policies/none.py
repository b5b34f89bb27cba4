"""The ``none`` policy: balloon targets are set by hand only (``set_balloon``/``setmem``)."""

from __future__ import annotations

from collections.abc import Sequence

from .base import Decision, History, HostSample, Policy, VmSample


class NonePolicy(Policy):
    """Never decides anything; the operator owns every target."""

    name = "none"

    def decide(
        self, host: HostSample, vms: Sequence[VmSample], history: History
    ) -> list[Decision]:
        return []
