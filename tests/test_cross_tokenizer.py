"""Cross-tokenizer distillation, the pure layer: alignment of two tokenisations (kdistill.data.alignment) and the
losses (kdistill.losses.cross_tokenizer).

Tokenizers are trained here from the bundled Alpaca text, of different algorithms and sizes: byte-level BPE 300
(offsets with and without the leading space), a Unigram/SentencePiece-style one with `▁` (500), a cased WordPiece
that drops whitespace (400), and a byte-level BPE whose normaliser lowercases (unalignable). Expected values come
from explicit float64 formulas written here, never from the functions under test.
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from kdistill.apps.tiny import iter_text, train_tokenizer
from kdistill.data.alignment import (
    AlignmentError,
    SlowTokenizerError,
    TokenSpans,
    align_chunks,
    matched_vocabulary,
    one_to_one,
    spans_from_ids,
    token_bytes,
    token_spans,
)
from kdistill.errors import UserError
from kdistill.losses import DIVERGENCES, get_divergence
from kdistill.losses.cross_tokenizer import alm_loss, chunk_logprobs, gold_loss, uld_loss

ALPACA = Path(__file__).resolve().parents[1] / "examples" / "data" / "alpaca_2000.jsonl"
UNICODE = "naïve café 東京 🙂"
TEXTS = [
    UNICODE,
    "12345 and 3.14159",
    "Hello  world\n\n  end ",
    " leading space, tabs\tand\r\nCRLF\n",
    "Multi-byte: Ünïcödé, 東京タワー, emoji 🙂🚀 and digits 2024-01-31.",
    "x",
]


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    return list(itertools.islice(iter_text(ALPACA), 1500))


def _wrap(tok, **kw):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=tok, **kw)


@pytest.fixture(scope="module")
def toks(corpus):
    """name -> PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    bpe = train_tokenizer(corpus, vocab_size=300)  # byte-level BPE; offsets of `Ġx` include the space
    trimmed = Tokenizer.from_str(bpe.backend_tokenizer.to_str())
    trimmed.post_processor = processors.ByteLevel(trim_offsets=True)  # ... and here they exclude it
    bpe_trim = _wrap(trimmed, eos_token="<|endoftext|>")

    alphabet = sorted({ch for text in TEXTS for ch in text if ch != " "})  # a space is `▁`
    uni = Tokenizer(models.Unigram())
    uni.normalizer = normalizers.NFC()
    uni.pre_tokenizer = pre_tokenizers.Metaspace()
    uni.decoder = decoders.Metaspace()
    uni.train_from_iterator(corpus, trainer=trainers.UnigramTrainer(
        vocab_size=500, special_tokens=["<unk>", "<s>", "</s>"], unk_token="<unk>", initial_alphabet=alphabet,
        show_progress=False))
    uni.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])

    wp = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    wp.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    wp.decoder = decoders.WordPiece()
    wp.train_from_iterator(corpus + TEXTS, trainer=trainers.WordPieceTrainer(
        vocab_size=400, special_tokens=["[UNK]", "[CLS]", "[SEP]"], show_progress=False))

    lower = Tokenizer.from_str(bpe.backend_tokenizer.to_str())
    lower.normalizer = normalizers.Lowercase()
    return {"bpe": bpe, "bpe_trim": bpe_trim,
            "uni": _wrap(uni, unk_token="<unk>", bos_token="<s>", eos_token="</s>"),
            "wordpiece": _wrap(wp, unk_token="[UNK]"), "lower": _wrap(lower, eos_token="<|endoftext|>")}


def _squeeze(text: str) -> str:
    return "".join(text.split())


def _covered(ts: TokenSpans, indices) -> str:
    spans = [ts.spans[i] for i in indices]
    return ts.text[min(a for a, _ in spans):max(b for _, b in spans)]


