"""hypervisor.topology: parsing, defaults, validation messages, round trip, shipped examples."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hypervisor.topology import (
    DEFAULT_FEATURES,
    Topology,
    TopologyError,
    default_topology,
    example_path,
    list_examples,
    load_topology,
    parse_topology,
)

MiB = 1 << 20

BASE = """
[host]
name = "t"
memory = "64MiB"
swap = "32MiB"

[[vm]]
name = "a"
memory = "32MiB"
[[vm.task]]
workload = "zipf"
size = "8MiB"
"""


def parse(text: str) -> Topology:
    return parse_topology(textwrap.dedent(text), "t.toml")


def error_of(text: str) -> TopologyError:
    with pytest.raises(TopologyError) as info:
        parse(text)
    return info.value


def test_defaults_are_filled_in() -> None:
    topo = parse(BASE)
    host, (vm,) = topo.host, topo.vms
    assert (host.name, host.memory, host.swap, host.policy) == ("t", 64 * MiB, 32 * MiB, "none")
    assert host.policy_interval == 1.0 and host.run_dir is None and host.policy_params == {}
    assert host.frames == 64 * MiB // 4096
    assert vm.features == DEFAULT_FEATURES and vm.wire == "ranges"
    assert vm.stats_interval == 1.0 and vm.on_crash == "restart"
    assert vm.guest_swap == 16 * MiB
    assert vm.min_memory == 3 * MiB  # 10 % of 32 MiB, rounded down to whole MiB
    assert vm.max_memory == vm.memory and vm.shares == 1000 and vm.initial_balloon == 0
    assert vm.pages == 8192
    (task,) = vm.tasks
    assert (task.workload, task.size, task.skew, task.write_ratio) == ("zipf", 8 * MiB, 0.9, 0.3)
    assert task.rate is None and task.duration is None and task.start == 0.0 and task.phases == ()


def test_host_swap_default_is_half_memory() -> None:
    topo = parse(BASE.replace('swap = "32MiB"\n', ""))
    assert topo.host.swap == 32 * MiB


def test_guest_config_matches_internals_shape() -> None:
    vm = parse(BASE).vms[0]
    cfg = vm.guest_config(seed=7)
    assert set(cfg) == {"name", "memory", "guest_swap", "stats_interval", "seed", "tasks"}
    assert cfg["seed"] == 7 and cfg["memory"] == 32 * MiB
    assert set(cfg["tasks"][0]) == {
        "workload", "size", "skew", "write_ratio", "rate", "hot_fraction", "hot_prob",
        "duration", "start", "phases",
    }
    json.dumps(cfg)  # must be JSON-serialisable for --config


def test_phases_inherit_and_size_defaults_to_largest_phase() -> None:
    topo = parse(BASE.replace('workload = "zipf"\nsize = "8MiB"\n', textwrap.dedent("""\
        workload = "phases"
        rate = 1000
        [[vm.task.phases]]
        workload = "uniform"
        size = "4MiB"
        duration = "2s"
        [[vm.task.phases]]
        workload = "scan"
        size = "12MiB"
        duration = "500ms"
        rate = 50
        """)))
    task = topo.vms[0].tasks[0]
    assert task.size == 12 * MiB
    assert [p.rate for p in task.phases] == [1000.0, 50.0]
    assert [p.duration for p in task.phases] == [2.0, 0.5]
    assert task.to_json()["phases"][1]["workload"] == "scan"


@pytest.mark.parametrize(
    ("edit", "key", "fragment", "suggestion"),
    [
        (('memory = "32MiB"', 'memroy = "32MiB"'), "vm[0].memroy", "unknown key", "memory"),
        (('[host]', '[host]\npolcy = "mom"'), "host.polcy", "unknown key", "policy"),
        (('workload = "zipf"', 'workload = "zipff"'), "vm[0].task[0].workload", "not one of",
         "zipf"),
        (('size = "8MiB"', 'size = "8XB"'), "vm[0].task[0].size", "unknown unit 'XB'", None),
        (('size = "8MiB"', 'size = "64MiB"'), "vm[0].task[0].size", "larger than its VM", None),
        (('memory = "32MiB"', 'memory = "200MiB"'), "vm[0].memory", "host memory + host swap",
         None),
        (('memory = "32MiB"', 'memory = 5000'), "vm[0].memory", "not a multiple of the 4096", None),
        (('name = "a"', 'name = "Bad Name"'), "vm[0].name", "not a valid name", None),
        (('name = "a"', 'name = "a"\nwire = "virtoi"'), "vm[0].wire", "not one of", "virtio"),
        (('name = "a"', 'name = "a"\non_crash = "reboot"'), "vm[0].on_crash", "not one of", None),
        (('name = "a"', 'name = "a"\nfeatures = ["stats", "balloning"]'), "vm[0].features[1]",
         "not one of", None),
        (('name = "a"', 'name = "a"\nfeatures = ["stats"]'), "vm[0].wire",
         "needs the \"ranges\" feature",
         None),
        (('name = "a"', 'name = "a"\nfeatures = ["stats", "stats"]'), "vm[0].features[1]", "twice",
         None),
        (('size = "8MiB"', 'size = "8MiB"\nwrite_ratio = 1.5'), "vm[0].task[0].write_ratio",
         "out of range", None),
        (('size = "8MiB"', 'size = "8MiB"\nrate = -5'), "vm[0].task[0].rate", "out of range", None),
        (('size = "8MiB"', 'size = "8MiB"\nduration = "10h"'), "vm[0].task[0].duration",
         "unknown unit 'h'", None),
        (('size = "8MiB"', 'size = "8MiB"\nphases = []'), "vm[0].task[0].phases",
         "only a 'phases' workload", None),
        (('[host]', '[host]\npolicy = "moom"'), "host.policy", "neither a built-in", "mom"),
        (('[host]', '[host]\npolicy_interval = "0s"'), "host.policy_interval", "longer than 0",
         None),
        (('name = "a"', 'name = "a"\nmin_memory = "16MiB"\nmax_memory = "8MiB"'),
         "vm[0].min_memory",
         "larger than max_memory", None),
        (('name = "a"', 'name = "a"\nmax_memory = "64MiB"'), "vm[0].max_memory",
         "larger than the VM",
         None),
        (('name = "a"', 'name = "a"\ninitial_balloon = "31MiB"'), "vm[0].initial_balloon",
         "below min_memory", None),
        (('name = "a"', 'name = "a"\nshares = 0'), "vm[0].shares", "positive", None),
        (('[host]', 'hots = 1\n[host]'), "hots", "unknown key", "host"),
    ],
)
def test_validation_messages(
    edit: tuple[str, str], key: str, fragment: str, suggestion: str | None
) -> None:
    text = BASE.replace(edit[0], edit[1], 1)
    assert text != BASE
    err = error_of(text)
    assert (err.source, err.key) == ("t.toml", key), str(err)
    assert fragment in err.problem, str(err)
    assert err.suggestion == suggestion, str(err)
    expected = f"t.toml: {key}: {err.problem}"
    if suggestion:
        expected += f" (did you mean {suggestion!r}?)"
    assert str(err).splitlines()[0] == expected


def test_every_error_is_reported_at_once() -> None:
    """The documented example: problems in several VMs and keys, one line each, in order."""
    text = """
    [host]
    memory = "1GiB"
    polcy = "mom"

    [[vm]]
    name = "web"
    memory = "512MiB"
    guest_swap = "0"
    [[vm.task]]
    workload = "zipf"
    size = "600MiB"
    [[vm.task]]
    workload = "zipff"
    size = "8MiB"

    [[vm]]
    name = "batch"
    memroy = "512MiB"
    """
    err = error_of(text)
    lines = str(err).splitlines()
    assert [e.key for e in err.errors] == [
        "host.polcy", "vm[0].task[0].size", "vm[0].task[1].workload", "vm[1].memroy",
        "vm[1].memory"]
    assert lines == [e.line for e in err.errors]
    assert all(line.startswith("t.toml: ") for line in lines)
    assert "(did you mean 'policy'?)" in lines[0]
    assert "600MiB is larger than its VM's memory plus guest swap (512MiB)" in lines[1]
    assert "(did you mean 'memory'?)" in lines[3]
    assert (err.key, err.source) == ("host.polcy", "t.toml")  # the first problem


def test_task_larger_than_vm_memory_is_a_warning() -> None:
    """A task may overcommit its guest up to memory + guest swap: valid, with a warning."""
    text = BASE.replace('size = "8MiB"', 'size = "40MiB"')  # 32 MiB VM + 16 MiB guest swap
    topo = parse(text)
    assert topo.vms[0].tasks[0].size == 40 * MiB
    assert topo.warnings == (
        "t.toml: vm[0].task[0].size: warning: 40MiB is larger than the VM's memory (32MiB): "
        "the task will live partly in guest swap",)
    assert parse(BASE).warnings == ()
    text = BASE + '[[vm.task]]\nworkload = "idle"\nsize = "30MiB"\n' \
        '[[vm.task]]\nworkload = "scan"\nsize = "30MiB"\n'
    (warning,) = parse(text).warnings
    assert warning.startswith("t.toml: vm[0].task: warning: the tasks' sizes add up to 68MiB")


def test_duplicate_vm_names() -> None:
    text = BASE + '\n[[vm]]\nname = "a"\nmemory = "16MiB"\n'
    err = error_of(text)
    assert err.key == "vm[1].name" and "duplicate" in err.problem


def test_no_vms_and_no_host() -> None:
    assert error_of('[host]\nmemory = "1GiB"\n').key == "vm"
    assert error_of('[[vm]]\nname = "a"\nmemory = "1MiB"\n').key == "host"
    assert error_of(BASE.replace("[[vm]]", "[vm]").split("[[vm.task]]")[0]).key == "vm"


def test_nested_phases_rejected() -> None:
    text = BASE.replace('workload = "zipf"\nsize = "8MiB"\n', textwrap.dedent("""\
        workload = "phases"
        [[vm.task.phases]]
        workload = "phases"
        size = "4MiB"
        duration = "1s"
        """))
    err = error_of(text)
    assert err.key == "vm[0].task[0].phases[0].workload" and "cannot nest" in err.problem


def test_phase_without_duration_rejected() -> None:
    text = BASE.replace('workload = "zipf"\nsize = "8MiB"\n', textwrap.dedent("""\
        workload = "phases"
        [[vm.task.phases]]
        workload = "uniform"
        size = "4MiB"
        """))
    assert error_of(text).key == "vm[0].task[0].phases[0].duration"


def test_syntax_error_has_line(tmp_path: Path) -> None:
    path = tmp_path / "broken.toml"
    path.write_text('[host]\nmemory = "1GiB"\nname = \n')
    with pytest.raises(TopologyError) as info:
        load_topology(path)
    assert info.value.source == str(path)
    assert info.value.key.startswith("line 3")
    assert "TOML syntax error" in info.value.problem


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(TopologyError, match="no such file") as info:
        load_topology(tmp_path / "nope.toml")
    assert info.value.key == "(file)"


def test_shipped_examples_load_and_round_trip() -> None:
    examples = dict(list_examples())
    shipped = {"default", "two-vms-small", "overcommit", "virtio-baseline", "reporting"}
    assert shipped <= set(examples)
    for name, desc in examples.items():
        assert desc, f"{name} has no description line"
        topo = load_topology(example_path(name))
        again = parse_topology(topo.to_toml(), topo.source)
        assert again == topo


def test_default_topology_shape() -> None:
    topo = default_topology()
    assert topo.source == "<default>"
    assert (topo.host.name, topo.host.memory, topo.host.swap) == ("lab", 1 << 30, 512 * MiB)
    assert topo.host.policy in ("mom", "share")
    assert [v.name for v in topo.vms] == ["web", "batch", "idle"]
    # Overcommitted: the VMs' memory does not fit the host's frames.
    assert sum(v.memory for v in topo.vms) > topo.host.memory
    assert [v.tasks[0].workload for v in topo.vms] == ["zipf", "phases", "idle"]
    sizes = [p.size for p in topo.vms[1].tasks[0].phases]
    assert sizes[1] >= 3 * sizes[0] and sizes[2] < sizes[1]  # a spike, then back down


def test_example_path_unknown_suggests() -> None:
    with pytest.raises(TopologyError, match="did you mean 'overcommit'"):
        example_path("overcomit")


def test_policy_params_round_trip() -> None:
    params = '[host.policy_params]\ntax = 0.75\n"odd key" = [1, 2]\nsub = {x = "y"}\n\n'
    text = BASE.replace("[[vm]]", params + "[[vm]]", 1)
    host = '[host]\npolicy = "mypkg.mod:MyPolicy"\nrun_dir = "/tmp/x"'
    topo = parse(text.replace('[host]', host))
    assert topo.host.policy_params == {"tax": 0.75, "odd key": [1, 2], "sub": {"x": "y"}}
    assert parse_topology(topo.to_toml(), "t.toml") == topo


_sizes = st.integers(min_value=1, max_value=64).map(lambda n: n * MiB)


@settings(max_examples=40, deadline=None)
@given(
    vm_mem=_sizes,
    frac=st.floats(min_value=0.01, max_value=1.0),
    skew=st.floats(min_value=0, max_value=3, allow_nan=False),
    wr=st.floats(min_value=0, max_value=1),
    rate=st.none() | st.floats(min_value=0.5, max_value=1e9),
    interval_ms=st.integers(min_value=1, max_value=10**6),
    wire=st.sampled_from(["ranges", "virtio"]),
    crash=st.sampled_from(["restart", "destroy"]),
)
def test_round_trip_property(
    vm_mem: int, frac: float, skew: float, wr: float, rate: float | None, interval_ms: int,
    wire: str, crash: str,
) -> None:
    size = max(4096, int(vm_mem * frac) // 4096 * 4096)
    rate_line = f"rate = {rate!r}\n" if rate is not None else ""
    text = (
        f'[host]\nmemory = "128MiB"\n[[vm]]\nname = "v"\nmemory = {vm_mem}\nwire = "{wire}"\n'
        f'on_crash = "{crash}"\nstats_interval = "{interval_ms}ms"\n'
        f'[[vm.task]]\nworkload = "hotcold"\nsize = {size}\nskew = {skew!r}\nwrite_ratio = {wr!r}\n'
        f"{rate_line}"
    )
    topo = parse_topology(text, "p")
    assert parse_topology(topo.to_toml(), "p") == topo
    assert topo.vms[0].stats_interval == pytest.approx(interval_ms / 1000)


def test_policy_params_are_checked_at_load_time_with_a_suggestion():
    text = """
