"""``python -m hypervisor --topology FILE [--log-level LEVEL]``: run one host until stopped.

Loads and validates the topology (``hypervisor.topology``), creates the run dir, launches the
VMs and serves until SIGINT/SIGTERM or the control ``shutdown`` call. Exit status 0 on a clean
stop, 2 on a bad topology, 3 when a live host already owns the run dir.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from hypervisor import rundir


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m hypervisor", description=__doc__.splitlines()[0])
    ap.add_argument("--topology", required=True, help="topology TOML file (DESIGN §10)")
    ap.add_argument("--log-level", default="INFO",
                    choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    args = ap.parse_args(argv)
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
        asyncio.run(run_host(topo))
    except rundir.HostAlreadyRunning as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