def check_chunks(s: TokenSpans, t: TokenSpans, chunks) -> None:
    """Every in-text token in exactly one chunk, in order; chunks tile the text; each chunk's two sides spell
    the same characters (up to whitespace at its edges); no character is split between two chunks."""
    assert chunks
    for side, ts in (("student", s), ("teacher", t)):
        ranges = [getattr(c, side) for c in chunks]
        assert all(len(r) > 0 for r in ranges)
        assert [i for r in ranges for i in r] == [i for i, keep in enumerate(ts.in_text) if keep]
        for r, nxt in zip(ranges, ranges[1:]):  # tokens of consecutive chunks share no character
            assert max(ts.spans[i][1] for i in r) <= min(ts.spans[i][0] for i in nxt)
    assert chunks[0].span[0] == 0
    assert all(a.span[1] == b.span[0] for a, b in zip(chunks, chunks[1:]))
    assert not s.text[chunks[-1].span[1]:].strip()
    for c in chunks:
        want = _squeeze(s.text[c.span[0]:c.span[1]])
        assert _squeeze(_covered(s, c.student)) == want == _squeeze(_covered(t, c.teacher)), c


PAIRS = [("bpe", "uni"), ("uni", "bpe"), ("bpe", "wordpiece"), ("bpe_trim", "uni"), ("wordpiece", "bpe_trim"),
         ("bpe", "bpe_trim"), ("uni", "wordpiece")]


@pytest.mark.parametrize("pair", PAIRS, ids="-".join)
@pytest.mark.parametrize("text", TEXTS, ids=range(len(TEXTS)))
def test_chunks_spell_the_same_text_on_both_sides(toks, pair, text):
    s = token_spans(toks[pair[0]], text, add_special_tokens=True, name="student")
    t = token_spans(toks[pair[1]], text, add_special_tokens=True, name="teacher")
    check_chunks(s, t, align_chunks(s, t))


@pytest.mark.parametrize("pair", [("bpe", "uni"), ("wordpiece", "bpe"), ("uni", "bpe_trim")], ids="-".join)
def test_chunks_on_alpaca_rows(toks, corpus, pair):
    for text in corpus[:60:3]:
        s, t = token_spans(toks[pair[0]], text), token_spans(toks[pair[1]], text)
        check_chunks(s, t, align_chunks(s, t))


def test_different_tokenizers_give_multi_token_chunks_and_identical_ones_single_tokens(toks):
    text = TEXTS[4]
    s, t = token_spans(toks["bpe"], text), token_spans(toks["uni"], text)
    assert any(len(c.student) != len(c.teacher) for c in align_chunks(s, t))
    ascii_text = "The 3 quick brown foxes jumped over 12 lazy dogs.\n\nThen  they slept."
    for name in ("bpe", "uni", "wordpiece", "bpe_trim"):
        a = token_spans(toks[name], ascii_text)
        chunks = align_chunks(a, a)
        assert [(list(c.student), list(c.teacher)) for c in chunks] == [([i], [i]) for i in range(len(a.ids))]


@pytest.mark.parametrize("pair", [("bpe", "uni"), ("wordpiece", "bpe_trim"), ("uni", "uni")], ids="-".join)
def test_word_boundary_chunks_end_next_to_whitespace(toks, pair):
    for text in TEXTS:
        s, t = token_spans(toks[pair[0]], text), token_spans(toks[pair[1]], text)
        words = align_chunks(s, t, word_boundaries=True)
        check_chunks(s, t, words)
        assert len(words) <= len(align_chunks(s, t))
        for c in words[:-1]:
            end = c.span[1]
            assert text[end].isspace() or text[end - 1].isspace(), (text, c)
    s = token_spans(toks[pair[0]], "Distillation moves knowledge around")
    t = token_spans(toks[pair[1]], "Distillation moves knowledge around")
    spans = [s.text[c.span[0]:c.span[1]].strip() for c in align_chunks(s, t, word_boundaries=True)]
    assert [x for x in spans if x] == ["Distillation", "moves", "knowledge", "around"]  # (and space-only chunks)


def test_one_to_one_positions(toks):
    a = token_spans(toks["bpe"], TEXTS[2])
    s_pos, t_pos = one_to_one(align_chunks(a, a))
    assert s_pos.dtype == torch.long and s_pos.tolist() == t_pos.tolist() == list(range(len(a.ids)))
    s, t = token_spans(toks["bpe"], TEXTS[4]), token_spans(toks["uni"], TEXTS[4])
    chunks = align_chunks(s, t)
    s_pos, t_pos = one_to_one(chunks)
    assert 0 < len(s_pos) < len(chunks)
    for i, j in zip(s_pos.tolist(), t_pos.tolist()):
        assert _squeeze(s.text[slice(*s.spans[i])]) == _squeeze(t.text[slice(*t.spans[j])])


