"""Two tokenisations of one text, aligned: the chunks of cross-tokenizer distillation and the shared vocabulary.

A teacher and a student with different tokenizers cut the same text into different tokens. ALM (Minixhofer et al.,
2025, "Universal Cross-Tokenizer Distillation via Approximate Likelihood Matching") compares them chunk by chunk: a
chunk is a run of student tokens and a run of teacher tokens that end at the same place in the text, so both runs
spell the same characters and the two models' likelihoods of the chunk describe the same event. GOLD (TRL) pairs
the two vocabularies' tokens that spell exactly the same text. Both come from a FAST tokenizer's character offsets.

    s = token_spans(student_tok, text, name="student")
    t = token_spans(teacher_tok, text, name="teacher")
    chunks = align_chunks(s, t)                     # [Chunk(student=range, teacher=range, span=(a, b)), ...]
    s_pos, t_pos = one_to_one(chunks)               # single-token chunks: where ULD / GOLD compare distributions
    student_ids, teacher_ids = matched_vocabulary(student_tok, teacher_tok)   # once per tokenizer pair

Positions are character offsets into the text (Python string indices), end exclusive. The rules:

- Special tokens the tokenizer adds outside the text (a BOS or EOS, offset (0, 0): an empty span) belong to no
  chunk. A special token written in the text (a chat-template marker such as ``<|im_start|>``, whose span covers
  those characters) is an ordinary token there.
- A side can cut between two consecutive tokens that share no character. Byte-level BPE splits a multi-byte UTF-8
  character into several tokens with the same span; those never separate, so such a character lies whole in one
  chunk (so does a SentencePiece ``▁`` that a tokenizer prepends as a token of its own: HF gives it the first
  character's span). Identical tokenizers thus give one token per chunk except for these.
- Whitespace conventions differ (``Ġ``/``▁`` tokens carry the space before a word, WordPiece drops spaces, some
  vocabularies end a token with a space), so cut positions are compared after skipping forward over whitespace.
  Where both sides cut at the very same position every such cut is kept (a chunk may then be whitespace only);
  where a whitespace run holds cuts of both sides but none at the same position, the pair of cuts closest
  to each other is taken. Tokens after the last common cut (trailing whitespace one side has a token for) join
  the last chunk.
- A chunk's ``span`` runs from the previous chunk's end to the further of its two cut positions, so the spans tile
  the text, and each span's non-whitespace characters are exactly those its student tokens and its teacher tokens
  cover. Only whitespace at a chunk's edges can be carried by one side and not the other.
- Text the two tokenisations do not both spell raises :class:`AlignmentError` with the reason (a normaliser that
  lowercases or strips accents, an unknown-token piece, characters in no token); the caller names ``file:line``
  and skips the row if the user allows it.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import NamedTuple, Sequence

import torch

from kdistill.errors import UserError

__all__ = ["AlignmentError", "Chunk", "SlowTokenizerError", "TokenSpans", "align_chunks", "matched_vocabulary",
           "one_to_one", "require_fast", "spans_from_ids", "token_bytes", "token_spans"]


class AlignmentError(UserError, ValueError):
    """The two tokenisations of a text cannot be aligned (the message says why); the caller adds file:line."""


class SlowTokenizerError(UserError, TypeError):
    """A slow (Python) tokenizer: it reports no character offsets, so no alignment can be computed."""


@dataclass(frozen=True)
class TokenSpans:
    """One tokenisation of ``text``: token ids, their (start, end) character spans, and which are in the text
    (False only for a special token with an empty span, e.g. an added BOS; such a token is in no chunk)."""

    text: str
    ids: tuple[int, ...]
    spans: tuple[tuple[int, int], ...]
    in_text: tuple[bool, ...]

    def __post_init__(self):
        if not len(self.ids) == len(self.spans) == len(self.in_text):
            raise ValueError(f"ids, spans and in_text differ in length: {len(self.ids)}, {len(self.spans)}, "
                             f"{len(self.in_text)}")


class Chunk(NamedTuple):
    """Student tokens ``student`` and teacher tokens ``teacher`` (index ranges into each side's ``TokenSpans``) that
    spell the same text, ``span`` = (start, end) in characters."""

    student: range
    teacher: range
    span: tuple[int, int]


def require_fast(tokenizer, name: str = "tokenizer") -> None:
    """Raise :class:`SlowTokenizerError` unless ``tokenizer`` is a fast (Rust ``tokenizers``) tokenizer."""
    if not getattr(tokenizer, "is_fast", False) or getattr(tokenizer, "backend_tokenizer", None) is None:
        raise SlowTokenizerError(
            f"{name}: {type(tokenizer).__name__} is a slow (Python) tokenizer and reports no character offsets, "
            f"which cross-tokenizer alignment needs; load the fast one: "
            f"AutoTokenizer.from_pretrained(..., use_fast=True) (the `tokenizers` package; a SentencePiece model "
            f"also needs `sentencepiece` to convert)")


def _special_ids(tokenizer) -> set[int]:
    ids = set(tokenizer.all_special_ids)
    ids.update(i for i, tok in tokenizer.added_tokens_decoder.items() if tok.special)
    return ids


def _squeeze(text: str) -> tuple[str, list[int]]:
    """The text without whitespace, and the position in ``text`` of each kept character."""
    where = [i for i, ch in enumerate(text) if not ch.isspace()]
    return "".join(text[i] for i in where), where


def token_spans(tokenizer, text: str, add_special_tokens: bool = False, name: str = "tokenizer") -> TokenSpans:
    """Tokenise ``text`` with a fast tokenizer and return its token ids with their character spans.

    Checks that the tokens spell the text: decoding the in-text tokens must give the text back up to whitespace,
    else :class:`AlignmentError` names the first character that differs (a normaliser that lowercases, strips
    accents or rewrites Unicode, or an unknown-token piece, would make the two sides' tokens describe different
    text). ``add_special_tokens`` adds the tokenizer's own BOS/EOS (in no chunk).
    """
    require_fast(tokenizer, name)
    enc = tokenizer(text, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
    ids = [int(i) for i in enc["input_ids"]]
    spans = tuple((int(a), int(b)) for a, b in enc["offset_mapping"])
    special = _special_ids(tokenizer)
    in_text = tuple(not (i in special and a == b) for i, (a, b) in zip(ids, spans))
    decoded = tokenizer.decode([i for i, keep in zip(ids, in_text) if keep], skip_special_tokens=False,
                               clean_up_tokenization_spaces=False)
    want, where = _squeeze(text)
    got, _ = _squeeze(decoded)
    if got != want:
        k = next((j for j, (a, b) in enumerate(zip(want, got)) if a != b), min(len(want), len(got)))
        pos = where[k] if k < len(where) else len(text)
        raise AlignmentError(
            f"the {name}'s tokens do not spell the text: at character {pos} the text has "
            f"{want[k:k + 12]!r} and the decoded tokens {got[k:k + 12]!r} (a normaliser that changes characters, "
            f"or characters the vocabulary cannot represent)")
    return TokenSpans(text, tuple(ids), spans, in_text)


def _skip_space(text: str) -> list[int]:
    """skip[i] = the first position >= i that is not whitespace (len(text) if none)."""
    skip = [len(text)] * (len(text) + 1)
    for i in range(len(text) - 1, -1, -1):
        skip[i] = skip[i + 1] if text[i].isspace() else i
    return skip


def _cuts(ts: TokenSpans, side: str) -> tuple[list[int], list[tuple[int, int]]]:
    """The in-text token indices and the places this side can cut: (position, in-text tokens before the cut)."""
    text = ts.text
    where = [k for k, keep in enumerate(ts.in_text) if keep]
    cuts: list[tuple[int, int]] = []
    covered = 0
    for q, k in enumerate(where):
        a, b = ts.spans[k]
        if not 0 <= a <= b <= len(text):
            raise AlignmentError(f"{side} token {k} has span ({a}, {b}) outside the text of {len(text)} characters")
        if q and (a < ts.spans[where[q - 1]][0] or b < ts.spans[where[q - 1]][1]):
            raise AlignmentError(f"{side} token {k}'s span ({a}, {b}) goes back before the token before it")
        if a > covered and text[covered:a].strip():
            raise AlignmentError(f"{side}: characters {covered}..{a} {text[covered:a][:20]!r} are in no token")
        covered = max(covered, b)
        if q + 1 == len(where) or b <= ts.spans[where[q + 1]][0]:
            cuts.append((b, q + 1))
    if text[covered:].strip():
        raise AlignmentError(f"{side}: characters {covered}..{len(text)} {text[covered:][:20]!r} are in no token")
    return where, cuts


def _pair_cuts(s_cuts, t_cuts, skip) -> list[tuple[int, int, int]]:
    """Common cuts as (student tokens before, teacher tokens before, end position), increasing on both sides."""
    groups: list[dict[int, list[tuple[int, int]]]] = [{}, {}]
    for side, cuts in enumerate((s_cuts, t_cuts)):
        for pos, count in cuts:
            groups[side].setdefault(skip[pos], []).append((pos, count))
    pairs: list[tuple[int, int, int]] = []
    for key in sorted(groups[0].keys() & groups[1].keys()):
        s_group, t_group = groups[0][key], groups[1][key]
        exact = []
        for pos in sorted({p for p, _ in s_group} & {p for p, _ in t_group}):
            s_at = [c for p, c in s_group if p == pos]
            t_at = [c for p, c in t_group if p == pos]
            exact += [(a, b, pos) for a, b in zip(reversed(s_at), reversed(t_at))]
        if exact:
            pairs += sorted(exact)
        else:  # no cut at the same position in this whitespace run: the two closest
            candidates = [(abs(ps - pt), ps, cs, pt, ct) for ps, cs in s_group for pt, ct in t_group]
            _, ps, cs, pt, ct = min(candidates)
            pairs.append((cs, ct, max(ps, pt)))
    last = (s_cuts[-1][1], t_cuts[-1][1])
    if pairs and (pairs[-1][0] == last[0]) != (pairs[-1][1] == last[1]):  # trailing tokens join the last chunk
        pairs[-1] = (*last, max(pairs[-1][2], s_cuts[-1][0], t_cuts[-1][0]))
    elif pairs and pairs[-1][:2] != last:
        pairs.append((*last, max(s_cuts[-1][0], t_cuts[-1][0])))
    return pairs


def align_chunks(student: TokenSpans, teacher: TokenSpans, word_boundaries: bool = False) -> list[Chunk]:
    """Group two tokenisations of the same text into chunks that end at the same character (see the module
    docstring for the rules). Every in-text token of both sides is in exactly one chunk, in order; chunks are
    never empty on either side. ``word_boundaries``: chunks end only next to whitespace (or at the end of the
    text), like ALM's "space" chunks: coarser chunks whose ends do not depend on how a tokenizer splits a word
    (less tokenization bias), at the price of one chunk per word at least (a text without spaces is one chunk).
    Raises :class:`AlignmentError` when the texts differ or a side leaves non-whitespace characters uncovered,
    has spans that go backwards, or has a special token without a span between two chunked tokens.
    """
    if student.text != teacher.text:
        raise AlignmentError("the student's and the teacher's tokens are of different texts")
    text = student.text
    s_where, s_cuts = _cuts(student, "student")
    t_where, t_cuts = _cuts(teacher, "teacher")
    if word_boundaries:
        def at_space(pos: int) -> bool:
            return pos == len(text) or text[pos].isspace() or (pos > 0 and text[pos - 1].isspace())

        s_cuts = [c for c in s_cuts if at_space(c[0])]
        t_cuts = [c for c in t_cuts if at_space(c[0])]
    if not s_cuts or not t_cuts:
        return []
    chunks: list[Chunk] = []
    s_done = t_done = start = 0
    for s_count, t_count, end in _pair_cuts(s_cuts, t_cuts, _skip_space(text)):
        s_range = _index_range(s_where, s_done, s_count, "student")
        t_range = _index_range(t_where, t_done, t_count, "teacher")
        chunks.append(Chunk(s_range, t_range, (start, end)))
        s_done, t_done, start = s_count, t_count, end
    return chunks


def one_to_one(chunks: Sequence[Chunk]) -> tuple[torch.Tensor, torch.Tensor]:
    """The token indices (student, teacher; two LongTensors) of the chunks that are a single token on each side:
    the positions where token-level losses (ULD, GOLD) compare two next-token distributions."""
    pairs = [(c.student.start, c.teacher.start) for c in chunks if len(c.student) == len(c.teacher) == 1]
    return (torch.tensor([s for s, _ in pairs], dtype=torch.long),
            torch.tensor([t for _, t in pairs], dtype=torch.long))


def _index_range(where: list[int], lo: int, hi: int, side: str) -> range:
    first, last = where[lo], where[hi - 1]
    if last - first != hi - 1 - lo:
        raise AlignmentError(f"{side}: a special token without a span sits inside the text (between tokens "
                             f"{first} and {last}); align only the text between special tokens")
    return range(first, last + 1)


# ------------------------------------------------------------------------------------------------ vocabulary
def _byte_decoder() -> dict[str, int]:
    """The inverse of byte-level BPE's byte -> printable character table (GPT-2's scheme): bytes that are
    printable Latin-1 map to themselves, the other 68 to characters 256, 257, ... in byte order."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for byte in range(256):
        if byte in keep:
            table[chr(byte)] = byte
        else:
            table[chr(256 + extra)] = byte
            extra += 1
    return table


