"""Will a topology fit on this machine? The check ``balloonlab up`` makes before it starts
anything.

Every VM costs two Python processes (its guest kernel and its balloon driver) before its
guest touches a byte, and the host itself is one more process holding its frame pool. A
topology is refused when

* ``VMs × PER_VM_OVERHEAD + HOST_OVERHEAD + host memory`` exceeds ``MemAvailable`` in
  ``/proc/meminfo``, or
* ``2 × VMs + 1`` processes exceed the headroom under ``RLIMIT_NPROC`` (the limit minus the
  tasks this user already runs; root is not bound by it).

The overheads are measured figures (proportional set size, ``Pss:`` of
``/proc/<pid>/smaps_rollup``, of idle processes; ``balloonlab bench scale`` measures them
again, see docs/results.md), rounded up.
"""

from __future__ import annotations

import os
import resource
from dataclasses import dataclass
from pathlib import Path

from hypervisor.topology import Topology

__all__ = ["HOST_OVERHEAD", "PER_VM_OVERHEAD", "Capacity", "PreflightError", "check",
           "machine_capacity"]

MIB = 1 << 20
#: PSS of one VM whose guest touches a few MiB: guest kernel (72-78 MiB) + balloon driver
#: (60-78 MiB), measured by ``balloonlab bench scale`` on 1-32 VM hosts (the most, 155 MiB,
#: with one VM: fewer processes to share pages with), rounded up.
PER_VM_OVERHEAD = 170 * MIB
#: PSS of the hypervisor process itself (Python, numpy, numba, the asyncio server; measured
#: 78-85 MiB) beside its frame pool (the topology's host memory, counted apart), rounded up.
HOST_OVERHEAD = 100 * MIB


class PreflightError(ValueError):
    """The topology cannot fit on this machine: one line naming the numbers."""


@dataclass(frozen=True)
class Capacity:
    """What this machine offers: bytes of ``MemAvailable`` and processes under the limit."""

    mem_available: int | None
    nproc_limit: int | None
    nproc_used: int


def _mem_available(meminfo: Path = Path("/proc/meminfo")) -> int | None:
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _tasks_of_user(uid: int) -> int:
    """Tasks (threads count: RLIMIT_NPROC counts them) whose real uid is ``uid``."""
    n = 0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            fields = {}
            for line in Path(entry.path, "status").read_text().splitlines():
                key, _, value = line.partition(":")
                if key in ("Uid", "Threads"):
                    fields[key] = value.split()
            if int(fields["Uid"][0]) == uid:
                n += int(fields["Threads"][0])
        except (OSError, KeyError, ValueError, IndexError):
            continue
    return n


def machine_capacity() -> Capacity:
    """This machine's ``MemAvailable`` and the process limit of this user."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_NPROC)
    # Linux does not hold root (real uid 0) to RLIMIT_NPROC.
    limit = None if soft == resource.RLIM_INFINITY or os.getuid() == 0 else int(soft)
    used = _tasks_of_user(os.getuid()) if limit is not None else 0
    return Capacity(mem_available=_mem_available(), nproc_limit=limit, nproc_used=used)


def _mib(n: int) -> str:
    return f"{n / MIB:,.0f} MiB"


def check(topo: Topology, capacity: Capacity | None = None) -> None:
    """Raise :class:`PreflightError` when ``topo`` cannot fit (see the module docstring)."""
    cap = machine_capacity() if capacity is None else capacity
    n = len(topo.vms)
    if cap.mem_available is not None:
        need = n * PER_VM_OVERHEAD + HOST_OVERHEAD + topo.host.memory
        if need > cap.mem_available:
            raise PreflightError(
                f"topology {topo.source} does not fit in memory: {n} VMs × "
                f"{_mib(PER_VM_OVERHEAD)} per VM + {_mib(HOST_OVERHEAD)} hypervisor + "
                f"{_mib(topo.host.memory)} host memory = {_mib(need)} > MemAvailable "
                f"{_mib(cap.mem_available)}")
    if cap.nproc_limit is not None:
        procs = 2 * n + 1
        headroom = cap.nproc_limit - cap.nproc_used
        if procs > headroom:
            raise PreflightError(
                f"topology {topo.source} needs {procs} processes (2 × {n} VMs + 1 host) but "
                f"RLIMIT_NPROC {cap.nproc_limit} leaves room for {max(headroom, 0)} "
                f"({cap.nproc_used} tasks of this user are running)")
