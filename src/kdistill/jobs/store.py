"""The append-only JSON Lines record store every resumable job writes.

A record is one JSON object on one line with at least ``"key"`` (a :func:`content_key` of what determines
it) and ``"status"`` (one of :data:`STATUSES`). A job never rewrites its file: each attempt appends a
record, and the LAST record of a key is what counts (:func:`load_records`). Each record is one
``os.write`` of a full line on an ``O_APPEND`` descriptor, under a lock (threads may write), ``fsync``-ed
every ``fsync_every`` records and at close; a line cut short by a kill is ended with a newline when the file
is opened again, so it stays one unreadable line, which readers count and skip with a warning.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from collections.abc import Iterator, Mapping
from datetime import datetime, timezone
from pathlib import Path

__all__ = ["STATUSES", "RecordWriter", "content_key", "iter_records", "load_records", "now"]

logger = logging.getLogger(__name__)

STATUSES = ("ok", "failed", "unparsable")


def content_key(payload: Mapping) -> str:
    """SHA-256 (hex) of the canonical JSON of ``payload`` (sorted keys, no spaces, non-ASCII kept, values JSON
    cannot hold written with ``str``): equal content, equal key."""
    canonical = json.dumps(payload, sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def now() -> str:
    """The current UTC time as ISO 8601 to the second (the ``time`` of records)."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def iter_records(path: str | os.PathLike, counts: dict | None = None) -> Iterator[dict]:
    """The readable records of a record file, in file order (nothing when the file does not exist); ``counts``
    (if given) receives "lines" (non-empty) and "unreadable" (not JSON, not an object, no string key or an
    unknown status: logged as a warning with its ``file:line``)."""
    path = Path(path)
    counts = {} if counts is None else counts
    counts.update(lines=0, unreadable=0)
    try:
        fh = path.open("rb")
    except FileNotFoundError:
        return
    with fh:
        for number, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            counts["lines"] += 1
            try:
                record = json.loads(line)
            except ValueError:
                record = None
            if not isinstance(record, dict) or not isinstance(record.get("key"), str) \
                    or record.get("status") not in STATUSES:
                counts["unreadable"] += 1
                logger.warning("%s:%d: ignoring an unreadable annotation record (a line cut short when a run "
                               "was killed?)", path, number)
                continue
            yield record


def load_records(path: str | os.PathLike, counts: dict | None = None) -> dict[str, dict]:
    """``{key: last record of that key}`` (ordered by each key's first record); ``{}`` when the file does not
    exist. ``counts`` as in :func:`iter_records`."""
    records: dict[str, dict] = {}
    for record in iter_records(path, counts):
        records[record["key"]] = record
    return records


class RecordWriter:
    """Appends records to ``path`` (created with its folder), one ``os.write`` of a whole line each, under a
    lock; ``fsync`` every ``fsync_every`` records and at :meth:`close`. Also a context manager."""

    def __init__(self, path: str | os.PathLike, fsync_every: int = 1):
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self._lock = threading.Lock()
        self._fsync_every = max(int(fsync_every), 1)
        self._unsynced = 0
        if os.fstat(self._fd).st_size:
            with path.open("rb") as fh:
                fh.seek(-1, os.SEEK_END)
                if fh.read(1) != b"\n":  # a line cut short by a kill: end it, so it stays one bad line
                    os.write(self._fd, b"\n")

    def write(self, record: dict) -> None:
        line = (json.dumps(record, ensure_ascii=False, default=str) + "\n").encode("utf-8")
        with self._lock:
            view = memoryview(line)
            while view:
                view = view[os.write(self._fd, view):]
            self._unsynced += 1
            if self._unsynced >= self._fsync_every:
                os.fsync(self._fd)
                self._unsynced = 0

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.fsync(self._fd)
                os.close(self._fd)
                self._fd = -1

    def __enter__(self) -> RecordWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
