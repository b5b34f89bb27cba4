"""The cost model and the guest kernel's own memory, in one process.

Modelled time must be a pure function of the memory events: the same seed and the same
events (guest faults, EPT exits, host swap, guest swap) give the same clocks, whatever the
machine's load.  The "host" is test_mm's MiniHost over a real memfd.
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from guest.cost import DEFAULT_COST, CostModel
from guest.mm import STRUCT_PAGE, MemoryManager, SwapDevice, kernel_reserve
from guest.workloads import Workload, WorkloadSpec
from hypervisor.topology import TopologyError, parse_topology
from protocol.cost import DEVICE_PRESETS, CostError, normalize_cost
from protocol.features import TASK_STATS_BASE, TASK_STATS_STRIDE, StatTag
from tests.guest.test_mm import PAGE, MiniHost

#: Only memory accesses cost anything: the clock must be accesses x 100 ns exactly.
ACCESS_ONLY = {"memory_access": "100ns", "minor_fault": 0, "page_zero": 0, "ept_exit": 0,
               "ept_page": 0}


def _mm(tmp_path, pages: int, swap_pages: int, cost: CostModel | None = None,
        name: str = "vm", **kw) -> tuple[MiniHost, MemoryManager]:
    host = MiniHost(pages)
    swap = SwapDevice(str(tmp_path / f"{name}.guest-swap"), swap_pages * PAGE)
    mm = MemoryManager(host.ram, host.ept, host.acc, swap, ensure_present=host.ensure_present,
                       cost=cost, **kw)
    return host, mm


async def _pressure_run(mm: MemoryManager, host: MiniHost, seed: int, quanta: int = 30):
    """Two tasks larger than RAM together, guest swap, and host swap behind the guest's
    back (pages revoked between quanta by a seeded generator)."""
    rng = np.random.default_rng(seed)
    specs = [WorkloadSpec(workload="uniform", size=300 * PAGE, write_ratio=0.5),
             WorkloadSpec(workload="zipf", size=400 * PAGE, write_ratio=0.3)]
    tasks = [(mm.add_task(i, s.pages), Workload(s, seed * 1000003 + i))
             for i, s in enumerate(specs)]
    for _ in range(quanta):
        for tm, wl in tasks:
            vpns, writes = wl.quantum(1500, 0.0)
            res = await mm.run_quantum(tm, vpns, writes)
            assert not res.killed
        await mm.kswapd()
        host.host_take(rng.integers(0, host.pages, 40))
    mm.check_invariants()
    return [tm for tm, _ in tasks]


def _clocks(tmp_path, name: str, cost: CostModel | None = None, seed: int = 7):
    host, mm = _mm(tmp_path, pages=512, swap_pages=2048, cost=cost, name=name)
    tasks = asyncio.run(_pressure_run(mm, host, seed))
    return mm, [(t.accesses, t.modelled_ns) for t in tasks]


def test_same_seed_same_events_same_modelled_time(tmp_path) -> None:
    mm1, a = _clocks(tmp_path, "one")
    mm2, b = _clocks(tmp_path, "two")
    assert a == b
    assert mm1.stats.modelled_ns == mm2.stats.modelled_ns == sum(ns for _, ns in a)
    # every kind of event happened, so every charge was exercised
    s = mm1.stats
    assert s.minor_faults and s.major_faults and s.swap_out and s.ept_exits
    assert all(ns > 0 for _, ns in a)
    # the memory-access part alone is far from all of it under this much paging
    assert sum(ns for _, ns in a) > 2 * DEFAULT_COST.accesses(sum(n for n, _ in a))
    # a different seed makes different events, hence a different clock
    _, c = _clocks(tmp_path, "three", seed=8)
    assert c != a


def test_memory_accesses_alone_are_count_times_cost(tmp_path) -> None:
    """No swapping (the task fits), every other cost zero: accesses x 100 ns exactly."""
    _, mm = _mm(tmp_path, pages=512, swap_pages=0, cost=CostModel.from_table(ACCESS_ONLY))
    spec = WorkloadSpec(workload="uniform", size=200 * PAGE, write_ratio=0.5)
    t = mm.add_task(0, spec.pages)
    wl = Workload(spec, 5)
    for _ in range(5):
        vpns, writes = wl.quantum(3000, 0.0)
        asyncio.run(mm.run_quantum(t, vpns, writes))
    assert t.accesses == 15000 and mm.stats.ept_exits > 0 and mm.stats.minor_faults > 0
    assert t.modelled_ns == 100 * 15000


def test_slower_host_swap_device_means_more_modelled_time(tmp_path) -> None:
    """Same events, host swap on an HDD instead of NVMe: only the EPT exits that read back a
    host-swapped page get dearer, and by exactly the device difference."""
    _, fast = _clocks(tmp_path, "nvme", CostModel.from_table({"host_swap_device": "nvme"}))
    _, slow = _clocks(tmp_path, "hdd", CostModel.from_table({"host_swap_device": "hdd"}))
    assert [n for n, _ in fast] == [n for n, _ in slow]
    per_page = DEVICE_PRESETS["hdd"].io_ns(1) - DEVICE_PRESETS["nvme"].io_ns(1)
    for (_, f), (_, s) in zip(fast, slow, strict=True):
        assert s > f and (s - f) % per_page == 0


def test_each_event_charges_its_cost(tmp_path) -> None:
    cost = CostModel.from_table({"memory_access": "100ns", "minor_fault": "1us",
                                 "page_zero": "2us", "ept_exit": "3us", "ept_page": "4us",
                                 "host_swap_device": {"latency": "10us", "bandwidth": "4096MB/s"}})
    host, mm = _mm(tmp_path, pages=256, swap_pages=64, cost=cost)
    t = mm.add_task(0, 4)

    async def go(vpns):
        v = np.asarray(vpns, np.int64)
        return await mm.run_quantum(t, v, np.ones(v.size, np.bool_))

    # first touch of one page: a minor fault (1 + 2 us), an EPT exit backing a fresh page
    # (3 + 4 + 2 us), one access (0.1 us)
    r = asyncio.run(go([0]))
    assert r.modelled_ns == t.modelled_ns == 1000 + 2000 + 3000 + 4000 + 2000 + 100
    # a present page: one access
    before = t.modelled_ns
    asyncio.run(go([0]))
    assert t.modelled_ns - before == 100
    # the host swaps the page out behind the guest's back: the next access is an EPT exit
    # that reads it back from host swap (10 us + 4096 B at 4096 MB/s = 1 us)
    host.host_take(np.array([t.pt[0]]))
    before = t.modelled_ns
    asyncio.run(go([0]))
    assert t.modelled_ns - before == 3000 + 4000 + 11_000 + 100
    assert mm.stats.modelled_ns == t.modelled_ns


def test_guest_swap_io_is_charged_to_the_faulting_task(tmp_path) -> None:
    dev = {"latency": "50us", "bandwidth": "4096MB/s"}  # 1 us per page
    cost = CostModel.from_table({**ACCESS_ONLY, "memory_access": 0, "guest_swap_device": dev})
    assert cost.guest_swap_read(1) == 51_000
    assert cost.guest_swap_write(32) == 50_000 + 32_000
    assert cost.guest_swap_write(0) == 0
    _, mm = _mm(tmp_path, pages=256, swap_pages=1024, cost=cost)
    spec = WorkloadSpec(workload="uniform", size=600 * PAGE, write_ratio=1.0)
    t = mm.add_task(0, spec.pages)
    wl = Workload(spec, 3)
    for _ in range(10):
        vpns, writes = wl.quantum(2000, 0.0)
        asyncio.run(mm.run_quantum(t, vpns, writes))
    s = mm.stats
    assert s.major_faults > 0 and s.direct_reclaim > 0
    # every major fault paid one read; direct reclaim paid its writes (kswapd: nobody)
    assert t.modelled_ns >= s.major_faults * 51_000 + s.direct_reclaim * 1000
    assert t.modelled_ns == s.modelled_ns


def test_kernel_reserve_scales_with_configured_ram() -> None:
    # 1 GiB: an 8 MiB image and 1/64 of RAM in page descriptors
    image, memmap = kernel_reserve(262144)
    assert image == 2048 and memmap == 262144 * STRUCT_PAGE // PAGE == 4096
    # toy VMs keep booting: the default image is at most 1/16 of RAM
    assert kernel_reserve(256) == (16, 4)
    assert kernel_reserve(8192, 4 << 20) == (1024, 128)
    with pytest.raises(ValueError, match="does not fit"):
        kernel_reserve(256, 1 << 20)


def test_large_vm_ballooned_down_has_less_room_than_a_small_vm(tmp_path) -> None:
    """ESX's ballooning overhead: page descriptors cover the configured RAM, so 128 MiB
    ballooned down to 64 MiB leaves less for tasks than a 64 MiB VM."""
    image = 4 << 20
    _, small = _mm(tmp_path, pages=16384, swap_pages=0, kernel_image=image, name="small")
    _, big = _mm(tmp_path, pages=32768, swap_pages=0, kernel_image=image, name="big")
    assert big.kernel_memmap_pages == 2 * small.kernel_memmap_pages == 512
    runs = big.balloon_alloc(16384, 10)
    assert int(runs[:, 1].sum()) == 16384
    assert big.npages - big.balloon_pages == small.npages
    assert big.buddy.free_pages == small.buddy.free_pages - 256
    for mm in (small, big):
        st = mm.stats_map()
        assert st[StatTag.KERNEL_PAGES] == mm.kernel_pages == 1024 + mm.kernel_memmap_pages
        assert mm.buddy.count_state(1) == mm.kernel_pages  # PG_KERNEL


def test_kernel_memory_is_backed_at_boot(tmp_path) -> None:
    host, mm = _mm(tmp_path, pages=4096, swap_pages=0)
    assert host.faulted == 0
    asyncio.run(mm.touch_kernel_memory())
    assert host.faulted == mm.kernel_pages > 0
    g = np.flatnonzero(mm.buddy.state == 1)
    assert np.all(host.ept[g] == 1) and np.all(host.ram[g * 512] != 0)
    assert np.all(host.ept[mm.buddy.state != 1] == 0)


def test_per_task_stats_tags(tmp_path) -> None:
    _, mm = _mm(tmp_path, pages=512, swap_pages=0)
    tasks = [mm.add_task(i, 8) for i in range(3)]
    v = np.arange(8, dtype=np.int64)
    asyncio.run(mm.run_quantum(tasks[1], v, np.ones(8, np.bool_)))
    st = mm.stats_map()
    one = TASK_STATS_BASE + TASK_STATS_STRIDE
    assert st[one] == 8 and st[one + 1] == tasks[1].modelled_ns > 0
    assert st[TASK_STATS_BASE] == 0 and st[TASK_STATS_BASE + 2 * TASK_STATS_STRIDE + 1] == 0
    assert st[StatTag.MODELLED_NS] == tasks[1].modelled_ns
    assert all(0 <= tag <= 0xFFFF for tag in st)


@pytest.mark.parametrize(("table", "key", "words"), [
    ({"memory_acces": "1ns"}, "cost.memory_acces", "unknown key"),
    ({"minor_fault": "-1us"}, "cost.minor_fault", "negative"),
    ({"ept_exit": -5}, "cost.ept_exit", "negative"),
    ({"page_zero": "2h"}, "cost.page_zero", "unknown unit"),
    ({"ept_page": "90s"}, "cost.ept_page", "absurd"),
    ({"guest_swap_device": "floppy"}, "cost.guest_swap_device", "no device preset"),
    ({"host_swap_device": {"latency": "1us"}}, "cost.host_swap_device.bandwidth", "missing"),
    ({"disk_device": {"latency": "1us", "bandwidth": "1PB/s"}}, "cost.disk_device.bandwidth",
     "bandwidth"),
    ({"disk_device": {"latency": "1us", "bandwidth": 10**15}}, "cost.disk_device.bandwidth",
     "absurd"),
    ({"memory_access": True}, "cost.memory_access", "expected"),
])
def test_bad_cost_entries_name_their_key(table, key, words) -> None:
    with pytest.raises(CostError) as e:
        normalize_cost(table)
    assert e.value.key == key and words in str(e.value)
    with pytest.raises(CostError):
        CostModel.from_table(table)


def test_normal_form_is_accepted_again_and_defaults_fill_the_rest() -> None:
    raw = {"memory_access": "0.1us", "ept_exit": "2.5µs",
           "guest_swap_device": {"latency": "20us", "bandwidth": "2.5GB/s"},
           "host_swap_device": "hdd"}
    norm = normalize_cost(raw)
    assert norm == {"memory_access": 100, "ept_exit": 2500,
                    "guest_swap_device": {"latency": 20_000, "bandwidth": 2_500_000_000},
                    "host_swap_device": "hdd"}
    assert normalize_cost(norm) == norm
    m = CostModel.from_table(norm)
    assert m.host_swap == DEVICE_PRESETS["hdd"] and m.disk == DEVICE_PRESETS["ssd"]
    assert m.minor_fault == DEFAULT_COST.minor_fault


TOPO = """
[host]
memory = "256MiB"
[[vm]]
name = "a"
memory = "64MiB"
{vm_extra}
[cost]
{cost}
"""


def test_topology_cost_table_reaches_the_guest_and_round_trips() -> None:
    t = parse_topology(TOPO.format(vm_extra='kernel_image = "4MiB"',
                                   cost='memory_access = "120ns"\nhost_swap_device = "hdd"\n'
                                        'guest_swap_device = {latency = "20us", '
                                        'bandwidth = "2GB/s"}'), "lab.toml")
    cfg = t.vms[0].guest_config(seed=1)
    assert cfg["kernel_image"] == 4 << 20
    assert cfg["cost"] == {"memory_access": 120, "host_swap_device": "hdd",
                           "guest_swap_device": {"latency": 20_000, "bandwidth": 2 * 10**9}}
    again = parse_topology(t.to_toml(), "again.toml")
    assert again.cost == t.cost and again.vms == t.vms
    plain = parse_topology(TOPO.format(vm_extra="", cost=""), "lab.toml")
    assert "cost" not in plain.vms[0].guest_config(seed=1)


@pytest.mark.parametrize(("vm_extra", "cost", "line"), [
    ("", 'memory_acess = "1ns"', "lab.toml: cost.memory_acess: unknown key"),
    ("", 'host_swap_device = "tape"', "lab.toml: cost.host_swap_device: no device preset"),
    ("", 'ept_exit = "-1us"', "lab.toml: cost.ept_exit: '-1us' is negative"),
    ('kernel_image = "63MiB"', "", "lab.toml: vm[0].kernel_image: 63MiB plus the memmap"),
])
def test_topology_cost_errors_name_file_and_key(vm_extra, cost, line) -> None:
    with pytest.raises(TopologyError) as e:
        parse_topology(TOPO.format(vm_extra=vm_extra, cost=cost), "lab.toml")
    assert str(e.value).startswith(line), str(e.value)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(("cfg", "words"), [
    ('{"cost": {"ept_exit": "-1us"}}', "config.cost.ept_exit: '-1us' is negative"),
    ('{"cost": {"guest_swap_device": "tape"}}', "config.cost.guest_swap_device: no device"),
    ('{"cost": "fast"}', "config.cost: expected a table"),
    ('{"memory": 1048576, "kernel_image": 1048576}', "config.kernel_image: the kernel's own"),
    ('{"kernel_image": -5}', "config.kernel_image: expected a positive integer"),
])
def test_guest_config_checks_cost_and_kernel_image_again(cfg, words) -> None:
    from guest.kernel import ConfigError, parse_config

    with pytest.raises(ConfigError) as e:
        parse_config(cfg)
    assert str(e.value).startswith(words), str(e.value)
    ok = parse_config('{"memory": 33554432, "kernel_image": 1048576, '
                      '"cost": {"host_swap_device": "hdd"}}')
    assert ok["_cost"].host_swap == DEVICE_PRESETS["hdd"]
