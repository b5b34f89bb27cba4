"""Prometheus /metrics of a running Host with in-test peers: scraped over real HTTP, parsed
with prometheus_client's own parser, checked against dommemstat and the host's state."""

from __future__ import annotations

import asyncio
import shutil
import socket
import urllib.error
import urllib.request

import numpy as np
import pytest
from hv_peers import Lab, frame, raw_connect, read_frame, run, topo
from prometheus_client.parser import text_string_to_metric_families

from hypervisor.host import Host
from hypervisor.metrics import parse_listen_address
from hypervisor.topology import TopologyError, parse_topology
from protocol import pfn as P

PAGE = 4096
WAIT = 20.0  # bounds a hang only


def with_metrics(text: str, addr: str = "127.0.0.1:0") -> str:
    return text.replace("[host]\n", f'[host]\nmetrics = "{addr}"\n', 1)


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of the endpoint: {(name, sorted labels): value}."""
    with urllib.request.urlopen(url, timeout=WAIT) as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/plain")
        text = r.read().decode()
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def dom(name: str) -> tuple[tuple[str, str], ...]:
    return (("domain", name),)


def test_metrics_match_dommemstat_and_the_host():
    async def main():
        async with Lab(with_metrics(topo(64, 16, {"a": 32, "b": 16}))) as lab:
            host = lab.host
            g = await lab.guest("a")
            d = await lab.driver("a")
            await g.touch(np.arange(20))
            d.stats = {0: 3 * PAGE, 1: 5 * PAGE, 2: 7, 3: 11, 4: 9 * PAGE, 5: 30 * PAGE,
                       6: 8 * PAGE, 7: 0, 256: 0, 260: 2}
            assert (await d.inflate(np.arange(24, 32))).ok
            await d.actual(8)
            # A driver of b breaks the rules: its batch is refused with a code.
            r, w = await raw_connect(lab.run_dir / "b.balloon.sock")
            w.write(frame({"t": "hello", "version": 1, "features": 1, "page_size": PAGE,
                           "vm": "b"}))
            assert (await read_frame(r))["t"] == "welcome"
            w.write(frame({"t": "inflate", "id": 1, "pfns": P.pfns_to_wire([16])}))
            ack = await read_frame(r)
            assert ack["ok"] is False and ack["code"] == "pfn_out_of_range"
            vm = host.vms["a"]
            async with asyncio.timeout(WAIT):
                while vm.balloon.stats.get(260) != 2 or vm.balloon.actual != 8:
                    await asyncio.sleep(0.02)
            host.set_balloon_target(vm, 8, reason="test", policy="static")  # one decision
            await asyncio.sleep(0.05)  # let the event reach the metrics' event reader
            await lab.quiesce()
            url = host.metrics_server.url
            m = await asyncio.to_thread(scrape, url)
            st = host.control.dommemstat({"vm": "a"})
            lib = "libvirt_domain_memory_stats_"
            for name, key in (("actual_balloon_bytes", "actual"),
                              ("available_bytes", "available"), ("unused_bytes", "unused"),
                              ("usable_bytes", "usable"), ("rss_bytes", "rss"),
                              ("disk_cache_bytes", "disk_caches"),
                              ("swap_in_bytes", "swap_in"), ("swap_out_bytes", "swap_out"),
                              ("major_fault_total", "major_fault"),
                              ("minor_fault_total", "minor_fault")):
                assert m[(lib + name, dom("a"))] == st[key], name
            assert m[(lib + "actual_balloon_bytes", dom("a"))] == 24 * PAGE
            assert m[(lib + "rss_bytes", dom("a"))] == 20 * PAGE
            assert m[("libvirt_domain_info_maximum_memory_bytes", dom("a"))] == 32 * PAGE
            assert m[("libvirt_domain_info_maximum_memory_bytes", dom("b"))] == 16 * PAGE
            # b has reported nothing: its guest stats are absent, not made up.
            assert (lib + "unused_bytes", dom("b")) not in m
            led = host.ledger
            assert m[("balloonlab_host_frames_used_bytes", ())] == 20 * PAGE
            assert m[("balloonlab_host_frames_free_bytes", ())] == led.frames_free * PAGE
            assert m[("balloonlab_host_memory_bytes", ())] == 64 * PAGE
            assert m[("balloonlab_host_swap_used_bytes", ())] == 0
            assert m[("balloonlab_balloon_inflated_pages_total", dom("a"))] == 8
            assert m[("balloonlab_balloon_inflate_batches_total", dom("a"))] == 1
            assert m[("balloonlab_balloon_deflated_pages_total", dom("a"))] == 0
            codes = {k[1]: v for k, v in m.items()
                     if k[0] == "balloonlab_balloon_rejected_batches_total"}
            assert codes == {(("code", "pfn_out_of_range"), ("domain", "b")): 1}
            assert m[("balloonlab_balloon_bytes", dom("a"))] == 8 * PAGE
            assert m[("balloonlab_balloon_target_bytes", dom("a"))] == 8 * PAGE
            assert m[("balloonlab_guest_oom_kills_total", dom("a"))] == 2
            assert m[("balloonlab_corrupted_reads_total", dom("a"))] == 0
            assert m[("balloonlab_policy_decisions_total", dom("a"))] == 1
            assert m[("balloonlab_policy_decisions_total", dom("b"))] == 0
            assert m[("balloonlab_domain_running", dom("a"))] == 1
            assert m[("balloonlab_domain_running", dom("b"))] == 0
            w.close()
            # No metric is named after a VM.
            assert not any("_a_" in k[0] or k[0].endswith("_a") for k in m)
    run(main())


def test_http_errors_leave_the_endpoint_serving():
    async def main():
        async with Lab(with_metrics(topo(64, 0, {"a": 32}))) as lab:
            host, port = lab.host.metrics_server.address
            base = f"http://{host}:{port}"

            def status(path: str, method: str = "GET") -> int:
                req = urllib.request.Request(base + path, method=method)
                try:
                    with urllib.request.urlopen(req, timeout=WAIT) as r:
                        return r.status
                except urllib.error.HTTPError as e:
                    return e.code

            assert await asyncio.to_thread(status, "/") == 404
            assert await asyncio.to_thread(status, "/metrics", "POST") == 405
            r, w = await asyncio.open_connection(host, port)
            w.write(b"GET /metrics HTTP/1.1\r\nX: " + b"a" * 20000 + b"\r\n\r\n")
            await w.drain()
            first = await asyncio.wait_for(r.readline(), WAIT)
            assert b" 431 " in first
            w.close()
            r, w = await asyncio.open_connection(host, port)
            w.write(b"garbage\r\n\r\n")
            assert b" 400 " in await asyncio.wait_for(r.readline(), WAIT)
            w.close()
            assert await asyncio.to_thread(status, "/metrics") == 200
            assert await asyncio.to_thread(status, "/metrics?x=1", "HEAD") == 200
    run(main())


def test_a_taken_address_fails_the_start_before_any_vm():
    async def main():
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        try:
            addr = f"127.0.0.1:{s.getsockname()[1]}"
            lab = Lab(with_metrics(topo(64, 0, {"a": 32}), addr))
            try:
                with pytest.raises(OSError):
                    await lab.host.start()
                assert lab.host.vms == {}
                assert not lab.run_dir.exists()
            finally:
                shutil.rmtree(lab.base, ignore_errors=True)
        finally:
            s.close()
    run(main())


@pytest.mark.parametrize("addr,problem", [
    ("9177", "expected HOST:PORT"),
    (":9177", "no host before the port"),
    ("127.0.0.1:99999", "not a number in 0..65535"),
    ("127.0.0.1:http", "not a number in 0..65535"),
    ("no such host:9177", "neither an IPv4 address nor a host name"),
    ("[zz]:9177", "not an IPv6 address"),
    ("300.1.1.1:9177", "neither an IPv4 address nor a host name"),
])
def test_bad_metrics_addresses_are_one_line_naming_file_and_key(addr, problem):
    text = with_metrics(topo(64, 0, {"a": 32}), addr)
    with pytest.raises(TopologyError) as ei:
        parse_topology(text, source="lab.toml")
    msg = str(ei.value)
    assert "\n" not in msg and msg.startswith("lab.toml: host.metrics: ") and problem in msg


def test_metrics_key_round_trips_and_is_off_by_default():
    assert parse_topology(topo(64, 0, {"a": 32})).host.metrics is None
    t = parse_topology(with_metrics(topo(64, 0, {"a": 32}), "[::1]:9177"))
    assert t.host.metrics == "[::1]:9177"
    assert parse_topology(t.to_toml()).host.metrics == "[::1]:9177"
    assert parse_listen_address("localhost:0") == ("localhost", 0)
    assert Host(parse_topology(topo(64, 0, {"a": 32}))).metrics_server is None
