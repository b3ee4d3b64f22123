"""Compact, sharded, append-only, resumable on-disk store of a teacher's top-k next-token distributions.

One *record* per example holds, for each of its ``n`` trained tokens, the teacher's ``k`` most likely next-token
ids and their log-probabilities. Nothing here uses pickle: the store is JSON + raw bytes, read back with numpy.

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

Record encoding (:class:`TopKCodec`), for ``n`` tokens and ``k`` entries per token::

    [ids section]      n*k ids, each an unsigned integer of ``id_bits = max(1, ceil(log2(vocab_size)))`` bits,
                       packed contiguously, little-endian bit order (bit 0 of id 0 is bit 0 of byte 0),
                       padded with zero bits to a whole byte: ceil(n*k*id_bits / 8) bytes
    [logprob section]  n*k quantised log-probabilities of ``logprob_bits`` bits each, packed the same way:
                       ceil(n*k*logprob_bits / 8) bytes

Entries are in row-major (token, rank) order. With V = 151,936 (18-bit ids), k = 64 and 12-bit log-probs a
token costs (18 + 12) * 64 / 8 = 240 bytes.

Quantisation: log-probs are clipped to ``[-logprob_floor, 0]`` and stored as ``q = ceil(-lp / step)`` with
``step = logprob_floor / (2**logprob_bits - 1)``; they decode as ``-q * step``. Rounding goes toward the MORE
negative log-prob on purpose: every decoded probability is <= the teacher's (except at the floor, where values
below ``-logprob_floor`` decode as ``-logprob_floor``), so the reconstructed "missing mass" bucket
``1 - sum_k p_k`` that a top-k loss spreads over the other ids is always >= the true remainder and in
particular never negative. Round-to-nearest could push ``sum_k p_k`` above 1 for peaked distributions.

Resume rule (:class:`TopKStoreWriter`): opening a writer on a folder that already has a manifest with the same
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
import math
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

FORMAT = "kdistill-topk-cache"
VERSION = 1

MANIFEST_NAME = "manifest.json"
_SHARD_RE = re.compile(r"^shard-(\d{5,})\.bin$")
_FSYNC_EVERY = 64 * 2**20  # bytes written between fsyncs
_MISSING = "<missing>"


def _to_numpy(x: Any) -> np.ndarray:
    """numpy view of an array-like, accepting torch tensors without importing torch."""
    if hasattr(x, "detach") and hasattr(x, "cpu"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _uint_dtype(bits: int) -> tuple[np.dtype, int]:
    """Little-endian unsigned dtype wide enough for ``bits`` bits, and its width in bits."""
    return (np.dtype("<u4"), 32) if bits <= 32 else (np.dtype("<u8"), 64)


def _pack_uints(values: np.ndarray, bits: int) -> bytes:
    """Pack unsigned ints (m,) of ``bits`` bits each, little-endian bit order, into ceil(m*bits/8) bytes."""
    if values.size == 0:
        return b""
    dtype, width = _uint_dtype(bits)
    m = values.size
    # little-endian words -> their bits, least significant first: (m, width); keep the low ``bits`` columns
    all_bits = np.unpackbits(values.astype(dtype).reshape(-1).view(np.uint8), bitorder="little")
    bit_matrix = all_bits.reshape(m, width)[:, :bits]  # (m, bits)
    return np.packbits(bit_matrix.reshape(-1), bitorder="little").tobytes()


def _unpack_uints(buf: np.ndarray, count: int, bits: int) -> np.ndarray:
    """Inverse of :func:`_pack_uints`: uint8 buffer -> int64 (count,)."""
    if count == 0:
        return np.zeros(0, dtype=np.int64)
    dtype, width = _uint_dtype(bits)
    bit_matrix = np.unpackbits(buf, count=count * bits, bitorder="little").reshape(count, bits)  # (m, bits)
    padded = np.zeros((count, width), dtype=np.uint8)  # (m, width): high bits zero
    padded[:, :bits] = bit_matrix
    words = np.packbits(padded.reshape(-1), bitorder="little").view(dtype)  # (m,)
    return words.astype(np.int64)


@dataclass(frozen=True)
class TopKCodec:
    """Bit-packed encoding of one record: (n, k) token ids and (n, k) log-probabilities.

    ``encode`` validates its inputs and returns ``record_nbytes(n)`` bytes; ``decode`` returns ids as int64 and
    log-probs as float32, each (n, k). Decoded log-probs satisfy ``lp - step <= decoded <= lp`` (up to float32
    rounding on the lower side) for ``lp >= -logprob_floor``, and ``decoded == -logprob_floor`` below that.
    """

    vocab_size: int  # ids lie in [0, vocab_size)
    k: int  # entries per token
    logprob_bits: int = 12  # 4..16
    logprob_floor: float = 30.0  # log-probs below -floor are stored as -floor

    def __post_init__(self) -> None:
        if isinstance(self.vocab_size, bool) or not isinstance(self.vocab_size, (int, np.integer)):
            raise ValueError(f"vocab_size must be an int, got {self.vocab_size!r}")
        if not 1 <= self.vocab_size < 2**53:
            raise ValueError(f"vocab_size must be in [1, 2**53), got {self.vocab_size}")
        if isinstance(self.k, bool) or not isinstance(self.k, (int, np.integer)) or self.k < 1:
            raise ValueError(f"k must be a positive int, got {self.k!r}")
        if self.k > self.vocab_size:
            raise ValueError(f"k={self.k} exceeds vocab_size={self.vocab_size}")
        if isinstance(self.logprob_bits, bool) or not isinstance(self.logprob_bits, (int, np.integer)):
            raise ValueError(f"logprob_bits must be an int, got {self.logprob_bits!r}")
        if not 4 <= self.logprob_bits <= 16:
            raise ValueError(f"logprob_bits must be in [4, 16], got {self.logprob_bits}")
        floor = float(self.logprob_floor)
        if not (math.isfinite(floor) and floor > 0):
            raise ValueError(f"logprob_floor must be a positive finite number, got {self.logprob_floor!r}")

    # ------------------------------------------------------------------ sizes
    @property
    def id_bits(self) -> int:
        """Bits per id: max(1, ceil(log2(vocab_size))); 151,936 -> 18."""
        return max(1, (int(self.vocab_size) - 1).bit_length())

    @property
    def step(self) -> float:
        """Quantisation step of the log-probs, in nats."""
        return float(self.logprob_floor) / (2 ** int(self.logprob_bits) - 1)

    @property
    def _qmax(self) -> int:
        return 2 ** int(self.logprob_bits) - 1

    def bytes_per_token(self) -> float:
        """Average bytes per token, ignoring the per-record rounding up to whole bytes."""
        return (self.id_bits + int(self.logprob_bits)) * int(self.k) / 8

    def _section_nbytes(self, n_tokens: int) -> tuple[int, int]:
        m = int(n_tokens) * int(self.k)
        return -(-m * self.id_bits // 8), -(-m * int(self.logprob_bits) // 8)

    def record_nbytes(self, n_tokens: int) -> int:
        """Exact size of a record of ``n_tokens`` tokens: ceil(n*k*id_bits/8) + ceil(n*k*logprob_bits/8)."""
        if n_tokens < 0:
            raise ValueError(f"n_tokens must be >= 0, got {n_tokens}")
        a, b = self._section_nbytes(n_tokens)
        return a + b

    # ------------------------------------------------------------------ encode / decode
    def quantize(self, logprobs: np.ndarray) -> np.ndarray:
        """Log-probs (any shape, <= 0) -> int64 codes in [0, 2**bits - 1], rounding toward more negative."""
        lp = np.asarray(logprobs, dtype=np.float64)
        step = self.step
        with np.errstate(invalid="ignore", over="ignore"):
            q = np.ceil(-lp / step)
        q = np.clip(q, 0, self._qmax)  # -inf -> qmax (the floor); values in (0, 1e-6] -> 0
        q = q.astype(np.int64)
        # ceil() in float64 can still decode (after the float32 cast) a hair above the input; push such codes
        # one step further so that decoded <= input always holds.
        dec = self.dequantize(q).astype(np.float64)
        bump = (dec > lp) & (q < self._qmax)
        if bump.any():
            q = q + bump
        return q

    def dequantize(self, q: np.ndarray) -> np.ndarray:
        """int codes -> float32 log-probs ``-q * step``."""
        return (-(np.asarray(q, dtype=np.float64) * self.step)).astype(np.float32)

    def encode(self, ids: Any, logprobs: Any) -> bytes:
        """Encode ids (n, k) int in [0, vocab_size) and logprobs (n, k) float (<= 0) into one record."""
        ids_np = _to_numpy(ids)
        lp_np = _to_numpy(logprobs)
        k = int(self.k)
        if ids_np.ndim != 2 or ids_np.shape[1] != k:
            raise ValueError(f"ids must have shape (n_tokens, k={k}), got {tuple(ids_np.shape)}")
        if lp_np.shape != ids_np.shape:
            raise ValueError(f"logprobs shape {tuple(lp_np.shape)} differs from ids shape {tuple(ids_np.shape)}")
        if ids_np.size and not np.issubdtype(ids_np.dtype, np.integer):
            raise ValueError(f"ids must be integers, got dtype {ids_np.dtype}")
        if lp_np.size and not np.issubdtype(lp_np.dtype, np.floating):
            raise ValueError(f"logprobs must be floating point, got dtype {lp_np.dtype}")
        if ids_np.size:
            lo, hi = int(ids_np.min()), int(ids_np.max())
            if lo < 0 or hi >= self.vocab_size:
                bad = lo if lo < 0 else hi
                raise ValueError(f"token id {bad} out of range [0, {self.vocab_size})")
        lp64 = lp_np.astype(np.float64).reshape(-1)  # (n*k,)
        if lp64.size:
            if np.isnan(lp64).any():
                raise ValueError("logprobs contain NaN")
            mx = float(lp64.max())
            if mx > 1e-6:
                raise ValueError(f"logprobs must be <= 0 (log-probabilities), found {mx}")
        q = self.quantize(lp64)  # (n*k,)
        return _pack_uints(ids_np.reshape(-1), self.id_bits) + _pack_uints(q, int(self.logprob_bits))

    def decode(self, buf: bytes | bytearray | memoryview | np.ndarray, n_tokens: int) -> tuple[np.ndarray, np.ndarray]:
        """Decode one record -> (ids int64 (n, k), logprobs float32 (n, k))."""
        n, k = int(n_tokens), int(self.k)
        if n < 0:
            raise ValueError(f"n_tokens must be >= 0, got {n_tokens}")
        raw = np.frombuffer(buf, dtype=np.uint8) if not isinstance(buf, np.ndarray) else buf.reshape(-1)
        if raw.dtype != np.uint8:
            raw = raw.view(np.uint8)
        a, b = self._section_nbytes(n)
        if raw.size != a + b:
            raise ValueError(f"record of {n} tokens must be {a + b} bytes, got {raw.size}")
        m = n * k
        ids = _unpack_uints(raw[:a], m, self.id_bits).reshape(n, k)
        q = _unpack_uints(raw[a:], m, int(self.logprob_bits)).reshape(n, k)
        return ids, self.dequantize(q)

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        return {
            "vocab_size": int(d["vocab_size"]),
            "k": int(d["k"]),
            "logprob_bits": int(d["logprob_bits"]),
            "logprob_floor": float(d["logprob_floor"]),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TopKCodec:
        try:
            return cls(
                vocab_size=int(d["vocab_size"]),
                k=int(d["k"]),
                logprob_bits=int(d.get("logprob_bits", 12)),
                logprob_floor=float(d.get("logprob_floor", 30.0)),
            )
        except KeyError as e:
            raise ValueError(f"codec dict lacks key {e.args[0]!r}: {d!r}") from None


# ====================================================================== shared helpers
def _shard_stem(shard: int) -> str:
    return f"shard-{shard:05d}"


def _write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _read_manifest(root: Path) -> dict[str, Any]:
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


def _list_shards(root: Path) -> list[int]:
    """Shard numbers of the ``shard-NNNNN.bin`` files in ``root``, checked to be 0..m-1."""
    nums = sorted(int(m.group(1)) for p in root.iterdir() if (m := _SHARD_RE.match(p.name)))
    if nums != list(range(len(nums))):
        raise ValueError(f"{root}: shard files are not numbered 0..{len(nums) - 1} without gaps: {nums}")
    return nums


def _json_roundtrip(x: Any) -> Any:
    return json.loads(json.dumps(x))


def _first_difference(old: dict[str, Any], new: dict[str, Any]) -> tuple[str, Any, Any] | None:
    for key in list(new) + [k for k in old if k not in new]:
        a = old.get(key, _MISSING)
        b = new.get(key, _MISSING)
        if a != b:
            return key, a, b
    return None


class _IndexEntries:
    """Parsed index lines: per entry shard id, offset, tokens and hash, plus per-shard valid byte lengths."""

    def __init__(self) -> None:
        self.shard: list[int] = []
        self.offset: list[int] = []
        self.tokens: list[int] = []
        self.hashes: list[str] = []
        self.index_nbytes: dict[int, int] = {}  # shard -> bytes of the index file that hold valid lines


def _read_index(
    root: Path, shards: list[int], codec: TopKCodec, tolerate_torn_tail: bool
) -> _IndexEntries:
    """Read every index line of every shard in order and validate it.

    With ``tolerate_torn_tail`` (writer resume, reader of an incomplete cache) a missing-newline / unparseable
    last line of the last shard is dropped, and trailing entries of the last shard whose bytes are not fully in
    its .bin are dropped too. Any other bad line raises ValueError naming ``file:line``.
    """
    out = _IndexEntries()
    for s in shards:
        is_last = s == shards[-1]
        path = root / f"{_shard_stem(s)}.index.jsonl"
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
        bin_path = root / f"{_shard_stem(s)}.bin"
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
        self.meta: dict[str, Any] = _json_roundtrip(meta)
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
            man = _read_manifest(self.root)
            checks = (("meta", man.get("meta") or {}, self.meta), ("codec", man.get("codec") or {}, codec_dict))
            for section, old, new in checks:
                diff = _first_difference(old, new)
                if diff is not None:
                    key, a, b = diff
                    raise ValueError(
                        f"cache at {self.root} was written with {section}.{key}={a!r}, this run has {b!r}; "
                        "use another folder or delete it"
                    )
            self._manifest = man
            self.complete = bool(man.get("complete"))
            self.stats = dict(man.get("stats") or {})
            shards = _list_shards(self.root)
            entries = _read_index(self.root, shards, codec, tolerate_torn_tail=not self.complete)
            self._next = len(entries.shard)
            if self.complete:
                self._closed = True
                return
            self._shards = shards
            if shards:
                last = shards[-1]
                stem = _shard_stem(last)
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
            if self.root.exists() and _list_shards(self.root):
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
            _write_json_atomic(manifest_path, self._manifest)
            self.complete = False
            self._next = 0

    # ------------------------------------------------------------------ properties
    @property
    def next_index(self) -> int:
        """Index of the example expected next (= number of examples already stored)."""
        return self._next

    # ------------------------------------------------------------------ internals
    def _open_shard(self, shard: int, size: int = 0) -> None:
        stem = _shard_stem(shard)
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
        n_tokens = int(_to_numpy(ids).shape[0])
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
        if self._unsynced >= _FSYNC_EVERY:
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
        self.stats.update(_json_roundtrip(stats or {}))
        man = dict(self._manifest)
        man["complete"] = True
        man["num_examples"] = self._next
        man["stats"] = self.stats
        man["shards"] = [f"{_shard_stem(s)}.bin" for s in self._shards]
        _write_json_atomic(self.root / MANIFEST_NAME, man)
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


# ====================================================================== reader
class TopKStore:
    """Random-access reader of a top-k cache. Picklable (for DataLoader workers): shard memmaps open lazily."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        man = _read_manifest(self.root)
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
            shards = _list_shards(self.root)
        self._shard_ids = shards
        entries = _read_index(self.root, shards, self.codec, tolerate_torn_tail=not self.complete)
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
            mm = np.memmap(self.root / f"{_shard_stem(shard)}.bin", dtype=np.uint8, mode="r")
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
                p = self.root / f"{_shard_stem(s)}{suffix}"
                if p.exists():
                    total += p.stat().st_size
        return total


