"""Tests of the on-disk top-k cache: codec, sharded writer/reader, resume, validation, reconstruction KL."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from kdistill.teachers.topk_codec import TopKCodec, reconstruction_kl
from kdistill.teachers.topk_store import FORMAT, VERSION, TopKStore
from kdistill.teachers.topk_writer import TopKStoreWriter


def _random_topk(rng: np.random.Generator, n: int, k: int, vocab: int) -> tuple[np.ndarray, np.ndarray]:
    """(n, k) distinct ids per row and sorted log-probs of a random softmax."""
    ids = np.stack([rng.choice(vocab, size=k, replace=False) for _ in range(n)]) if n else np.zeros((0, k), int)
    logits = rng.normal(scale=3.0, size=(n, vocab))
    logp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    lp = np.take_along_axis(logp, ids, axis=1) if n else np.zeros((0, k))
    return ids.astype(np.int64), lp.astype(np.float32)


# ---------------------------------------------------------------------- codec
@pytest.mark.parametrize(
    "vocab,k,bits",
    [(2, 1, 8), (2, 2, 12), (151_936, 64, 12), (151_936, 3, 16), (151_936, 7, 8), (1000, 1, 4), (5, 5, 16)],
)
def test_codec_round_trip(vocab: int, k: int, bits: int) -> None:
    rng = np.random.default_rng(vocab + k + bits)
    codec = TopKCodec(vocab_size=vocab, k=k, logprob_bits=bits, logprob_floor=30.0)
    n = 37
    ids = rng.integers(0, vocab, size=(n, k))
    ids[0, 0] = vocab - 1  # the largest id must survive
    lp = -rng.exponential(scale=4.0, size=(n, k))
    lp[0, 0] = 0.0
    lp[1, 0] = -29.999
    lp[2, 0] = -55.0  # below the floor
    lp[3, 0] = -np.inf
    lp[4, 0] = 5e-7  # tiny positive rounding noise is accepted as 0
    buf = codec.encode(ids, lp)
    assert len(buf) == codec.record_nbytes(n)
    dec_ids, dec_lp = codec.decode(buf, n)
    assert dec_ids.dtype == np.int64 and dec_lp.dtype == np.float32
    assert dec_ids.shape == (n, k) and dec_lp.shape == (n, k)
    np.testing.assert_array_equal(dec_ids, ids)
    above = lp >= -codec.logprob_floor
    d = dec_lp.astype(np.float64)
    assert np.all(d[above] <= np.minimum(lp[above], 0.0))  # never rounds up
    assert np.all(d[above] >= lp[above] - codec.step - 1e-6)  # within one step below
    assert np.all(d[~above] == np.float32(-codec.logprob_floor))
    assert dec_lp[0, 0] == 0.0


def test_codec_float32_inputs_never_round_up() -> None:
    codec = TopKCodec(vocab_size=100, k=4, logprob_bits=12)
    # exact multiples of the step are the worst case for float rounding
    q = np.arange(0, 4096, dtype=np.float64)
    lp = (-(q * codec.step)).astype(np.float32).reshape(-1, 4)
    ids = np.zeros(lp.shape, dtype=np.int64)
    _, dec = codec.decode(codec.encode(ids, lp), lp.shape[0])
    assert np.all(dec <= lp)
    assert np.all(dec.astype(np.float64) >= lp.astype(np.float64) - codec.step - 1e-6)


def test_codec_sizes_and_properties() -> None:
    codec = TopKCodec(vocab_size=151_936, k=64, logprob_bits=12)
    assert codec.id_bits == 18
    assert codec.bytes_per_token() == 240
    assert codec.record_nbytes(0) == 0
    assert codec.record_nbytes(1) == 144 + 96
    assert TopKCodec(vocab_size=2, k=1).id_bits == 1
    assert TopKCodec(vocab_size=1, k=1).id_bits == 1
    assert TopKCodec(vocab_size=3, k=1, logprob_bits=5).record_nbytes(3) == 1 + 2  # ceil(6/8) + ceil(15/8)
    assert TopKCodec(vocab_size=256, k=1).id_bits == 8
    assert TopKCodec(vocab_size=257, k=1).id_bits == 9
    assert codec.step == pytest.approx(30.0 / 4095)
    assert TopKCodec.from_dict(json.loads(json.dumps(codec.to_dict()))) == codec


def test_codec_empty_record_and_torch_inputs() -> None:
    codec = TopKCodec(vocab_size=151_936, k=8)
    buf = codec.encode(np.zeros((0, 8), dtype=np.int64), np.zeros((0, 8), dtype=np.float32))
    assert buf == b""
    ids, lp = codec.decode(buf, 0)
    assert ids.shape == (0, 8) and lp.shape == (0, 8)
    t_ids = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 151_935]])
    t_lp = torch.log_softmax(torch.randn(1, 8), dim=-1)
    ids, lp = codec.decode(codec.encode(t_ids, t_lp), 1)
    np.testing.assert_array_equal(ids, t_ids.numpy())


def test_codec_rejects_bad_inputs() -> None:
    codec = TopKCodec(vocab_size=10, k=2)
    ok_ids = np.array([[1, 2]])
    ok_lp = np.array([[-0.1, -2.0]])
    with pytest.raises(ValueError, match="shape"):
        codec.encode(np.array([[1, 2, 3]]), np.array([[-1.0, -1.0, -1.0]]))
    with pytest.raises(ValueError, match="shape"):
        codec.encode(np.array([1, 2]), np.array([-1.0, -1.0]))
    with pytest.raises(ValueError, match="differs"):
        codec.encode(ok_ids, np.array([[-1.0, -1.0], [-1.0, -1.0]]))
    with pytest.raises(ValueError, match="out of range"):
        codec.encode(np.array([[1, 10]]), ok_lp)
    with pytest.raises(ValueError, match="out of range"):
        codec.encode(np.array([[-1, 3]]), ok_lp)
    with pytest.raises(ValueError, match="NaN"):
        codec.encode(ok_ids, np.array([[np.nan, -1.0]]))
    with pytest.raises(ValueError, match="<= 0"):
        codec.encode(ok_ids, np.array([[0.5, -1.0]]))
    with pytest.raises(ValueError, match="integers"):
        codec.encode(np.array([[1.0, 2.0]]), ok_lp)
    with pytest.raises(ValueError, match="bytes"):
        codec.decode(b"\x00" * 3, 1)
    for bad in (dict(logprob_bits=3), dict(logprob_bits=17), dict(logprob_floor=0.0), dict(k=11), dict(k=0)):
        with pytest.raises(ValueError):
            TopKCodec(**{"vocab_size": 10, "k": 2, **bad})


# ---------------------------------------------------------------------- writer / reader
META = {"teacher": "t/x", "k": 16, "max_len": 128}


def _examples(n: int, codec: TopKCodec, seed: int = 0) -> list[tuple[str, np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        n_tok = 0 if i == 4 else int(rng.integers(1, 20))  # example 4 is an empty record
        ids, lp = _random_topk(rng, n_tok, codec.k, codec.vocab_size)
        out.append((f"h{i:04d}", ids, lp))
    return out


def _assert_matches(store: TopKStore, examples: list, codec: TopKCodec) -> None:
    assert len(store) == len(examples)
    for i, (h, ids, lp) in enumerate(examples):
        assert store.example_hash(i) == h
        assert store.num_tokens(i) == ids.shape[0]
        got_ids, got_lp = store.get(i)
        exp_ids, exp_lp = codec.decode(codec.encode(ids, lp), ids.shape[0])
        np.testing.assert_array_equal(got_ids, exp_ids)
        np.testing.assert_array_equal(got_lp, exp_lp)


def test_writer_reader_round_trip_multiple_shards(tmp_path: Path) -> None:
    codec = TopKCodec(vocab_size=1000, k=16, logprob_bits=12)
    examples = _examples(30, codec)
    root = tmp_path / "cache"
    with TopKStoreWriter(root, META, codec, shard_bytes=4096) as w:
        assert w.next_index == 0 and not w.complete
        man = json.loads((root / "manifest.json").read_text())
        assert man == {
            "format": FORMAT,
            "version": VERSION,
            "meta": META,
            "codec": codec.to_dict(),
            "complete": False,
            "num_examples": None,
            "stats": {},
        }
        for i, (h, ids, lp) in enumerate(examples):
            w.append(i, h, ids, lp)
        assert w.next_index == 30
        w.close(stats={"seconds": 1.5}, num_examples=30)
        assert w.complete
    shards = sorted(p.name for p in root.glob("shard-*.bin"))
    assert len(shards) >= 3
    for p in root.glob("shard-*.bin"):
        assert p.stat().st_size <= 4096
    man = json.loads((root / "manifest.json").read_text())
    assert man["complete"] is True and man["num_examples"] == 30
    assert man["stats"] == {"seconds": 1.5}
    assert man["shards"] == shards

    store = TopKStore(root)
    assert store.complete and store.meta == META and store.codec == codec
    assert store.stats == {"seconds": 1.5}
    _assert_matches(store, examples, codec)
    assert store.total_tokens() == sum(ids.shape[0] for _, ids, _ in examples)
    on_disk = sum(p.stat().st_size for p in root.iterdir())
    assert store.total_bytes() == on_disk
    with pytest.raises(IndexError):
        store.get(30)

    clone = pickle.loads(pickle.dumps(store))
    assert clone._mmaps == {}
    _assert_matches(clone, examples, codec)

    # a complete cache: writer reports complete and refuses appends
    w2 = TopKStoreWriter(root, META, codec, shard_bytes=4096)
    assert w2.complete and w2.next_index == 30
    with pytest.raises(ValueError, match="complete"):
        w2.append(30, "x", *examples[0][1:])


def test_resume_after_kill(tmp_path: Path) -> None:
    codec = TopKCodec(vocab_size=50_000, k=8, logprob_bits=10)
    examples = _examples(10, codec, seed=3)
    root = tmp_path / "cache"
    with TopKStoreWriter(root, META, codec, shard_bytes=1500) as w:
        for i in range(5):
            w.append(i, *examples[i])
    # no close(): simulate a kill that left a partial record and a half-written index line
    last_bin = sorted(root.glob("shard-*.bin"))[-1]
    last_idx = last_bin.with_name(last_bin.name.replace(".bin", ".index.jsonl"))
    with open(last_bin, "ab") as f:
        f.write(b"\xde\xad\xbe\xef" * 7)
    with open(last_idx, "ab") as f:
        f.write(b'{"i": 5, "hash": "h00')
    # an incomplete cache is readable and shows the 5 stored examples
    partial = TopKStore(root)
    assert not partial.complete and len(partial) == 5
    _assert_matches(partial, examples[:5], codec)

    w = TopKStoreWriter(root, META, codec, shard_bytes=1500)
    assert not w.complete and w.next_index == 5
    with pytest.raises(ValueError, match="out of order"):
        w.append(4, *examples[4])
    for i in range(5, 10):
        w.append(i, *examples[i])
    w.close(num_examples=10)

    store = TopKStore(root)
    assert store.complete and len(store) == 10
    assert len(set(store.example_hash(i) for i in range(10))) == 10
    _assert_matches(store, examples, codec)
    lines = [json.loads(x) for p in sorted(root.glob("*.index.jsonl")) for x in p.read_text().splitlines()]
    assert [r["i"] for r in lines] == list(range(10))


def test_resume_drops_index_entry_without_data(tmp_path: Path) -> None:
    codec = TopKCodec(vocab_size=100, k=4)
    examples = _examples(4, codec, seed=5)
    assert examples[2][1].shape[0] > 0
    root = tmp_path / "c"
    with TopKStoreWriter(root, META, codec) as w:
        for i in range(3):
            w.append(i, *examples[i])
    # power loss: the index line of example 2 survived but the end of its record did not
    bin_path = root / "shard-00000.bin"
    with open(bin_path, "r+b") as f:
        f.truncate(bin_path.stat().st_size - 1)
    w = TopKStoreWriter(root, META, codec)
    assert w.next_index == 2
    w.append(2, *examples[2])
    w.append(3, *examples[3])
    w.close()
    _assert_matches(TopKStore(root), examples, codec)


def test_bit_layout_is_little_endian() -> None:
    # 3-bit ids [1, 2] -> bits 1,0,0 | 0,1,0 -> 0b010001; 4-bit codes [0, 15] -> 0b11110000
    codec = TopKCodec(vocab_size=8, k=2, logprob_bits=4, logprob_floor=15.0)
    buf = codec.encode(np.array([[1, 2]]), np.array([[0.0, -15.0]]))
    assert buf == bytes([0b010001, 0b11110000])


def test_mismatched_meta_or_codec_refused(tmp_path: Path) -> None:
    codec = TopKCodec(vocab_size=100, k=4)
    root = tmp_path / "c"
    with TopKStoreWriter(root, META, codec):
        pass
    with pytest.raises(ValueError, match=r"meta\.k=16, this run has 64"):
        TopKStoreWriter(root, {**META, "k": 64}, codec)
    with pytest.raises(ValueError, match=r"meta\.extra"):
        TopKStoreWriter(root, {**META, "extra": 1}, codec)
    with pytest.raises(ValueError, match=r"codec\.logprob_bits=12, this run has 8"):
        TopKStoreWriter(root, META, TopKCodec(vocab_size=100, k=4, logprob_bits=8))
    # same meta given with a tuple instead of a list is the same JSON
    root2 = tmp_path / "d"
    with TopKStoreWriter(root2, {"a": (1, 2)}, codec):
        pass
    TopKStoreWriter(root2, {"a": [1, 2]}, codec).close()


def test_writer_rejects_bad_appends(tmp_path: Path) -> None:
    codec = TopKCodec(vocab_size=100, k=4)
    w = TopKStoreWriter(tmp_path / "c", META, codec)
    ids = np.array([[1, 2, 3, 4]])
    lp = np.log(np.array([[0.4, 0.3, 0.2, 0.1]]))
    with pytest.raises(ValueError, match="out of order"):
        w.append(1, "h", ids, lp)
    with pytest.raises(ValueError, match="out of range"):
        w.append(0, "h", np.array([[1, 2, 3, 100]]), lp)
    w.append(0, "h0", ids, lp)
    with pytest.raises(ValueError, match="out of order"):
        w.append(0, "h0", ids, lp)
    with pytest.raises(ValueError, match="2 examples|1 examples"):
        w.close(num_examples=2)
    w.close()
    assert len(TopKStore(tmp_path / "c")) == 1


def test_reader_rejects_non_cache(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no manifest.json"):
        TopKStore(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(ValueError, match="format"):
        TopKStore(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"format": FORMAT, "version": 99}))
    with pytest.raises(ValueError, match="version"):
        TopKStore(tmp_path)


def test_reader_rejects_out_of_order_index(tmp_path: Path) -> None:
    codec = TopKCodec(vocab_size=100, k=4)
    examples = _examples(3, codec, seed=1)
    root = tmp_path / "c"
    w = TopKStoreWriter(root, META, codec)
    for i in range(3):
        w.append(i, *examples[i])
    w.close()
    idx = root / "shard-00000.index.jsonl"
    lines = idx.read_text().splitlines()
    rec = json.loads(lines[1])
    rec["i"] = 5
    lines[1] = json.dumps(rec)
    idx.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"shard-00000\.index\.jsonl:2"):
        TopKStore(root)


# ---------------------------------------------------------------------- reconstruction KL
def test_reconstruction_kl_exact_when_k_equals_vocab() -> None:
    rng = np.random.default_rng(0)
    v = 12
    logits = rng.normal(size=(5, v))
    logp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    ids = np.argsort(-logp, axis=1)
    lp = np.take_along_axis(logp, ids, axis=1)
    kl = reconstruction_kl(logp, ids, lp)
    assert kl.shape == (5,) and kl.dtype == np.float64
    assert np.all(np.abs(kl) < 1e-9)
    kl_t = reconstruction_kl(torch.from_numpy(logp), torch.from_numpy(ids), torch.from_numpy(lp))
    np.testing.assert_allclose(kl_t, kl)


def test_reconstruction_kl_matches_direct_computation() -> None:
    rng = np.random.default_rng(1)
    n, v, k = 6, 40, 5
    logits = rng.normal(scale=2.0, size=(n, v))
    logp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    ids = np.argsort(-logp, axis=1)[:, :k]
    lp_exact = np.take_along_axis(logp, ids, axis=1)
    codec = TopKCodec(vocab_size=v, k=k, logprob_bits=8)
    ids_d, lp_d = codec.decode(codec.encode(ids, lp_exact), n)
    kl = reconstruction_kl(logp, ids_d, lp_d)
    p = np.exp(logp)
    expected = np.empty(n)
    for r in range(n):
        q = np.empty(v)
        top = np.exp(lp_d[r].astype(np.float64))
        rest = max(1.0 - top.sum(), 0.0)
        q[:] = rest / (v - k)
        q[ids_d[r]] = top
        expected[r] = np.sum(p[r] * (np.log(p[r]) - np.log(q)))
    assert np.all(kl > 0)
    np.testing.assert_allclose(kl, expected, rtol=1e-10, atol=1e-12)


def test_reconstruction_kl_inf_when_no_mass_left() -> None:
    logp = np.log(np.array([[0.5, 0.25, 0.25]]))
    ids = np.array([[0, 1]])
    lp = np.log(np.array([[0.6, 0.4]]))  # sums to 1: nothing left for id 2
    assert np.isinf(reconstruction_kl(logp, ids, lp)[0])
