"""The record encoding of the top-k store: packed ids and quantised log-probabilities, and its diagnostics.

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
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

__all__ = ["TopKCodec", "reconstruction_kl", "to_numpy"]


def to_numpy(x: Any) -> np.ndarray:
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
        ids_np = to_numpy(ids)
        lp_np = to_numpy(logprobs)
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


# ====================================================================== diagnostics
def reconstruction_kl(full_logprobs: Any, ids: Any, logprobs: Any) -> np.ndarray:
    """Per-row KL(P_full || Q) in nats, float64 (n,).

    ``full_logprobs`` (n, V) are the teacher's full log-probs (numpy or torch). Q is the reconstruction from the
    (decoded) top-k ``ids`` / ``logprobs`` (n, k): q[ids] = exp(logprobs), and the remaining mass
    r = max(1 - sum exp(logprobs), 0) is spread uniformly over the V - k other ids. When r == 0 those ids get 0
    and the KL is inf if P puts mass there: that is the honest value. Ids within a row are assumed distinct.
    """
    logp = to_numpy(full_logprobs).astype(np.float64)  # (n, V)
    ids_np = to_numpy(ids).astype(np.int64)  # (n, k)
    lq_top = to_numpy(logprobs).astype(np.float64)  # (n, k)
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
