"""``python -m guest.forkserver --fd N``: the process every guest kernel and balloon driver of
a host is forked from.

Started once per host by the hypervisor (``hypervisor.forkclient``), it imports what the VM
processes run — the interpreter, numpy, numba and LLVM, ``guest.kernel``,
``guest.balloon_driver`` and the ``protocol`` package — and loads their Numba kernels from the
on-disk cache, then freezes the garbage collector's view of all of it. Each VM process is then
a ``fork`` of this one: it shares those pages copy-on-write instead of importing and loading
them again, which is what made a VM cost two full interpreters (about 130 MiB of PSS) and a
second of CPU per process to start.

The server is single-threaded and never runs an event loop: it blocks on its socket (``N``, a
``SOCK_SEQPACKET`` end the hypervisor passed down), one JSON request per message::

    {"id": 7, "which": "kernel" | "driver", "argv": [...], "env": {...}}   + SCM_RIGHTS: log fd

and answers ``{"id": 7, "pid": P}`` or ``{"id": 7, "errno": E, "error": "..."}``. Its first
message is ``{"ready": true, "pid": ..., "preloaded": K}`` once everything is loaded. At
end of file on the socket it exits.

A VM process is forked twice (the intermediate exits at once), so that it is re-parented to
the hypervisor, which is a child subreaper (``PR_SET_CHILD_SUBREAPER``): the VM process is the
hypervisor's own child as if it had been started with ``exec`` — it reaps it, learns its exit
status, and the lifeline (``protocol.lifeline.bind_to_host``: die with the hypervisor) holds
unchanged. The server answers with the pid only after the intermediate was reaped, so by then
the process already belongs to the hypervisor. This is also why a fork server that dies takes
no VM with it. The forked process runs ``main`` only after the server told it that the
hypervisor has its pid (one byte on a pipe): if the server dies in between, the process sees
end of file and exits, so no VM process runs that the hypervisor does not know of.

In the forked process, before the module's ``main`` runs: a new session, the log on stdout
and stderr, ``/dev/null`` on stdin, every other descriptor closed, default signal handlers,
the request's environment (fault plans of ``protocol.syscalls`` re-read from it), fresh random
state; ``main`` then creates its own event loop. The process exits through ``os._exit`` after
the ``atexit`` handlers ran, never returning into the server's code.
"""

from __future__ import annotations

import argparse
import array
import atexit
import errno
import gc
import json
import os
import signal
import socket
import sys
import time
import traceback
from collections.abc import Callable
from types import ModuleType
from typing import Any

#: Largest request (the environment is in it).
MAX_MESSAGE = 1 << 20
#: The environment variables that size the thread pools of numpy's BLAS libraries.
BLAS_THREADS = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
#: The descriptor on which a forked process waits for the server's go (closed before main).
GO_FD = 3
#: Seconds a forked process waits to be re-parented to the hypervisor before giving up.
REPARENT_TIMEOUT = 10.0


def _mains() -> dict[str, Callable[[list[str]], int]]:
    from guest import balloon_driver, kernel

    return {"kernel": kernel.main, "driver": balloon_driver.main}


def preload() -> int:
    """Import the VM processes' modules and load their cached Numba kernels; the count of
    kernel signatures loaded."""
    import guest.kernels
    import protocol.pfn
    from protocol.warmup import warm_up

    _mains()
    warm_up()
    return sum(_load_cached(mod) for mod in (guest.kernels, protocol.pfn))


def _load_cached(mod: ModuleType) -> int:
    """Load every signature of ``mod``'s cached Numba dispatchers that the on-disk cache holds
    for this very code (the same load a VM process would do on a kernel's first call)."""
    from numba.core.registry import CPUDispatcher

    n = 0
    for name, obj in list(vars(mod).items()):
        if not isinstance(obj, CPUDispatcher):
            continue
        # Numba's cache has no public "load everything": its index, read as numba reads it.
        cache: Any = getattr(obj, "_cache", None)
        cache_file = getattr(cache, "_cache_file", None)
        if cache is None or cache_file is None:
            continue
        try:
            codegen = getattr(obj.targetctx, "codegen")()  # noqa: B009 - untyped in the stubs
            for key in list(cache_file._load_index()):
                sig = key[0]
                # Only entries of this code and this machine: anything else would compile.
                if key == cache._index_key(sig, codegen) and tuple(sig) not in obj.overloads:
                    obj.compile(sig)
                    n += 1
        except Exception as e:  # a cache it cannot read is the child's to load
            print(f"guest.forkserver: cannot preload {mod.__name__}.{name}: {e}",
                  file=sys.stderr)
    return n


