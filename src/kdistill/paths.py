"""Output locations checked before any work starts, so a run never fails at its first save."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from kdistill.errors import UserError

__all__ = ["OutputPathError", "check_output_dir", "free_bytes", "write_json_atomic"]


class OutputPathError(UserError, OSError):
    """An output folder that cannot be used (a file, not writable, on a read-only file system)."""


def check_output_dir(path: str | os.PathLike, key: str) -> Path:
    """Check, before any work, that `path` can be (or is) a folder kdistill can write in, without creating it:
    neither it nor an ancestor is a file, and a file can be created in its nearest existing ancestor (a probe that
    is removed at once). `key` names the option or config key that set it, for the error (e.g.
    "training.output_dir")."""
    folder = Path(path).expanduser().absolute()
    existing = folder
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise OutputPathError(f"{key}: {str(path)!r} cannot be a folder: {str(existing)!r} is a file")
    try:
        with tempfile.NamedTemporaryFile(dir=existing, prefix=".kdistill-write-check-"):
            pass
    except OSError as exc:
        raise OutputPathError(f"{key}: {str(path)!r} is not writable: cannot create a file in {str(existing)!r} "
                              f"({exc.strerror or exc})") from None
    return folder


def free_bytes(path: str | os.PathLike) -> int:
    """Free bytes on the file system that holds `path` (its nearest existing ancestor)."""
    folder = Path(path).expanduser().absolute()
    while not folder.exists():
        folder = folder.parent
    return shutil.disk_usage(folder).free


def write_json_atomic(path: str | os.PathLike, obj: Any, default=None) -> None:
    """Write `obj` as indented JSON to `path` (its folder created) through a temporary file renamed over it, so a
    reader never sees half a file. `default`: as in `json.dump` (e.g. `str` for paths and numpy numbers)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, default=default)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