def _uses(node, kind: str) -> bool:
    """Whether a tokenizer.json component (a dict, possibly a Sequence of them) is or contains ``kind``."""
    if isinstance(node, dict):
        return node.get("type") == kind or any(_uses(v, kind) for v in node.values())
    if isinstance(node, list):
        return any(_uses(v, kind) for v in node)
    return False


_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def token_bytes(tokenizer, name: str = "tokenizer") -> list[bytes | None]:
    """For each id below ``len(tokenizer)``, the UTF-8 bytes the token adds to a text in the middle of a sequence
    (``Ġthe`` and ``▁the`` both give b" the"; a byte-level piece of a multi-byte character gives its byte(s));
    None for special tokens and for pieces whose text the decoder hides (it would print U+FFFD).

    Byte-level vocabularies are read through the byte table; others through the tokenizer's own decoder, as the
    second token after a plain one (so a SentencePiece ``▁`` is a space, as it is inside a text); byte-fallback
    pieces ``<0xNN>`` are the byte NN. Added non-special tokens spell their content. Runs once per vocabulary.
    """
    require_fast(tokenizer, name)
    backend = tokenizer.backend_tokenizer
    spec = json.loads(backend.to_str())
    byte_level = _uses(spec.get("decoder"), "ByteLevel")
    byte_fallback = bool((spec.get("model") or {}).get("byte_fallback"))
    decoder = backend.decoder
    special = _special_ids(tokenizer)
    added = {i: tok.content for i, tok in tokenizer.added_tokens_decoder.items()}
    to_byte = _byte_decoder()
    anchor = decoder.decode(["a"]) if decoder is not None else "a"
    out: list[bytes | None] = []
    for i, piece in enumerate(tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))):
        if i in special or piece is None:
            out.append(None)
        elif i in added:
            out.append(added[i].encode("utf-8"))
        elif byte_level and all(ch in to_byte for ch in piece):
            out.append(bytes(to_byte[ch] for ch in piece))
        elif byte_fallback and _BYTE_PIECE.fullmatch(piece):
            out.append(bytes([int(piece[3:5], 16)]))
        elif decoder is None:
            out.append(piece.encode("utf-8"))
        else:
            text = decoder.decode(["a", piece])
            ok = text.startswith(anchor) and ("\ufffd" not in text or "\ufffd" in piece)
            out.append(text[len(anchor):].encode("utf-8") if ok else None)
    return out


