"""``[host] seed`` and ``[[schedule]]`` in topologies: parsing, one-line errors naming the
file and key, the TOML round trip, and the guest seed derivation."""

from __future__ import annotations

import pytest

from hypervisor.schedule import ScheduleEntry, guest_seed
from hypervisor.topology import TopologyError, parse_topology

BASE = """
[host]
memory = "64MiB"
seed = 7

[[vm]]
name = "a"
memory = "32MiB"

[[vm]]
name = "b"
memory = "16MiB"
"""

GOOD = BASE + """
[[schedule]]
at = "2s"
action = "set_balloon"
vm = "a"
size = "8MiB"

[[schedule]]
at = "500ms"
action = "setmem"
vm = "b"
size = "12MiB"

[[schedule]]
at = "3s"
action = "set_policy"
name = "mom"
params = { pressure_threshold = 0.25 }
"""


def test_schedule_and_seed_are_parsed() -> None:
    t = parse_topology(GOOD, "lab.toml")
    assert t.host.seed == 7
    assert t.schedule == (
        ScheduleEntry(at=2.0, action="set_balloon", vm="a", size=8 << 20),
        ScheduleEntry(at=0.5, action="setmem", vm="b", size=12 << 20),
        ScheduleEntry(at=3.0, action="set_policy", name="mom",
                      params={"pressure_threshold": 0.25}),
    )
    assert [e.describe() for e in t.schedule] == [
        "set_balloon a 8MiB", "setmem b 12MiB", "set_policy mom pressure_threshold=0.25"]


def test_defaults_seed_zero_and_no_schedule() -> None:
    t = parse_topology(BASE.replace("seed = 7\n", ""), "lab.toml")
    assert t.host.seed == 0 and t.schedule == ()


def test_to_toml_round_trips_seed_and_schedule() -> None:
    t = parse_topology(GOOD, "lab.toml")
    back = parse_topology(t.to_toml(), "copy.toml")
    assert back.host.seed == 7 and back.schedule == t.schedule


ENTRY = '\n[[schedule]]\nat = "1s"\naction = "set_balloon"\nvm = "a"\nsize = "1MiB"\n'


@pytest.mark.parametrize("text, message", [
    (ENTRY.replace('"set_balloon"', '"set_ballon"'),
     "lab.toml: schedule[0].action: 'set_ballon' is not one of set_balloon, setmem, "
     "set_policy (did you mean 'set_balloon'?)"),
    (ENTRY.replace('vm = "a"', 'vm = "c"'),
     "lab.toml: schedule[0].vm: no VM 'c' in this topology (VMs: a, b)"),
    (ENTRY.replace('"1MiB"', '"64MiB"'),
     "lab.toml: schedule[0].size: '64MiB' is larger than VM 'a''s memory (32MiB)"),
    (ENTRY.replace('"1MiB"', '"1000B"'), "lab.toml: schedule[0].size: '1000B'"),
    (ENTRY.replace('size = "1MiB"\n', ""),
     "lab.toml: schedule[0].size: missing: set_balloon needs vm and size"),
    (ENTRY.replace('at = "1s"\n', ""), "lab.toml: schedule[0].at: missing"),
    (ENTRY.replace('"1s"', '"soon"'), "lab.toml: schedule[0].at: 'soon'"),
    (ENTRY + 'name = "mom"\n', "lab.toml: schedule[0].name: unknown key"),
    ('\n[[schedule]]\nat = "1s"\naction = "set_policy"\nname = "mmo"\n',
     "lab.toml: schedule[0].name: 'mmo' is neither a built-in policy"),
    ('\n[[schedule]]\nat = "1s"\naction = "set_policy"\nname = "mom"\nparams = { x = 1 }\n',
     "lab.toml: schedule[0].params: policy 'mom': unknown parameter 'x'"),
    ('\n[[schedule]]\nat = "1s"\n', "lab.toml: schedule[0].action: missing"),
    ('\n[schedule]\nat = "1s"\n', "lab.toml: schedule: expected an array of tables"),
])
def test_bad_schedule_is_one_line_naming_file_and_key(text: str, message: str) -> None:
    with pytest.raises(TopologyError) as e:
        parse_topology(BASE + text, "lab.toml")
    assert str(e.value).startswith(message)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("value", ['"7"', "-1", "true", "1.5", str(2**63)])
def test_bad_seed_is_rejected(value: str) -> None:
    with pytest.raises(TopologyError, match=r"^lab.toml: host.seed: expected an integer"):
        parse_topology(BASE.replace("seed = 7", f"seed = {value}"), "lab.toml")


def test_guest_seeds_depend_on_seed_vm_and_restart_only() -> None:
    s = guest_seed(7, "a", 0)
    assert s == guest_seed(7, "a", 0)  # a pure function: same seed, same streams
    others = {guest_seed(8, "a", 0), guest_seed(7, "b", 0), guest_seed(7, "a", 1)}
    assert s not in others and len(others) == 3
    assert all(0 <= x < 2**48 for x in others | {s})


def test_every_bad_schedule_entry_is_reported_at_once() -> None:
    bad_vm = ENTRY.replace('vm = "a"', 'vm = "c"')
    bad_size = ENTRY.replace('"1MiB"', '"64MiB"')
    with pytest.raises(TopologyError) as e:
        parse_topology(BASE + bad_vm + bad_size, "lab.toml")
    lines = str(e.value).splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("lab.toml: schedule[0].vm: no VM 'c'")
    assert lines[1].startswith("lab.toml: schedule[1].size: '64MiB' is larger")
