"""Reading rows: the one JSON / JSON Lines / hub reader, with every row located as ``file:line``.

A local file is JSON Lines (one value per line; blank lines skipped), a JSON array (over any number of
lines), or one JSON object (possibly pretty-printed over several lines). Every row comes with its location:
``"<file>:<line>"`` with ``<line>`` the 1-based line on which the row starts (also inside a multi-line
array). Problems are reported in the same shape, ``"<file>:<line>: malformed JSON: <reason>"``, so the
user can jump to the place. A source that is not a local file is a Hugging Face ``datasets`` hub id or a
local dataset folder (:func:`load_hub_dataset`); its rows are located as ``"<hub_id>[<split>]:row <N>"``
(``N`` 0-based, so ``dataset[N]`` is the row).

:func:`read_json_rows` returns the rows of a file and the parse problems (callers that validate rows merge
both into one report); :func:`read_rows` reads a file or a hub dataset and raises one
:class:`DataValidationError` listing every problem; :func:`iter_json_lines` reads JSON Lines lazily, for
callers that stop early; :func:`read_json` reads one whole JSON document.
"""

from __future__ import annotations

import bisect
import json
import os
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from kdistill.errors import HubUnavailableError, MissingFileError, UserError
from kdistill.hub import offline_reason

__all__ = [
    "DataValidationError",
    "by_line",
    "iter_json_lines",
    "load_hub_dataset",
    "looks_local",
    "malformed_json",
    "read_json",
    "read_json_rows",
    "read_rows",
]

_MAX_LISTED = 50
_JSON_WS = " \t\n\r"
# "name" or "namespace/name" as the hub spells repository ids.
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9][A-Za-z0-9_.-]*)?$")


class DataValidationError(UserError, ValueError):
    """Raised with every problem found in a data source.

    ``errors`` holds all problems as ``"file:line: reason"`` strings; ``str()`` lists the first 50, one
    per line, followed by ``"and N more"`` when there are more.
    """

    def __init__(self, errors: Iterable[str]):
        self.errors: list[str] = list(errors)
        shown = self.errors[:_MAX_LISTED]
        lines = list(shown)
        if len(self.errors) > len(shown):
            lines.append(f"and {len(self.errors) - len(shown)} more")
        super().__init__("\n".join(lines))

    def __reduce__(self):  # keep `errors` intact through pickling (e.g. across worker processes)
        return (type(self), (self.errors,))


def by_line(messages: list[str]) -> list[str]:
    """Order "file:line: reason" messages by line number (stable for messages without one)."""

    def key(msg: str) -> int:
        m = re.match(r"^.*?:(\d+): ", msg)
        return int(m.group(1)) if m else 0

    return sorted(messages, key=key)


def malformed_json(location: str, exc: json.JSONDecodeError) -> str:
    """The report of a JSON Lines line that does not parse: ``"<location>: malformed JSON: <msg> (column C)"``."""
    return f"{location}: malformed JSON: {exc.msg} (column {exc.colno})"


def iter_json_lines(lines: Iterable[str], where: str) -> Iterator[tuple[str, Any, json.JSONDecodeError | None]]:
    """``(location, value, None)`` per non-blank line of JSON Lines, ``(location, None, error)`` for a line that
    does not parse; ``lines`` is any iterable of lines (an open text file, or ``text.split("\\n")``), ``where``
    the file name put into locations (``"where:line"``, 1-based)."""
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            yield f"{where}:{number}", json.loads(line), None
        except json.JSONDecodeError as exc:
            yield f"{where}:{number}", None, exc


class _Lines:
    """Char offset -> 1-based line number."""

    def __init__(self, text: str):
        self._starts = [0] + [m.end() for m in re.finditer("\n", text)]

    def __call__(self, offset: int) -> int:
        return bisect.bisect_right(self._starts, offset)


def _skip_ws(text: str, i: int) -> int:
    n = len(text)
    while i < n and text[i] in _JSON_WS:
        i += 1
    return i


def _parse_array(text: str, start: int, where: str, line_of: _Lines) -> tuple[list, list[str]]:
    """Parse a top-level JSON array, returning ``[(location, element)]`` and fatal parse errors."""
    decoder = json.JSONDecoder()
    rows: list[tuple[str, Any]] = []
    n = len(text)
    i = _skip_ws(text, start + 1)
    if i < n and text[i] == "]":
        i += 1
    else:
        while True:
            if i >= n:
                return rows, [f"{where}:{line_of(n)}: malformed JSON: unterminated array (missing ']'); "
                              f"file truncated?"]
            try:
                obj, end = decoder.raw_decode(text, i)
            except json.JSONDecodeError as exc:
                return rows, [f"{where}:{line_of(i)}: malformed JSON: {exc.msg} (line {exc.lineno}, "
                              f"column {exc.colno}); the rest of the array was not checked"]
            rows.append((f"{where}:{line_of(i)}", obj))
            i = _skip_ws(text, end)
            if i < n and text[i] == ",":
                i = _skip_ws(text, i + 1)
                if i < n and text[i] == "]":
                    return rows, [f"{where}:{line_of(i)}: malformed JSON: trailing comma before ']'"]
                continue
            if i < n and text[i] == "]":
                i += 1
                break
            if i >= n:
                continue  # reported as unterminated on the next turn
            return rows, [f"{where}:{line_of(i)}: malformed JSON: expected ',' or ']' after an array "
                          f"element; the rest of the array was not checked"]
    i = _skip_ws(text, i)
    if i < n:
        return rows, [f"{where}:{line_of(i)}: malformed JSON: extra data after the top-level array"]
    return rows, []