def test_split_multibyte_characters_stay_whole(toks):
    s, t = token_spans(toks["bpe"], UNICODE), token_spans(toks["uni"], UNICODE)
    shared = {sp for sp in s.spans if s.spans.count(sp) > 1}
    assert {UNICODE[a:b] for a, b in shared} >= {"ï", "é", "東", "京", "🙂"}  # byte-level split them
    chunks = align_chunks(s, t)
    for sp in shared:
        owners = {k for k, c in enumerate(chunks) for i in c.student if s.spans[i] == sp}
        assert len(owners) == 1
    by_span = {UNICODE[c.span[0]:c.span[1]].strip(): c for c in chunks}
    assert len(by_span["東"].student) == 3 and len(by_span["🙂"].student) == 4  # UTF-8 lengths, one chunk each
    same = align_chunks(s, s)  # the same tokenizer: split characters are the only multi-token chunks
    assert all(len(c.student) == 1 or len({s.spans[i] for i in c.student}) == 1 for c in same)


def test_leading_space_in_or_out_of_the_offsets_aligns_token_for_token(toks):
    text = "Hello world, again  and\nagain"
    s, t = token_spans(toks["bpe"], text), token_spans(toks["bpe_trim"], text)
    assert s.ids == t.ids and s.spans != t.spans  # same tokens, spans with and without the space
    chunks = align_chunks(s, t)
    check_chunks(s, t, chunks)
    assert all(len(c.student) == len(c.teacher) == 1 for c in chunks if _squeeze(text[c.span[0]:c.span[1]]))


def test_special_tokens_outside_the_text_are_in_no_chunk_and_markers_in_it_are_ordinary(toks):
    s = token_spans(toks["uni"], "Hello world", add_special_tokens=True)
    assert s.ids[0] == toks["uni"].bos_token_id and s.spans[0] == (0, 0) and not s.in_text[0]
    chunks = align_chunks(s, token_spans(toks["bpe"], "Hello world"))
    assert chunks[0].student.start == 1
    text = "<|im_start|>user\nhi there<|im_end|>"
    b, u = token_spans(toks["bpe"], text), token_spans(toks["uni"], text)
    assert toks["bpe"].convert_tokens_to_ids("<|im_start|>") in b.ids and all(b.in_text)
    chunks = align_chunks(b, u)
    check_chunks(b, u, chunks)
    assert text[chunks[0].span[0]:chunks[0].span[1]] == "<|im_start|>" and len(chunks[0].student) == 1


def test_special_token_without_span_inside_the_text_is_refused(toks):
    bos = toks["uni"].bos_token_id
    a = token_spans(toks["uni"], "ab cd")
    inner = TokenSpans(a.text, a.ids[:1] + (bos,) + a.ids[1:], a.spans[:1] + ((2, 2),) + a.spans[1:],
                       (True, False) + a.in_text[1:])
    single = TokenSpans(a.text, (5,), ((0, 5),), (True,))
    with pytest.raises(AlignmentError, match="special token without a span"):
        align_chunks(inner, single)


def test_a_normaliser_that_changes_characters_is_unalignable(toks):
    assert token_spans(toks["lower"], "hello world").ids  # nothing to change: fine
    with pytest.raises(AlignmentError, match=r"teacher's tokens do not spell the text: at character 6") as err:
        token_spans(toks["lower"], "hello World", name="teacher")
    assert isinstance(err.value, UserError) and "'World'" in str(err.value)
    with pytest.raises(AlignmentError, match="do not spell the text"):  # an unknown-token piece
        token_spans(toks["uni"], "snow ☃ man")


