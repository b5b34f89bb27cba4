"""One VM's runtime state in the host: its memory, ledger entry, channels and processes.

Units: pages of 4096 bytes.
"""

from __future__ import annotations

import asyncio
import enum
from dataclasses import dataclass, field

import numpy as np

from hypervisor.balloon import BalloonBackend
from hypervisor.forkclient import ForkedProcess
from hypervisor.ledger import VmLedger
from hypervisor.machine import MachineServer
from hypervisor.topology import VmConfig
from hypervisor.vmmem import VmMemory

#: A VM process: exec'd (asyncio's) or forked by the fork server (same face).
VmProcess = asyncio.subprocess.Process | ForkedProcess


class VmState(enum.StrEnum):
    """Where a VM is in its life. The value is what ``list_vms`` and events show."""

    CREATED = "created"        #: memory made, guest kernel not booted (yet, or again)
    RUNNING = "running"        #: guest kernel booted
    CRASHED = "crashed"        #: its guest kernel died; memory freed; may restart
    DESTROYED = "destroyed"    #: crashed with ``on_crash = "destroy"``: stays down
    OOM_KILLED = "oom_killed"  #: killed by the host OOM killer: stays down
    HALTED = "halted"          #: halted by the host's shutdown

    @property
    def gone(self) -> bool:
        """Stopped for good (nothing will restart it)."""
        return self in (VmState.DESTROYED, VmState.OOM_KILLED)

    @property
    def stopped(self) -> bool:
        """Holds no memory and runs no processes now (a halted VM included: the policy, the
        supervisor and the memory manager leave it alone)."""
        return self in (VmState.CRASHED, VmState.DESTROYED, VmState.OOM_KILLED,
                        VmState.HALTED)


@dataclass
class Vm:
    """Runtime state of one VM."""

    config: VmConfig
    mem: VmMemory
    led: VmLedger
    machine: MachineServer
    balloon: BalloonBackend
    state: VmState = VmState.CREATED
    kernel_proc: VmProcess | None = None
    driver_proc: VmProcess | None = None
    restarts: int = 0
    driver_restarts: int = 0
    balloon_violations: int = 0
    host_swap_out: int = 0
    host_swap_in: int = 0
    #: Of ``host_swap_in``: pages whose slot did not follow the previous page's in their
    #: fault (decayed swap sequentiality).
    host_swap_reads_noncontig: int = 0
    faults: int = 0
    fault_pages: int = 0
    sample_pages: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int64))
    sample_armed_at: float = float("-inf")
    sample_result: tuple[int, int] = (0, 0)  # (pages sampled, touched) of the last period
    #: Set by a manual ``set_balloon``/``setmem``: the policy leaves this VM's target alone
    #: until ``set_policy`` or ``set_balloon`` with ``release`` clears it.
    manual_target: bool = False
    supervisor: asyncio.Task[None] | None = None

    @property
    def name(self) -> str:
        return str(self.config.name)

    @property
    def pages(self) -> int:
        return int(self.config.pages)