def _parse_json_lines(text: str, where: str) -> tuple[list, list[str]]:
    rows: list[tuple[str, Any]] = []
    errors: list[str] = []
    # Split on "\n" only: str.splitlines() would also split on U+2028 etc., which may sit inside strings.
    for location, value, error in iter_json_lines(text.split("\n"), where):
        if error is None:
            rows.append((location, value))
        else:
            errors.append(malformed_json(location, error))
    return rows, errors


def _first_line_is_a_row(text: str, first: int) -> bool:
    """True for JSON Lines whose first row is an array: the first line parses on its own and more follows."""
    end = text.find("\n", first)
    if end < 0 or not text[end:].strip():
        return False
    try:
        json.loads(text[first:end])
    except json.JSONDecodeError:
        return False
    return True


def _decode(path: Path) -> tuple[str | None, str | None]:
    """``(text, None)`` of a UTF-8 file (a BOM is dropped), or ``(None, problem)`` naming the line."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig"), None
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        return None, f"{path}:{line}: malformed JSON: file is not valid UTF-8 ({exc.reason} at byte {exc.start})"


def read_json_rows(path: str | os.PathLike) -> tuple[list[tuple[str, Any]], list[str]]:
    """``([(location, row)], problems)`` of a local JSON / JSON Lines file (see the module docstring); rows
    are any JSON values (callers check their shape)."""
    path = Path(path)
    where = str(path)
    text, problem = _decode(path)
    if text is None:
        return [], [problem]
    first = _skip_ws(text, 0)
    if first >= len(text):
        return [], [f"{where}:1: file contains no rows (it is empty)"]
    line_of = _Lines(text)
    if text[first] == "[" and not _first_line_is_a_row(text, first):
        rows, errors = _parse_array(text, first, where, line_of)
    else:
        rows, errors = _parse_json_lines(text, where)
        if errors:
            # A single pretty-printed object spanning several lines.
            try:
                whole = json.loads(text)
            except json.JSONDecodeError:
                whole = None
            if isinstance(whole, dict):
                rows, errors = [(f"{where}:{line_of(first)}", whole)], []
    if not rows and not errors:
        errors = [f"{where}:{line_of(first)}: file contains no rows (empty JSON array)"]
    return rows, errors


def read_json(path: str | os.PathLike) -> Any:
    """The one JSON document in ``path``; a :class:`DataValidationError` ``"file:line: malformed JSON: ..."``
    when it does not parse."""
    path = Path(path)
    text, problem = _decode(path)
    if text is None:
        raise DataValidationError([problem])
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataValidationError([f"{path}:{exc.lineno}: malformed JSON: {exc.msg} (column {exc.colno})"]) from None


def looks_local(source: str) -> bool:
    """True when ``source`` is shaped like a local path (a .json/.jsonl name, or a path that is no hub id)."""
    if source.lower().endswith((".json", ".jsonl")):
        return True
    if source.startswith(("/", "./", "../", "~", ".\\", "..\\")) or "\\" in source:
        return True
    if os.sep in source or (os.altsep and os.altsep in source):
        # "namespace/name" is the shape of a hub id; anything else with a separator is a path.
        return not _HUB_ID.match(source)
    return False


def load_hub_dataset(source: str, split: str, option: str | None = None, subset: str | None = None):
    """``datasets.load_dataset(source, [subset,] split=split)`` (a hub id or a local dataset folder), with the
    failures a user can fix as one :class:`~kdistill.errors.HubUnavailableError` that names ``option``, the flag
    or config key that takes a local .jsonl/.json file instead."""
    import datasets

    offline = None if Path(source).is_dir() else offline_reason()
    try:
        if subset:
            return datasets.load_dataset(source, subset, split=split)
        return datasets.load_dataset(source, split=split)
    except Exception as exc:  # offline, unreachable, unknown id or split: datasets raises many types
        reason = " ".join(str(exc).split())
        if len(reason) > 300:
            reason = reason[:300] + "..."
        if offline:
            reason = f"{offline}; {reason}"
        hint = f"give {option} a" if option else "pass a local"
        raise HubUnavailableError(f"{source!r} is not a local file and datasets.load_dataset(..., split={split!r}) "
                                  f"failed ({type(exc).__name__}: {reason}); to use local data instead, {hint} "
                                  f".jsonl/.json file") from exc


def read_rows(source: str | os.PathLike, split: str = "train", limit: int | None = None,
              option: str | None = None) -> list[tuple[str, dict]]:
    """``[(location, row)]`` from a local ``.jsonl`` / ``.json`` file or, when ``source`` is not a file, a hub
    dataset id or local dataset folder (:func:`load_hub_dataset` with ``split``; ``option`` names the flag).

    Every row must be a JSON object: unreadable lines and other values raise one :class:`DataValidationError`
    listing all of them; so does a source without rows. ``limit``: the first N rows only.
    """
    source = os.fspath(source)
    path = Path(source).expanduser()
    if path.is_file():
        rows, errors = read_json_rows(path)
        errors += [f"{loc}: row is not a JSON object" for loc, row in rows if not isinstance(row, dict)]
        if errors:
            raise DataValidationError(by_line(errors))
    elif path.is_dir() or not looks_local(source):
        dataset = load_hub_dataset(source, split, option)
        rows = [(f"{source}[{split}]:row {i}", dict(r)) for i, r in enumerate(dataset)]
        if not rows:
            raise DataValidationError([f"{source}[{split}]: dataset contains no rows"])
    else:
        raise MissingFileError(f"data file not found: {source!r} (resolved to {str(path.resolve())!r}); "
                               f"it looks like a local path, so it was not looked up on the Hugging Face hub")
    return rows[:limit] if limit is not None else rows
