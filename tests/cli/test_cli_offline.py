"""The `balloonlab` CLI without a running host: validate, topologies, plot, error handling."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from balloonlab.cli import cli
from balloonlab.recording import Recorder
from hypervisor.topology import example_path, list_examples, load_topology
from tests.cli import synthetic


@pytest.fixture
def runner(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> CliRunner:
    # An empty runtime dir: no host can be found, whatever else runs on this machine.
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "xdg"))
    return CliRunner()


def test_validate_ok(runner: CliRunner) -> None:
    res = runner.invoke(cli, ["validate", str(example_path("default"))])
    assert res.exit_code == 0, res.output
    topo = load_topology(example_path("default"))
    ratio = sum(v.memory for v in topo.vms) / topo.host.memory
    assert "ok" in res.output and f"overcommit {ratio:.2f}x" in res.output
    web = topo.vm("web")
    assert f"web: {web.memory / (1 << 20):.1f} MiB" in res.output


def test_validate_example_name_and_json(runner: CliRunner) -> None:
    res = runner.invoke(cli, ["validate", "two-vms-small", "--json"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.output)
    assert doc["host"]["frames"] == 48 * 256
    assert [v["name"] for v in doc["vms"]] == ["a", "b"]


def test_validate_resolved_is_loadable(runner: CliRunner, tmp_path: Path) -> None:
    res = runner.invoke(cli, ["validate", "overcommit", "--resolved"])
    assert res.exit_code == 0
    f = tmp_path / "resolved.toml"
    f.write_text(res.output)
    assert load_topology(f).vms == load_topology(example_path("overcommit")).vms


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('[host]\nmemory = "1GiB"\n[[vm]]\nname = "a"\nmemory = "1MiB"\nmemroy = "1MiB"\n',
         "vm[0].memroy: unknown key (allowed: name, memory, features, wire, stats_interval, "
         "guest_swap, on_crash, task, min_memory, max_memory, shares, initial_balloon, "
         "kernel_image, disk) (did you mean 'memory'?)"),
        ('[host]\nmemory = "1GB"\n[[vm]]\nname = "a"\nmemory = "1MiB"\n',
         "host.memory: '1GB' (1000000000 bytes) is not a multiple of the 4096-byte page size"),
        ('[host]\nmemory = "1GiB"\n', "vm: no VMs: add at least one [[vm]] table"),
        ('[host]\nmemory = "1GiB"\nname = \n', "line 3, column 8: TOML syntax error"),
    ],
)
def test_validate_bad_files_one_line_error(
    runner: CliRunner, tmp_path: Path, text: str, expected: str
) -> None:
    f = tmp_path / "bad.toml"
    f.write_text(text)
    res = runner.invoke(cli, ["validate", str(f)])
    assert res.exit_code == 1
    assert res.stdout == ""
    (line,) = res.stderr.strip().splitlines()
    assert line.startswith(f"balloonlab: error: {f}: ")
    assert expected in line
    assert "Traceback" not in res.output


def test_validate_reports_every_error_one_line_each(runner: CliRunner, tmp_path: Path) -> None:
    f = tmp_path / "lab.toml"
    f.write_text('[host]\nmemory = "1GiB"\n[[vm]]\nname = "web"\nmemory = "512MiB"\n'
                 'guest_swap = "0"\n[[vm.task]]\nworkload = "zipf"\nsize = "600MiB"\n'
                 '[[vm]]\nname = "b"\nmemory = "64MiB"\nmemroy = "1MiB"\n')
    res = runner.invoke(cli, ["validate", str(f)])
    assert res.exit_code == 1 and res.stdout == ""
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 2, res.stderr
    assert lines[0].startswith(f"balloonlab: error: {f}: vm[0].task[0].size: 600MiB is larger")
    assert lines[1].startswith(f"balloonlab: error: {f}: vm[1].memroy: unknown key")


def test_validate_prints_warnings(runner: CliRunner, tmp_path: Path) -> None:
    """A task larger than its VM but within memory + guest swap is valid, with a warning."""
    f = tmp_path / "lab.toml"
    f.write_text('[host]\nmemory = "1GiB"\n[[vm]]\nname = "web"\nmemory = "512MiB"\n'
                 '[[vm.task]]\nworkload = "zipf"\nsize = "600MiB"\n')
    res = runner.invoke(cli, ["validate", str(f)])
    assert res.exit_code == 0, res.output
    assert f"{f}: ok" in res.stdout
    assert res.stderr.strip() == (
        f"balloonlab: {f}: vm[0].task[0].size: warning: 600MiB is larger than the VM's memory "
        "(512MiB): the task will live partly in guest swap")


def test_validate_missing_file(runner: CliRunner) -> None:
    res = runner.invoke(cli, ["validate", "nonexistent-topology"])
    assert res.exit_code == 1
    assert "no such file; `balloonlab topologies` lists the shipped examples" in res.stderr


def test_topologies(runner: CliRunner) -> None:
    res = runner.invoke(cli, ["topologies"])
    assert res.exit_code == 0
    for name, desc in list_examples():
        assert name in res.output and desc in res.output
    res = runner.invoke(cli, ["topologies", "--json"])
    names = [t["name"] for t in json.loads(res.output)]
    assert "default" in names and all(Path(t["path"]).is_file() for t in json.loads(res.output))


def test_plot_command(runner: CliRunner, tmp_path: Path) -> None:
    rec = tmp_path / "rec"
    with Recorder(rec, load_topology(example_path("two-vms-small"))) as r:
        for snap in synthetic.run(6):
            r.tick(snap)
    res = runner.invoke(cli, ["plot", str(rec), "--out", str(tmp_path / "png")])
    assert res.exit_code == 0, res.output
    outs = [Path(p) for p in res.stdout.split()]
    assert [p.name for p in outs] == ["memory.png", "host.png"]
    assert all(p.read_bytes().startswith(b"\x89PNG") for p in outs)


def test_plot_missing_recording(runner: CliRunner, tmp_path: Path) -> None:
    res = runner.invoke(cli, ["plot", str(tmp_path)])
    assert res.exit_code == 1
    assert "timeseries.csv: no such file; record a run with `balloonlab up --record" in res.stderr


@pytest.mark.parametrize(
    "args",
    [["list"], ["host"], ["dommemstat", "a"], ["events"], ["down"], ["setmem", "a", "16MiB"],
     ["policy", "mom"], ["list", "--host", "nosuch"], ["list", "--json"], ["down", "--all"],
     ["set-balloon", "a", "--release"], ["setmem", "a", "24576"]],
)
def test_no_running_host_is_one_line(runner: CliRunner, args: list[str]) -> None:
    res = runner.invoke(cli, args)
    assert res.exit_code == 1, res.output
    (line,) = res.stderr.strip().splitlines()
    assert line.startswith("balloonlab: error: ")
    assert "running host" in line


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["setmem", "a", "16XB"], "unknown unit 'XB'"),
        (["setmem", "a", "1001"], "1001 KiB, not a whole number of 4 KiB pages"),
        (["set-balloon", "a", "1000B"], "not a whole number of 4 KiB pages"),
        (["set-balloon", "a"], "missing SIZE (or --release)"),
        (["set-balloon", "a", "4M", "--release"], "give SIZE or --release, not both"),
        (["down", "--all", "--host", "x"], "exclude each other"),
        (["up", "--for", "10h"], "unknown unit 'h'"),
        (["up", "--detach", "--for", "10s"], "exclude each other"),
        (["policy", "mom", "--param", "novalue"], "is not KEY=VALUE"),
    ],
)
def test_bad_arguments_are_usage_errors(runner: CliRunner, args: list[str], fragment: str) -> None:
    res = runner.invoke(cli, args)
    assert res.exit_code == 2, res.output
    assert fragment in res.stderr


def test_up_rejects_bad_topology_before_launching(runner: CliRunner, tmp_path: Path) -> None:
    f = tmp_path / "t.toml"
    f.write_text('[host]\nmemory = "1GiB"\n[[vm]]\nname = "a"\nmemory = "3GiB"\n')
    res = runner.invoke(cli, ["up", str(f), "--detach"])
    assert res.exit_code == 1
    assert "vm[0].memory: 3GiB is larger than host memory + host swap" in res.stderr


def test_dommemstat_text_is_virsh_kib_and_json_names_bytes() -> None:
    from balloonlab.cli import dommemstat_json, dommemstat_lines

    st = synthetic.memstat(backed=3000, balloon=2048, target=2048, ops=5, faults=10)
    st["oom_kills"] = None  # not reported: left out, as virsh leaves out what it lacks
    lines = dommemstat_lines(st)
    fields = {line.split()[0]: line.split()[1] for line in lines}
    # virsh order and units: the guest's current memory in KiB (32 MiB VM - 8 MiB balloon)
    assert [line.split()[0] for line in lines[:3]] == ["actual", "swap_in", "swap_out"]
    assert fields["actual"] == str(24 * 1024)
    assert fields["unused"] == str(4 * 1024) and fields["rss"] == str(3000 * 4)
    assert fields["swap_out"] == "8" and fields["major_fault"] == "1"
    assert "balloon_pages        2048  (8.0 MiB)" in lines
    assert "oom_kills" not in fields
    doc = dommemstat_json(st)
    assert doc["actual_bytes"] == 24 << 20 and "actual" not in doc
    assert doc["unused_bytes"] == 4 << 20 and doc["balloon_pages"] == 2048
    assert doc["major_fault"] == 1


def test_transcript_into_a_closed_pipe_ends_quietly() -> None:
    """`balloonlab transcript | head -1`: no "Broken pipe", no traceback, status 0."""
    import subprocess
    import sys

    exe = str(Path(sys.executable).with_name("balloonlab"))
    proc = subprocess.Popen([exe, "transcript"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None
    proc.stdout.readline()
    proc.stdout.close()  # the reader goes away while the transcript is still being written
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert err == b""
