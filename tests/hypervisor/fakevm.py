"""Stand-in VM processes for supervision tests, until guest.kernel/guest.balloon_driver run.

Invoked by the Host exactly as the real ones would be (``fakevm.py -m guest.kernel --vm ...``
with the command-line of docs/internals.md). Both speak the real protocol over the real
sockets with the blocking adapter:

- kernel: boots (receiving the three memfds), faults in and writes ``FAKEVM_TOUCH`` pages,
  then serves shootdowns until ``halt`` (exit 0) or EOF (exit 1);
- driver: says hello, answers ``stats_request`` and exits 0 on ``bye``/EOF.
"""

from __future__ import annotations

import argparse
import mmap
import os
import socket
import sys

import numpy as np

from protocol import messages as m
from protocol import pfn as P
from protocol.balloon import BalloonDriver
from protocol.connection import MachineGuest
from protocol.features import PROTOCOL_VERSION, Feature
from protocol.sync import PeerClosed, SyncChannel


def kernel(args: argparse.Namespace) -> int:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(args.machine_sock)
    ch = SyncChannel(sock, MachineGuest())
    ch.send(m.Boot(vm=args.vm, version=PROTOCOL_VERSION))
    ok = ch.recv(maxfds=3)
    assert isinstance(ok, m.BootOk) and len(ch.fds) == 3
    ram = mmap.mmap(ch.fds[0], ok.pages * 4096)
    ept = np.frombuffer(mmap.mmap(ch.fds[1], ok.pages), dtype=np.uint8)
    touch = np.arange(min(int(os.environ.get("FAKEVM_TOUCH", "8")), ok.pages))
    fid = 1
    while True:
        missing = touch[ept[touch] == 0]
        if missing.size == 0:
            break
        ch.send(m.EptFault(id=fid, pfns=P.pfns_to_wire(missing)))
        while True:
            msg = ch.recv()
            if isinstance(msg, m.Shootdown):
                ch.send(m.ShootdownAck(id=msg.id))
            elif isinstance(msg, m.Resume):
                break
        fid += 1
    for p in touch.tolist():
        ram[p * 4096:p * 4096 + 8] = p.to_bytes(8, "little")
    print(f"fakevm kernel {args.vm}: booted, {touch.size} pages touched", flush=True)
    try:
        while True:
            msg = ch.recv()
            if isinstance(msg, m.Shootdown):
                ch.send(m.ShootdownAck(id=msg.id))
            elif isinstance(msg, m.Halt):
                return 0
    except PeerClosed:
        return 1


def driver(args: argparse.Namespace) -> int:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(args.balloon_sock)
    conn = BalloonDriver(vm=args.vm, features=Feature.from_names(args.features.split(",")))
    ch = SyncChannel(sock, conn)
    sock.sendall(conn.hello())
    try:
        while True:
            msg = ch.recv()
            if isinstance(msg, m.StatsRequest):
                ch.send(m.Stats(id=conn.new_id(), stats={4: 4096}))
            elif isinstance(msg, m.Bye):
                return 0
    except PeerClosed:
        return 0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("-m", dest="module", required=True)
    ap.add_argument("--vm", required=True)
    ap.add_argument("--machine-sock")
    ap.add_argument("--kernel-sock")
    ap.add_argument("--balloon-sock")
    ap.add_argument("--config")
    ap.add_argument("--features", default="")
    ap.add_argument("--wire")
    args = ap.parse_args()
    return kernel(args) if args.module == "guest.kernel" else driver(args)


if __name__ == "__main__":
    sys.exit(main())
