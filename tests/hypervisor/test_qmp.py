"""QMP monitors (``<vm>.qmp.sock``) of a running Host with in-test peers, driven by the
``qemu.qmp`` package's QMPClient (the judge of protocol conformance) and by raw sockets for
hostile input."""

from __future__ import annotations

import asyncio
import json
import os
import stat

import numpy as np
import pytest
from hv_peers import Lab, run, topo
from hypothesis import given, settings
from hypothesis import strategies as st
from qemu.qmp import ExecuteError, QMPClient

from hypervisor import qmp, rundir

PAGE = 4096
WAIT = 20.0  # bounds a hang only


async def client(lab: Lab, vm: str) -> QMPClient:
    c = QMPClient(f"test-{vm}")
    await c.connect(str(rundir.qmp_sock(lab.run_dir, vm)))
    return c


async def until(pred, what: str) -> None:
    async with asyncio.timeout(WAIT):
        while not pred():
            await asyncio.sleep(0.01)


async def next_event(c: QMPClient, name: str) -> dict:
    """The next event called ``name`` (others are skipped)."""
    async with asyncio.timeout(WAIT):
        async for ev in c.events:
            if ev["event"] == name:
                return dict(ev)
    raise AssertionError("event stream ended")


class Raw:
    """A line-level QMP client for input no real client would send."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.r, self.w = reader, writer

    @classmethod
    async def open(cls, lab: Lab, vm: str) -> Raw:
        r, w = await asyncio.open_unix_connection(str(rundir.qmp_sock(lab.run_dir, vm)),
                                                  limit=1 << 22)
        raw = cls(r, w)
        greet = await raw.recv()
        assert set(greet["QMP"]) == {"version", "capabilities"}
        return raw

    async def send(self, data: bytes | str | dict) -> None:
        if isinstance(data, dict):
            data = json.dumps(data)
        if isinstance(data, str):
            data = data.encode()
        self.w.write(data + b"\n")
        await self.w.drain()

    async def recv(self) -> dict | None:
        line = await asyncio.wait_for(self.r.readline(), WAIT)
        return json.loads(line) if line else None

    async def call(self, data: bytes | str | dict) -> dict:
        await self.send(data)
        while True:
            msg = await self.recv()
            assert msg is not None, "server hung up"
            if "event" not in msg:
                return msg

    def close(self) -> None:
        self.w.close()


def test_greeting_negotiation_and_queries():
    async def main():
        async with Lab(topo(64, 0, {"a": 32, "b": 16})) as lab:
            path = rundir.qmp_sock(lab.run_dir, "a")
            assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
            await lab.guest("a")
            c = await client(lab, "a")
            assert c.greeting is not None
            assert c.greeting.QMP.capabilities == []
            assert c.greeting.QMP.version["qemu"]["major"] >= 1
            assert await c.execute("query-name") == {"name": "a"}
            assert await c.execute("query-status") == {
                "running": True, "singlestep": False, "status": "running"}
            assert await c.execute("query-balloon") == {"actual": 32 * PAGE}
            assert await c.execute("query-memory-size-summary") == {
                "base-memory": 32 * PAGE, "plugged-memory": 0}
            assert await c.execute("query-version") == qmp.QEMU_VERSION
            names = {x["name"] for x in await c.execute("query-commands")}
            assert names == set(qmp.SCHEMA)
            # b has no guest yet: QEMU's prelaunch; each socket serves its own VM.
            cb = await client(lab, "b")
            assert await cb.execute("query-name") == {"name": "b"}
            assert (await cb.execute("query-status"))["status"] == "prelaunch"
            await c.disconnect()
            await cb.disconnect()
    run(main())


def test_balloon_sets_the_target_and_balloon_change_reports_actual():
    async def main():
        async with Lab(topo(64, 0, {"a": 32})) as lab:
            g = await lab.guest("a")
            d = await lab.driver("a")
            await g.touch(np.arange(32))
            c = await client(lab, "a")
            # QEMU's balloon: the guest should end with `value` bytes.
            assert await c.execute("balloon", {"value": 24 * PAGE}) == {}
            vm = lab.host.vms["a"]
            assert vm.balloon.target == 8 and vm.manual_target  # the policy leaves it
            await until(lambda: d.targets == [8], "config pushed to the driver")
            with c.listener() as listener:
                ack = await d.inflate(np.arange(24, 32))
                assert ack.ok
                await d.actual(8)
                async with asyncio.timeout(WAIT):
                    ev = await listener.get()
                    while ev["event"] != "BALLOON_CHANGE":
                        ev = await listener.get()
            assert ev["data"] == {"actual": 24 * PAGE}
            assert set(ev["timestamp"]) == {"seconds", "microseconds"}
            assert await c.execute("query-balloon") == {"actual": 24 * PAGE}
            # Above RAM: an empty balloon, as QEMU clamps.
            await c.execute("balloon", {"value": 1 << 40})
            assert vm.balloon.target == 0
            # Not a size: refused, nothing changes.
            for bad in (0, -PAGE):
                with pytest.raises(ExecuteError) as ei:
                    await c.execute("balloon", {"value": bad})
                assert ei.value.error_class == "GenericError"
            assert vm.balloon.target == 0
            await lab.quiesce()
            await c.disconnect()
    run(main())


def test_guest_stats_and_polling_interval_through_qom():
    async def main():
        async with Lab(topo(64, 0, {"a": 32})) as lab:
            await lab.guest("a")
            c = await client(lab, "a")
            path = qmp.BALLOON_PATH
            vm = lab.host.vms["a"]
            # No stats yet: QEMU's error.
            with pytest.raises(ExecuteError) as ei:
                await c.execute("qom-get", {"path": path, "property": "guest-stats"})
            assert ei.value.error_class == "GenericError"
            d = await lab.driver("a")
            d.stats = {0: 4096, 1: 8192, 2: 3, 3: 44, 4: 20 * PAGE, 5: 32 * PAGE,
                       6: 15 * PAGE, 7: 0, 10: 1}
            await until(lambda: vm.balloon.stats.get(4) == 20 * PAGE, "stats polled")
            got = await c.execute("qom-get", {"path": path, "property": "guest-stats"})
            st = got["stats"]
            assert st["stat-swap-in"] == 4096 and st["stat-swap-out"] == 8192
            assert st["stat-major-faults"] == 3 and st["stat-minor-faults"] == 44
            assert st["stat-free-memory"] == 20 * PAGE
            assert st["stat-total-memory"] == 32 * PAGE
            assert st["stat-available-memory"] == 15 * PAGE
            assert st["stat-disk-caches"] == 0 and st["stat-oom-kills"] == 1
            assert st["stat-htlb-pgalloc"] == qmp.STAT_UNSET  # never reported
            assert abs(got["last-update"] - vm.balloon.last_update) < 1
            # The polling interval, in seconds, read and set as QEMU's property.
            get = {"path": path, "property": "guest-stats-polling-interval"}
            assert await c.execute("qom-get", get) == 1  # the topology's 50 ms
            assert await c.execute("qom-set", {**get, "value": 3}) == {}
            assert vm.balloon.stats_interval == 3.0
            assert await c.execute("qom-get", get) == 3
            # 0 turns polling off, and it can be turned on again.
            assert await c.execute("qom-set", {**get, "value": 0}) == {}
            assert await c.execute("qom-get", get) == 0
            assert await c.execute("qom-set", {**get, "value": 3}) == {}
            for value, cls in ((-1, "GenericError"), (2**32, "GenericError"),
                               ("2", "GenericError")):
                with pytest.raises(ExecuteError) as ei:
                    await c.execute("qom-set", {**get, "value": value})
                assert ei.value.error_class == cls
            with pytest.raises(ExecuteError) as ei:
                await c.execute("qom-get", {"path": "/machine/peripheral/nope",
                                            "property": "guest-stats"})
            assert ei.value.error_class == "DeviceNotFound"
            with pytest.raises(ExecuteError) as ei:
                await c.execute("qom-get", {"path": path, "property": "nope"})
            assert ei.value.error_class == "GenericError"
            assert vm.balloon.stats_interval == 3.0
            await c.disconnect()
    run(main())


def test_errors_are_qemus_and_change_nothing():
    async def main():
        async with Lab(topo(64, 0, {"a": 32})) as lab:
            await lab.guest("a")
            vm = lab.host.vms["a"]
            raw = await Raw.open(lab, "a")
            # Before negotiation every other command is CommandNotFound, as QEMU answers.
            a = await raw.call({"execute": "balloon", "arguments": {"value": PAGE}, "id": 7})
            assert a["error"]["class"] == "CommandNotFound" and a["id"] == 7
            assert vm.balloon.target == 0
            a = await raw.call("{not json}")
            assert a["error"]["class"] == "GenericError"
            assert a["error"]["desc"].startswith("JSON parse error")
            assert "id" not in a
            assert (await raw.call("[1, 2]"))["error"]["desc"] == \
                "QMP input must be a JSON object"
            a = await raw.call({"execute": "query-name", "bogus": 1, "id": "x"})
            assert a["error"]["desc"] == "QMP input member 'bogus' is unexpected"
            assert a["id"] == "x"
            a = await raw.call({"arguments": {}})
            assert a["error"]["desc"] == "QMP input lacks member 'execute'"
            a = await raw.call({"execute": "qmp_capabilities", "arguments": {"enable": ["oob"]}})
            assert a["error"]["class"] == "GenericError"  # nothing offered, nothing enabled
            a = await raw.call("[" * 5000 + "]" * 5000)
            assert a["error"]["desc"].startswith("JSON parse error")
            assert (await raw.call({"execute": "qmp_capabilities", "id": 1})) == \
                {"return": {}, "id": 1}
            a = await raw.call({"execute": "qmp_capabilities"})
            assert a["error"]["class"] == "CommandNotFound"
            a = await raw.call({"execute": "no-such-command", "id": [1, {"a": 2}]})
            assert a["error"]["class"] == "CommandNotFound" and a["id"] == [1, {"a": 2}]
            for args, desc in (({}, "Parameter 'value' is missing"),
                               ({"value": "1"}, "Invalid parameter type for 'value', "
                                                "expected: integer"),
                               ({"value": True}, "Invalid parameter type for 'value', "
                                                 "expected: integer"),
                               ({"value": 2**70}, "Invalid parameter type for 'value', "
                                                  "expected: integer"),
                               ({"value": PAGE, "x": 1}, "Parameter 'x' is unexpected")):
                a = await raw.call({"execute": "balloon", "arguments": args})
                assert a["error"] == {"class": "GenericError", "desc": desc}
            assert vm.balloon.target == 0
            # The connection still works after every error.
            assert (await raw.call({"execute": "query-name"}))["return"] == {"name": "a"}
            # A request over the cap: an error, then the server hangs up.
            await raw.send(b'{"execute": "' + b"x" * (qmp.MAX_REQUEST + 10) + b'"}')
            a = await raw.recv()
            assert a is not None and a["error"]["desc"].startswith("JSON parse error")
            assert await raw.recv() is None
            raw.close()
            # The VM and the monitor are fine.
            c = await client(lab, "a")
            assert (await c.execute("query-status"))["status"] == "running"
            await c.disconnect()
    run(main())


def test_a_flood_is_answered_in_order_and_other_clients_are_unaffected():
    async def main():
        async with Lab(topo(64, 0, {"a": 32, "b": 16})) as lab:
            await lab.guest("a")
            raw = await Raw.open(lab, "a")
            await raw.call({"execute": "qmp_capabilities"})
            n = 3000
            burst = b"".join(json.dumps({"execute": "query-balloon", "id": i}).encode() + b"\n"
                             for i in range(n))
            raw.w.write(burst)  # all at once, nothing read meanwhile
            other = await client(lab, "b")
            assert await other.execute("query-name") == {"name": "b"}
            ids = []
            while len(ids) < n:
                a = await raw.recv()
                assert a is not None
                if "event" in a:
                    continue
                assert a["return"] == {"actual": 32 * PAGE}
                ids.append(a["id"])
            assert ids == list(range(n))
            raw.close()
            await other.disconnect()
    run(main())


def test_stop_cont_and_system_powerdown_with_events():
    async def main():
        async with Lab(topo(64, 0, {"a": 32, "b": 16})) as lab:
            g = await lab.guest("a")
            gb = await lab.guest("b")
            await g.touch(np.arange(16))
            await gb.touch(np.arange(4))
            c = await client(lab, "a")
            with c.listener() as listener:
                assert await c.execute("stop") == {}
                assert (await c.execute("query-status")) == {
                    "running": False, "singlestep": False, "status": "paused"}
                assert await c.execute("stop") == {}  # already paused: no second STOP
                assert await c.execute("cont") == {}
                assert (await c.execute("query-status"))["status"] == "running"
                assert await c.execute("system_powerdown") == {}
                seen = []
                async with asyncio.timeout(WAIT):
                    while "SHUTDOWN" not in seen:
                        seen.append((await listener.get())["event"])
            assert seen == ["STOP", "RESUME", "POWERDOWN", "SHUTDOWN"]
            vm = lab.host.vms["a"]
            await until(lambda: vm.state == "halted", "VM a halted")
            assert (await c.execute("query-status")) == {
                "running": False, "singlestep": False, "status": "shutdown"}
            with pytest.raises(ExecuteError):
                await c.execute("stop")  # nothing to pause
            # Its frames went back; the other VM is untouched.
            assert lab.host.ledger.frames_free == 64 - 4
            assert lab.host.vms["b"].state == "running"
            kinds = [(e["kind"], e["vm"]) for e in lab.host.events]
            assert ("vm_halted", "a") in kinds and ("vm_crashed", "a") not in kinds
            # A halted VM has left the policy's view: a policy that would move every
            # balloon decides for b alone.
            lab.host.set_policy("static", {"targets": {"a": 100, "b": 100}})
            assert {d.vm for d in lab.host.policy_step()} == {"b"}
            await lab.quiesce()
            await c.disconnect()
    run(main())


def test_a_client_that_never_reads_is_disconnected_and_harms_nobody(monkeypatch):
    monkeypatch.setattr(qmp, "WRITE_TIMEOUT", 0.5)
    monkeypatch.setattr(qmp, "EVENT_BACKLOG", 50)

    async def main():
        async with Lab(topo(64, 0, {"a": 32})) as lab:
            await lab.guest("a")
            d = await lab.driver("a")
            # One client floods requests and never reads: once its socket buffers are full
            # its answers wait WRITE_TIMEOUT, then it is cut off.
            flood = await Raw.open(lab, "a")
            await flood.call({"execute": "qmp_capabilities"})
            big = json.dumps({"execute": "query-commands"}).encode()
            flood.w.write(big * 20000)
            # Another negotiated client stops reading while events pour in: over the
            # backlog it is cut off too.
            mute = await Raw.open(lab, "a")
            await mute.call({"execute": "qmp_capabilities"})
            monitor = lab.host.qmp.monitors["a"]
            for i in range(200):
                monitor.server.broadcast("a", qmp.event("BALLOON_CHANGE", {"actual": i}))
            await until(lambda: not lab.host.qmp.clients["a"], "both clients dropped")
            with pytest.raises((ConnectionError, AssertionError, asyncio.IncompleteReadError)):
                while True:  # whatever was buffered, then the end
                    assert await flood.recv() is not None
            # The VM and a well-behaved client are unaffected.
            c = await client(lab, "a")
            assert await c.execute("balloon", {"value": 30 * PAGE}) == {}
            await until(lambda: d.targets == [2], "config pushed to the driver")
            assert (await c.execute("query-status"))["status"] == "running"
            await c.disconnect()
            flood.close()
            mute.close()
    run(main())


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(
    st.builds(lambda v: json.dumps(v).encode(),
              st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=8),
                           lambda kids: st.lists(kids, max_size=3)
                           | st.dictionaries(st.text(max_size=5), kids, max_size=3),
                           max_leaves=10)),
    st.binary(max_size=12)), max_size=6), st.integers(1, 7))
def test_splitter_is_chunking_invariant_and_answers_anything(parts, step):
    """Fed whole or in pieces, the splitter finds the same texts; every text gets an answer
    (a return or an error), never an exception."""
    stream = b" \n".join(parts) + b"\n"  # a scalar ends at whitespace
    whole = qmp.JsonSplitter().feed(stream)
    s = qmp.JsonSplitter()
    pieces: list[bytes] = []
    for i in range(0, len(stream), step):
        pieces += s.feed(stream[i:i + step])
    assert pieces == whole
    for text in whole:
        assert text and text[:1] not in b" \t\r\n" and text[-1:] not in b" \t\r\n"
    session = qmp.QmpSession(None)  # type: ignore[arg-type] # no command reaches a monitor
    for text in whole:
        answer = asyncio.run(session.handle(text))
        assert set(answer) <= {"return", "error", "id"} and ("error" in answer) != (
            "return" in answer)
    try:
        for p in parts:
            json.loads(p)
    except ValueError:
        return
    assert whole == parts  # a stream of JSON texts is split exactly as it was sent


def test_every_declared_command_has_a_handler_taking_exactly_its_arguments():
    import inspect

    for name, cmd in qmp.SCHEMA.items():
        if name == "qmp_capabilities":
            continue  # the session's own
        handler = getattr(qmp.VmMonitor, "cmd_" + name.replace("-", "_"))
        params = list(inspect.signature(handler).parameters)[1:]
        assert params == [a.name.replace("-", "_") for a in cmd.args], name
    handlers = {n[4:].replace("_", "-") for n in dir(qmp.VmMonitor) if n.startswith("cmd_")}
    assert handlers == {n.replace("_", "-") for n in qmp.SCHEMA} - {"qmp-capabilities"}
    assert all(e.isupper() for e in qmp.EVENTS)
