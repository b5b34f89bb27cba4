"""Will a topology fit on this machine? The check ``balloonlab up`` makes before it starts
anything.

Every VM costs two Python processes (its guest kernel and its balloon driver) before its
guest touches a byte, and the host itself is one more process holding its frame pool, plus
its fork server (``guest.forkserver``), from which the VM processes are forked. A topology
is refused when

* ``VMs × PER_VM_OVERHEAD + HOST_OVERHEAD + host memory`` exceeds ``MemAvailable`` in
  ``/proc/meminfo``, or
* ``2 × VMs + 2`` processes (``+ 1`` without the fork server) exceed the headroom under
  ``RLIMIT_NPROC`` (the limit minus the tasks this user already runs; root is not bound by
  it).

The overheads are measured figures (proportional set size, ``Pss:`` of
``/proc/<pid>/smaps_rollup``; ``balloonlab bench scale`` measures them again, see
docs/results.md), rounded up. They follow how the host starts its VM processes: forked from
the fork server (the default) or exec'd (``BALLOONLAB_FORK_SERVER=0``), where each process
is a whole interpreter with numpy and Numba of its own.
"""

from __future__ import annotations

import os
import resource
from dataclasses import dataclass
from pathlib import Path

from hypervisor.forkclient import fork_server_enabled
from hypervisor.topology import Topology

__all__ = ["EXEC_HOST_OVERHEAD", "EXEC_PER_VM_OVERHEAD", "HOST_OVERHEAD", "PER_VM_OVERHEAD",
           "Capacity", "PreflightError", "check", "machine_capacity"]

MIB = 1 << 20
#: PSS of one VM beyond the RAM its guest touches (which the host memory counts), its
#: processes forked from the fork server: guest kernel + balloon driver measured 18-24 MiB
#: by ``balloonlab bench scale`` on 4-32 VM hosts (up to 58 MiB with one VM, whose two
#: processes share the server's pages with fewer; the host overhead covers that), rounded up.
PER_VM_OVERHEAD = 40 * MIB
#: PSS of the hypervisor (Python, numpy, numba, the asyncio server; measured 113-134 MiB)
#: and of its fork server (50-84 MiB) beside the frame pool (the topology's host memory,
#: counted apart), rounded up.
HOST_OVERHEAD = 250 * MIB
#: The same without the fork server: each VM process exec'd, a whole interpreter (guest
#: kernel 72-78 MiB + balloon driver 60-78 MiB, 155 MiB with one VM), and the hypervisor
#: alone (78-85 MiB).
EXEC_PER_VM_OVERHEAD = 170 * MIB
EXEC_HOST_OVERHEAD = 100 * MIB


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


def check(topo: Topology, capacity: Capacity | None = None, *,
          fork_server: bool | None = None) -> None:
    """Raise :class:`PreflightError` when ``topo`` cannot fit (see the module docstring).
    ``fork_server`` None: as a host started from this environment would run."""
    cap = machine_capacity() if capacity is None else capacity
    forked = fork_server_enabled() if fork_server is None else fork_server
    per_vm, host = ((PER_VM_OVERHEAD, HOST_OVERHEAD) if forked
                    else (EXEC_PER_VM_OVERHEAD, EXEC_HOST_OVERHEAD))
    n = len(topo.vms)
    if cap.mem_available is not None:
        need = n * per_vm + host + topo.host.memory
        if need > cap.mem_available:
            who = "hypervisor and fork server" if forked else "hypervisor"
            raise PreflightError(
                f"topology {topo.source} does not fit in memory: {n} VMs × "
                f"{_mib(per_vm)} per VM + {_mib(host)} {who} + "
                f"{_mib(topo.host.memory)} host memory = {_mib(need)} > MemAvailable "
                f"{_mib(cap.mem_available)}")
    if cap.nproc_limit is not None:
        procs = 2 * n + (2 if forked else 1)
        headroom = cap.nproc_limit - cap.nproc_used
        if procs > headroom:
            extra = "1 host + 1 fork server" if forked else "1 host"
            raise PreflightError(
                f"topology {topo.source} needs {procs} processes (2 × {n} VMs + {extra}) but "
                f"RLIMIT_NPROC {cap.nproc_limit} leaves room for {max(headroom, 0)} "
                f"({cap.nproc_used} tasks of this user are running)")
