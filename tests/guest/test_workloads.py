"""Workload specs (validation naming the field) and the access-stream generators."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from guest.workloads import KINDS, SpecError, Workload, WorkloadSpec

PAGE = 4096


@pytest.mark.parametrize("spec, field", [
    ({"workload": "bogus", "size": PAGE}, "workload"),
    ({"workload": "uniform"}, "size"),
    ({"workload": "uniform", "size": -5}, "size"),
    ({"workload": "uniform", "size": "1GiB"}, "size"),
    ({"workload": "uniform", "size": PAGE, "write_ratio": 1.5}, "write_ratio"),
    ({"workload": "zipf", "size": PAGE, "skew": float("nan")}, "skew"),
    ({"workload": "uniform", "size": PAGE, "rate": 0}, "rate"),
    ({"workload": "hotcold", "size": PAGE, "hot_fraction": 0}, "hot_fraction"),
    ({"workload": "hotcold", "size": PAGE, "hot_prob": True}, "hot_prob"),
    ({"workload": "uniform", "size": PAGE, "duration": -1}, "duration"),
    ({"workload": "phases", "size": PAGE}, "phases"),
    ({"workload": "phases", "phases": [{"workload": "uniform", "size": PAGE}]},
     "phases[0].duration"),
    ({"workload": "phases", "phases": [{"workload": "idle", "size": 0, "duration": 1}]},
     "phases[0].size"),
])
def test_bad_spec_is_refused_naming_the_field(spec, field) -> None:
    with pytest.raises(SpecError) as e:
        WorkloadSpec.from_dict(spec, "config.tasks[0]")
    assert f"config.tasks[0].{field}" in str(e.value)


@settings(max_examples=60, deadline=None)
@given(kind=st.sampled_from([k for k in KINDS if k not in ("phases", "fileio")]),
       pages=st.integers(1, 3000), n=st.integers(0, 5000), seed=st.integers(0, 100),
       wr=st.floats(0, 1))
def test_streams_stay_inside_the_working_set(kind, pages, n, seed, wr) -> None:
    spec = WorkloadSpec.from_dict({"workload": kind, "size": pages * PAGE, "write_ratio": wr})
    wl = Workload(spec, seed)
    vpns, writes = wl.quantum(n, 0.0)
    assert vpns.dtype == np.int64 and writes.dtype == np.uint8
    assert len(vpns) == len(writes) <= n
    if len(vpns):
        assert vpns.min() >= 0 and vpns.max() < pages
    if wr == 0.0 and kind != "idle":
        assert not writes.any()


def test_same_seed_same_stream() -> None:
    spec = WorkloadSpec.from_dict({"workload": "zipf", "size": 100 * PAGE, "skew": 1.1})
    a = Workload(spec, 7).quantum(1000, 0)
    b = Workload(spec, 7).quantum(1000, 0)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])


def test_zipf_is_skewed_and_hotcold_hits_hot_set() -> None:
    z = Workload(WorkloadSpec.from_dict({"workload": "zipf", "size": 1000 * PAGE,
                                         "skew": 1.2}), 1)
    v, _ = z.quantum(20000, 0)
    counts = np.sort(np.bincount(v, minlength=1000))[::-1]
    assert counts[:10].sum() > 0.3 * 20000  # top 1% of pages take a large share
    h = Workload(WorkloadSpec.from_dict({"workload": "hotcold", "size": 1000 * PAGE,
                                         "hot_fraction": 0.1, "hot_prob": 0.9}), 1)
    v, _ = h.quantum(20000, 0)
    assert 0.85 < np.mean(v < 100) < 0.95


def test_scan_is_sequential_and_idle_touches_once_then_sleeps() -> None:
    s = Workload(WorkloadSpec.from_dict({"workload": "scan", "size": 10 * PAGE}), 1)
    assert s.quantum(7, 0)[0].tolist() == [0, 1, 2, 3, 4, 5, 6]
    assert s.quantum(5, 0)[0].tolist() == [7, 8, 9, 0, 1]
    idle = Workload(WorkloadSpec.from_dict({"workload": "idle", "size": 10 * PAGE}), 1)
    v, w = idle.quantum(6, 0)
    assert v.tolist() == list(range(6)) and w.all()
    assert not idle.sleeping(0)
    assert idle.quantum(6, 0)[0].tolist() == [6, 7, 8, 9]
    assert idle.sleeping(0)
    assert len(idle.quantum(6, 0)[0]) == 0


def test_phases_grow_and_shrink_and_repeat() -> None:
    spec = WorkloadSpec.from_dict({"workload": "phases", "phases": [
        {"workload": "uniform", "size": 10 * PAGE, "duration": 1.0},
        {"workload": "scan", "size": 50 * PAGE, "duration": 2.0},
        {"workload": "idle", "size": 5 * PAGE, "duration": 1.0},
    ]})
    assert spec.pages == 50
    wl = Workload(spec, 1)
    assert [wl.working_pages(t) for t in (0.5, 1.5, 3.5, 4.5)] == [10, 50, 5, 10]
    assert wl.quantum(100, 0.5)[0].max() < 10
    # each idle phase touches its own set again
    assert len(wl.quantum(100, 3.2)[0]) == 5 and wl.sleeping(3.3)
    assert len(wl.quantum(100, 7.5)[0]) == 5  # next cycle's idle phase


def test_a_phase_sets_its_own_rate_and_inherits_the_tasks_otherwise() -> None:
    spec = WorkloadSpec.from_dict({"workload": "phases", "rate": 500, "phases": [
        {"workload": "uniform", "size": PAGE, "duration": 1, "rate": 100},
        {"workload": "scan", "size": PAGE, "duration": 1}]})
    wl = Workload(spec, 1)
    assert wl.rate(0.5) == 100 and wl.rate(1.5) == 500 and wl.rate(2.5) == 100
    plain = Workload(WorkloadSpec.from_dict({"workload": "uniform", "size": PAGE}), 1)
    assert plain.rate(0.0) is None


def test_an_idle_task_with_hold_ends_that_long_after_its_touch() -> None:
    spec = WorkloadSpec.from_dict({"workload": "idle", "size": 10 * PAGE, "hold": 2})
    wl = Workload(spec, 1)
    wl.quantum(4, 0.0)
    assert not wl.finished(100.0)  # not all touched yet: a slow touch is waited for
    wl.quantum(100, 7.0)
    assert wl.touched_at == 7.0
    assert not wl.finished(8.9) and wl.finished(9.0)
    with pytest.raises(SpecError, match=r"task\.hold"):
        WorkloadSpec.from_dict({"workload": "zipf", "size": PAGE, "hold": 1})


def test_hold_goes_from_the_topology_to_the_guest_config() -> None:
    from hypervisor.topology import TopologyError, parse_topology

    base = ('[host]\nmemory = "64MiB"\n[[vm]]\nname = "a"\nmemory = "16MiB"\n'
            '[[vm.task]]\nsize = "1MiB"\n')
    topo = parse_topology(base + 'workload = "idle"\nhold = "1.5s"\n')
    task = topo.vms[0].tasks[0].to_json()
    assert task["hold"] == 1.5
    assert WorkloadSpec.from_dict(task).hold == 1.5
    with pytest.raises(TopologyError, match="hold"):
        parse_topology(base + 'workload = "zipf"\nhold = "1s"\n')
