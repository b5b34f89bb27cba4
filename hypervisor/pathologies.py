"""The pathologies of uncooperative host swapping, as the host reports them.

VSwapper (Amit, Tsafrir and Schuster, ASPLOS 2014) names what goes wrong when a host swaps a
guest's memory behind its back; Waldspurger (OSDI 2002) gives double paging as the reason
for ballooning.  Units: pages of 4096 bytes, cumulative.  docs/architecture.md,
"Pathologies", describes each counter and what provokes it.

Four counters are counted by the guest kernel, which alone knows what it does with a page,
and arrive in its stats (:data:`GUEST_COUNTERS`); the host counts its own swap reads and
those not contiguous on its swap device (:mod:`hypervisor.memory`).  A ``pathology`` event
is emitted when a VM's counter reaches 1, 2, 4, 8, … (:func:`crossed`), so a VM that
double-pages all the time makes a few dozen events in its life, not one per page.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from protocol.features import StatTag

#: dommemstat field → the guest's stats tag.
GUEST_COUNTERS: dict[str, StatTag] = {
    "double_paging": StatTag.DOUBLE_PAGING,
    "false_swap_reads": StatTag.FALSE_SWAP_READS,
    "silent_swap_writes": StatTag.SILENT_SWAP_WRITES,
    "stale_swap_reads": StatTag.STALE_SWAP_READS,
}


def crossed(before: int, after: int) -> bool:
    """A power of two lies in ``(before, after]`` (``before`` 0 after a counter reset)."""
    if after < before:
        before = 0
    return after > 0 and after.bit_length() > before.bit_length()


def guest_events(vm: str, old: Mapping[int, int], new: Mapping[int, int],
                 emit: Callable[..., Any]) -> None:
    """Emit ``pathology`` for each guest counter that crossed a power of two between two
    stats messages of ``vm``."""
    for name, tag in GUEST_COUNTERS.items():
        now = new.get(int(tag))
        if now is not None and crossed(old.get(int(tag), 0), now):
            emit("pathology", vm, counter=name, pages=now, source="guest")


def noncontig_ratio(reads: int, noncontig: int) -> float | None:
    """Share of host swap reads not contiguous with the read before them (None: no reads)."""
    return noncontig / reads if reads else None