def matched_vocabulary(student_tokenizer, teacher_tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """Pairs of (student id, teacher id) whose tokens spell exactly the same text (:func:`token_bytes`), and
    special tokens with the same content; GOLD's matched part. Two LongTensors of equal length, sorted by
    student id, each free of repeats: where one vocabulary has several ids with the same text (rare; e.g. a
    WordPiece ``.`` and ``##.``), the lowest id is paired and the others stay unmatched. Identical tokenizers
    give the identity on every id of a byte-level or SentencePiece vocabulary.
    """
    tables = [token_bytes(student_tokenizer, "student"), token_bytes(teacher_tokenizer, "teacher")]
    keys: list[dict[object, int]] = [{}, {}]
    for side, (tok, table) in enumerate(zip((student_tokenizer, teacher_tokenizer), tables)):
        for i in sorted(_special_ids(tok)):
            if 0 <= i < len(table):
                keys[side].setdefault(("special", tok.convert_ids_to_tokens(i)), i)
        for i, piece in enumerate(table):
            if piece:
                keys[side].setdefault(piece, i)
    pairs = sorted((keys[0][k], keys[1][k]) for k in keys[0].keys() & keys[1].keys())
    student_ids = torch.tensor([s for s, _ in pairs], dtype=torch.long)
    teacher_ids = torch.tensor([t for _, t in pairs], dtype=torch.long)
    return student_ids, teacher_ids


def spans_from_ids(tokenizer, ids: Sequence[int], table: list[bytes | None] | None = None,
                   name: str = "tokenizer") -> TokenSpans:
    """The text a given id sequence spells and each token's span, for tokens that are not the tokenizer's own
    tokenisation of a text (a sampled answer, a forced segmentation). ``table`` is :func:`token_bytes` of the
    tokenizer (pass it when calling often: computing it reads the whole vocabulary). Special tokens get an empty
    span at the current position and are in no chunk; a token that splits a character spans that character.
    Raises :class:`AlignmentError` when a token has no known text or the bytes are not valid UTF-8.
    """
    table = token_bytes(tokenizer, name) if table is None else table
    special = _special_ids(tokenizer)
    pieces: list[bytes] = []
    for k, i in enumerate(ids):
        piece = table[i] if 0 <= i < len(table) else None
        if piece is None and i not in special:
            raise AlignmentError(f"{name} token {k} (id {i}) has no known text")
        pieces.append(piece or b"")
    data = b"".join(pieces)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise AlignmentError(f"the {name}'s tokens are not valid UTF-8 text ({exc.reason} at byte {exc.start})") \
            from None
    char_of = [0] * (len(data) + 1)  # char_of[b] = the character byte b belongs to (b = len: len(text))
    pos = 0
    for c, ch in enumerate(text):
        n = len(ch.encode("utf-8"))
        char_of[pos:pos + n] = [c] * n
        pos += n
    char_of[len(data)] = len(text)
    spans, in_text, pos = [], [], 0
    for i, piece in zip(ids, pieces):
        if piece:
            spans.append((char_of[pos], char_of[pos + len(piece) - 1] + 1))
        else:
            spans.append((char_of[pos], char_of[pos]))
        in_text.append(bool(piece) or i not in special)
        pos += len(piece)
    return TokenSpans(text, tuple(int(i) for i in ids), tuple(spans), tuple(in_text))