[host]
name = "p"
memory = "64MiB"
policy = "share"
[host.policy_params]
tax = 0.5
[[vm]]
name = "a"
memory = "32MiB"
"""
    with pytest.raises(TopologyError) as ei:
        parse_topology(text, "p.toml")
    msg = str(ei.value)
    assert msg.startswith("p.toml: host.policy_params.tax: ")
    assert "unknown parameter 'tax'" in msg
    assert "did you mean 'tax_rate'?" in msg
    ok = parse_topology(text.replace("tax = 0.5", "tax_rate = 0.5"), "p.toml")
    assert ok.host.policy_params == {"tax_rate": 0.5}


FILEIO = """
[host]
memory = "256MiB"

[[vm]]
name = "db"
memory = "64MiB"
disk = "32MiB"
[[vm.task]]
workload = "fileio"
files = 8
file_size = "2MiB"
write_ratio = 0.4
skew = 1.1
[[vm.task]]
workload = "fileio"
files = 4
file_size = "4MiB"
[[vm.task]]
workload = "uniform"
size = "8MiB"
"""


def test_fileio_task_and_disk_parse_round_trip_and_reach_the_guest() -> None:
    topo = parse(FILEIO)
    vm = topo.vms[0]
    assert vm.disk == 32 * MiB
    t0, t1, _ = vm.tasks
    assert (t0.workload, t0.files, t0.file_size, t0.size) == ("fileio", 8, 2 * MiB, 16 * MiB)
    assert parse_topology(topo.to_toml(), "t.toml") == topo
    cfg = vm.guest_config(seed=1)
    assert cfg["disk"] == 32 * MiB
    assert (cfg["tasks"][0]["files"], cfg["tasks"][0]["file_size"]) == (8, 2 * MiB)
    assert "files" not in cfg["tasks"][2]
    # the guest kernel accepts what the topology sends (with the path the host adds)
    from guest.kernel import parse_config
    got = parse_config(json.dumps({**cfg, "disk_path": "/r/db.disk"}))
    assert got["_disk_bases"] == [0, 4096, 8192]


@pytest.mark.parametrize("edit, key, text", [
    (('disk = "32MiB"', 'disk = "24MiB"'), "vm[0].task[1].files",
     "4 files of 4MiB (16MiB) do not fit on the VM's disk (24MiB, 16MiB taken by earlier "
     "fileio tasks)"),
    (('disk = "32MiB"\n', ""), "vm[0].task[0].workload", "a fileio task needs a disk"),
    (("files = 8", "files = 0"), "vm[0].task[0].files", "expected a positive integer"),
    (("files = 8\n", ""), "vm[0].task[0].files", "missing"),
    (('file_size = "2MiB"', 'file_size = "1000"'), "vm[0].task[0].file_size", ""),
    (('files = 8\n', 'files = 8\nsize = "1MiB"\n'), "vm[0].task[0].size",
     "set those instead of size"),
    (('size = "8MiB"', 'size = "8MiB"\nfiles = 2'), "vm[0].task[2].files",
     "only a fileio task has files"),
    (('disk = "32MiB"', 'disk = "1MiB + 1"'), "vm[0].disk", ""),
])
def test_fileio_and_disk_errors_name_file_and_key(edit, key, text) -> None:
    src = FILEIO.replace(*edit)
    assert src != FILEIO
    err = error_of(src)
    assert err.key == key
    first = str(err).splitlines()[0]
    assert first.startswith(f"t.toml: {key}: ") and text in first


def test_fileio_size_does_not_count_against_memory() -> None:
    vm = parse(FILEIO.replace('file_size = "2MiB"', 'file_size = "1MiB"')
               .replace('disk = "32MiB"', 'disk = "1GiB"')
               .replace("files = 8", "files = 900")).vms[0]
    assert vm.tasks[0].size == 900 * MiB > vm.memory
