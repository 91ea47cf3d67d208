"""Small file helpers shared by the modules that write user-visible files."""

from __future__ import annotations

import os
import tempfile

import numpy as np


def write_atomic(path, data) -> str:
    """Writes `data` to `path` through a temporary file in the same folder and a rename.

    A failure (full disk, interrupt, power loss) never leaves a half-written file where a
    good one was: the old file stays until the new one is complete, and the new one and the
    rename are flushed to disk (`fsync` of the file, then of its folder) before returning. The file
    gets the mode of the file it replaces, or 0o644 (a temporary file is
    created 0o600, which would hide a summary from the rest of a team).

    Args:
        path: the file to write; its folder must exist.
        data: `bytes`, or `str` (written as UTF-8).

    Returns:
        `path`, as a string.
    """
    path = os.fspath(path)
    if isinstance(data, str):
        data = data.encode("utf-8")
    folder = os.path.dirname(os.path.abspath(path))
    suffix = os.path.splitext(path)[1]
    fd, tmp = tempfile.mkstemp(prefix=".colopt-", suffix=suffix, dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())  # the bytes are on disk before the name points at them
        os.chmod(tmp, os.stat(path).st_mode & 0o7777 if os.path.exists(path) else 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    fsync_folder(folder)  # and the rename itself survives a power loss
    return path


def fsync_folder(folder) -> None:
    """Flushes a folder's entries (a rename into it) to disk, where the system allows it."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return  # e.g. Windows: folders cannot be opened
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems refuse fsync on a folder
    finally:
        os.close(fd)


def json_default(v):
    """`json.dumps(..., default=json_default)`: numpy scalars as Python numbers."""
    if isinstance(v, np.integer):
        return int(v)
    if isinstance(v, np.floating):
        return float(v)
    raise TypeError(f"not JSON serializable: {type(v).__name__}")


def check_writable(folder, what: str) -> None:
    """Raises PermissionError unless a file can really be created in `folder`.

    `os.access` is not enough: it says yes to root on a read-only mount or a
    pseudo file system. A temporary file is created and removed instead.
    """
    try:
        fd, probe = tempfile.mkstemp(prefix=".colopt-probe-", dir=folder)
    except OSError as e:
        raise PermissionError(f"Cannot write {what}: nothing can be created in {folder!r} "
                              f"({e.strerror or e}). Pick a folder you can write to.") from None
    os.close(fd)
    os.unlink(probe)


def make_writable_folder(folder, arg: str, what: str) -> str:
    """Creates `folder` (and its parents) and checks a file can be created in it.

    Args:
        folder: the folder path.
        arg: the argument that named it, for the message (e.g. "`log_dir`").
        what: what will be written there, for the message.

    Returns:
        `folder`, as a string.
    """
    folder = os.fspath(folder)
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise PermissionError(f"{arg} {folder!r} cannot be created ({e.strerror or e}). "
                              "Pick a folder you can write to.") from None
    check_writable(folder, what)
    return folder
