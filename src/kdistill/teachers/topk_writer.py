"""Writing the top-k store: append records in example order, resume a killed run, close with the manifest.

The layout, the resume rule and the record encoding are described in :mod:`kdistill.teachers.topk_store`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from kdistill.teachers.topk_codec import TopKCodec, to_numpy
from kdistill.teachers.topk_store import (FORMAT, FSYNC_EVERY, MANIFEST_NAME, VERSION, first_difference, json_roundtrip, list_shards, read_index, read_manifest, shard_stem, write_json_atomic)

__all__ = ["TopKStoreWriter"]


# ====================================================================== writer
class TopKStoreWriter:
    """Append-only, resumable writer of a top-k cache (see the module docstring for the format and resume rule).

    Usage::

        with TopKStoreWriter(root, meta, codec) as w:
            for i in range(w.next_index, len(dataset)):
                w.append(i, example_hash, ids, logprobs)   # ids/logprobs (n_tokens, k)
            w.close(stats={...}, num_examples=len(dataset))

    Leaving the ``with`` block without ``close()`` (e.g. on an exception) closes the files but leaves the cache
    incomplete, so the next run resumes it.
    """

    def __init__(
        self, root: str | Path, meta: dict[str, Any], codec: TopKCodec, shard_bytes: int = 256 * 2**20
    ) -> None:
        if shard_bytes <= 0:
            raise ValueError(f"shard_bytes must be positive, got {shard_bytes}")
        self.root = Path(root)
        self.codec = codec
        self.shard_bytes = int(shard_bytes)
        self.meta: dict[str, Any] = json_roundtrip(meta)
        self._bin: Any = None  # open binary file of the current shard
        self._idx: Any = None  # open index file of the current shard
        self._shard = -1  # current shard number, -1 before the first one is opened
        self._bin_size = 0  # bytes in the current shard's .bin
        self._unsynced = 0
        self._shards: list[int] = []
        self._closed = False
        self.stats: dict[str, Any] = {}

        self.root.mkdir(parents=True, exist_ok=True)
        manifest_path = self.root / MANIFEST_NAME
        codec_dict = codec.to_dict()
        if manifest_path.exists():
            man = read_manifest(self.root)
            checks = (("meta", man.get("meta") or {}, self.meta), ("codec", man.get("codec") or {}, codec_dict))
            for section, old, new in checks:
                diff = first_difference(old, new)
                if diff is not None:
                    key, a, b = diff
                    raise ValueError(
                        f"cache at {self.root} was written with {section}.{key}={a!r}, this run has {b!r}; "
                        "use another folder or delete it"
                    )
            self._manifest = man
            self.complete = bool(man.get("complete"))
            self.stats = dict(man.get("stats") or {})
            shards = list_shards(self.root)
            entries = read_index(self.root, shards, codec, tolerate_torn_tail=not self.complete)
            self._next = len(entries.shard)
            if self.complete:
                self._closed = True
                return
            self._shards = shards
            if shards:
                last = shards[-1]
                stem = shard_stem(last)
                end = 0
                if entries.shard and entries.shard[-1] == last:
                    end = entries.offset[-1] + codec.record_nbytes(entries.tokens[-1])
                bin_path = self.root / f"{stem}.bin"
                idx_path = self.root / f"{stem}.index.jsonl"
                # drop a partial trailing record and a torn index tail
                with open(bin_path, "ab") as f:
                    f.truncate(end)
                with open(idx_path, "ab") as f:
                    f.truncate(entries.index_nbytes.get(last, 0))
                self._open_shard(last, size=end)
        else:
            if self.root.exists() and list_shards(self.root):
                raise ValueError(f"{self.root}: has shard files but no {MANIFEST_NAME}; use another folder")
            self._manifest = {
                "format": FORMAT,
                "version": VERSION,
                "meta": self.meta,
                "codec": codec_dict,
                "complete": False,
                "num_examples": None,
                "stats": {},
            }
            write_json_atomic(manifest_path, self._manifest)
            self.complete = False
            self._next = 0

    # ------------------------------------------------------------------ properties
    @property
    def next_index(self) -> int:
        """Index of the example expected next (= number of examples already stored)."""
        return self._next

    # ------------------------------------------------------------------ internals
    def _open_shard(self, shard: int, size: int = 0) -> None:
        stem = shard_stem(shard)
        self._bin = open(self.root / f"{stem}.bin", "ab")
        self._idx = open(self.root / f"{stem}.index.jsonl", "ab")
        self._shard = shard
        self._bin_size = size
        if shard not in self._shards:
            self._shards.append(shard)

    def _sync(self) -> None:
        for f in (self._bin, self._idx):
            if f is not None and not f.closed:
                f.flush()
                os.fsync(f.fileno())
        self._unsynced = 0

    def _close_files(self) -> None:
        if self._bin is not None:
            self._sync()
            self._bin.close()
            self._idx.close()
        self._bin = self._idx = None

    # ------------------------------------------------------------------ public
    def append(self, i: int, example_hash: str, ids: Any, logprobs: Any) -> None:
        """Store example ``i`` (must equal ``next_index``): ids (n_tokens, k) int, logprobs (n_tokens, k) float."""
        if self.complete:
            raise ValueError(f"cache at {self.root} is complete; nothing can be appended")
        if self._closed:
            raise ValueError("writer is closed")
        if int(i) != self._next:
            raise ValueError(f"append out of order: got example {i}, expected {self._next} (no gaps or duplicates)")
        if not isinstance(example_hash, str):
            raise ValueError(f"example_hash must be a str, got {type(example_hash).__name__}")
        record = self.codec.encode(ids, logprobs)
        n_tokens = int(to_numpy(ids).shape[0])
        if self._bin is None or (self._bin_size > 0 and self._bin_size + len(record) > self.shard_bytes):
            if self._bin is not None:
                self._close_files()
            self._open_shard(self._shard + 1)
        offset = self._bin_size
        self._bin.write(record)
        self._bin.flush()  # data first ...
        line = json.dumps({"i": int(i), "hash": example_hash, "offset": offset, "tokens": n_tokens})
        self._idx.write((line + "\n").encode("utf-8"))  # ... then the index line that points at it
        self._idx.flush()
        self._bin_size += len(record)
        self._unsynced += len(record)
        self._next += 1
        if self._unsynced >= FSYNC_EVERY:
            self._sync()

    def close(self, stats: dict[str, Any] | None = None, num_examples: int | None = None) -> None:
        """Mark the cache complete: sets ``num_examples`` (must equal ``next_index`` when given), merges ``stats``
        into the manifest's and records the shard file names. A no-op on an already complete cache."""
        if self.complete:
            self._close_files()
            return
        if num_examples is not None and int(num_examples) != self._next:
            raise ValueError(
                f"close(num_examples={num_examples}) but {self._next} examples are stored; the cache stays incomplete"
            )
        self._close_files()
        self.stats.update(json_roundtrip(stats or {}))
        man = dict(self._manifest)
        man["complete"] = True
        man["num_examples"] = self._next
        man["stats"] = self.stats
        man["shards"] = [f"{shard_stem(s)}.bin" for s in self._shards]
        write_json_atomic(self.root / MANIFEST_NAME, man)
        self._manifest = man
        self.complete = True
        self._closed = True

    def __enter__(self) -> TopKStoreWriter:
        return self

    def __exit__(self, *exc: Any) -> None:
        # closes files; does not mark the cache complete unless close() was called
        self._close_files()
        self._closed = True

    def __del__(self) -> None:
        try:
            self._close_files()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass
