"""``python -m hypervisor --topology FILE [--log-level LEVEL] [--no-fork-server]``: run one
host until stopped.

Loads and validates the topology (``hypervisor.topology``), creates the run dir, launches the
VMs and serves until SIGINT/SIGTERM or the control ``shutdown`` call. Exit status 0 on a clean
stop, 1 when the host cannot start (the system refused a resource it needs: a file size limit,
no descriptor, no memory), 2 on a bad topology, 3 when a live host already owns the run dir, 4
when the run dir (or the directory holding it) is not safely ours. Every failure to start is
one line on stderr.

The VM processes are forked from one fork server (``guest.forkserver``,
``hypervisor.forkclient``) unless ``--no-fork-server`` is given or the environment has
``BALLOONLAB_FORK_SERVER=0``: then each is a fresh ``python -m guest.kernel`` /
``python -m guest.balloon_driver``.
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import logging
import sys

from hypervisor import rundir
from hypervisor.forkclient import fork_server_enabled


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m hypervisor", description=__doc__.splitlines()[0])
    ap.add_argument("--topology", required=True, help="topology TOML file (docs/topology.md)")
    ap.add_argument("--log-level", default="INFO",
                    choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    ap.add_argument("--no-fork-server", action="store_true",
                    help="exec every VM process instead of forking it from the fork server")
    args = ap.parse_args(argv)
    fork_server = not args.no_fork_server and fork_server_enabled()
    from hypervisor.topology import TopologyError, load_topology
    try:
        topo = load_topology(args.topology)
    except (TopologyError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(level=args.log_level,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from hypervisor.host import run_host
    try:
        asyncio.run(run_host(topo, fork_server=fork_server))
    except rundir.HostAlreadyRunning as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    except rundir.RunDirError as e:
        print(f"error: {e}", file=sys.stderr)
        return 4
    except OSError as e:
        print(f"error: cannot start host {topo.host.name!r}: {_describe(e)}", file=sys.stderr)
        return 1
    return 0


def _describe(e: OSError) -> str:
    """One line for a start-up failure: the system's words, the errno and the file."""
    name = errno.errorcode.get(e.errno or 0, "")
    what = f"{e.strerror or e} ({name})" if name else str(e)
    return f"{what}: {e.filename}" if e.filename else what


if __name__ == "__main__":
    sys.exit(main())