def test_texts_that_do_not_cover_each_other_are_refused(toks):
    a = token_spans(toks["bpe"], "one two")
    with pytest.raises(AlignmentError, match="different texts"):
        align_chunks(a, token_spans(toks["bpe"], "one three"))
    gap = TokenSpans("one two", (1, 2), ((0, 3), (5, 7)), (True, True))  # "t" at 4 in no token
    with pytest.raises(AlignmentError, match=r"student: characters 3..5 ' t' are in no token"):
        align_chunks(gap, a)
    back = TokenSpans("one two", (1, 2), ((0, 5), (1, 3)), (True, True))
    with pytest.raises(AlignmentError, match="goes back"):
        align_chunks(a, back)


def test_slow_tokenizer_is_refused_naming_the_fast_variant(toks):
    slow = SimpleNamespace(is_fast=False)
    for call in (lambda: token_spans(slow, "x", name="teacher"), lambda: token_bytes(slow),
                 lambda: matched_vocabulary(toks["bpe"], slow)):
        with pytest.raises(SlowTokenizerError, match=r"use_fast=True") as err:
            call()
        assert isinstance(err.value, UserError) and "character offsets" in str(err.value)


def test_spans_from_ids_round_trips_the_tokenizers_own_tokens(toks):
    for text in TEXTS:
        own = token_spans(toks["bpe"], text)
        again = spans_from_ids(toks["bpe"], own.ids + (toks["bpe"].eos_token_id,))
        assert again.text == text and again.spans[:-1] == own.spans
        assert again.spans[-1] == (len(text), len(text)) and not again.in_text[-1]
    with pytest.raises(AlignmentError, match="not valid UTF-8"):
        spans_from_ids(toks["bpe"], [toks["bpe"].convert_tokens_to_ids("æ")])  # a lone lead byte


def _char_logprobs(text: str, seed: int) -> list[float]:
    g = torch.Generator().manual_seed(seed)
    return [0.0 if ch.isspace() else -float(torch.rand((), generator=g)) * 3 for ch in text]


def _toy_token_logprobs(ts: TokenSpans, char_lp: list[float]) -> torch.Tensor:
    """A model consistent across tokenisations: log p(text) = sum of per-character log-probs, each character
    scored by the last token that covers it (whitespace is free, so the edges of chunks do not matter)."""
    last = {}
    for k, (a, b) in enumerate(ts.spans):
        for c in range(a, b):
            last[c] = k
    out = torch.zeros(len(ts.ids), dtype=torch.float64)
    for c, k in last.items():
        out[k] += char_lp[c]
    return out


@pytest.mark.parametrize("teacher", ["uni", "wordpiece", "bpe_trim"])
def test_non_canonical_student_tokenisation_gives_the_same_chunk_logprobs(toks, teacher):
    text = TEXTS[4]
    bpe = toks["bpe"]
    canonical = token_spans(bpe, text)
    byte_ids = [bpe.convert_tokens_to_ids(p) for i in canonical.ids for p in _bytes_of(bpe, i)]
    forced = spans_from_ids(bpe, byte_ids)  # one token per byte: a tokenisation BPE never produces itself
    assert forced.text == text and len(forced.ids) > len(canonical.ids)
    t = token_spans(toks[teacher], text)
    char_lp = _char_logprobs(text, seed=1)
    t_lp = _toy_token_logprobs(t, char_lp)
    for s in (canonical, forced):
        chunks = align_chunks(s, t)
        check_chunks(s, t, chunks)
        s_chunks = chunk_logprobs(_toy_token_logprobs(s, char_lp), [c.student for c in chunks])
        t_chunks = chunk_logprobs(t_lp, [c.teacher for c in chunks])
        want = torch.tensor([sum(char_lp[c.span[0]:c.span[1]]) for c in chunks], dtype=torch.float64)
        torch.testing.assert_close(s_chunks, want)
        torch.testing.assert_close(t_chunks, want)
        assert float(alm_loss(s_chunks, t_chunks, reduction="sum")) < 1e-9


def _bytes_of(tok, token_id: int) -> list[str]:
    return list(tok.convert_ids_to_tokens(token_id))  # a byte-level token is a string of one-byte symbols


# ------------------------------------------------------------------------------------------------ vocabulary
@pytest.mark.parametrize("name", ["bpe", "uni", "bpe_trim"])
def test_identical_tokenizers_match_every_id_to_itself(toks, name):
    s, t = matched_vocabulary(toks[name], toks[name])
    assert s.dtype == t.dtype == torch.long
    assert s.tolist() == t.tolist() == list(range(len(toks[name])))


