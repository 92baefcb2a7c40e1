"""Output folders: complete or absent, replaced only when hfbridge made them, never a protected folder."""

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from hfbridge import io
from hfbridge.io import MARKER, OutputExistsError, atomic_dir


def _write(path: Path, text: str, overwrite: bool = False) -> None:
    with atomic_dir(path, overwrite=overwrite) as tmp:
        (tmp / "weights.txt").write_text(text)


def test_an_output_carries_the_marker_and_replaces_only_its_own_kind(tmp_path):
    out = tmp_path / "run"
    _write(out, "one")
    assert (out / MARKER).is_file() and json.loads((out / MARKER).read_text())["writer"] == "hfbridge"
    with pytest.raises(OutputExistsError, match="exists and is not empty"):
        _write(out, "two")
    _write(out, "two", overwrite=True)
    assert (out / "weights.txt").read_text() == "two" and not list(tmp_path.glob(".run.*"))


def test_overwrite_refuses_a_folder_hfbridge_did_not_write(tmp_path):
    project = tmp_path / "project"
    project.mkdir()
    (project / "thesis.tex").write_text("years of work")
    with pytest.raises(OutputExistsError, match="was not written by hfbridge"):
        _write(project, "x", overwrite=True)
    assert (project / "thesis.tex").read_text() == "years of work" and not (project / "weights.txt").exists()


@pytest.mark.parametrize("which", ["cwd", "parent", "home", "root"])
def test_overwrite_refuses_protected_folders_even_with_a_marker(tmp_path, monkeypatch, which):
    here = tmp_path / "a" / "b"
    here.mkdir(parents=True)
    monkeypatch.chdir(here)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    target = {"cwd": Path("."), "parent": Path(".."), "home": tmp_path / "home", "root": Path("/")}[which]
    if which != "root":
        (target / MARKER).write_text("{}")
    with pytest.raises(OutputExistsError, match="refusing to replace"):
        io.check_output_dir(target, overwrite=True)


def test_files_are_fsynced_before_the_folder_is_published(tmp_path, monkeypatch):
    synced, published = [], []
    real_fsync, real_rename = os.fsync, os.rename
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(os.readlink(f"/proc/self/fd/{fd}")) or real_fsync(fd))
    monkeypatch.setattr(os, "rename", lambda a, b: published.append(len(synced)) or real_rename(a, b))
    _write(tmp_path / "run", "x")
    names = [Path(p).name for p in synced]
    assert "weights.txt" in names and MARKER in names and published and published[0] >= 3


def test_a_run_killed_while_writing_leaves_the_old_output_and_its_leftovers_are_cleaned(tmp_path):
    out = tmp_path / "run"
    _write(out, "old")
    script = textwrap.dedent(f"""
        import os, signal
        from hfbridge.io import atomic_dir
        with atomic_dir({str(out)!r}, overwrite=True) as tmp:
            (tmp / "weights.txt").write_text("half")
            os.kill(os.getpid(), signal.SIGKILL)
    """)
    run = subprocess.run([sys.executable, "-c", script])
    assert run.returncode == -signal.SIGKILL
    assert (out / "weights.txt").read_text() == "old" and len(list(tmp_path.glob(".run.tmp-*"))) == 1
    _write(out, "new", overwrite=True)  # the next run in the same place removes the dead run's folder
    assert (out / "weights.txt").read_text() == "new" and not list(tmp_path.glob(".run.*"))


def test_a_folder_without_the_marker_is_never_cleaned_up(tmp_path):
    foreign = tmp_path / ".run.tmp-999999999-mine"  # looks like a leftover of a dead writer, but is not hfbridge's
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep")
    io.clean_stale(tmp_path / "run")
    assert (foreign / "notes.txt").exists()


def test_a_live_writers_temporary_folder_is_left_alone(tmp_path):
    live = tmp_path / f".run.tmp-{os.getppid()}-abcd"
    live.mkdir()
    (live / MARKER).write_text("{}")
    io.clean_stale(tmp_path / "run")
    assert live.exists()


def test_a_kill_between_the_two_renames_is_repaired_at_the_next_run(tmp_path, monkeypatch):
    """Where the atomic exchange is unavailable, the old output is moved aside before the new one is renamed in; a
    kill between the two leaves it hidden, and the next run puts it back before anything else."""
    out = tmp_path / "run"
    _write(out, "old")
    monkeypatch.setattr(io, "_exchange", lambda a, b: False)
    real_rename, calls = os.rename, []

    def rename(a, b):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # stands for a kill after the first rename
        return real_rename(a, b)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(KeyboardInterrupt):
        _write(out, "new", overwrite=True)
    monkeypatch.setattr(os, "rename", real_rename)
    assert not out.exists() and list(tmp_path.glob(".run.old-*"))
    io.clean_stale(out)
    assert (out / "weights.txt").read_text() == "old" and not list(tmp_path.glob(".run.old-*"))


def test_the_atomic_exchange_is_used_where_the_system_has_it(tmp_path, monkeypatch):
    seen = []
    real = io._exchange
    monkeypatch.setattr(io, "_exchange", lambda a, b: seen.append(real(a, b)) or seen[-1])
    out = tmp_path / "run"
    _write(out, "old")
    _write(out, "new", overwrite=True)
    assert seen == [True] and (out / "weights.txt").read_text() == "new"


@pytest.mark.parametrize("phase", ["writing", "fsynced", "exchanged"])
def test_a_sigkill_at_each_phase_of_an_output_save_leaves_the_old_or_the_new_output(tmp_path, phase):
    """Killed while writing, after the fsync but before the exchange, or after the exchange but before the old copy
    is removed: the folder holds one complete output, and the next save in the same place cleans up."""
    out = tmp_path / "run"
    _write(out, "old")
    kill = "os.kill(os.getpid(), signal.SIGKILL)"
    patch = {
        "writing": "",
        "fsynced": f"real = io._exchange\nio._exchange = lambda a, b: {kill}",
        "exchanged": f"real = io._exchange\nimport shutil\nreal_rm = shutil.rmtree\n"
                     f"io._exchange = lambda a, b: real(a, b)\nshutil.rmtree = lambda *a, **k: {kill}",
    }[phase]
    lines = ["import os, signal", "from hfbridge import io", patch,
             f"with io.atomic_dir({str(out)!r}, overwrite=True) as tmp:",
             "    (tmp / 'weights.txt').write_text('new')",
             f"    {kill}" if phase == "writing" else "    pass"]
    script = "\n".join(lines) + "\n"
    run = subprocess.run([sys.executable, "-c", script])
    assert run.returncode == -signal.SIGKILL
    expected = "new" if phase == "exchanged" else "old"
    assert (out / "weights.txt").read_text() == expected and (out / MARKER).is_file()
    _write(out, "next", overwrite=True)
    assert (out / "weights.txt").read_text() == "next" and not list(tmp_path.glob(".run.*"))
