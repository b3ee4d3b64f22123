"""`NAME=PATH` command-line specs (`--student`, `--data`, `--answers`) turned into unique names."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

__all__ = ["data_name", "folder_name", "named_paths"]


def folder_name(path: str) -> str:
    """A model folder's name: its last path part (`runs/kd/student/` -> `student`)."""
    return Path(path.rstrip("/")).name or path


def data_name(path: str) -> str:
    """A data file's name: its stem (`data/test.jsonl` -> `test`; a hub id `org/set` -> `set`)."""
    return Path(path.rstrip("/")).stem or path


def named_paths(specs: Iterable[str], default_name: Callable[[str], str]) -> dict[str, str]:
    """`{name: path}` from specs `NAME=PATH` or a bare `PATH` (named `default_name(PATH)`); an existing path that
    holds `=` is taken whole. A repeated name gets `-2`, `-3`, ... appended, in the order given."""
    named: dict[str, str] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path or Path(spec).exists():
            name, path = default_name(spec), spec
        base, i = name, 2
        while name in named:
            name, i = f"{base}-{i}", i + 1
        named[name] = path
    return named
