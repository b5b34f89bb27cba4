"""What the host's parts see of the host: one typed interface that ``Host`` implements.

The host (``hypervisor.host``) is the composition root: it creates the memory manager, the
VM supervisor, the control, QMP and metrics servers and the schedule runner, and hands each of
them itself. They see it through :class:`HostView`, so none of them imports
``hypervisor.host`` (no import cycle), and what a part may use of the host is written down in
one place. ``tests/test_layout.py`` keeps it that way.

Units: pages of 4096 bytes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, Protocol

from hypervisor.ledger import FrameLedger
from hypervisor.memory import HostMemory
from hypervisor.topology import Topology
from hypervisor.vm import Vm


class HostView(Protocol):
    """The host as its parts use it."""

    name: str
    run_dir: Path
    topology: Topology
    vms: dict[str, Vm]
    memory: HostMemory
    #: The control server's handlers (``dommemstat``, ``set_balloon``, ...); None before start.
    control: Any

    @property
    def stopping(self) -> bool:
        """The host is shutting down: nothing is restarted any more."""
        ...

    @property
    def ledger(self) -> FrameLedger: ...

    @property
    def mm_lock(self) -> asyncio.Lock: ...

    @property
    def oom_kills(self) -> int: ...

    @property
    def by_index(self) -> dict[int, Vm]:
        """VMs by their ledger index (a restart gives a VM a new index)."""
        ...

    def emit(self, kind: str, vm: str | None, **fields: Any) -> dict[str, Any]: ...

    def subscribe(self) -> asyncio.Queue[dict[str, Any]]: ...

    def unsubscribe(self, q: asyncio.Queue[dict[str, Any]]) -> None: ...

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        """Run ``coro`` as a task the host cancels at shutdown."""
        ...

    def crash_locked(self, vm: Vm, reason: str) -> None:
        """Stop ``vm`` and free what it holds (the memory lock held)."""
        ...

    def set_balloon_target(self, vm: Vm, pages: int, reason: str = "manual",
                           policy: str | None = None) -> None: ...
