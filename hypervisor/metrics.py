"""Prometheus metrics of a host: ``GET /metrics`` over HTTP, off unless asked for.

Enabled by ``[host] metrics = "127.0.0.1:9177"`` in the topology or ``balloonlab up
--metrics ADDR``. The endpoint is served by the hypervisor process itself, on its event
loop (a small HTTP/1.1 handler: one request per connection), so a scrape sees the host's
state between two of its operations, never half-way through one.

Nothing is counted for the metrics: :class:`HostCollector`, a prometheus-client custom
collector in a private :class:`~prometheus_client.CollectorRegistry`, reads the host's own
state at scrape time (the ledger, each VM's ``dommemstat``, the balloon device's counters).
The one exception is ``balloonlab_policy_decisions_total``, counted from the host's event
stream because the host keeps only a bounded history of events.

Names follow the Prometheus guide: base units in the name (``_bytes``), counters end in
``_total``, one label ``domain`` (the VM's name) instead of a metric per VM. The per-VM
memory metrics are libvirt-exporter's, with its meanings (virsh ``dommemstat``):

========================================================  ==================================
``libvirt_domain_memory_stats_actual_balloon_bytes``      guest memory now (virsh ``actual``)
``libvirt_domain_memory_stats_available_bytes``           memory the guest sees (``available``)
``libvirt_domain_memory_stats_unused_bytes``              free in the guest (``unused``)
``libvirt_domain_memory_stats_usable_bytes``              reclaimable without swapping
``libvirt_domain_memory_stats_rss_bytes``                 host memory backing the guest
``libvirt_domain_memory_stats_disk_cache_bytes``          the guest's page cache
``libvirt_domain_memory_stats_major_fault_total``         major faults in the guest
``libvirt_domain_memory_stats_minor_fault_total``         minor faults in the guest
``libvirt_domain_memory_stats_swap_in_bytes``             bytes the guest read from its swap
``libvirt_domain_memory_stats_swap_out_bytes``            bytes the guest wrote to its swap
``libvirt_domain_info_maximum_memory_bytes``              the VM's memory size
========================================================  ==================================

docs/cli.md lists every metric. Units: bytes, pages of 4096 bytes where a name says pages.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from hypervisor.pathologies import noncontig_ratio
from hypervisor.units import parse_listen_address
from protocol.features import PAGE_SIZE, StatTag

if TYPE_CHECKING:
    from hypervisor.hostview import HostView as Host

log = logging.getLogger(__name__)

#: Longest HTTP request head (request line and headers) a scraper may send, bytes.
MAX_REQUEST_HEAD = 8192
#: Seconds a client gets to send its request head and read the answer.
REQUEST_TIMEOUT = 10.0
#: Connections served at once; more wait in the kernel's accept queue.
MAX_CLIENTS = 16

#: libvirt-exporter's per-domain memory gauges: (name suffix, dommemstat key, help).
LIBVIRT_GAUGES: tuple[tuple[str, str, str], ...] = (
    ("actual_balloon_bytes", "actual",
     "Guest memory now: its size minus the balloon (virsh dommemstat actual)."),
    ("available_bytes", "available",
     "Memory the guest sees as its total (virtio MEMTOT; virsh available)."),
    ("unused_bytes", "unused", "Memory left unused by the guest (virtio MEMFREE; virsh unused)."),
    ("usable_bytes", "usable",
     "Memory the balloon could take without pushing the guest to swap (virtio AVAIL)."),
    ("rss_bytes", "rss", "Host memory backing the guest's RAM now (resident pages of its memfd)."),
    ("disk_cache_bytes", "disk_caches", "The guest's page cache (virtio CACHES)."),
    ("swap_in_bytes", "swap_in", "Bytes the guest read in from its swap device (cumulative)."),
    ("swap_out_bytes", "swap_out", "Bytes the guest wrote out to its swap device (cumulative)."),
)
#: libvirt-exporter's per-domain memory counters: (name without _total, dommemstat key, help).
LIBVIRT_COUNTERS: tuple[tuple[str, str, str], ...] = (
    ("major_fault", "major_fault", "Major page faults in the guest (swap-ins)."),
    ("minor_fault", "minor_fault", "Minor page faults in the guest."),
)
#: balloonlab's per-domain balloon counters: (name without _total, BalloonMetrics field, help).
BALLOON_COUNTERS: tuple[tuple[str, str, str], ...] = (
    ("balloonlab_balloon_inflated_pages", "inflated", "Pages given to the host by inflates."),
    ("balloonlab_balloon_deflated_pages", "deflated", "Pages taken back by deflates."),
    ("balloonlab_balloon_inflate_batches", "inflate_batches", "Inflate batches accepted."),
    ("balloonlab_balloon_deflate_batches", "deflate_batches", "Deflate batches accepted."),
    ("balloonlab_balloon_out_of_puff_stalls", "out_of_puff",
     "Times the driver stalled short of its target (the guest had no memory to give)."),
    ("balloonlab_free_page_reports", "report_batches", "Free page report batches accepted."),
    ("balloonlab_free_page_reported_pages", "reported",
     "Pages reported free by the guest and released by the host."),
)


#: The pathologies of host swapping, per domain: (name without _total, dommemstat key, help).
PATHOLOGY_COUNTERS: tuple[tuple[str, str, str], ...] = (
    ("balloonlab_double_paging_pages", "double_paging",
     "Pages the guest swapped out after the host read them back from its swap for that."),
    ("balloonlab_false_swap_reads_pages", "false_swap_reads",
     "Pages the host read back from its swap that the guest then overwrote whole."),
    ("balloonlab_silent_swap_writes_pages", "silent_swap_writes",
     "Clean guest page-cache pages the host wrote to its swap (their disk copy would do)."),
    ("balloonlab_stale_swap_reads_pages", "stale_swap_reads",
     "Pages the host read back from its swap that a guest disk read then overwrote."),
    ("balloonlab_host_swap_reads_pages", "host_swap_reads",
     "The VM's pages read back from host swap."),
    ("balloonlab_host_swap_reads_noncontig_pages", "host_swap_reads_noncontig",
     "Host swap reads whose slot did not follow the previous page's in their fault."),
)


class HostCollector(Collector):
    """Reads one host's state at scrape time into metric families."""

    def __init__(self, host: Host) -> None:
        self.host = host
        #: Policy decisions per VM, counted from the host's event stream.
        self.policy_decisions: collections.Counter[str] = collections.Counter()

    def collect(self) -> Iterator[Any]:
        host = self.host
        led = host.ledger
        used = GaugeMetricFamily("balloonlab_host_frames_used_bytes",
                                 "Host frames in use by VMs, in bytes.")
        used.add_metric([], (led.frames_total - led.frames_free) * PAGE_SIZE)
        free = GaugeMetricFamily("balloonlab_host_frames_free_bytes",
                                 "Host frames free, in bytes.")
        free.add_metric([], led.frames_free * PAGE_SIZE)
        total = GaugeMetricFamily("balloonlab_host_memory_bytes",
                                  "Host memory (all frames), in bytes.")
        total.add_metric([], led.frames_total * PAGE_SIZE)
        swap_used = GaugeMetricFamily("balloonlab_host_swap_used_bytes",
                                      "Host swap in use, in bytes.")
        swap_used.add_metric([], (led.swap_slots_total - led.slots_free) * PAGE_SIZE)
        swap_total = GaugeMetricFamily("balloonlab_host_swap_bytes", "Host swap size, in bytes.")
        swap_total.add_metric([], led.swap_slots_total * PAGE_SIZE)
        host_oom = CounterMetricFamily("balloonlab_host_oom_kills",
                                       "VMs killed by the host's OOM killer.")
        host_oom.add_metric([], host.oom_kills)
        reads, jumps = host.memory.swap_reads, host.memory.swap_reads_noncontig
        h_reads = CounterMetricFamily("balloonlab_host_swap_reads_all_pages",
                                      "Pages read back from host swap, all VMs.")
        h_reads.add_metric([], reads)
        h_jumps = CounterMetricFamily(
            "balloonlab_host_swap_reads_noncontig_all_pages",
            "Host swap reads not contiguous with the page read before them, all VMs.")
        h_jumps.add_metric([], jumps)
        yield from (used, free, total, swap_used, swap_total, host_oom, h_reads, h_jumps)
        ratio = noncontig_ratio(reads, jumps)
        if ratio is not None:
            r = GaugeMetricFamily("balloonlab_host_swap_noncontig_ratio",
                                  "Share of host swap reads not contiguous on the swap device.")
            r.add_metric([], ratio)
            yield r

        lab = ["domain"]
        libvirt_g = {key: GaugeMetricFamily(f"libvirt_domain_memory_stats_{suffix}", doc,
                                            labels=lab)
                     for suffix, key, doc in LIBVIRT_GAUGES}
        libvirt_c = {key: CounterMetricFamily(f"libvirt_domain_memory_stats_{suffix}", doc,
                                              labels=lab)
                     for suffix, key, doc in LIBVIRT_COUNTERS}
        maximum = GaugeMetricFamily("libvirt_domain_info_maximum_memory_bytes",
                                    "The VM's memory size, in bytes.", labels=lab)
        balloon_c = {fld: CounterMetricFamily(name, doc, labels=lab)
                     for name, fld, doc in BALLOON_COUNTERS}
        patho_c = {key: CounterMetricFamily(name, doc, labels=lab)
                   for name, key, doc in PATHOLOGY_COUNTERS}
        rejected = CounterMetricFamily("balloonlab_balloon_rejected_batches",
                                       "Balloon batches refused by the host, by error code.",
                                       labels=["domain", "code"])
        target = GaugeMetricFamily("balloonlab_balloon_target_bytes",
                                   "The balloon's target size, in bytes.", labels=lab)
        size = GaugeMetricFamily("balloonlab_balloon_bytes",
                                 "Pages in the balloon now (the host's map), in bytes.",
                                 labels=lab)
        swap_in = CounterMetricFamily("balloonlab_host_swap_in_pages",
                                      "The VM's pages read back from host swap.", labels=lab)
        swap_out = CounterMetricFamily("balloonlab_host_swap_out_pages",
                                       "The VM's pages written to host swap.", labels=lab)
        host_swapped = GaugeMetricFamily("balloonlab_host_swapped_bytes",
                                         "The VM's memory in host swap now, in bytes.",
                                         labels=lab)
        guest_oom = CounterMetricFamily("balloonlab_guest_oom_kills",
                                        "Tasks killed by the guest's OOM killer.", labels=lab)
        corrupted = CounterMetricFamily("balloonlab_corrupted_reads",
                                        "Guest reads that found wrong bytes (must stay 0).",
                                        labels=lab)
        decisions = CounterMetricFamily("balloonlab_policy_decisions",
                                        "Balloon targets set by the policy.", labels=lab)
        running = GaugeMetricFamily("balloonlab_domain_running",
                                    "1 when the VM's guest kernel runs, else 0.", labels=lab)
        control = host.control
        for name, vm in list(host.vms.items()) if control is not None else []:
            st = control.dommemstat({"vm": name})
            for key, fam in libvirt_g.items():
                if st.get(key) is not None:
                    fam.add_metric([name], st[key])
            for key, cfam in libvirt_c.items():
                if st.get(key) is not None:
                    cfam.add_metric([name], st[key])
            for key, cfam in patho_c.items():
                if st.get(key) is not None:
                    cfam.add_metric([name], st[key])
            maximum.add_metric([name], vm.pages * PAGE_SIZE)
            met = vm.balloon.metrics
            for fld, cfam in balloon_c.items():
                cfam.add_metric([name], getattr(met, fld))
            for code, n in sorted(met.rejected.items()):
                rejected.add_metric([name, code], n)
            target.add_metric([name], vm.balloon.target * PAGE_SIZE)
            size.add_metric([name], st["balloon_pages"] * PAGE_SIZE)
            swap_in.add_metric([name], vm.host_swap_in)
            swap_out.add_metric([name], vm.host_swap_out)
            host_swapped.add_metric([name], st["host_swapped_pages"] * PAGE_SIZE)
            stats = vm.balloon.stats
            kills = stats.get(int(StatTag.OOM_KILLS_TOTAL), stats.get(int(StatTag.OOM_KILL)))
            if kills is not None:
                guest_oom.add_metric([name], kills)
            bad = stats.get(int(StatTag.CORRUPTED_READS))
            if bad is not None:
                corrupted.add_metric([name], bad)
            decisions.add_metric([name], self.policy_decisions[name])
            running.add_metric([name], 1 if str(vm.state) == "running" else 0)
        yield from libvirt_g.values()
        yield from libvirt_c.values()
        yield maximum
        yield from balloon_c.values()
        yield from patho_c.values()
        yield from (rejected, target, size, swap_in, swap_out, host_swapped, guest_oom,
                    corrupted, decisions, running)


