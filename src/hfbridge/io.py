"""Output folders that are either complete or absent, and that hfbridge deletes only when it made them.

Everything hfbridge writes (runs, models, adapters) goes to a temporary sibling folder (``.NAME.tmp-*``), whose
files and folder are fsynced and which then replaces ``NAME`` in one atomic exchange (``renameat2`` with
``RENAME_EXCHANGE`` on Linux; elsewhere two renames, with the old copy restored at the next run if a kill fell
between them). So an interrupted or failed run leaves either the old complete output or the new one.

Every such folder carries a marker file, :data:`MARKER`. ``overwrite`` replaces only a folder with that marker, or
an empty one; it never touches ``/``, the home folder, the current folder or any folder above it. Temporary
folders left by a killed run (their writer process gone) are removed at the next run in the same place.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

MARKER = ".hfbridge-output"
_TMP, _OLD = ".tmp-", ".old-"


class OutputExistsError(FileExistsError):
    """The output folder exists and is not empty (or is not hfbridge's to replace)."""


def _protected(path: Path) -> str | None:
    """Why ``path`` may never be replaced, or ``None``."""
    resolved = path.resolve()
    cwd = Path.cwd().resolve()
    if resolved == Path(resolved.anchor):
        return "it is the file system's root"
    if resolved == Path.home().resolve():
        return "it is the home folder"
    if resolved == cwd or resolved in cwd.parents:
        return "it is the current folder or one above it"
    return None


def is_hfbridge_output(path: str | Path) -> bool:
    """Whether ``path`` is a folder hfbridge wrote (it holds the :data:`MARKER`)."""
    return (Path(path) / MARKER).is_file()


def check_output_dir(path: str | Path, overwrite: bool = False, flag: str = "--overwrite") -> Path:
    """Refuse a path that is a file, a non-empty folder unless ``overwrite``, and, even with ``overwrite``, a
    folder hfbridge did not write or one it must never replace (root, home, the current folder and above)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputExistsError(f"output path {path} is a file, not a folder")
    if not path.is_dir() or not any(path.iterdir()):
        return path
    if not overwrite:
        raise OutputExistsError(f"output folder {path} exists and is not empty; choose another or pass {flag}")
    reason = _protected(path)
    if reason:
        raise OutputExistsError(f"refusing to replace {path}: {reason}")
    if not is_hfbridge_output(path):
        raise OutputExistsError(
            f"refusing to replace {path}: it is not empty and was not written by hfbridge (no {MARKER} file); "
            "remove it yourself or choose another output folder"
        )
    return path


# --------------------------------------------------------------------------------------------------- durability
def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every file below ``root``, then every folder (deepest first), so a rename publishes data on disk."""
    folders = []
    for folder, _, files in os.walk(root):
        folders.append(Path(folder))
        for name in files:
            if not os.path.islink(os.path.join(folder, name)):
                _fsync(Path(folder) / name)
    for folder in reversed(folders):
        _fsync(folder)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two existing paths (Linux ``renameat2(RENAME_EXCHANGE)``); ``False`` where unsupported."""
    libc_name = ctypes.util.find_library("c")
    if not libc_name:
        return False
    libc = ctypes.CDLL(libc_name, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is None:
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    errno = ctypes.get_errno()
    if errno in (22, 38, 95):  # EINVAL, ENOSYS, EOPNOTSUPP: the file system or kernel cannot exchange
        return False
    raise OSError(errno, os.strerror(errno), str(b))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _writer_pid(folder: Path) -> int | None:
    """The process that made a temporary folder: named in the folder's name (``.NAME.tmp-PID-XXXX``), which stays
    the writer's even after an exchange has put the old output inside it."""
    tail = folder.name.rpartition(_TMP)[2]
    pid, sep, _ = tail.partition("-")
    return int(pid) if sep and pid.isdigit() else None


def clean_stale(path: str | Path) -> None:
    """Remove what killed runs left beside ``path``: temporary folders whose writer is gone; and restore the old
    output hidden by a run killed between its two renames (where the atomic exchange is not available)."""
    path = Path(path)
    parent = path.parent
    if not parent.is_dir():
        return
    for leftover in parent.glob(f".{path.name}{_TMP}*"):
        if not leftover.is_dir() or not (is_hfbridge_output(leftover) or not any(leftover.iterdir())):
            continue  # only what hfbridge wrote (its marker, or nothing yet) is ever removed
        pid = _writer_pid(leftover)
        dead = pid is not None and pid != os.getpid() and not _pid_alive(pid)
        if dead or (pid is None and time.time() - leftover.stat().st_mtime > 24 * 3600):
            shutil.rmtree(leftover, ignore_errors=True)
    for hidden in parent.glob(f".{path.name}{_OLD}*"):
        old = hidden / "x"
        if not hidden.is_dir() or not (is_hfbridge_output(old) or not any(hidden.iterdir())):
            continue  # not what hfbridge hid there: left alone
        if not path.exists() and is_hfbridge_output(old):
            os.rename(old, path)
        shutil.rmtree(hidden, ignore_errors=True)


def _write_marker(folder: Path) -> None:
    (folder / MARKER).write_text(json.dumps({"writer": "hfbridge", "time": time.time()}) + "\n")


@contextlib.contextmanager
def atomic_dir(path: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; on success it replaces ``path`` (see the module docstring), on
    error it is removed and ``path`` is as it was."""
    path = Path(path)
    check_output_dir(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}{_TMP}{os.getpid()}-", dir=path.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the result is an ordinary folder
    try:
        _write_marker(tmp)
        yield tmp
        fsync_tree(tmp)
        if path.exists() and not _exchange(tmp, path):
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}{_OLD}", dir=path.parent))
            os.rename(path, old / "x")
            os.rename(tmp, path)
            _fsync(path.parent)
            shutil.rmtree(old, ignore_errors=True)
        elif not path.exists():
            os.rename(tmp, path)
        # after an exchange, ``tmp`` holds the old output and is removed below
        _fsync(path.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


# --------------------------------------------------------------------------------------------------- single files
def check_output_file(path: str | Path, flag: str = "--output") -> Path:
    """Refuse an output file that already exists (or is a folder), or whose folder does not exist: hfbridge
    never replaces a file it cannot tell it wrote."""
    path = Path(path)
    if path.is_dir():
        raise OutputExistsError(f"{flag} {path} is a folder, not a file")
    if path.exists():
        raise OutputExistsError(f"{flag} {path} exists; hfbridge does not replace files: choose another name")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"{flag} {path}: the folder {path.parent} does not exist")
    return path


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write ``text`` to a temporary file beside ``path``, fsync it, and link it into place only if ``path`` still
    does not exist (never replacing a file), so a reader sees the whole file or none."""
    path = Path(check_output_file(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}{_TMP}{os.getpid()}-", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)  # fails if path appeared meanwhile: nothing is replaced
        except FileExistsError:
            raise OutputExistsError(f"{path} appeared while it was being written; it was left as it is") from None
        _fsync(path.parent)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    return path
