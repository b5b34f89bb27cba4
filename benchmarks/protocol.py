"""Encode + decode throughput of balloon inflate batches, against plain msgpack.

Run: ``python -m benchmarks.protocol [--json] [--repeats N] [--breakdown]``, or
``balloonlab bench protocol [--repeat N] [--breakdown] [--out DIR] [--json]``.

For each workload the project path — what ``Connection.send`` / ``next_event`` run: build
the ``Inflate`` message (which validates it), ``msg.to_frame()``, then the receive side
``FrameBuffer.feed`` / ``next_frame_span`` and the connection's ``decoder_for(registry)``
(which validates again) — is timed against plain ``msgpack.packb`` / ``msgpack.unpackb``
of the same map in the same run, interleaved. Reported: pages/s for both and the overhead
ratio (project time / plain time) as min / median / max over repeats. The generic path
(``encode_frame(msg.to_wire())``, ``next_frame``, ``decode_payload``, ``decode_message``:
what messages without a fast path take) is reported the same way, and ``--breakdown``
adds a per-stage table (µs per message, min over repeats). Workloads: ``pfns`` with 4096-
and 256-page batches (virtio's VIRTIO_BALLOON_ARRAY_PFNS_MAX), ``runs`` fragmented (every
other page: one run per page) and contiguous (one run of 4096 pages). Units: pages per
second, µs; ratios are unitless.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import msgpack
import numpy as np

from protocol import messages as m
from protocol import pfn as P
from protocol.framing import FrameBuffer, decode_payload, encode_frame

#: The codec may cost at most this much over bare msgpack (pfns-4096, median ratio).
TARGET_RATIO_4096 = 1.5


def _workloads() -> dict[str, tuple[int, dict[str, bytes]]]:
    """name → (pages per batch, the pfn-set field of the batch)."""
    rng = np.random.default_rng(1)
    big = np.sort(rng.choice(1 << 20, 4096, replace=False)).astype(np.uint32)
    small = big[:256]
    frag = P.pfns_to_runs(np.arange(0, 2 * 4096, 2, dtype=np.uint32))
    contig = P.as_runs([(1 << 16, 4096)])
    return {
        "pfns-4096": (4096, {"pfns": P.pfns_to_wire(big)}),
        "pfns-256": (256, {"pfns": P.pfns_to_wire(small)}),
        "runs-fragmented-4096": (4096, {"runs": frag.tobytes()}),
        "runs-contiguous-4096": (4096, {"runs": contig.tobytes()}),
    }


def _project(field: dict[str, bytes]) -> Callable[[int], None]:
    fb = FrameBuffer()
    decode = m.decoder_for(m.BALLOON_TO_DEVICE)  # as a Connection holds it
    Inflate = m.Inflate

    def run(n: int) -> None:
        for i in range(n):
            fb.feed(Inflate(id=i, **field).to_frame())
            msg = decode(*fb.next_frame_span())  # type: ignore[misc]
            assert msg.id == i  # type: ignore[attr-defined]

    return run


def _generic(field: dict[str, bytes]) -> Callable[[int], None]:
    fb = FrameBuffer()
    decode = m.decode_message
    reg = m.BALLOON_TO_DEVICE

    def run(n: int) -> None:
        for i in range(n):
            frame = encode_frame(m.Inflate(id=i, **field).to_wire())
            fb.feed(frame)
            msg = decode(reg, decode_payload(fb.next_frame()))  # type: ignore[arg-type]
            assert msg.id == i  # type: ignore[attr-defined]

    return run


def _plain(field: dict[str, bytes]) -> Callable[[int], None]:
    packb, unpackb = msgpack.packb, msgpack.unpackb

    def run(n: int) -> None:
        for i in range(n):
            body = packb({"t": "inflate", "id": i, **field}, use_bin_type=True)
            d = unpackb(body, raw=False)
            assert d["id"] == i

    return run


def _time(fn: Callable[[int], None], n: int) -> float:
    t0 = time.perf_counter()
    fn(n)
    return time.perf_counter() - t0


def _stages(field: dict[str, bytes]) -> dict[str, Callable[[int], None]]:
    """One callable per stage of the project path (and of plain msgpack), same payload."""
    reg = m.BALLOON_TO_DEVICE
    msg = m.Inflate(id=7, **field)
    frame = msg.to_frame()
    body = frame[4:]
    wire = {"t": "inflate", "id": 7, **field}
    packed = msgpack.packb(wire, use_bin_type=True)
    fb = FrameBuffer()
    Inflate, decode = m.Inflate, m.decoder_for(reg)
    packb, unpackb = msgpack.packb, msgpack.unpackb

    def build(n: int) -> None:
        for i in range(n):
            Inflate(id=i, **field)

    def to_frame(n: int) -> None:
        for _ in range(n):
            msg.to_frame()

    def feed_next(n: int) -> None:
        for _ in range(n):
            fb.feed(frame)
            fb.next_frame_span()

    def decode_fr(n: int) -> None:
        for _ in range(n):
            decode(frame, 4, len(frame))

    def plain_pack(n: int) -> None:
        for i in range(n):
            packb({"t": "inflate", "id": i, **field}, use_bin_type=True)

    def plain_unpack(n: int) -> None:
        for _ in range(n):
            unpackb(packed, raw=False)

    def generic_decode(n: int) -> None:
        for _ in range(n):
            m.decode_message(reg, decode_payload(body))

    return {"build Inflate (validate)": build, "to_frame": to_frame,
            "feed + next_frame_span": feed_next, "decode_frame (validate)": decode_fr,
            "generic: decode_payload + decode_message": generic_decode,
            "msgpack.packb (dict built)": plain_pack, "msgpack.unpackb": plain_unpack}


def measure(repeats: int = 7, target_s: float = 0.05, breakdown: bool = False,
            progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    results: dict[str, Any] = {}
    work = _workloads()
    for k, (name, (pages, field)) in enumerate(work.items(), 1):
        if progress is not None:
            progress(f"[{k}/{len(work)}] {name}")
        proj, gen, plain = _project(field), _generic(field), _plain(field)
        for f in (proj, gen, plain):
            f(50)  # warm up
        n = max(50, int(target_s / max(_time(proj, 200) / 200, 1e-9)))
        ratios, gen_ratios, proj_rates, plain_rates = [], [], [], []
        for _ in range(repeats):
            # Interleaved, so that all sides see the same machine load.
            tp = _time(proj, n)
            tq = _time(plain, n)
            tg = _time(gen, n)
            ratios.append(tp / tq)
            gen_ratios.append(tg / tq)
            proj_rates.append(pages * n / tp)
            plain_rates.append(pages * n / tq)
        results[name] = {
            "pages_per_batch": pages,
            "batches_per_repeat": n,
            "project_pages_per_s": statistics.median(proj_rates),
            "msgpack_pages_per_s": statistics.median(plain_rates),
            "overhead_ratio": {"min": min(ratios), "median": statistics.median(ratios),
                               "max": max(ratios)},
            "generic_path_ratio": {"min": min(gen_ratios),
                                   "median": statistics.median(gen_ratios),
                                   "max": max(gen_ratios)},
        }
        if breakdown:
            stages = _stages(field)
            best = {k: min(_time(f, n) for _ in range(repeats)) / n * 1e6
                    for k, f in stages.items()}
            results[name]["stages_us"] = best
    r = results["pfns-4096"]["overhead_ratio"]["median"]
    results["target"] = {"pfns-4096 median ratio": r, "limit": TARGET_RATIO_4096,
                         "met": r <= TARGET_RATIO_4096}
    return results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.protocol", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    ap.add_argument("--repeats", type=int, default=7, help="repeats per workload (default 7)")
    ap.add_argument("--breakdown", action="store_true",
                    help="also time each stage (µs per message, min over repeats)")
    args = ap.parse_args(argv)
    if args.repeats < 1:
        ap.error("--repeats must be at least 1")
    res = measure(repeats=args.repeats, breakdown=args.breakdown)
    if args.json:
        json.dump(res, sys.stdout, indent=2)
        print()
        return 0
    print(f"{'workload':24} {'project pages/s':>16} {'msgpack pages/s':>16} "
          f"{'ratio min/med/max':>20} {'generic path min/med/max':>26}")
    for name, r in res.items():
        if name == "target":
            continue
        o, g = r["overhead_ratio"], r["generic_path_ratio"]
        print(f"{name:24} {r['project_pages_per_s']:16.3e} {r['msgpack_pages_per_s']:16.3e} "
              f"{o['min']:6.2f}/{o['median']:5.2f}/{o['max']:5.2f}"
              f"        {g['min']:6.2f}/{g['median']:5.2f}/{g['max']:5.2f}")
    if args.breakdown:
        names = [k for k in res if k != "target"]
        stages = list(res[names[0]]["stages_us"])
        print(f"\n{'stage (µs per message)':42}" + "".join(f"{k[:22]:>23}" for k in names))
        for st in stages:
            print(f"{st:42}" + "".join(f"{res[k]['stages_us'][st]:23.3f}" for k in names))
    t = res["target"]
    print(f"target: pfns-4096 median ratio {t['pfns-4096 median ratio']:.2f} "
          f"<= {t['limit']}: {'met' if t['met'] else 'MISSED'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