def _send(sock: socket.socket, obj: dict[str, Any]) -> None:
    sock.send(json.dumps(obj).encode())


def _threads() -> int:
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        return 1


def serve(sock: socket.socket, host_pid: int | None) -> int:
    """Answer requests until the hypervisor closes its end."""
    mains = _mains()
    while True:
        fds = array.array("i")
        try:
            data, anc, _flags, _addr = sock.recvmsg(MAX_MESSAGE,
                                                    socket.CMSG_SPACE(4 * fds.itemsize))
        except InterruptedError:
            continue
        except OSError:
            return 0
        for level, kind, payload in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(payload[:len(payload) - len(payload) % fds.itemsize])
        if not data:
            for fd in fds:
                os.close(fd)
            return 0
        rid = None
        try:
            req = json.loads(data)
            if not isinstance(req, dict):
                raise ValueError("a request is a JSON object")
            rid = req.get("id")
            if req.get("which") not in mains or len(fds) != 1:
                raise ValueError(f"which={req.get('which')!r}, {len(fds)} fds")
            pid, go = _fork_vm_process(mains[req["which"]], list(map(str, req["argv"])),
                                       {str(k): str(v) for k, v in dict(req["env"]).items()},
                                       fds[0], host_pid)
            try:
                _send(sock, {"id": rid, "pid": pid})
                os.write(go, b"1")  # handed over: it may run
            except OSError:
                return 0  # the host is gone; the process sees end of file and exits
            finally:
                os.close(go)
            continue
        except OSError as e:
            reply = {"id": rid, "errno": e.errno or 0, "error": str(e)}
        except (ValueError, KeyError, TypeError) as e:
            reply = {"id": rid, "errno": errno.EINVAL, "error": f"bad request: {e}"}
        finally:
            for fd in fds:
                os.close(fd)
        try:
            _send(sock, reply)
        except OSError:
            return 0


def _fork_vm_process(main: Callable[[list[str]], int], argv: list[str], env: dict[str, str],
                     logfd: int, host_pid: int | None) -> tuple[int, int]:
    """Fork (twice) a process running ``main(argv)``: its pid once it is the host's child,
    and the write end of its *go* pipe. The process waits for one byte on that pipe before
    ``main``: the server writes it once the host has the pid, so a server that dies before
    (end of file on the pipe) leaves no VM process the host does not know of."""
    r, w = os.pipe()
    go_r, go_w = os.pipe()
    try:
        sys.stdout.flush()
        sys.stderr.flush()
        mid = os.fork()
        if mid == 0:  # the intermediate: fork the VM process, say its pid, leave
            code = 1
            try:
                os.close(r)
                os.close(go_w)
                me = os.getpid()
                pid = os.fork()
                if pid == 0:
                    os.close(w)
                    _run_child(main, argv, env, logfd, go_r, me, host_pid)  # never returns
                os.write(w, pid.to_bytes(8, "little"))
                code = 0
            finally:
                os._exit(code)
        os.close(w)
        w = -1
        os.close(go_r)
        go_r = -1
        data = b""
        while len(data) < 8:
            chunk = os.read(r, 8 - len(data))
            if not chunk:
                break
            data += chunk
        os.waitpid(mid, 0)
        if len(data) != 8:
            raise OSError(errno.EAGAIN, "the fork server's intermediate process died before "
                                        "the fork")
        go, go_w = go_w, -1
        return int.from_bytes(data, "little"), go
    finally:
        for fd in (r, w, go_r, go_w):
            if fd >= 0:
                os.close(fd)