def _decoded(tok, token_id: int) -> str | None:
    """What a token adds after an `a`, through transformers' own decode (an independent path)."""
    anchor = tok.convert_tokens_to_ids("a")
    text = tok.decode([anchor, token_id], clean_up_tokenization_spaces=False)
    return None if "\ufffd" in text else text[1:]


@pytest.mark.parametrize("pair", [("bpe", "uni"), ("uni", "bpe"), ("bpe", "wordpiece")], ids="-".join)
def test_matched_vocabulary_pairs_tokens_that_spell_the_same_text(toks, pair):
    a, b = toks[pair[0]], toks[pair[1]]
    s_ids, t_ids = matched_vocabulary(a, b)
    assert len(set(s_ids.tolist())) == len(s_ids) and len(set(t_ids.tolist())) == len(t_ids)
    specials = set(a.all_special_ids) | set(b.all_special_ids)
    pairs = {(s, t) for s, t in zip(s_ids.tolist(), t_ids.tolist())}
    assert not pairs & {(s, t) for s in a.all_special_ids for t in b.all_special_ids}  # no shared special
    texts_a = {i: _decoded(a, i) for i in range(len(a)) if i not in specials}
    texts_b: dict[str, list[int]] = {}
    for i in range(len(b)):
        if i not in b.all_special_ids and _decoded(b, i):
            texts_b.setdefault(_decoded(b, i), []).append(i)
    expected = {(i, min(texts_b[x])) for i, x in texts_a.items() if x and x in texts_b}
    assert pairs == expected and len(pairs) > 50
    by_text = {_decoded(a, s): t for s, t in pairs}
    assert " the" in by_text and b.convert_ids_to_tokens(by_text[" the"]) in ("▁the", "Ġthe", "the")
    partial = [i for i in range(len(a)) if i not in specials and _decoded(a, i) is None]
    if pair[0] == "bpe":
        assert partial and not set(partial) & set(s_ids.tolist())  # lone UTF-8 bytes match nothing here


def test_token_bytes_reads_space_markers_and_bytes(toks):
    for name, piece in (("bpe", "Ġthe"), ("uni", "▁the")):
        table = token_bytes(toks[name])
        assert table[toks[name].convert_tokens_to_ids(piece)] == b" the"
        assert all(table[i] is None for i in toks[name].all_special_ids)
    table = token_bytes(toks["bpe"])
    assert table[toks["bpe"].convert_tokens_to_ids("Ã")] == b"\xc3"


