"""Policy loop (collect → decide → act), share sampling, balloon violations, run dir."""

from __future__ import annotations

import asyncio
import os

import numpy as np
import pytest
from hv_peers import Lab, run, topo

from hypervisor import rundir

PAGE = 4096


def test_policy_step_applies_decisions_and_reports_reasons():
    async def main():
        async with Lab(topo(64, 0, {"a": 32, "b": 32})) as lab:
            d = await lab.driver("a")
            lab.host.set_policy("static", {"targets": {"a": 12, "b": 3}})
            applied = lab.host.policy_step()
            assert sorted((x.vm, x.target_pages) for x in applied) == [("a", 12), ("b", 3)]
            assert lab.host.vms["a"].balloon.target == 12
            pol = [e for e in lab.host.events if e["kind"] == "policy" and e["vm"]]
            assert {e["vm"] for e in pol} == {"a", "b"} and all(e["reason"] for e in pol)
            for _ in range(2500):  # bounds a hang only
                if d.targets:
                    break
                await asyncio.sleep(0.02)
            assert d.targets == [12]
            assert lab.host.policy_step() == []  # static decides once
    run(main())


def test_vm_sample_reports_memory_and_share_activity():
    async def main():
        async with Lab(topo(256, 16, {"a": 200})) as lab:
            g = await lab.guest("a")
            d = await lab.driver("a")
            await g.touch(np.arange(150))
            d.stats = {4: 40 * PAGE, 6: 60 * PAGE, 0: 7, 1: 9, 11: 2, 2: 5}
            vm = lab.host.vms["a"]
            for _ in range(2500):  # bounds a hang only
                if vm.balloon.stats.get(4):
                    break
                await asyncio.sleep(0.02)
            await d.actual(3, stall=True)
            await asyncio.sleep(0.05)
            lab.host.active_sample_period = 0.0  # every call closes a sampling period
            s1 = lab.host.vm_sample(vm)
            assert s1.backed_pages == 150 and s1.free_pages == 40
            assert s1.available_pages == 60 and s1.swap_in == 7 and s1.swap_out == 9
            assert s1.alloc_stalls == 2 and s1.major_faults == 5
            assert s1.balloon_pages == 3 and s1.out_of_puff
            assert s1.active_sampled == 0  # first sample only arms the accessed bits
            sampled = vm.sample_pages.copy()
            assert sampled.size == 100 and np.all(vm.mem.accessed[sampled] == 0)
            assert np.all(vm.led.p2m[sampled] >= 0)  # only backed pages are sampled
            hot = sampled[:37]
            await g.touch(hot, stamp=False)  # the guest touches 37 of them again
            s2 = lab.host.vm_sample(vm)
            assert s2.active_sampled == 100 and s2.active_touched == 37
            assert not s2.out_of_puff  # the stall was reported once
    run(main())


def test_touching_a_ballooned_page_is_backed_and_reported():
    async def main():
        async with Lab(topo(64, 0, {"a": 32})) as lab:
            g = await lab.guest("a")
            d = await lab.driver("a")
            await g.touch(np.arange(8))
            assert (await d.inflate([2, 3])).ok
            await g.touch([3])  # a guest bug: the host backs it anyway and says so
            vm = lab.host.vms["a"]
            assert vm.balloon_violations == 1 and g.ept[3] == 1
            ev = [e for e in lab.host.events if e["kind"] == "balloon_violation"]
            assert ev and ev[0]["first"] == 3
            async with lab.host.mm_lock:
                lab.host.check_conservation()
    run(main())


def test_stale_run_dir_is_cleaned_and_found(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    d = rundir.default_run_dir("lab")
    assert d == tmp_path / "balloonlab" / "lab"
    d.parent.mkdir(mode=0o700)  # the base must be private to this user
    d.mkdir()
    (d / "hypervisor.pid").write_text("999999999\n")  # no such process
    (d / "control.sock").write_text("stale")
    with pytest.raises(rundir.NoHostFound):
        rundir.find_host("lab")
    rundir.prepare_run_dir(d)
    assert not (d / "control.sock").exists()
    assert (d / "hypervisor.pid").read_text().strip() == str(os.getpid())
    assert d.stat().st_mode & 0o777 == 0o700
    with pytest.raises(rundir.NoHostFound, match="no running host"):
        rundir.find_host()
    with pytest.raises(ValueError, match="invalid host name"):
        rundir.default_run_dir("../x")


def test_find_host_finds_the_only_live_host(monkeypatch):
    async def main():
        async with Lab(topo(16, 0, {"a": 8})) as lab:
            monkeypatch.setenv("XDG_RUNTIME_DIR", str(lab.base))
            # Lab's run dir is <base>/run; point the default layout at it.
            link = lab.base / "balloonlab"
            link.mkdir(mode=0o700)  # the base must be private to this user
            os.symlink(lab.run_dir, link / "t")
            found = await asyncio.to_thread(rundir.find_host)
            assert found.resolve() == lab.run_dir.resolve()
            assert (await asyncio.to_thread(rundir.find_host, "t")).name == "t"
    run(main())


def test_share_activity_is_sampled_over_a_period_not_per_round():
    """Between the ends of two sampling periods every policy round sees the last full
    sample; pages touched mid-period change nothing until the period closes."""
    async def main():
        async with Lab(topo(256, 16, {"a": 200})) as lab:
            g = await lab.guest("a")
            await g.touch(np.arange(150))
            vm = lab.host.vms["a"]
            lab.host.active_sample_period = 3600.0
            lab.host.vm_sample(vm)  # closes the (empty) first period and arms a sample
            armed = vm.sample_pages.copy()
            assert armed.size == 100
            await g.touch(armed, stamp=False)  # every sampled page touched, mid-period
            s = lab.host.vm_sample(vm)
            assert (s.active_sampled, s.active_touched) == (0, 0)  # still the last period
            assert np.array_equal(vm.sample_pages, armed)  # not re-armed
            lab.host.active_sample_period = 0.0
            s = lab.host.vm_sample(vm)
            assert (s.active_sampled, s.active_touched) == (100, 100)
    run(main())
