"""Control server and client against a running Host with in-test peers."""

from __future__ import annotations

import asyncio
import shutil

import numpy as np
import pytest
from hv_peers import Lab, frame, raw_connect, read_frame, run, topo

from balloonlab.client import ControlClient, ControlError, HostNotRunning

PAGE = 4096
#: Bounds a wait on a condition; only a hang reaches it.
HANG = 60.0


async def _until(pred) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + HANG
    while not pred():
        assert loop.time() < end, "condition never held"
        await asyncio.sleep(0.02)


def test_host_info_list_vms_dommemstat():
    async def main():
        async with Lab(topo(64, 16, {"a": 32, "b": 16})) as lab:
            g = await lab.guest("a")
            d = await lab.driver("a")
            await g.touch(np.arange(10))
            d.stats = {0: 1, 1: 2, 2: 3, 3: 4, 4: 20 * PAGE, 5: 32 * PAGE, 6: 15 * PAGE,
                       7: 5 * PAGE, 256: 0, 257: 1234}
            await _until(lambda: lab.host.vms["a"].balloon.stats.get(257))

            def client_side():
                with ControlClient(lab.run_dir) as c:
                    info = c.call("host_info")
                    vms = c.call("list_vms")
                    st = c.call("dommemstat", vm="a")
                    return info, vms, st

            info, vms, st = await asyncio.to_thread(client_side)
            assert info["frames_total"] == 64 and info["frames_free"] == 54
            assert info["swap_slots_total"] == 16 and info["page_size"] == PAGE
            assert info["policy"] == "none" and info["name"] == "t"
            by = {v["name"]: v for v in vms}
            assert by["a"]["state"] == "running" and by["a"]["driver"] == "connected"
            assert by["b"]["driver"] == "disconnected" and by["b"]["memory_pages"] == 16
            assert st["backed_pages"] == 10 and st["rss"] == 10 * PAGE
            assert st["unused"] == 20 * PAGE and st["usable"] == 15 * PAGE
            assert st["available"] == 32 * PAGE and st["ops"] == 1234
            assert st["swap_in"] == 1 and st["major_fault"] == 3
            assert st["last_update"] is not None and st["corrupted_reads"] == 0
            for key in ("actual", "disk_caches", "target_pages", "balloon_pages",
                        "host_swapped_pages", "oom_kills"):
                assert key in st
    run(main())


def test_call_many_sends_every_call_in_one_round_trip():
    """Values come back in the calls' order; a failed call is raised once every answer is
    read, so the connection stays in step for the next call."""
    async def main():
        async with Lab(topo(64, 0, {"a": 32, "b": 16})) as lab:
            def client_side():
                with ControlClient(lab.run_dir) as c:
                    ok = c.call_many([("set_balloon", {"vm": "a", "pages": 8}),
                                      ("set_balloon", {"vm": "b", "pages": 4}),
                                      ("host_info", {})])
                    with pytest.raises(ControlError) as err:
                        c.call_many([("set_balloon", {"vm": "a", "pages": 2}),
                                     ("set_balloon", {"vm": "nosuch", "pages": 1}),
                                     ("set_balloon", {"vm": "b", "pages": 3})])
                    after = c.call("list_vms")
                    return ok, err.value, after

            ok, err, after = await asyncio.to_thread(client_side)
            assert ok[0]["target_pages"] == 8 and ok[1]["target_pages"] == 4
            assert ok[2]["name"] == "t"
            assert "nosuch" in str(err)
            # the calls around the failed one were answered and applied
            assert {v["name"]: v["target_pages"] for v in after} == {"a": 2, "b": 3}
    run(main())


def test_setmem_and_set_balloon_push_config_to_the_driver():
    async def main():
        async with Lab(topo(64, 0, {"a": 32})) as lab:
            d = await lab.driver("a")

            def client_side():
                with ControlClient(lab.run_dir / "control.sock") as c:
                    r1 = c.call("set_balloon", vm="a", pages=8)
                    r2 = c.call("setmem", vm="a", bytes=24 * PAGE)
                    return r1, r2

            r1, r2 = await asyncio.to_thread(client_side)
            assert r1["target_pages"] == 8 and r2["target_pages"] == 8
            r3 = await asyncio.to_thread(
                lambda: ControlClient(lab.run_dir).call("setmem", vm="a", bytes=16 * PAGE))
            assert r3["target_pages"] == 16
            await _until(lambda: d.targets == [8, 16])
            assert d.targets == [8, 16]
            kinds = [e["kind"] for e in lab.host.events]
            assert kinds.count("balloon_target") == 2
    run(main())


