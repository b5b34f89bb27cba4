"""The run directory is safe against other local users: a base created by someone else, left
open to others, or replaced by a symbolic link is refused in one line, and no file is ever
written through a planted link.

The tests run as root on the CI machine; another user is simulated with ``os.chown``.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from balloonlab.cli import cli
from hypervisor import rundir

OTHER_UID = 54321  # no such user needed: ownership is all that is checked
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def xdg(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="bl-rd-"))
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(d))
    yield d
    subprocess.run(["rm", "-rf", str(d)], check=False)


def _base(xdg: Path) -> Path:
    return xdg / "balloonlab"


def _one_line_error(res: object) -> str:
    err = res.stderr  # type: ignore[attr-defined]
    assert res.exit_code == 1, (res.exit_code, err)  # type: ignore[attr-defined]
    assert err.startswith("balloonlab: error: "), err
    assert len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err
    return err


def _hypervisor(topo_file: Path, env_xdg: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, XDG_RUNTIME_DIR=str(env_xdg),
               NUMBA_CACHE_DIR=str(REPO / "build" / "numba-cache"))
    return subprocess.run([sys.executable, "-m", "hypervisor", "--topology", str(topo_file)],
                          capture_output=True, text=True, timeout=120, env=env)


def test_the_base_is_created_private(xdg: Path) -> None:
    base = rundir.ensure_base()
    assert base == _base(xdg)
    st = os.lstat(base)
    assert stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o700
    assert st.st_uid == os.getuid()
    run = rundir.prepare_run_dir(rundir.default_run_dir("lab"))
    assert stat.S_IMODE(os.lstat(run).st_mode) == 0o700
    assert rundir.read_pid(run) == os.getpid()
    assert rundir.read_generation(run)
    rundir.remove_run_dir(run)


@pytest.mark.parametrize("problem", ["foreign", "group-writable", "world-readable", "symlink",
                                     "file"])
def test_an_unsafe_base_is_refused_in_one_line(xdg: Path, problem: str) -> None:
    base = _base(xdg)
    if problem == "symlink":
        real = xdg / "elsewhere"
        real.mkdir(mode=0o700)
        base.symlink_to(real)
    elif problem == "file":
        base.write_text("not a directory")
    else:
        base.mkdir(mode=0o700)
        if problem == "foreign":
            os.chown(base, OTHER_UID, OTHER_UID)
        elif problem == "group-writable":
            os.chmod(base, 0o770)
        else:
            os.chmod(base, 0o755)
    before = sorted(os.listdir(xdg))
    want = {"foreign": f"belongs to uid {OTHER_UID}", "group-writable": "mode 0770",
            "world-readable": "mode 0755", "symlink": "is a symbolic link",
            "file": "not a directory"}[problem]
    with pytest.raises(rundir.RunDirError, match=want) as e:
        rundir.prepare_run_dir(rundir.default_run_dir("lab"))
    assert str(base) in str(e.value) and "\n" not in str(e.value)
    # The CLI: one line naming the path and the problem; nothing launched or created.
    res = CliRunner().invoke(cli, ["up", "two-vms-small", "--detach", "--boot-timeout", "5s"])
    err = _one_line_error(res)
    assert str(base) in err and want in err
    assert sorted(os.listdir(xdg)) == before
    if base.is_dir() and not base.is_symlink():
        assert os.listdir(base) == []
    # Looking for a host there is refused the same way.
    res = CliRunner().invoke(cli, ["list"])
    err = _one_line_error(res)
    assert str(base) in err


def test_a_planted_output_symlink_is_never_followed(xdg: Path) -> None:
    """`up --detach` used to open <host>.hypervisor.out for writing through a link planted
    there, truncating the link's target."""
    base = _base(xdg)
    base.mkdir(mode=0o700)
    victim = xdg / "victim.txt"
    victim.write_text("precious\n")
    os.chmod(victim, 0o644)
    link = base / "small.hypervisor.out"
    link.symlink_to(victim)
    res = CliRunner().invoke(cli, ["up", "two-vms-small", "--detach", "--boot-timeout", "5s"])
    assert victim.read_text() == "precious\n"  # the old code truncated it
    err = _one_line_error(res)
    assert str(link) in err and "symbolic link" in err
    assert link.is_symlink()
    assert not (base / "small").exists()  # no host started
    # Removing an output never removes a link's target either.
    rundir.remove_output(link)
    assert victim.read_text() == "precious\n"


