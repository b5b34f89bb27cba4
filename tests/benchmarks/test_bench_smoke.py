"""Smoke tests of the benchmarks at their smallest sizes: they run, their formulations agree,
and they write the JSON schema other tools read. No timing assertions."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from balloonlab.bench import bench
from benchmarks import kernels as K
from benchmarks import references as R

RECLAIM_KEYS = ("e2e_gib_s", "virtio_gib_s", "limit_punch_gib_s", "per_page_punch_gib_s",
                "refault_gib_s", "limit_first_touch_gib_s", "ratio_e2e_to_limit",
                "limit_mapped_punch_gib_s", "ratio_e2e_to_mapped_limit",
                "ratio_ranges_to_virtio")


@pytest.mark.parametrize("fn", [R.punch_limit, R.mapped_punch_limit, R.per_page_punch,
                                R.first_touch, R.fallocate_populate])
def test_reference_moves_memory_and_reports_rates(fn):
    r = fn(1 << 20, 2)
    d = r.as_dict()
    assert d["pages"] == 256
    assert d["seconds"]["repeats"] == 2
    assert d["seconds"]["min"] <= d["seconds"]["median"] <= d["seconds"]["max"]
    assert d["gib_s"] > 0 and d["pages_s"] > 0


def test_reference_rejects_bad_size():
    with pytest.raises(ValueError, match="multiple of 4096"):
        R.punch_limit(5000, 1)
    with pytest.raises(ValueError, match="repeats"):
        R.first_touch(4096, 0)


def test_read_bandwidth_reference():
    r = R.read_bandwidth(1 << 20, 3)
    assert r.nbytes == 1 << 20 and r.gib_s > 0


def test_resident_bytes_tracks_population():
    fd = os.memfd_create("t")
    try:
        os.ftruncate(fd, 1 << 20)
        assert R.resident_bytes(fd) == 0
        R.fallocate(fd, 0, 0, 1 << 20)
        assert R.resident_bytes(fd) >= 1 << 20
        R.fallocate(fd, R.PUNCH, 0, 1 << 20)
        assert R.resident_bytes(fd) == 0
    finally:
        os.close(fd)


@pytest.mark.parametrize("name", K.case_names())
def test_every_kernel_agrees_with_numpy_and_naive(name):
    case = next(c for c in K.CASES if c.name == name)
    for seed in (1, 2):
        K.cross_check(case, 10, seed)


@settings(max_examples=30, deadline=None)
@given(st.lists(st.booleans(), max_size=200), st.integers(0, 300), st.integers(0, 250))
def test_numpy_clock_scan_matches_kernel_in_both_sweeps(acc, hand, want):
    # `want` up to more than the frames: exercises the second sweep and the empty result.
    n = len(acc)
    a1 = np.array(acc, dtype=np.uint8)
    a2 = a1.copy()
    s1 = np.ones(n, np.uint8)
    s2 = s1.copy()
    vm = np.zeros(n, np.int32)
    gp = np.arange(n, dtype=np.int64)[::-1].copy()
    from hypervisor import kernels as HK
    v1, h1 = HK.clock_scan(s1, vm, gp, HK.make_accessed_list([a1]), hand, want)
    v2, h2 = K.np_hv_clock_scan(s2, vm, gp, [a2], hand, want)
    assert v1.tolist() == np.asarray(v2).tolist()
    assert np.array_equal(a1, a2) and np.array_equal(s1, s2)
    if n:
        assert h1 == h2


@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(0, 1), max_size=300))
def test_numpy_run_formulations_match(bits):
    s = np.array(bits, dtype=np.uint8)
    from protocol import pfn as P
    assert K.np_runs_of_set(s).tolist() == P.runs_of_set(s).tolist()
    runs = P.runs_of_set(s)
    assert K.np_runs_to_pfns(runs).tolist() == P.runs_to_pfns(runs).tolist()
    assert np.array_equal(K.np_runs_mask(s.shape[0], runs), s != 0)


def test_kernels_cli_writes_schema(tmp_path: Path):
    res = CliRunner().invoke(bench, ["kernels", "--min-log2", "10", "--max-log2", "10",
                                     "--repeat", "1", "--naive-max-log2", "10",
                                     "--only", "pfn.count_set", "--only", "guest.free_runs",
                                     "--out", str(tmp_path), "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)  # progress goes to stderr: stdout is the JSON alone
    assert "[1/2] pfn.count_set" in res.stderr
    assert out["full"] is False
    assert out["benchmark"] == "kernels" and out["read_gib_s"] > 0
    assert [c["name"] for c in out["cases"]] == ["pfn.count_set", "guest.free_runs"]
    row = out["cases"][0]["sizes"][0]
    for key in ("kernel_ns_per_elem", "numpy_ns_per_elem", "ratio_kernel_vs_numpy",
                "ratio_kernel_vs_naive", "ratio_bandwidth_vs_read"):
        assert key in row
    assert out["machine"]["nproc"] >= 1
    assert json.loads((tmp_path / "kernels.json").read_text())["summary"]
    assert (tmp_path / "kernels.png").stat().st_size > 0
    assert "pfn.count_set" in (tmp_path / "kernels.md").read_text()


def test_kernels_cli_rejects_unknown_kernel():
    res = CliRunner().invoke(bench, ["kernels", "--only", "nope", "--max-log2", "10",
                                     "--min-log2", "10"])
    assert res.exit_code != 0 and "unknown kernel" in res.output


@pytest.mark.slow
def test_reclaim_cli_writes_schema(tmp_path: Path):
    res = CliRunner().invoke(bench, ["reclaim", "--vm-size", "32MiB", "--repeat", "1",
                                     "--out", str(tmp_path), "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert "references" in res.stderr and "fragmented: trial 1/1" in res.stderr
    ranges = out["scenarios"]["ranges"]["trials"][0]
    # On a loaded machine the refault task (started at a fixed time) can run whole during
    # the inflate and deflate: the trial then flags it and leaves the refault unmeasured.
    unmeasured = ranges["refault_s"] is None
    assert not unmeasured or ranges["refault_overlapped_phases"], ranges
    assert unmeasured == (ranges["refault_unmeasured"] is not None)
    for key in RECLAIM_KEYS:
        if unmeasured and key == "refault_gib_s":
            assert out[key] is None
            continue
        assert key in out and out[key] is not None and out[key] > 0, key
    for sc in ("ranges", "virtio", "fragmented"):
        t = out["scenarios"][sc]["trials"][0]
        assert t["target_pages"] > 0 and t["corrupted_reads"] == 0
        assert t["refault_s"] is None or t["refault_pages"] > 0, t
        assert (t["refault_s"] is None) == isinstance(t["refault_unmeasured"], str), t
    assert json.loads((tmp_path / "reclaim.json").read_text())["benchmark"] == "reclaim"


def test_reclaim_rejects_bad_size():
    res = CliRunner().invoke(bench, ["reclaim", "--vm-size", "1MiB"])
    assert res.exit_code != 0 and "at least 16 MiB" in res.output


def test_progress_without_a_terminal_is_one_line_per_stage():
    import io

    from balloonlab.bench import _progress

    out = io.StringIO()
    with _progress("kernels", out) as say:
        say("[1/3] a: 2^16")
        say("[1/3] a: 2^16")  # repeated: printed once
        say("[2/3] a: 2^18")
    lines = out.getvalue().splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("bench kernels ") and lines[0].endswith("[1/3] a: 2^16")
    assert lines[1].endswith("[2/3] a: 2^18")


def test_quick_default_and_full_sweep_options():
    # The default is the quick sweep; --full the long one; an option given wins over both.
    def sweep(*args: str) -> dict:
        res = CliRunner().invoke(bench, ["kernels", "--only", "pfn.count_set", *args, "--json"])
        assert res.exit_code == 0, res.output
        return json.loads(res.stdout)

    quick = sweep()
    assert (quick["sizes_log2"], quick["naive_max_log2"], quick["full"]) == ([16, 18, 20], 14,
                                                                            False)
    full = sweep("--full", "--max-log2", "16")
    assert (full["sizes_log2"], full["naive_max_log2"], full["full"]) == ([16], 16, True)


def test_guest_cache_hit_bench_runs_both_loops_to_the_end():
    from benchmarks.guest import bench_cache_hits

    out = bench_cache_hits(64, 2000, reps=1)
    assert out["cache_hit_accesses_per_s"] > 0 and out["cache_hit_vs_anon_time_ratio"] > 0


@pytest.mark.parametrize("regime", ["spare", "guest_swap", "host_swap", "ballooned"])
def test_fidelity_topologies_are_valid_and_give_the_guest_the_same_memory(regime, tmp_path):
    from benchmarks import fidelity as F
    from hypervisor.topology import parse_topology

    p = F.QUICK
    topo = parse_topology(F.topology_text(regime, p, "fid", tmp_path / "run"), "fid.toml")
    vm = topo.vms[0]
    mib = 1 << 20
    guest = vm.pages * 4096 - vm.initial_balloon
    if regime == "spare":
        assert guest >= p["wss_mib"] * mib and topo.host.memory >= vm.pages * 4096
    elif regime == "host_swap":
        assert topo.host.memory == p["mem_mib"] * mib < guest and topo.host.swap > 0
    else:  # guest swap or balloon: the guest itself has mem_mib
        assert guest == p["mem_mib"] * mib and topo.host.memory >= vm.pages * 4096


@pytest.mark.slow
def test_fidelity_runs_regimes_and_writes_its_table(tmp_path: Path):
    from benchmarks import fidelity as F

    params = {"wss_mib": 8, "mem_mib": 6, "vm_mib": 16, "warmup_s": 1.0, "window_s": 2.0,
              "loop_log2": 14, "loop_repeats": 1}
    res = F.run_fidelity(params, regimes=("spare", "host_swap"))
    assert [pt["regime"] for pt in res["points"]] == ["spare", "host_swap"]
    for pt in res["points"]:
        assert pt["ok"], pt
        assert pt["modelled_throughput"] > 0 and pt["corrupted_reads"] == 0
    spare, hswap = res["points"]
    assert spare["delta"]["host_swap_reads"] == 0
    assert hswap["delta"]["host_swap_reads"] > 0
    assert hswap["modelled_throughput"] < spare["modelled_throughput"]
    assert res["loop"]["on_accesses_per_s"] > 0 and res["loop"]["off_accesses_per_s"] > 0
    md = F.markdown(res)
    assert "(a) memory to spare" in md and "(c) host swap on ssd" in md


@pytest.mark.slow
def test_concurrent_cli_inflates_every_vm_and_writes_schema(tmp_path: Path):
    res = CliRunner().invoke(bench, ["concurrent", "--vms", "2", "--vm-size", "32MiB",
                                     "--repeat", "1", "--out", str(tmp_path), "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert "[3/3] 2 VMs of 32 MiB: trial 1/1" in res.stderr
    assert out["benchmark"] == "concurrent" and out["vms"] == 2
    t = out["trials"][0]
    assert sorted(t["targets"]) == ["v0", "v1"] and all(v > 0 for v in t["targets"].values())
    assert t["target_pages"] == sum(t["targets"].values()) and t["corrupted_reads"] == 0
    for key in ("aggregate_gib_s", "limit_punch_gib_s", "limit_mapped_punch_gib_s",
                "ratio_to_limit", "ratio_to_mapped_limit"):
        assert out[key] > 0, key
    assert json.loads((tmp_path / "concurrent.json").read_text())["vms"] == 2
    assert "aggregate / punch limit" in (tmp_path / "concurrent.md").read_text()


def test_concurrent_cli_rejects_a_bad_size():
    res = CliRunner().invoke(bench, ["concurrent", "--vm-size", "8MiB"])
    assert res.exit_code != 0 and "at least 16 MiB" in res.output


def test_reclaim_summary_skips_unmeasured_refaults():
    from benchmarks.reclaim import summarise_trials

    def trial(refault_s, refault_pages):
        return {"target_pages": 1024, "released_pages": 1024, "inflate_s": 0.5,
                "deflate_s": 0.01, "refault_s": refault_s, "refault_pages": refault_pages}

    mib4 = 1024 * 4096 / (1 << 30)
    both = summarise_trials([trial(0.25, 1024), trial(None, 0)])
    assert both["refault_gib_s"]["median"] == pytest.approx(mib4 / 0.25)
    assert both["inflate_gib_s"]["min"] == both["inflate_gib_s"]["max"] == pytest.approx(mib4 / 0.5)
    none = summarise_trials([trial(None, 0)])
    assert none["refault_gib_s"] == {"min": None, "median": None, "max": None}
    assert none["deflate_refault_gib_s"]["median"] is None
    assert none["inflate_gib_s"]["median"] == pytest.approx(mib4 / 0.5)