# ------------------------------------------------------------------------------------------------ ULD
def _ref_uld(s: torch.Tensor, t: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    out = []
    for row_s, row_t in zip(s.double(), t.double()):
        ps = sorted(torch.softmax(row_s / temperature, -1).tolist(), reverse=True)
        pt = sorted(torch.softmax(row_t / temperature, -1).tolist(), reverse=True)
        n = max(len(ps), len(pt))
        ps, pt = ps + [0.0] * (n - len(ps)), pt + [0.0] * (n - len(pt))
        out.append(sum(abs(x - y) for x, y in zip(ps, pt)) * temperature ** 2)
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_uld_matches_sorted_l1_with_zero_padding(temperature):
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 3, 7, generator=g) * 2, torch.randn(2, 3, 11, generator=g) * 2
    got = uld_loss(s, t, temperature=temperature, reduction="none")
    assert got.dtype == torch.float32 and got.shape == (2, 3)
    torch.testing.assert_close(got.double().reshape(-1), _ref_uld(s.reshape(6, 7), t.reshape(6, 11), temperature),
                               atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(uld_loss(t, s, temperature=temperature, reduction="none"), got)  # symmetric
    assert float(got.max()) <= 2 * temperature ** 2 + 1e-6


def test_uld_ignores_token_identity_and_padding():
    g = torch.Generator().manual_seed(1)
    s = torch.randn(4, 9, generator=g)
    perm = torch.randperm(9, generator=g)
    assert float(uld_loss(s, s[:, perm], reduction="sum")) < 1e-6  # a permutation costs nothing
    wider = torch.cat([s[:, perm], torch.full((4, 5), float("-inf"))], dim=-1)  # extra tokens with probability 0
    assert float(uld_loss(s, wider, reduction="sum")) < 1e-6
    assert float(uld_loss(s, torch.randn(4, 14, generator=g), reduction="sum")) > 0.1


def test_uld_mask_num_items_and_low_precision():
    g = torch.Generator().manual_seed(2)
    s, t = torch.randn(3, 5, 6, generator=g), torch.randn(3, 5, 8, generator=g)
    mask = torch.rand(3, 5, generator=g) > 0.4
    s_nan = s.clone().requires_grad_(True)
    with torch.no_grad():
        s_nan[~mask] = float("nan")  # masked positions never enter the value or the gradient
    value = uld_loss(s_nan, t, mask=mask, num_items=17)
    value.backward()
    want = _ref_uld(s[mask], t[mask]).sum() / 17
    torch.testing.assert_close(value.double(), want, atol=1e-6, rtol=1e-5)
    assert torch.isfinite(s_nan.grad).all() and not s_nan.grad[~mask].any()
    half = uld_loss(s.bfloat16(), t.bfloat16(), reduction="sum")
    assert half.dtype == torch.float32


# ------------------------------------------------------------------------------------------------ GOLD
@pytest.mark.parametrize("name", sorted(DIVERGENCES))
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_gold_with_identical_tokenizers_equals_the_divergence_exactly(name, reduction):
    g = torch.Generator().manual_seed(3)
    v = 13
    s = (torch.randn(2, 4, v, generator=g) * 3).requires_grad_(True)
    t = torch.randn(2, 4, v, generator=g) * 3
    mask = torch.rand(2, 4, generator=g) > 0.3
    ids = torch.arange(v)
    params = {"jsd": {"beta": 0.3}, "skew_forward_kl": {"alpha": 0.4}, "skew_reverse_kl": {"alpha": 0.4}}
    kw = dict(mask=mask, temperature=1.7, reduction=reduction, num_items=9, **params.get(name, {}))
    want = get_divergence(name)(s, t, **kw)
    got = gold_loss(s, t, ids, ids, divergence=name, **kw)
    assert torch.equal(got, want)
    (g_want,) = torch.autograd.grad(want.sum(), s)
    (g_got,) = torch.autograd.grad(got.sum(), s)
    assert torch.equal(g_got, g_want)


def _ref_gold(s, t, s_ids, t_ids, w_m, w_u, temperature=1.0):
    """Explicit float64 reference with forward KL on the renormalised matched part."""
    out = []
    for row_s, row_t in zip(s.double(), t.double()):
        ps, pt = torch.softmax(row_s / temperature, -1), torch.softmax(row_t / temperature, -1)
        qs = ps[s_ids] / ps[s_ids].sum()
        qt = pt[t_ids] / pt[t_ids].sum()
        kl = sum(float(a) * math.log(float(a) / float(b)) for a, b in zip(qt, qs))
        rest_s = [float(ps[i]) for i in range(len(ps)) if i not in set(s_ids.tolist())]
        rest_t = [float(pt[i]) for i in range(len(pt)) if i not in set(t_ids.tolist())]
        rest_s, rest_t = sorted(rest_s, reverse=True), sorted(rest_t, reverse=True)
        n = max(len(rest_s), len(rest_t))
        rest_s += [0.0] * (n - len(rest_s))
        rest_t += [0.0] * (n - len(rest_t))
        uld = sum(abs(a - b) for a, b in zip(rest_s, rest_t))
        out.append((w_m * kl + w_u * uld) * temperature ** 2)
    return torch.tensor(out, dtype=torch.float64)


def test_gold_on_two_trained_vocabularies_matches_the_reference(toks):
    s_ids, t_ids = matched_vocabulary(toks["bpe"], toks["uni"])
    v_s, v_t = len(toks["bpe"]), len(toks["uni"])
    g = torch.Generator().manual_seed(4)
    s, t = torch.randn(5, v_s, generator=g) * 2, torch.randn(5, v_t, generator=g) * 2
    got = gold_loss(s, t, s_ids, t_ids, temperature=1.5, reduction="none")
    w_m = len(s_ids) / v_t  # GOLD's default: the teacher vocabulary's matched share
    torch.testing.assert_close(got.double(), _ref_gold(s, t, s_ids, t_ids, w_m, 1 - w_m, 1.5), atol=1e-5, rtol=1e-4)
    fixed = gold_loss(s, t, s_ids, t_ids, matched_weight=0.3, unmatched_weight=2.0, reduction="none")
    torch.testing.assert_close(fixed.double(), _ref_gold(s, t, s_ids, t_ids, 0.3, 2.0), atol=1e-5, rtol=1e-4)


def test_gold_zero_when_the_teacher_agrees_and_uld_when_nothing_matches():
    g = torch.Generator().manual_seed(5)
    s = torch.randn(3, 8, generator=g)
    s_ids, t_ids = torch.tensor([0, 2, 5, 7]), torch.tensor([6, 1, 3, 0])
    t = torch.full((3, 10), -30.0)
    t[:, t_ids] = s[:, s_ids]  # the same logits on the shared tokens ...
    t[:, [2, 4, 5, 7]] = s[:, [1, 3, 4, 6]]  # ... and the rest with the same values under other ids
    t[:, [8, 9]] = float("-inf")
    assert float(gold_loss(s, t, s_ids, t_ids, divergence="jsd", reduction="sum")) < 1e-6
    empty = torch.zeros(0, dtype=torch.long)
    torch.testing.assert_close(gold_loss(s, t, empty, empty), uld_loss(s, t))


def test_gold_refuses_bad_pairs():
    s, t = torch.randn(2, 5), torch.randn(2, 6)
    for s_ids, t_ids, match in ((torch.tensor([0, 0]), torch.tensor([1, 2]), "repeats"),
                                (torch.tensor([0, 5]), torch.tensor([1, 2]), r"\[0, 5\)"),
                                (torch.tensor([0]), torch.tensor([1, 2]), "same length"),
                                (torch.tensor([0.0]), torch.tensor([1.0]), "LongTensor")):
        with pytest.raises(ValueError, match=match):
            gold_loss(s, t, s_ids, t_ids)
    with pytest.raises(ValueError, match="unknown divergence"):
        gold_loss(s, t, torch.tensor([0]), torch.tensor([0]), divergence="kl")


# ------------------------------------------------------------------------------------------------ ALM
def test_chunk_logprobs_sums_each_range_and_passes_gradients():
    g = torch.Generator().manual_seed(6)
    lp = (-torch.rand(2, 7, generator=g) * 4).requires_grad_(True)
    chunks = [[range(0, 2), (2, 3), range(3, 7)], [(1, 4), range(5, 6)]]
    got = chunk_logprobs(lp, chunks)
    d = lp.detach()
    want = torch.stack([d[0, :2].sum(), d[0, 2], d[0, 3:].sum(), d[1, 1:4].sum(), d[1, 5]])
    torch.testing.assert_close(got, want)
    got.sum().backward()
    assert lp.grad.tolist() == [[1.0] * 7, [0.0, 1.0, 1.0, 1.0, 0.0, 1.0, 0.0]]
    torch.testing.assert_close(chunk_logprobs(d[1], chunks[1]), want[3:])
    assert chunk_logprobs(d, [[], []]).shape == (0,)
    for bad in ([[range(2, 2)], []], [[(5, 8)], []]):
        with pytest.raises(ValueError, match="empty or outside"):
            chunk_logprobs(d, bad)


def _ref_binary_kl(lp: float, lq: float, tau: float, eps: float = 1e-6) -> float:
    p, q = math.exp(min(lp, 0.0) / tau - eps), math.exp(min(lq, 0.0) / tau - eps)
    return p * math.log(p / q) + (1 - p) * math.log((1 - p) / (1 - q))


@pytest.mark.parametrize("tau", [1.0, 100.0])
def test_alm_is_the_binarised_kl_of_chunk_probabilities(tau):
    t = torch.tensor([-0.1, -2.0, -7.5, -0.0001, -30.0], dtype=torch.float64)
    s = torch.tensor([-0.3, -2.0, -5.0, -0.2, -31.0], dtype=torch.float64)
    fwd = alm_loss(s, t, binarization_temperature=tau, reduction="none")
    rev = alm_loss(s, t, binarization_temperature=tau, divergence="reverse_kl", reduction="none")
    assert fwd.dtype == torch.float64
    for k in range(5):
        assert math.isclose(float(fwd[k]), _ref_binary_kl(float(t[k]), float(s[k]), tau), rel_tol=1e-9, abs_tol=1e-15)
        assert math.isclose(float(rev[k]), _ref_binary_kl(float(s[k]), float(t[k]), tau), rel_tol=1e-9, abs_tol=1e-15)
    assert float(fwd[1]) == 0.0 and all(float(fwd[k]) > 0 for k in (0, 2, 3, 4))
    # the reference implementation's binary cross-entropy = this forward KL + the teacher's binary entropy
    p = torch.exp(t / tau - 1e-6)
    q = torch.exp(s / tau - 1e-6)
    bce = -(p * q.log() + (1 - p) * (1 - q).log())
    entropy = -(p * p.log() + (1 - p) * (1 - p).log())
    torch.testing.assert_close(fwd, bce - entropy)


def test_alm_with_identical_tokenizers_is_per_token_likelihood_matching(toks):
    text = "The 3 quick brown foxes jumped over 12 lazy dogs."
    a = token_spans(toks["bpe"], text)
    chunks = align_chunks(a, a)
    g = torch.Generator().manual_seed(7)
    s_tok = -torch.rand(len(a.ids), generator=g) * 5
    t_tok = s_tok.clone()
    t_tok[::3] -= 0.5  # every third token differs
    s_chunks = chunk_logprobs(s_tok, [c.student for c in chunks])
    t_chunks = chunk_logprobs(t_tok, [c.teacher for c in chunks])
    assert torch.equal(s_chunks, s_tok) and torch.equal(t_chunks, t_tok)  # one token per chunk
    per = alm_loss(s_chunks, t_chunks, binarization_temperature=1.0, reduction="none")
    assert ((per == 0) == (s_tok == t_tok)).all() and (per[::3] > 0).all()
    want = [_ref_binary_kl(float(x), float(y), 1.0) for x, y in zip(t_tok, s_tok)]
    torch.testing.assert_close(per.double(), torch.tensor(want, dtype=torch.float64), atol=1e-6, rtol=1e-4)
    assert float(alm_loss(s_chunks, s_chunks)) == 0.0


def test_alm_is_finite_at_the_edges_and_honours_mask_and_num_items():
    s = torch.tensor([0.0, -1e4, -3.0, -2.0, -1.0], requires_grad=True)
    t = torch.tensor([0.0, -2.0, float("-inf"), -2.0, 0.5])
    value = alm_loss(s, t, reduction="none")
    assert torch.isfinite(value).all() and value[0] == 0 and value[4] > 0  # a log-prob of 0.5 counts as 0
    (grad,) = torch.autograd.grad(value.sum(), s)
    assert torch.isfinite(grad).all()
    reverse = alm_loss(s, t, divergence="reverse_kl", reduction="none")  # mass on what the teacher rules out:
    assert torch.isinf(reverse[2]) and torch.isfinite(reverse[[0, 1, 3, 4]]).all()  # legitimately infinite
    kept = torch.tensor([True, True, False, True, True])  # masked out, it never enters the gradient
    (grad,) = torch.autograd.grad(alm_loss(s, t, mask=kept, divergence="reverse_kl"), s)
    assert torch.isfinite(grad).all() and float(grad[2]) == 0.0
    mask = torch.tensor([True, False, True, True, False])
    s_nan = torch.tensor([-1.0, float("nan"), -3.0, -2.5, float("nan")])
    got = alm_loss(s_nan, t, mask=mask, num_items=10)
    full = alm_loss(s_nan.nan_to_num(), t, reduction="none")
    torch.testing.assert_close(got, full[mask].sum() / 10)
    with pytest.raises(ValueError, match="binarization_temperature"):
        alm_loss(s, t, binarization_temperature=0.0)
    with pytest.raises(ValueError, match="divergence"):
        alm_loss(s, t, divergence="jsd")
