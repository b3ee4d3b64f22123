"""LM rows for cross-tokenizer distillation: the student's tokens, the teacher's own tokens of the same row, and the
chunks that align them.

Each side renders the row with its own tokenizer (and chat template: an instruct teacher reads its own prompt
format) and tokenises it segment by segment, as `kdistill.data.formatting` does. The answers are the same text on
both sides; each trained answer is aligned with `kdistill.data.alignment.align_chunks` over that text (the template's
own end-of-turn marker, different per tokenizer, is outside it). A row then carries, besides `input_ids` / `labels`:

* `xt_input_ids`, `xt_labels`: the teacher's tokens (the token view "xt"; labels on its answer tokens);
* `s_chunks`, `xt_chunks`: per token, the index of its chunk within the row, or -1 (prompt, padding, template
  markers, a chunk cut by `max_length` on either side). Chunk c spells the same characters on both sides.

Rows are causal only. A row whose two tokenisations cannot be aligned raises `AlignmentError` naming `file:line`
(skipped and counted with `data.skip_invalid`).

For on-policy runs (`sampling=True`) each row also carries where its final answer starts on each side
(`prompt_length`, `xt_prompt_length`), and prompt-only rows are accepted: rendered with a placeholder answer and cut
before it on both sides (`kdistill.data.prompt_rows`). `kdistill.data.cross_samples` rebuilds both views around
the answers the student samples.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kdistill.data.alignment import AlignmentError, TokenSpans, align_chunks, token_spans
from kdistill.data.formatting import IGNORE_INDEX, EncodeStats, encode_with_segments
from kdistill.data.prompt_rows import PROMPT_LENGTH, final_response_start, has_response, with_placeholder
from kdistill.data.records import Example

__all__ = ["CHUNK_KEYS", "TEACHER_PROMPT_LENGTH", "TEACHER_VIEW", "CrossTokenizerCollator", "encode_cross"]

TEACHER_VIEW = "xt"
CHUNK_KEYS = ("s_chunks", "xt_chunks")
TEACHER_PROMPT_LENGTH = f"{TEACHER_VIEW}_{PROMPT_LENGTH}"


def _answers(example: Example) -> list[str]:
    """The trained answers of a row, in order (the text both tokenizers must spell)."""
    f = example.fields
    if example.kind == "alpaca":
        return [f["output"]]
    if example.kind == "prompt_completion":
        return [f["completion"]]
    return [m["content"] for m in f["messages"] if m["role"] == "assistant"]


def _inside(spans: TokenSpans, lo: int, hi: int, answer: str) -> tuple[TokenSpans, list[int]]:
    """The tokens of a segment that lie inside [lo, hi) (the answer), as spans of the answer alone, and their
    indices in the segment."""
    keep = [i for i, (a, b) in enumerate(spans.spans) if spans.in_text[i] and lo <= a and b <= hi and b > a]
    return (TokenSpans(answer, tuple(spans.ids[i] for i in keep), tuple((spans.spans[i][0] - lo, spans.spans[i][1] - lo)
                                                                      for i in keep), tuple(True for _ in keep)),
            keep)


def _trained_segments(feature_segments, example: Example, tokenizer, side: str):
    """(segment start token, TokenSpans of the answer, the kept tokens' indices in the segment) per answer."""
    answers = _answers(example)
    trained = [(text, start) for text, trainable, start in feature_segments if trainable]
    if len(trained) != len(answers):
        raise AlignmentError(f"the {side}'s rendering has {len(trained)} trained segments for {len(answers)} answers")
    out = []
    for (text, start), answer in zip(trained, answers):
        at = text.find(answer)
        if at < 0:
            raise AlignmentError(f"the {side}'s chat template changes the answer's text (it is not found in its "
                                 "rendering)")
        spans = token_spans(tokenizer, text, name=side)
        sub, keep = _inside(spans, at, at + len(answer), answer)
        out.append((start, sub, keep))
    return out


def encode_cross(examples, student_tokenizer, teacher_tokenizer, *, template: str = "auto", max_length: int = 512,
                 skip_invalid: bool = False, sampling: bool = False) -> tuple[list[dict], EncodeStats, list[str]]:
    """Encode rows for both tokenizers with their chunk alignment (see the module docstring). Returns (features,
    stats, the skipped rows' "file:line: reason")."""
    features, stats, skipped = [], EncodeStats(), []
    for example in examples:
        stats.total += 1
        answered = not sampling or has_response(example)
        example = example if answered else with_placeholder(example)
        student, s_cut, s_segments = encode_with_segments(example, student_tokenizer, template=template,
                                                           max_length=max_length)
        teacher, t_cut, t_segments = encode_with_segments(example, teacher_tokenizer, template=template,
                                                           max_length=max_length)
        stats.truncated += int(s_cut or t_cut)
        if student is None or teacher is None:
            stats.dropped_no_target += 1
            continue
        try:
            s_parts = _trained_segments(s_segments, example, student_tokenizer, "student")
            t_parts = _trained_segments(t_segments, example, teacher_tokenizer, "teacher")
            s_chunks = [-1] * len(student["input_ids"])
            t_chunks = [-1] * len(teacher["input_ids"])
            c = 0
            for (s_start, s_spans, s_keep), (t_start, t_spans, t_keep) in zip(s_parts, t_parts):
                for chunk in align_chunks(s_spans, t_spans):
                    s_pos = [s_start + s_keep[i] for i in chunk.student]
                    t_pos = [t_start + t_keep[i] for i in chunk.teacher]
                    if not s_pos or not t_pos or max(s_pos) >= len(s_chunks) or max(t_pos) >= len(t_chunks):
                        continue  # empty on one side (whitespace only) or cut by max_length
                    for p in s_pos:
                        s_chunks[p] = c
                    for p in t_pos:
                        t_chunks[p] = c
                    c += 1
        except AlignmentError as exc:
            if not skip_invalid:
                raise AlignmentError(f"{example.source}: {exc}") from None
            skipped.append(f"{example.source}: {exc}")
            continue
        feature = {**student, f"{TEACHER_VIEW}_input_ids": teacher["input_ids"],
                   f"{TEACHER_VIEW}_labels": teacher["labels"], CHUNK_KEYS[0]: s_chunks, CHUNK_KEYS[1]: t_chunks}
        if sampling:
            feature = _with_prompt_lengths(feature, answered)
            if feature is None:  # nothing before the answer to generate from
                stats.dropped_no_target += 1
                continue
        features.append(feature)
        stats.sources.append(example.source)
    return features, stats, skipped


def _with_prompt_lengths(feature: dict, answered: bool) -> dict | None:
    """Where the final answer starts on each side; a prompt-only row is cut there (no labels, no chunks)."""
    starts = {}
    for prefix in ("", f"{TEACHER_VIEW}_"):
        start = final_response_start(feature[f"{prefix}labels"])
        if start == 0:
            return None
        starts[prefix] = start
        if not answered:
            chunk_key = CHUNK_KEYS[0] if not prefix else CHUNK_KEYS[1]
            feature[f"{prefix}input_ids"] = feature[f"{prefix}input_ids"][:start]
            feature[f"{prefix}labels"] = [IGNORE_INDEX] * start
            feature[chunk_key] = [-1] * start
    feature[PROMPT_LENGTH], feature[TEACHER_PROMPT_LENGTH] = starts[""], starts[f"{TEACHER_VIEW}_"]
    return feature


@dataclass
class CrossTokenizerCollator:
    """Pads the student's keys with the student's pad id, the teacher view with the teacher's, chunk ids with -1
    (all right-padded)."""

    student_pad_id: int
    teacher_pad_id: int
    keys: tuple = field(default=(TEACHER_VIEW,))

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        def pad(rows, value):
            width = max(len(r) for r in rows)
            return torch.tensor([list(r) + [value] * (width - len(r)) for r in rows], dtype=torch.long)

        out = {}
        for prefix, pad_id in (("", self.student_pad_id), (f"{TEACHER_VIEW}_", self.teacher_pad_id)):
            ids = [f[f"{prefix}input_ids"] for f in features]
            out[f"{prefix}input_ids"] = pad(ids, pad_id)
            out[f"{prefix}attention_mask"] = pad([[1] * len(r) for r in ids], 0)
            out[f"{prefix}labels"] = pad([f[f"{prefix}labels"] for f in features], IGNORE_INDEX)
        for key in CHUNK_KEYS:
            out[key] = pad([f[key] for f in features], -1)
        for key in (PROMPT_LENGTH, TEACHER_PROMPT_LENGTH):  # on-policy rows
            if key in features[0]:
                out[key] = torch.tensor([f[key] for f in features], dtype=torch.long)
        return out
