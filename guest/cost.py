"""The cost model: what each memory event costs in modelled time.

Every task keeps a modelled clock (int64 nanoseconds).  The memory manager charges it at each
event of the task's access path, with the costs of the topology's ``[cost]`` table
(:mod:`protocol.cost` holds the keys, defaults and device presets):

- a memory access: ``memory_access`` (counted by the vCPU loop, multiplied after the
  quantum: :meth:`CostModel.accesses`);
- a guest minor fault: ``minor_fault`` plus ``page_zero`` (the guest clears the new page);
- an EPT exit the host serves (one per page, as hardware takes them): ``ept_exit`` plus
  ``ept_page`` (host backing work), plus ``page_zero`` for a page the host backs fresh (it
  hands out zeroed frames) or one host-swap read (``host_swap_device``) for a page the host
  read back from its swap (``resume`` names them; a host that does not say leaves the guest
  to take every page that had contents for one): the guest sees host swap-in only as a
  longer exit;
- the host's swap-out writes an EPT exit waited for: when the host had no free frame for
  the exit, it reclaimed (wrote victims to its swap) before answering, and ``resume`` says
  how many pages in how many writes (``evicted``, ``evicted_ios``): charged as those writes on
  ``host_swap_device`` (:meth:`CostModel.host_swap_writes`), as a vCPU waits for host direct
  reclaim;
- a guest swap read (major fault): one I/O of one page on ``guest_swap_device``;
- a guest swap write (reclaim): one I/O per reclaim batch, of the batch's pages.

Charges depend only on the events, never on wall-clock time, so the same seed and the same
sequence of events give the same modelled time.  Units: nanoseconds, pages of 4096 bytes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from protocol.cost import COST_DEFAULTS, Device, normalize_cost, resolve_device


@dataclass(frozen=True)
class CostModel:
    """Per-event costs in ns and the three devices; build with :meth:`from_table`."""

    memory_access: int
    minor_fault: int
    page_zero: int
    ept_exit: int
    ept_page: int
    guest_swap: Device
    host_swap: Device
    disk: Device

    @classmethod
    def from_table(cls, table: Mapping[str, Any] | None = None) -> CostModel:
        """The model of a ``[cost]`` table (raw or normalised); missing keys take defaults.
        Raises :class:`protocol.cost.CostError` naming a bad key."""
        t = {**COST_DEFAULTS, **normalize_cost(table or {})}
        return cls(memory_access=int(t["memory_access"]), minor_fault=int(t["minor_fault"]),
                   page_zero=int(t["page_zero"]), ept_exit=int(t["ept_exit"]),
                   ept_page=int(t["ept_page"]),
                   guest_swap=resolve_device(t["guest_swap_device"]),
                   host_swap=resolve_device(t["host_swap_device"]),
                   disk=resolve_device(t["disk_device"]))

    # Per-event charges (ns).  Plain integer arithmetic: deterministic by construction.

    def accesses(self, n: int) -> int:
        """``n`` memory accesses done by the vCPU loop."""
        return n * self.memory_access

    def minor_faults(self, n: int) -> int:
        """``n`` guest minor faults, each mapping a page the guest zeroes."""
        return n * (self.minor_fault + self.page_zero)

    def ept_exit_cost(self, fresh: int, host_swapped: int) -> int:
        """EPT exits backing ``fresh`` never-written pages (the host zeroes them) and
        ``host_swapped`` pages the host reads back from its swap device, one read each.

        Hardware takes one exit per page touched: the emulator asks for many pages per
        ``ept_fault`` to go faster, but the model charges what the hardware would."""
        pages = fresh + host_swapped
        return (pages * (self.ept_exit + self.ept_page) + fresh * self.page_zero
                + host_swapped * self.host_swap.io_ns(1))

    def host_swap_writes(self, pages: int, ios: int) -> int:
        """``ios`` host swap writes of ``pages`` pages in all (the runs a reclaim wrote)."""
        if pages <= 0:
            return 0
        return self.host_swap.io_ns(pages) + (max(1, ios) - 1) * self.host_swap.latency_ns

    def guest_swap_read(self, pages: int = 1) -> int:
        """A guest swap-in: one read I/O per page (no readahead)."""
        return pages * self.guest_swap.io_ns(1)

    def guest_swap_write(self, pages: int) -> int:
        """One write I/O of ``pages`` pages (a reclaim batch is written as one cluster)."""
        return self.guest_swap.io_ns(pages)


#: The model with every default: what a topology without ``[cost]`` gets.
DEFAULT_COST = CostModel.from_table({})
