"""A manual balloon target holds against the policy; one event per target change;
``dommemstat``'s ``actual`` is the guest's current memory (virsh's and QMP's meaning)."""

from __future__ import annotations

import asyncio
from typing import Any

from hv_peers import Lab, run, topo

from balloonlab.client import ControlClient, ControlError

PAGE = 4096


def _call(lab: Lab, method: str, **params: Any) -> Any:
    with ControlClient(lab.run_dir) as c:
        return c.call(method, **params)


async def _wait(pred: Any, what: str) -> None:
    for _ in range(500):  # bounds a hang only
        if pred():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def test_manual_target_holds_until_released_or_policy_set_again():
    async def main():
        async with Lab(topo(64, 0, {"a": 32, "b": 32})) as lab:
            await lab.driver("a")
            r = await asyncio.to_thread(_call, lab, "set_balloon", vm="a", pages=4)
            assert r == {"target_pages": 4, "manual_target": True}
            lab.host.set_policy("static", {"targets": {"a": 12, "b": 3}})
            applied = lab.host.policy_step()
            # The policy moved b only: a's manual target holds.
            assert [(x.vm, x.target_pages) for x in applied] == [("b", 3)]
            assert lab.host.vms["a"].balloon.target == 4
            st = await asyncio.to_thread(_call, lab, "dommemstat", vm="a")
            assert st["manual_target"] is True

            r = await asyncio.to_thread(_call, lab, "set_balloon", vm="a", release=True)
            assert r == {"target_pages": 4, "manual_target": False}
            lab.host.set_policy("static", {"targets": {"a": 12, "b": 3}})
            assert [(x.vm, x.target_pages) for x in lab.host.policy_step()] == [("a", 12)]

            # setmem holds too; setting a policy over the control channel releases it.
            await asyncio.to_thread(_call, lab, "setmem", vm="a", bytes=24 * PAGE)
            assert lab.host.vms["a"].manual_target
            r = await asyncio.to_thread(_call, lab, "set_policy", name="static",
                                        params={"targets": {"a": 2}})
            assert r == {"policy": "static", "released": ["a"]}
            assert not lab.host.vms["a"].manual_target
            assert ("a", 2) in [(x.vm, x.target_pages) for x in lab.host.policy_step()]
    run(main())


def test_policy_decision_is_one_event():
    async def main():
        async with Lab(topo(64, 0, {"a": 32})) as lab:
            lab.host.set_policy("static", {"targets": {"a": 7}})
            lab.host.policy_step()
            mine = [e for e in lab.host.events if e.get("vm") == "a"
                    and e["kind"] in ("policy", "balloon_target")]
            assert len(mine) == 1, mine
            ev = mine[0]
            assert ev["kind"] == "policy" and ev["policy"] == "static"
            assert ev["target_pages"] == 7 and ev["old"] == 0 and ev["reason"]
            await asyncio.to_thread(_call, lab, "set_balloon", vm="a", pages=9)
            manual = [e for e in lab.host.events if e["kind"] == "balloon_target"]
            assert [(e["target_pages"], e["reason"]) for e in manual] == [(9, "set_balloon")]
    run(main())


def test_dommemstat_actual_is_current_memory_in_bytes():
    async def main():
        async with Lab(topo(64, 0, {"a": 32})) as lab:
            d = await lab.driver("a")
            st = await asyncio.to_thread(_call, lab, "dommemstat", vm="a")
            assert st["actual"] == 32 * PAGE  # nothing ballooned: the whole VM
            await d.actual(8)
            await _wait(lambda: lab.host.vms["a"].balloon.actual == 8, "the driver's actual")
            st = await asyncio.to_thread(_call, lab, "dommemstat", vm="a")
            assert st["actual"] == (32 - 8) * PAGE
    run(main())


def test_set_balloon_release_must_be_boolean():
    async def main():
        async with Lab(topo(64, 0, {"a": 32})) as lab:
            try:
                await asyncio.to_thread(_call, lab, "set_balloon", vm="a", release="yes")
            except ControlError as e:
                assert "release must be true or false" in e.message
            else:
                raise AssertionError("release='yes' was accepted")
            assert not lab.host.vms["a"].manual_target
    run(main())