def test_open_new_refuses_links_and_existing_files(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("x")
    (tmp_path / "link").symlink_to(victim)
    with pytest.raises(FileExistsError):
        rundir.open_new(tmp_path / "link")
    with pytest.raises(FileExistsError):
        rundir.open_new(victim)
    with pytest.raises(OSError):
        rundir.open_log(tmp_path / "link")  # O_NOFOLLOW: ELOOP
    assert victim.read_text() == "x"
    fd = rundir.open_new(tmp_path / "fresh")
    os.close(fd)
    assert stat.S_IMODE(os.stat(tmp_path / "fresh").st_mode) == 0o600


def test_a_symlinked_run_dir_is_refused_without_a_traceback(xdg: Path, tmp_path: Path) -> None:
    """A pre-created symbolic link as the run dir used to end in a traceback."""
    base = _base(xdg)
    base.mkdir(mode=0o700)
    target = tmp_path / "target"
    target.mkdir()
    (target / "keep").write_text("keep")
    (base / "lab").symlink_to(target)
    topo = tmp_path / "t.toml"
    topo.write_text('[host]\nname = "lab"\nmemory = "16MiB"\n\n[[vm]]\nname = "a"\n'
                    'memory = "8MiB"\n')
    r = _hypervisor(topo, xdg)
    assert r.returncode == 4, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert "is a symbolic link" in lines[0] and str(base / "lab") in lines[0]
    assert sorted(os.listdir(target)) == ["keep"]


def test_a_foreign_run_dir_is_refused(xdg: Path, tmp_path: Path) -> None:
    base = rundir.ensure_base()
    d = base / "lab"
    d.mkdir(mode=0o700)
    (d / "theirs").write_text("theirs")
    os.chown(d, OTHER_UID, OTHER_UID)
    with pytest.raises(rundir.RunDirError, match=f"belongs to uid {OTHER_UID}"):
        rundir.prepare_run_dir(d)
    assert (d / "theirs").read_text() == "theirs"


@pytest.mark.parametrize("name", ["", ".", "..", "a/b"])
def test_bad_host_names_are_one_line_errors(xdg: Path, name: str) -> None:
    res = CliRunner().invoke(cli, ["list", "--host", name])
    err = _one_line_error(res)
    assert "invalid host name" in err or "no running host" in err


# ---------------------------------------------------------------- files of one generation


def test_a_process_removes_only_files_it_created_in_its_generation(tmp_path: Path,
                                                                   monkeypatch) -> None:
    from protocol import lifeline

    (tmp_path / "generation").write_text("old\n")
    monkeypatch.setenv(lifeline.ENV_GENERATION, "old")
    mine = tmp_path / "b.kernel.sock"
    mine.write_text("old instance")
    owned = lifeline.OwnedFile(str(mine))
    # A new instance took the run dir over: new generation, a new file at the same path.
    (tmp_path / "generation").write_text("new\n")
    assert not owned.unlink() and mine.exists()
    # Same generation, but the path now names another file (removed and re-created).
    (tmp_path / "generation").write_text("old\n")
    other = tmp_path / "other"
    other.write_text("someone else's")  # (made while ours exists: another inode)
    os.replace(other, mine)
    assert not owned.unlink() and mine.read_text() == "someone else's"
    # Still ours: removed.
    owned = lifeline.OwnedFile(str(mine))
    assert owned.unlink() and not mine.exists()


# ---------------------------------------------------------------- start-up failures


def _fsize_limit(nbytes: int):  # type: ignore[no-untyped-def]
    import resource

    def set_limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, nbytes))
    return set_limit


def test_a_file_size_limit_is_a_one_line_error(xdg: Path, tmp_path: Path) -> None:
    """`up` under a small `ulimit -f`: the host swap file cannot be sized (EFBIG; Python
    ignores SIGXFSZ); before, a traceback."""
    env = dict(os.environ, XDG_RUNTIME_DIR=str(xdg),
               NUMBA_CACHE_DIR=str(REPO / "build" / "numba-cache"))
    cli_bin = Path(sys.executable).parent / "balloonlab"
    r = subprocess.run([str(cli_bin), "up", "two-vms-small", "--detach", "--boot-timeout", "60s"],
                       capture_output=True, text=True, timeout=120, env=env,
                       preexec_fn=_fsize_limit(1 << 20))
    assert r.returncode == 1, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert lines[0].startswith("balloonlab: error: the hypervisor exited with status 1")
    assert "File too large" in lines[0] and "EFBIG" in lines[0], lines[0]
    assert not (_base(xdg) / "small").exists()  # its run dir went with it



def test_create_disk_is_fresh_sized_private_and_never_follows_a_link(tmp_path: Path) -> None:
    from protocol import syscalls

    run_dir = tmp_path / "run"
    run_dir.mkdir(mode=0o700)
    p = rundir.create_disk(run_dir, "vm", 1 << 20)
    assert p == run_dir / "vm.disk" and p.stat().st_size == 1 << 20
    assert stat.S_IMODE(p.stat().st_mode) == 0o600
    p.write_bytes(b"old data")  # a previous boot's disk: replaced by a blank one
    rundir.create_disk(run_dir, "vm", 8192)
    assert p.read_bytes() == bytes(8192)
    # a planted link is refused, its target untouched
    p.unlink()
    target = tmp_path / "victim"
    target.write_bytes(b"keep")
    os.symlink(target, p)
    with pytest.raises(rundir.RunDirError, match="symbolic link"):
        rundir.create_disk(run_dir, "vm", 8192)
    assert target.read_bytes() == b"keep"
    p.unlink()
    # a failed sizing leaves no half-made disk
    syscalls.install("disk.truncate@1=ENOSPC")
    try:
        with pytest.raises(OSError, match=r"injected at disk\.truncate"):
            rundir.create_disk(run_dir, "vm", 8192)
    finally:
        syscalls.clear()
    assert not os.path.lexists(p)