def _run_child(main: Callable[[list[str]], int], argv: list[str], env: dict[str, str],
               logfd: int, go: int, intermediate: int, host_pid: int | None) -> None:
    code: Any = 1
    try:
        os.setsid()
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.dup2(logfd, 1)
        os.dup2(logfd, 2)
        if go != GO_FD:
            os.dup2(go, GO_FD, inheritable=False)
        os.closerange(GO_FD + 1, _max_fd())
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD):
            signal.signal(sig, signal.SIG_DFL)
        os.environ.clear()
        os.environ.update(env)
        _set_comm(f"{MODULES_SHORT.get(main.__module__, 'vm')}:{_vm_name(argv)}")
        # Belong to the hypervisor before anything else: the intermediate exits at once.
        if host_pid is not None:
            deadline = time.monotonic() + REPARENT_TIMEOUT
            while os.getppid() == intermediate and time.monotonic() < deadline:
                time.sleep(0.0005)
        # Run only once the host has this pid (see _fork_vm_process).
        if os.read(GO_FD, 1) != b"1":
            print(f"{main.__module__}: the fork server died before handing this process "
                  "over; exiting", file=sys.stderr)
            raise SystemExit(1)
        os.close(GO_FD)
        from protocol import syscalls

        syscalls.reload_environment()
        import numpy as np

        np.random.seed()
        # The server's objects stay frozen: a collection walking them would write to their
        # pages and un-share them. What the child allocates is collected as in any process.
        sys.argv = [main.__module__, *argv]
        code = main(argv)
    except SystemExit as e:
        code = e.code
    except BaseException:  # the child must never return into the server
        traceback.print_exc()
        code = 1
    finally:
        try:
            atexit._run_exitfuncs()
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            if code is None:
                code = 0
            elif not isinstance(code, int):
                print(code, file=sys.stderr)
                code = 1
            os._exit(code)


MODULES_SHORT = {"guest.kernel": "kernel", "guest.balloon_driver": "driver"}


def _vm_name(argv: list[str]) -> str:
    return argv[argv.index("--vm") + 1] if "--vm" in argv[:-1] else "?"


def _set_comm(name: str) -> None:
    """The process's name in ``ps -o comm`` and ``/proc/PID/comm`` (15 bytes)."""
    try:
        with open("/proc/self/comm", "w") as f:
            f.write(name[:15])
    except OSError:
        pass


def _max_fd() -> int:
    try:
        return int(os.sysconf("SC_OPEN_MAX"))
    except (ValueError, OSError):
        return 4096


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m guest.forkserver",
                                 description=__doc__.splitlines()[0])
    ap.add_argument("--fd", type=int, required=True,
                    help="descriptor of this server's SOCK_SEQPACKET end")
    ap.add_argument("--run-dir", default=None,
                    help="the host's run dir (only named on the command line, which the "
                         "forked processes share: `ps` shows whose they are)")
    args = ap.parse_args(argv)
    # A process that forks must stay one thread: numpy's BLAS would start a pool at import.
    for var in BLAS_THREADS:
        os.environ.setdefault(var, "1")
    from protocol.lifeline import ENV_HOST_PID, bind_to_host

    bind_to_host("guest.forkserver")  # first: die with the hypervisor
    host_pid = int(os.environ[ENV_HOST_PID]) if os.environ.get(ENV_HOST_PID) else None
    sock = socket.socket(fileno=args.fd)
    sock.setblocking(True)
    t0 = time.monotonic()
    loaded = preload()
    gc.collect()
    gc.freeze()  # what is loaded now stays out of the children's collections: pages stay shared
    threads = _threads()
    print(f"guest.forkserver: pid {os.getpid()} ready in {time.monotonic() - t0:.2f} s, "
          f"{loaded} cached kernel signatures loaded, {threads} thread(s)", file=sys.stderr)
    _send(sock, {"ready": True, "pid": os.getpid(), "preloaded": loaded, "threads": threads})
    return serve(sock, host_pid)


if __name__ == "__main__":
    sys.exit(main())
