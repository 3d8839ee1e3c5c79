"""Writing files so that a crash leaves the old file or the new one, never half of either.

Every write goes to a temporary file in the same folder, is fsynced, then renamed over the target (a folder: a
temporary folder renamed into place). ``crash_point`` names the moments between those steps, so tests can kill a
writer there ($MEMEDIT_CRASH_AT) and check what the next reader sees.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

from ..errors import MemeditError

CRASH_ENV = "MEMEDIT_CRASH_AT"


def crash_point(name: str) -> None:
    """Die like kill -9 at the named write point when $MEMEDIT_CRASH_AT says so (tests of recovery)."""
    if os.environ.get(CRASH_ENV) == name:
        os._exit(137)


@contextlib.contextmanager
def atomic_path(path: str | Path, crash: str = "") -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success fsync it and rename it over ``path``.

    On any exception the temporary file is removed and ``path`` is left as it was. ``crash`` names the write point
    for $MEMEDIT_CRASH_AT (:func:`crash_point`: "{crash}-tmp" before the rename, "{crash}-renamed" after it).
    """
    path = Path(path)
    refuse_special(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise MemeditError(f"cannot write {path}: {e.strerror or e}") from None
    os.close(fd)
    tmp_path = Path(tmp)
    os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600; a saved file gets the usual permissions
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o666 & ~_umask())  # again: some writers (safetensors) replace the file with 0600
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        if crash:
            crash_point(f"{crash}-tmp")
        os.replace(tmp_path, path)
        _fsync_dir(path.parent)
    except OSError as e:
        tmp_path.unlink(missing_ok=True)
        raise MemeditError(f"cannot write {path}: {e.strerror or e}") from None
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise
    if crash:
        crash_point(f"{crash}-renamed")


def refuse_special(path: Path) -> None:
    """Refuse an output path that exists and is not a regular file (a device, a pipe, a socket, a folder): a rename
    would replace the node itself (/dev/null with a regular file)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return
    except OSError as e:
        raise MemeditError(f"cannot write {path}: {e.strerror or e}") from None
    if not stat.S_ISREG(st.st_mode):
        kind = "a folder" if stat.S_ISDIR(st.st_mode) else "not a regular file (a device, pipe or socket)"
        raise MemeditError(f"{path} is {kind}; give a regular file or a new path")


@contextlib.contextmanager
def atomic_dir(dst: str | Path) -> Iterator[Path]:
    """Yield a temporary folder beside ``dst`` (which must not exist or be empty); on success it becomes ``dst``."""
    dst = Path(dst).expanduser()
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise MemeditError(f"{dst} already exists and is not empty; choose a new folder")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", suffix=".tmp", dir=dst.parent))
    try:
        yield tmp
        _publish_dir(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _publish_dir(tmp: Path, dst: Path) -> None:
    """fsync every file in ``tmp``, give it the usual permissions, and rename it to ``dst`` (replacing it)."""
    mask = _umask()
    os.chmod(tmp, 0o777 & ~mask)  # mkdtemp makes 0700
    for f in tmp.rglob("*"):
        os.chmod(f, (0o777 if f.is_dir() else 0o666) & ~mask)
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(dst, old)
        os.replace(tmp, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, dst)
    _fsync_dir(dst.parent)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(d: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(d, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())
