"""Compact, sharded, append-only, resumable on-disk store of a teacher's top-k next-token distributions.

One *record* per example holds, for each of its ``n`` trained tokens, the teacher's ``k`` most likely next-token
ids and their log-probabilities. Nothing here uses pickle: the store is JSON + raw bytes, read back with numpy. The bytes of one record are
:class:`~kdistill.teachers.topk_codec.TopKCodec`'s (packed ids and quantised log-probabilities).

Layout of a cache folder ``root``::

    root/manifest.json              {"format": "kdistill-topk-cache", "version": 1, "meta": {...},
                                     "codec": {...}, "complete": false, "num_examples": null, "stats": {},
                                     ["shards": ["shard-00000.bin", ...]]   (added by close())}
    root/shard-00000.bin            records of examples, concatenated, no header, no padding between them
    root/shard-00000.index.jsonl    one line per record in that shard:
                                    {"i": example_index, "hash": str, "offset": int, "tokens": int}
    root/shard-00001.bin ...        a new shard starts when appending a record would make the current .bin
                                    exceed ``shard_bytes``; a record never spans two shards

``manifest.json`` is always replaced atomically (temporary file + ``os.replace``). Examples are stored in order
0, 1, 2, ... with no gaps and no duplicates, so example ``i`` is line ``i`` of the concatenated index files.

Resume rule (:class:`~kdistill.teachers.topk_writer.TopKStoreWriter`): opening a writer on a folder that already has a manifest with the same
format, version, ``meta`` and codec continues where the last run stopped. Every index line of every shard is
read in order; an incomplete or unparseable LAST line of the last shard (a killed run may leave one) is
dropped, as is any trailing index entry whose bytes are not fully on disk; the last shard's ``.bin`` is then
truncated to the end of its last indexed record (dropping a partial trailing record) and appending continues at
``next_index``. A record's bytes are written and flushed before its index line, so an index line never points
at missing bytes. A different ``meta`` or codec is refused with a ValueError naming the first differing key; a
manifest marked complete opens a writer with ``complete = True`` that refuses to append.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np

from kdistill.paths import write_json_atomic
from kdistill.teachers.topk_codec import TopKCodec

__all__ = ["FORMAT", "MANIFEST_NAME", "TopKStore", "VERSION", "first_difference", "json_roundtrip", "list_shards",
           "read_index", "read_manifest", "shard_stem", "write_json_atomic"]

FORMAT = "kdistill-topk-cache"
VERSION = 1

MANIFEST_NAME = "manifest.json"
_SHARD_RE = re.compile(r"^shard-(\d{5,})\.bin$")
FSYNC_EVERY = 64 * 2**20  # bytes written between fsyncs
_MISSING = "<missing>"


# ====================================================================== shared helpers
def shard_stem(shard: int) -> str:
    return f"shard-{shard:05d}"


def read_manifest(root: Path) -> dict[str, Any]:
    path = root / MANIFEST_NAME
    if not path.is_file():
        raise ValueError(f"{root}: not a kdistill top-k cache (no {MANIFEST_NAME})")
    try:
        with open(path, encoding="utf-8") as f:
            man = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: unreadable manifest ({e})") from None
    if not isinstance(man, dict) or man.get("format") != FORMAT:
        fmt = man.get("format") if isinstance(man, dict) else None
        raise ValueError(f"{root}: not a kdistill top-k cache (manifest format {fmt!r}, expected {FORMAT!r})")
    if man.get("version") != VERSION:
        raise ValueError(
            f"{root}: top-k cache version {man.get('version')!r} is not supported (this code reads {VERSION})"
        )
    return man


def list_shards(root: Path) -> list[int]:
    """Shard numbers of the ``shard-NNNNN.bin`` files in ``root``, checked to be 0..m-1."""
    nums = sorted(int(m.group(1)) for p in root.iterdir() if (m := _SHARD_RE.match(p.name)))
    if nums != list(range(len(nums))):
        raise ValueError(f"{root}: shard files are not numbered 0..{len(nums) - 1} without gaps: {nums}")
    return nums


def json_roundtrip(x: Any) -> Any:
    return json.loads(json.dumps(x))


def first_difference(old: dict[str, Any], new: dict[str, Any]) -> tuple[str, Any, Any] | None:
    for key in list(new) + [k for k in old if k not in new]:
        a = old.get(key, _MISSING)
        b = new.get(key, _MISSING)
        if a != b:
            return key, a, b
    return None


class IndexEntries:
    """Parsed index lines: per entry shard id, offset, tokens and hash, plus per-shard valid byte lengths."""

    def __init__(self) -> None:
        self.shard: list[int] = []
        self.offset: list[int] = []
        self.tokens: list[int] = []
        self.hashes: list[str] = []
        self.index_nbytes: dict[int, int] = {}  # shard -> bytes of the index file that hold valid lines


def read_index(
    root: Path, shards: list[int], codec: TopKCodec, tolerate_torn_tail: bool
) -> IndexEntries:
    """Read every index line of every shard in order and validate it.

    With ``tolerate_torn_tail`` (writer resume, reader of an incomplete cache) a missing-newline / unparseable
    last line of the last shard is dropped, and trailing entries of the last shard whose bytes are not fully in
    its .bin are dropped too. Any other bad line raises ValueError naming ``file:line``.
    """
    out = IndexEntries()
    for s in shards:
        is_last = s == shards[-1]
        path = root / f"{shard_stem(s)}.index.jsonl"
        data = path.read_bytes() if path.exists() else b""
        pos = 0
        lineno = 0
        shard_start = len(out.shard)
        ends: list[int] = []  # byte position after each kept line of this shard
        while pos < len(data):
            lineno += 1
            nl = data.find(b"\n", pos)
            line_end = len(data) if nl < 0 else nl
            raw = data[pos:line_end]
            try:
                if nl < 0:
                    raise ValueError("line has no terminating newline")
                rec = json.loads(raw.decode("utf-8"))
                i, h, off, tok = rec["i"], rec["hash"], rec["offset"], rec["tokens"]
                if not (isinstance(i, int) and isinstance(off, int) and isinstance(tok, int) and isinstance(h, str)):
                    raise ValueError("bad field types")
            except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
                torn_tail = is_last and tolerate_torn_tail and (nl < 0 or nl == len(data) - 1)
                if torn_tail:
                    break
                raise ValueError(f"{path}:{lineno}: bad index line ({e})") from None
            expected = len(out.shard)
            if i != expected:
                raise ValueError(f"{path}:{lineno}: expected example index {expected}, found {i}")
            if off < 0 or tok < 0:
                raise ValueError(f"{path}:{lineno}: negative offset or token count")
            out.shard.append(s)
            out.offset.append(off)
            out.tokens.append(tok)
            out.hashes.append(h)
            pos = line_end + 1
            ends.append(pos)
        # records must be laid out back to back from offset 0
        bin_path = root / f"{shard_stem(s)}.bin"
        bin_size = bin_path.stat().st_size if bin_path.exists() else 0
        expect_off = 0
        for j in range(shard_start, len(out.shard)):
            if out.offset[j] != expect_off:
                raise ValueError(
                    f"{path}:{j - shard_start + 1}: record offset {out.offset[j]}, expected {expect_off}"
                )
            expect_off += codec.record_nbytes(out.tokens[j])
        # entries whose bytes are not (fully) on disk
        while len(out.shard) > shard_start:
            j = len(out.shard) - 1
            if out.offset[j] + codec.record_nbytes(out.tokens[j]) <= bin_size:
                break
            if not (is_last and tolerate_torn_tail):
                raise ValueError(f"{bin_path}: shorter ({bin_size} bytes) than its index says")
            for lst in (out.shard, out.offset, out.tokens, out.hashes):
                lst.pop()
            ends.pop()
        out.index_nbytes[s] = ends[-1] if ends else 0
    return out


# ====================================================================== reader
class TopKStore:
    """Random-access reader of a top-k cache. Picklable (for DataLoader workers): shard memmaps open lazily."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        man = read_manifest(self.root)
        self.meta: dict[str, Any] = man.get("meta") or {}
        self.codec = TopKCodec.from_dict(man.get("codec") or {})
        self.complete: bool = bool(man.get("complete"))
        self.stats: dict[str, Any] = man.get("stats") or {}
        if self.complete and man.get("shards") is not None:
            names = list(man["shards"])
            shards = []
            for name in names:
                m = _SHARD_RE.match(name)
                if not m:
                    raise ValueError(f"{self.root}: bad shard name {name!r} in manifest")
                shards.append(int(m.group(1)))
            if shards != list(range(len(shards))):
                raise ValueError(f"{self.root}: manifest shards are not numbered 0..{len(shards) - 1}: {names}")
        else:
            shards = list_shards(self.root)
        self._shard_ids = shards
        entries = read_index(self.root, shards, self.codec, tolerate_torn_tail=not self.complete)
        self._shard = np.asarray(entries.shard, dtype=np.int32)  # (N,)
        self._offset = np.asarray(entries.offset, dtype=np.int64)  # (N,)
        self._tokens = np.asarray(entries.tokens, dtype=np.int64)  # (N,)
        self._hashes: list[str] = entries.hashes
        if self.complete and man.get("num_examples") is not None and man["num_examples"] != len(self._hashes):
            raise ValueError(
                f"{self.root}: manifest says {man['num_examples']} examples, index has {len(self._hashes)}"
            )
        self._mmaps: dict[int, np.memmap] = {}

    # ------------------------------------------------------------------ pickling
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_mmaps"] = {}  # memmaps reopen lazily in the receiving process
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    # ------------------------------------------------------------------ access
    def __len__(self) -> int:
        return len(self._hashes)

    def _check(self, i: int) -> int:
        i = int(i)
        if not 0 <= i < len(self._hashes):
            raise IndexError(f"example {i} out of range [0, {len(self._hashes)})")
        return i

    def example_hash(self, i: int) -> str:
        return self._hashes[self._check(i)]

    def num_tokens(self, i: int) -> int:
        return int(self._tokens[self._check(i)])

    def _mmap(self, shard: int) -> np.memmap:
        mm = self._mmaps.get(shard)
        if mm is None:
            mm = np.memmap(self.root / f"{shard_stem(shard)}.bin", dtype=np.uint8, mode="r")
            self._mmaps[shard] = mm
        return mm

    def get(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Decoded record of example ``i``: ids int64 (n, k), logprobs float32 (n, k)."""
        i = self._check(i)
        n = int(self._tokens[i])
        k = self.codec.k
        if n == 0:
            return np.zeros((0, k), dtype=np.int64), np.zeros((0, k), dtype=np.float32)
        off = int(self._offset[i])
        nbytes = self.codec.record_nbytes(n)
        mm = self._mmap(int(self._shard[i]))
        if off + nbytes > mm.size:  # a shard still being written may have grown: remap
            del self._mmaps[int(self._shard[i])]
            mm = self._mmap(int(self._shard[i]))
        return self.codec.decode(np.asarray(mm[off : off + nbytes]), n)

    __getitem__ = get

    def total_tokens(self) -> int:
        return int(self._tokens.sum())

    def total_bytes(self) -> int:
        """Bytes on disk of all shard .bin and index files plus the manifest."""
        total = (self.root / MANIFEST_NAME).stat().st_size
        for s in self._shard_ids:
            for suffix in (".bin", ".index.jsonl"):
                p = self.root / f"{shard_stem(s)}{suffix}"
                if p.exists():
                    total += p.stat().st_size
        return total
