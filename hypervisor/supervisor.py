"""VM process supervision: each VM's guest kernel and balloon driver processes, their life and
their death.

The host owns one :class:`Supervisor`. Per VM it starts the guest kernel, starts the balloon
driver once the kernel has booted, restarts a dead driver with backoff, and when the kernel
dies frees the VM's memory and restarts or destroys it as its ``on_crash`` says. At shutdown
it stops every process it started, SIGKILL for stragglers, so none outlives the host.

Units: seconds.
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import os
import signal
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from hypervisor import rundir
from hypervisor.forkclient import (
    ForkedProcess,
    ForkServer,
    ForkServerUnavailable,
    set_child_subreaper,
)
from hypervisor.vm import Vm, VmProcess, VmState
from protocol import syscalls
from protocol.lifeline import lifeline_env

if TYPE_CHECKING:
    from hypervisor.hostview import HostView as Host

log = logging.getLogger(__name__)

#: Driver restart backoff (seconds): doubles from the first value up to the second.
DRIVER_BACKOFF = (0.5, 8.0)
#: Seconds a VM process gets to exit after ``halt`` (then SIGKILL).
HALT_GRACE = 3.0
#: Backoff (seconds) between attempts to start a VM process that failed to start: doubles
#: from the first value up to the second.
SPAWN_BACKOFF = (0.2, 5.0)
#: The fork server's log in the run dir.
FORKSERVER_LOG = "forkserver.log"
#: The module each VM process runs.
MODULES = {"kernel": "guest.kernel", "driver": "guest.balloon_driver"}


class Supervisor:
    """Starts, watches and stops the VM processes of one host."""

    def __init__(self, host: Host, python: Sequence[str], *, fork_server: bool = False) -> None:
        self.host = host
        #: The command that runs Python modules (``[sys.executable]``, or a test's stand-in).
        self.python = list(python)
        #: Every process ever started, so teardown can always reach it.
        self.procs: set[VmProcess] = set()
        #: This host instance's generation token (from the run dir, read on first spawn).
        self.generation: str | None = None
        #: Forks the VM processes (hypervisor.forkclient); None: each one is exec'd.
        self.fork_server: ForkServer | None = None
        if fork_server:
            self.fork_server = ForkServer(self.python, host.run_dir / FORKSERVER_LOG,
                                          host.emit, self._env)

    # ------------------------------------------------------------------ start and stop

    def start(self, vm: Vm) -> None:
        """Begin supervising ``vm`` (its kernel, then its driver)."""
        vm.supervisor = self.host.spawn(self._supervise(vm), f"{vm.name}-supervisor")

    def cancel_all(self) -> None:
        for vm in self.host.vms.values():
            if vm.supervisor is not None:
                vm.supervisor.cancel()

    async def stop_all(self, grace: float) -> None:
        """Stop every VM's processes (``grace`` 0: SIGKILL at once)."""
        await asyncio.gather(*(self.stop_procs(vm, grace) for vm in self.host.vms.values()),
                             return_exceptions=True)

    async def launch_fork_server(self) -> None:
        """Start the fork server now (it loads while the host goes on starting)."""
        if self.fork_server is not None:
            # The VM processes it forks are re-parented to this process (forkclient).
            set_child_subreaper()
            await self.fork_server.launch()

    async def close_fork_server(self) -> None:
        if self.fork_server is not None:
            await self.fork_server.close()

    async def kill_stragglers(self) -> None:
        """SIGKILL whatever this supervisor started and is still running."""
        stragglers = [p for p in self.procs if p.returncode is None]
        for p in stragglers:
            kill(p)
        if stragglers:
            await asyncio.wait([asyncio.ensure_future(p.wait()) for p in stragglers],
                               timeout=5.0)

    # ------------------------------------------------------------------ channel callbacks

    def on_boot(self, vm: Vm) -> None:
        vm.state = VmState.RUNNING
        self.host.emit("vm_booted", vm.name, pages=vm.pages)

    def on_guest_gone(self, vm: Vm, reason: str) -> None:
        host = self.host
        if host.stopping or vm.state.stopped:
            return
        if vm.kernel_proc is None:
            # In-test peer (or a kernel we did not launch) left: its memory goes back.
            host.spawn(self.crash(vm, reason), f"{vm.name}-crash")
        elif vm.kernel_proc.returncode is None:
            # A kernel that drops its machine channel can never be resumed: stop it; the
            # supervisor sees the exit and frees, restarts or destroys the VM.
            log.warning("%s: %s; killing its guest kernel", vm.name, reason)
            kill(vm.kernel_proc)

    # ------------------------------------------------------------------ VM life

    async def crash(self, vm: Vm, reason: str) -> None:
        host = self.host
        async with host.mm_lock:
            if vm.state in (VmState.CRASHED, VmState.DESTROYED, VmState.OOM_KILLED):
                return
            host.crash_locked(vm, reason)

    async def restart_vm(self, vm: Vm) -> None:
        """Give a crashed VM a fresh ledger entry (its memfds were punched to zero)."""
        host = self.host
        async with host.mm_lock:
            if vm.led.index in host.ledger.vms:
                host.ledger.remove_vm(vm.led.index)
            vm.mem.accessed[:] = 0
            led = host.ledger.add_vm(vm.name, vm.pages, vm.mem.accessed)
            host.by_index.pop(vm.led.index, None)
            vm.led = led
            host.by_index[led.index] = vm
            vm.balloon.ballooned = led.balloon
            vm.balloon.actual = 0
            vm.state = VmState.CREATED
            vm.restarts += 1

    def vm_args(self, vm: Vm, which: str) -> list[str]:
        """The arguments of ``which``'s ``main`` (after ``python -m MODULE``)."""
        r = self.host.run_dir
        if which == "kernel":
            from hypervisor.schedule import guest_seed

            seed = guest_seed(self.host.topology.host.seed, vm.name, vm.restarts)
            cfg = vm.config.guest_config(seed=seed)
            if vm.config.disk:
                cfg["disk_path"] = str(rundir.disk_path(r, vm.name))
            return ["--vm", vm.name,
                    "--machine-sock", str(rundir.machine_sock(r, vm.name)),
                    "--kernel-sock", str(rundir.kernel_sock(r, vm.name)),
                    "--config", json.dumps(cfg)]
        return ["--vm", vm.name,
                "--balloon-sock", str(rundir.balloon_sock(r, vm.name)),
                "--kernel-sock", str(rundir.kernel_sock(r, vm.name)),
                "--features", ",".join(vm.config.features), "--wire", vm.config.wire]

    def vm_argv(self, vm: Vm, which: str) -> list[str]:
        """The command line that exec's ``which`` of ``vm``."""
        return [*self.python, "-m", MODULES[which], *self.vm_args(vm, which)]

    async def spawn_proc(self, vm: Vm, which: str) -> VmProcess:
        """Start ``which`` ("kernel" or "driver") of ``vm``, retrying while it cannot be.

        Opening the log or starting the process can fail for want of descriptors, memory or
        processes (EMFILE, ENFILE, ENOMEM, EAGAIN) — or anything else the system says. The
        VM must not stay down silently: each failure is a ``vm_spawn_failed`` event naming
        the error, and the start is retried with backoff until it works or the host stops.
        """
        delay = SPAWN_BACKOFF[0]
        attempt = 0
        while True:
            attempt += 1
            try:
                return await self._spawn_once(vm, which)
            except OSError as e:
                if self.host.stopping:
                    raise
                name = errno.errorcode.get(e.errno or 0, "OSError")
                log.error("%s: cannot start its %s (attempt %d): %s; retrying in %.1f s",
                          vm.name, which, attempt, e, delay)
                self.host.emit("vm_spawn_failed", vm.name, process=which, error=name,
                               detail=str(e), attempt=attempt, retry_in=delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, SPAWN_BACKOFF[1])

    async def _spawn_once(self, vm: Vm, which: str) -> VmProcess:
        syscalls.hit("spawn")
        logfd = rundir.open_log(self.host.run_dir / f"{vm.name}.{which}.log")
        try:
            if self.fork_server is not None:
                forked = await self._fork(vm, which, logfd)
                if forked is not None:
                    return forked
            task = asyncio.ensure_future(asyncio.create_subprocess_exec(
                *self.vm_argv(vm, which), stdin=asyncio.subprocess.DEVNULL, stdout=logfd,
                stderr=logfd, start_new_session=True, env=self._env()))
            # Every process we start is remembered before anyone can cancel the caller, so
            # teardown can always reach it: no orphans even when a supervisor is cancelled
            # half-way through a spawn.
            task.add_done_callback(
                lambda t: None if t.cancelled() or t.exception() else self.procs.add(t.result()))
            return await asyncio.shield(task)
        finally:
            os.close(logfd)

    async def _fork(self, vm: Vm, which: str, logfd: int) -> ForkedProcess | None:
        """``which`` of ``vm`` forked by the fork server; None: exec it instead (the server
        is down, hung or disabled, which it has reported). An OSError is the fork's own
        failure (EAGAIN, ENOMEM), retried like a failed exec."""
        assert self.fork_server is not None
        task = asyncio.ensure_future(self.fork_server.spawn(which, self.vm_args(vm, which),
                                                            self._env(), logfd))
        # As for exec: remembered before anyone can cancel the caller (no orphan).
        task.add_done_callback(
            lambda t: None if t.cancelled() or t.exception() else self.procs.add(t.result()))
        try:
            return await asyncio.shield(task)
        except ForkServerUnavailable as e:
            log.warning("%s: fork server unavailable (%s); exec'ing its %s", vm.name, e, which)
            return None

    def _env(self) -> dict[str, str]:
        """The VM processes' environment: ours, plus what binds them to this instance (they
        die with this process and remove only files of this generation)."""
        if self.generation is None:
            self.generation = rundir.read_generation(self.host.run_dir)
        return {**os.environ, **lifeline_env(os.getpid(), self.generation)}

    async def _supervise(self, vm: Vm) -> None:
        """Kernel first; the driver once the kernel booted; restart per ``on_crash``."""
        host = self.host
        while not host.stopping:
            if vm.config.disk and not await self._make_disk(vm):
                return
            vm.kernel_proc = await self.spawn_proc(vm, "kernel")
            kernel_wait = asyncio.create_task(vm.kernel_proc.wait())
            while not vm.machine.booted and not kernel_wait.done():
                await asyncio.sleep(0.05)
            # docs/internals.md: the driver starts once the kernel has booted (the kernel
            # creates <vm>.kernel.sock before it sends boot).
            driver_task = None if kernel_wait.done() else \
                asyncio.create_task(self._run_driver(vm))
            try:
                code = await kernel_wait
            finally:
                if driver_task is not None:
                    driver_task.cancel()
                    await asyncio.gather(driver_task, return_exceptions=True)
                await self.stop_procs(vm, 1.0, kernel=False)
            vm.machine.booted = False
            if host.stopping:
                return
            if vm.state in (VmState.OOM_KILLED, VmState.DESTROYED):
                return
            await self.crash(vm, f"guest kernel exited with status {code}")
            if vm.config.on_crash != "restart":
                vm.state = VmState.DESTROYED
                host.emit("vm_destroyed", vm.name)
                return
            await self.restart_vm(vm)
            host.emit("vm_restarted", vm.name, restarts=vm.restarts)
            await asyncio.sleep(min(DRIVER_BACKOFF[0] * 2 ** vm.restarts, DRIVER_BACKOFF[1]))

    async def _make_disk(self, vm: Vm) -> bool:
        """Create the VM's virtual disk afresh before its kernel starts (every boot).

        A disk that cannot be made (no space, a planted file, an injected fault at
        ``disk.create``/``disk.truncate``) is a ``vm_disk_failed`` event and one log line,
        and the VM does not start: it is destroyed (its memory freed, as after a crash);
        the other VMs go on."""
        try:
            rundir.create_disk(self.host.run_dir, vm.name, vm.config.disk)
            return True
        except (OSError, rundir.RunDirError) as e:
            name = errno.errorcode.get(getattr(e, "errno", None) or 0, type(e).__name__)
            path = rundir.disk_path(self.host.run_dir, vm.name)
            log.error("%s: cannot create its disk %s: %s; the VM does not start",
                      vm.name, path, e)
            self.host.emit("vm_disk_failed", vm.name, error=name, detail=str(e),
                           path=str(path))
            await self.crash(vm, f"cannot create its disk: {e}")
            vm.state = VmState.DESTROYED
            self.host.emit("vm_destroyed", vm.name)
            return False

    async def _run_driver(self, vm: Vm) -> None:
        host = self.host
        delay = DRIVER_BACKOFF[0]
        while not host.stopping:
            vm.driver_proc = await self.spawn_proc(vm, "driver")
            t0 = time.monotonic()
            code = await vm.driver_proc.wait()
            if host.stopping:
                return
            if time.monotonic() - t0 > 30:
                delay = DRIVER_BACKOFF[0]  # it ran for a while: not a crash loop
            await asyncio.sleep(delay)
            delay = min(delay * 2, DRIVER_BACKOFF[1])
            vm.driver_restarts += 1
            host.emit("driver_restarted", vm.name, restarts=vm.driver_restarts, status=code)

    async def stop_procs(self, vm: Vm, grace: float, *, kernel: bool = True) -> None:
        procs = [p for p in ((vm.kernel_proc if kernel else None), vm.driver_proc)
                 if p is not None and p.returncode is None]
        if not procs:
            return
        if grace == 0:
            for p in procs:
                kill(p)
        elif vm.driver_proc is not None and vm.driver_proc in procs:
            # The kernel was sent `halt`; the driver has no such message, so SIGTERM it.
            try:
                vm.driver_proc.terminate()
            except ProcessLookupError:
                pass
        try:
            await asyncio.wait_for(asyncio.gather(*(p.wait() for p in procs)), grace or 1.0)
        except TimeoutError:
            for p in procs:
                kill(p)
            await asyncio.gather(*(p.wait() for p in procs), return_exceptions=True)


def kill(p: VmProcess) -> None:
    """SIGKILL a VM process and its session (it is a session leader)."""
    try:
        os.killpg(p.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        try:
            p.kill()
        except ProcessLookupError:
            pass