@pytest.mark.parametrize("method,params,code", [
    ("nope", {}, "unknown_method"),
    ("dommemstat", {}, "bad_params"),
    ("dommemstat", {"vm": "zz"}, "unknown_vm"),
    ("set_balloon", {"vm": "a", "pages": 33}, "bad_params"),
    ("set_balloon", {"vm": "a", "pages": -1}, "bad_params"),
    ("set_balloon", {"vm": "a", "pages": "7"}, "bad_params"),
    ("setmem", {"vm": "a"}, "bad_params"),
    ("set_policy", {"name": "no-such-policy"}, "bad_params"),
    ("events", {"follow": "yes"}, "bad_params"),
])
def test_bad_calls_get_clear_errors_and_change_nothing(method, params, code):
    async def main():
        async with Lab(topo(64, 0, {"a": 32})) as lab:
            def client_side():
                with ControlClient(lab.run_dir) as c:
                    with pytest.raises(ControlError) as ei:
                        c.call(method, **params)
                    # The connection survives a failed call.
                    return ei.value, c.call("host_info")
            err, info = await asyncio.to_thread(client_side)
            assert err.code == code and err.message
            assert lab.host.vms["a"].balloon.target == 0
            assert info["policy"] == "none"
    run(main())


def test_events_list_and_follow():
    async def main():
        async with Lab(topo(64, 0, {"a": 32})) as lab:
            def follow():
                with ControlClient(lab.run_dir, timeout=HANG) as c:
                    seen = []
                    for ev in c.events(follow=True):
                        seen.append(ev)
                        if ev["kind"] == "balloon_target":
                            return seen
            fut = asyncio.ensure_future(asyncio.to_thread(follow))
            await asyncio.sleep(0.2)
            lab.host.set_balloon_target(lab.host.vms["a"], 4)
            seen = await asyncio.wait_for(fut, HANG)
            assert seen[0]["kind"] == "host_started"
            assert all({"time", "kind", "vm"} <= ev.keys() for ev in seen)
            past = await asyncio.to_thread(lambda: list(ControlClient(lab.run_dir).events()))
            assert [e["kind"] for e in past][:1] == ["host_started"]
    run(main())


def test_set_policy_and_shutdown_remove_the_run_dir():
    async def main():
        lab = Lab(topo(64, 0, {"a": 32}))
        await lab.host.start()
        try:
            def client_side():
                with ControlClient(lab.run_dir) as c:
                    c.call("set_policy", name="static")
                    p = c.call("host_info")["policy"]
                    c.call("set_policy", name="none")
                    c.call("shutdown")
                    return p
            assert await asyncio.to_thread(client_side) == "static"
            await asyncio.wait_for(lab.host.wait_stopped(), HANG)
            assert not lab.run_dir.exists()
            with pytest.raises(HostNotRunning):
                ControlClient(lab.run_dir)
        finally:
            await lab.host.shutdown()  # idempotent
            shutil.rmtree(lab.base, ignore_errors=True)
    run(main())


def test_control_socket_is_owner_only_and_run_dir_0700():
    async def main():
        async with Lab(topo(16, 0, {"a": 8})) as lab:
            assert lab.run_dir.stat().st_mode & 0o777 == 0o700
            for s in ("control.sock", "a.machine.sock", "a.balloon.sock"):
                assert (lab.run_dir / s).stat().st_mode & 0o777 == 0o600
            assert (lab.run_dir / "hypervisor.pid").read_text().strip().isdigit()
    run(main())


def test_control_client_speaks_only_the_protocol():
    async def main():
        async with Lab(topo(16, 0, {"a": 8})) as lab:
            r, w = await raw_connect(lab.run_dir / "control.sock")
            w.write(frame({"t": "call", "id": 7, "method": "host_info"}))
            res = await read_frame(r)
            assert res["t"] == "result" and res["id"] == 7
            w.write(frame({"t": "result", "id": 7}))  # a client may not send results
            err = await read_frame(r)
            assert err["t"] == "error" and err["code"] == "unknown_type"
            assert await read_frame(r) is None
    run(main())