class MetricsServer:
    """``GET /metrics`` of one host on ``HOST:PORT``, served from the host's event loop."""

    def __init__(self, host: Host) -> None:
        self.host = host
        self.collector = HostCollector(host)
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self.collector)
        self._server: asyncio.AbstractServer | None = None
        self._events: asyncio.Task[None] | None = None
        self._clients = asyncio.Semaphore(MAX_CLIENTS)
        self.address: tuple[str, int] | None = None

    @classmethod
    async def start(cls, host: Host, address: str) -> MetricsServer:
        """Bind ``address`` now (OSError when it is taken or not ours) and serve."""
        self = cls(host)
        bind_host, port = parse_listen_address(address)
        self._server = await asyncio.start_server(self._handle, bind_host, port,
                                                  limit=MAX_REQUEST_HEAD)
        sockname = self._server.sockets[0].getsockname()
        self.address = (str(sockname[0]), int(sockname[1]))
        self._events = asyncio.create_task(self._count_events(), name="metrics-events")
        log.info("metrics on http://%s:%d/metrics", *self.address)
        return self

    @property
    def url(self) -> str:
        assert self.address is not None
        h, p = self.address
        return f"http://{f'[{h}]' if ':' in h else h}:{p}/metrics"

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        if self._events is not None:
            self._events.cancel()
            await asyncio.gather(self._events, return_exceptions=True)

    async def _count_events(self) -> None:
        q = self.host.subscribe()
        try:
            while True:
                ev = await q.get()
                if ev.get("kind") == "policy" and ev.get("vm") is not None:
                    self.collector.policy_decisions[str(ev["vm"])] += 1
        finally:
            self.host.unsubscribe(q)

    def render(self) -> bytes:
        """The exposition text of every metric now."""
        return generate_latest(self.registry)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with self._clients, asyncio.timeout(REQUEST_TIMEOUT):
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except asyncio.LimitOverrunError:
                    await _respond(writer, 431, b"request head too large\n")
                    return
                except asyncio.IncompleteReadError:
                    return
                parts = head.split(b"\r\n", 1)[0].split()
                if len(parts) != 3 or not parts[2].startswith(b"HTTP/"):
                    await _respond(writer, 400, b"bad request line\n")
                    return
                method, target = parts[0], parts[1].split(b"?", 1)[0]
                if method not in (b"GET", b"HEAD"):
                    await _respond(writer, 405, b"only GET and HEAD\n", allow=True)
                elif target != b"/metrics":
                    await _respond(writer, 404, b"metrics are at /metrics\n")
                else:
                    await _respond(writer, 200, self.render(), ctype=CONTENT_TYPE_LATEST,
                                   head_only=method == b"HEAD")
        except (TimeoutError, ConnectionError):
            pass
        except Exception:
            log.exception("metrics request failed")
            with contextlib.suppress(Exception):
                await _respond(writer, 500, b"internal error\n")
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()


_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
            431: "Request Header Fields Too Large", 500: "Internal Server Error"}


async def _respond(writer: asyncio.StreamWriter, status: int, body: bytes, *,
                   ctype: str = "text/plain; charset=utf-8", allow: bool = False,
                   head_only: bool = False) -> None:
    head = [f"HTTP/1.1 {status} {_REASONS[status]}", f"Content-Type: {ctype}",
            f"Content-Length: {len(body)}", "Connection: close"]
    if allow:
        head.append("Allow: GET, HEAD")
    writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + (b"" if head_only else body))
    await writer.drain()
