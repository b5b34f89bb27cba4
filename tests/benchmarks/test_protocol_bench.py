"""Smoke test of ``python -m benchmarks.protocol``: it runs at its smallest size, times the
same payloads on every path, and reports the documented keys. No timing assertions."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from balloonlab.bench import bench
from benchmarks import protocol as B


def test_protocol_benchmark_reports_every_workload_and_stage(capsys):
    res = B.measure(repeats=1, target_s=0.0005, breakdown=True)
    workloads = [k for k in res if k != "target"]
    assert workloads == ["pfns-4096", "pfns-256", "runs-fragmented-4096",
                         "runs-contiguous-4096"]
    for name in workloads:
        r = res[name]
        for key in ("overhead_ratio", "generic_path_ratio"):
            o = r[key]
            assert 0 < o["min"] <= o["median"] <= o["max"]
        assert r["project_pages_per_s"] > 0 and r["msgpack_pages_per_s"] > 0
        assert set(r["stages_us"]) >= {"build Inflate (validate)", "to_frame",
                                       "feed + next_frame_span", "decode_frame (validate)",
                                       "msgpack.packb (dict built)", "msgpack.unpackb"}
    assert res["target"]["limit"] == B.TARGET_RATIO_4096
    assert B.main(["--json", "--repeats", "1"]) == 0
    assert set(json.loads(capsys.readouterr().out)) == {*workloads, "target"}


def test_protocol_cli_writes_json_and_markdown(tmp_path: Path):
    res = CliRunner().invoke(bench, ["protocol", "--repeat", "1", "--breakdown",
                                     "--out", str(tmp_path), "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)  # progress lines go to stderr
    assert out["benchmark"] == "protocol" and out["machine"]["nproc"] >= 1
    assert out["pfns-4096"]["overhead_ratio"]["median"] > 0
    saved = json.loads((tmp_path / "protocol.json").read_text())
    assert saved["target"]["limit"] == B.TARGET_RATIO_4096
    md = (tmp_path / "protocol.md").read_text()
    assert "pfns-4096" in md and "Per stage" in md and "to_frame" in md