# ====================================================================== diagnostics
def reconstruction_kl(full_logprobs: Any, ids: Any, logprobs: Any) -> np.ndarray:
    """Per-row KL(P_full || Q) in nats, float64 (n,).

    ``full_logprobs`` (n, V) are the teacher's full log-probs (numpy or torch). Q is the reconstruction from the
    (decoded) top-k ``ids`` / ``logprobs`` (n, k): q[ids] = exp(logprobs), and the remaining mass
    r = max(1 - sum exp(logprobs), 0) is spread uniformly over the V - k other ids. When r == 0 those ids get 0
    and the KL is inf if P puts mass there: that is the honest value. Ids within a row are assumed distinct.
    """
    logp = _to_numpy(full_logprobs).astype(np.float64)  # (n, V)
    ids_np = _to_numpy(ids).astype(np.int64)  # (n, k)
    lq_top = _to_numpy(logprobs).astype(np.float64)  # (n, k)
    if logp.ndim != 2 or ids_np.ndim != 2 or ids_np.shape != lq_top.shape or ids_np.shape[0] != logp.shape[0]:
        raise ValueError(
            f"expected full_logprobs (n, V) and ids/logprobs (n, k); got {logp.shape}, {ids_np.shape}, {lq_top.shape}"
        )
    n, v = logp.shape
    k = ids_np.shape[1]
    if k > v:
        raise ValueError(f"k={k} exceeds V={v}")
    r = np.maximum(1.0 - np.exp(lq_top).sum(axis=1), 0.0)  # (n,)
    with np.errstate(divide="ignore"):
        rest = np.log(r / (v - k)) if v > k else np.full(n, -np.inf)  # (n,)
    logq = np.repeat(rest[:, None], v, axis=1)  # (n, V)
    np.put_along_axis(logq, ids_np, lq_top, axis=1)
    p = np.exp(logp)  # (n, V)
    with np.errstate(invalid="ignore", over="ignore"):
        terms = np.where(p > 0, p * (logp - logq), 0.0)  # (n, V); p>0 & q=0 -> +inf
    return terms.sum(axis=1)
