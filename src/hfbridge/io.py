"""Output folders that are either complete or absent.

Everything hfbridge writes (models, adapters, metrics) goes to a temporary sibling folder that is renamed into
place only when complete, so an interrupted or failed run never leaves a folder that looks finished.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


class OutputExistsError(FileExistsError):
    """The output folder exists and is not empty."""


def check_output_dir(path: str | Path, overwrite: bool = False, flag: str = "--overwrite") -> Path:
    """Refuse a non-empty existing folder unless ``overwrite``; refuse a path that is a file."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputExistsError(f"output path {path} is a file, not a folder")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise OutputExistsError(f"output folder {path} exists and is not empty; choose another or pass {flag}")
    return path


@contextlib.contextmanager
def atomic_dir(path: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; on success it replaces ``path``, on error it is removed."""
    path = Path(path)
    check_output_dir(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the result is an ordinary folder
    try:
        yield tmp
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
            os.rename(path, old / "x")
            os.rename(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
