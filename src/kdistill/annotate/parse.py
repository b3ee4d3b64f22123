"""Reading a teacher's answer: the label it names (:func:`parse_label`) or its chain of thought and final
answer (:func:`parse_rationale`). Case, punctuation and spacing never matter when answers are matched."""

from __future__ import annotations

import re
from collections.abc import Sequence

__all__ = ["check_labels", "match_label", "parse_label", "parse_rationale"]


def _norm(text: str) -> str:
    """Lower case, every non-alphanumeric character (punctuation, underscores) as a space, spaces collapsed."""
    return " ".join(re.sub(r"[\W_]+", " ", str(text).lower()).split())


def check_labels(labels: Sequence[str] | None) -> list[str] | None:
    """``labels`` as a list of strings (``None`` stays ``None``); raises when it is one string, empty, or two
    labels are the same after normalisation."""
    if labels is None:
        return None
    if isinstance(labels, str):
        raise TypeError("labels must be a list of strings, not one string")
    labels = [str(label) for label in labels]
    if not labels:
        raise ValueError("labels is empty")
    seen: dict[str, str] = {}
    for label in labels:
        norm = _norm(label)
        if not norm:
            raise ValueError(f"label {label!r} has no letters or digits")
        if norm in seen:
            raise ValueError(f"labels {seen[norm]!r} and {label!r} are the same after normalisation "
                             f"(case and punctuation are ignored when answers are matched)")
        seen[norm] = label
    return labels


def _occurring_labels(text: str, labels: Sequence[str]) -> set[str]:
    """Labels that occur in ``text`` as whole words, ignoring occurrences inside a longer label's occurrence."""
    norm_text = _norm(text)
    spans: list[tuple[int, int, str]] = []
    for label in labels:
        pattern = r"(?<!\S)" + re.escape(_norm(label)) + r"(?!\S)"
        spans.extend((m.start(), m.end(), label) for m in re.finditer(pattern, norm_text))
    found = set()
    for start, end, label in spans:
        inside = any(s <= start and end <= e and (e - s) > (end - start) for s, e, _ in spans)
        if not inside:
            found.add(label)
    return found


def match_label(answer: str, labels: Sequence[str]) -> str | None:
    """The label ``answer`` names: an exact match ignoring case, punctuation and spacing, else the only label
    occurring in it as whole words; ``None`` when no label or several labels occur."""
    norm = _norm(answer)
    if not norm:
        return None
    for label in labels:
        if _norm(label) == norm:
            return label
    squashed = norm.replace(" ", "")
    for label in labels:
        if _norm(label).replace(" ", "") == squashed:
            return label
    found = _occurring_labels(answer, labels)
    return next(iter(found)) if len(found) == 1 else None


_ANSWER_FORM = re.compile(
    r"(?:\b(?:so|thus|therefore|hence)\s*,?\s+)?\b(?:the\s+)?(?:final\s+|correct\s+)?"
    r"(?:answer|label|category|class|classification|prediction)\s*(?:is\b|:|=)\s*:?\s*", re.I)
_RATIONALE_ANSWER = re.compile(
    r"(?:\b(?:so|thus|therefore|hence)\s*,?\s+)?\bthe\s+(?:final\s+)?answer\s+is\b\s*:?\s*", re.I)
_CONTINUATION = re.compile(r"(?m)^[ \t]*(?:Q|Question)[ \t]*:")  # a new few-shot block the model went on with
_CHOICE_MARKER = re.compile(r"\(([A-Za-z])\)\s*")
_SENTENCE_END = re.compile(r"[.!?](?=\s|$)")


def _answer_text(rest: str) -> str:
    """The answer of a final-answer sentence: up to the end of the line and of the sentence, trimmed of
    surrounding whitespace, quotes, asterisks and final punctuation."""
    line = rest.split("\n", 1)[0]
    end = _SENTENCE_END.search(line)
    answer = line[:end.start()] if end else line
    return answer.strip().strip("*\"'`").strip().rstrip(".!?,;:").strip()


def parse_label(text: str, labels: Sequence[str]) -> str | None:
    """The label a classification answer names, or ``None``.

    In order: the whole answer is a label (case, punctuation and spacing ignored: "Positive." -> positive);
    the last "the answer is X" / "Label: X" / "Answer: X" form names one label (X as above, or the only label
    occurring in X); exactly one label occurs in the whole answer as whole words (an occurrence inside a
    longer label's occurrence does not count: "noHate" is not "hate"). Otherwise ``None``.
    """
    labels = check_labels(labels) or []
    if text is None:
        return None
    for label in labels:
        if _norm(label) == _norm(text):
            return label
    forms = list(_ANSWER_FORM.finditer(text))
    if forms:
        answer = _answer_text(text[forms[-1].end():])
        answer = _CHOICE_MARKER.sub("", answer, count=1) if _CHOICE_MARKER.match(answer) else answer
        label = match_label(answer, labels)
        if label is not None:
            return label
    return match_label(text, labels)


def parse_rationale(text: str, labels: Sequence[str] | None = None) -> tuple[str, str] | None:
    """Split a chain-of-thought answer into ``(rationale, label)``; ``None`` when it has no usable answer.

    1. The text is cut at the first line that starts a new few-shot block (``Q:`` / ``Question:``): models
       prompted few-shot often go on writing further examples after their answer.
    2. The LAST "the answer is" (optionally "So / Thus / Therefore / Hence ...", "final answer") marks the
       final answer sentence; ``rationale`` is the text before that sentence, stripped.
    3. The answer is the rest of that line up to the end of the sentence (a period followed by a space or
       the end, so "3.5" and "(84 / 2)" stay whole; "D.C." loses its final period), without final
       punctuation. A multiple-choice marker is removed: "(d) math problem" -> "math problem".
    4. ``None`` when there is no answer sentence, the answer is empty, it names several choices
       ("either (a) X or (e) Y"), its parentheses are unbalanced (output cut short), or, with ``labels``,
       it names no single label (see :func:`match_label`; the label is then returned as spelled in
       ``labels``).
    """
    if not text:
        return None
    cut = _CONTINUATION.search(text)
    body = text[:cut.start()] if cut else text
    matches = list(_RATIONALE_ANSWER.finditer(body))
    if not matches:
        return None
    final = matches[-1]
    rationale = body[:final.start()].strip()
    if rationale.startswith("A:"):
        rationale = rationale[2:].strip()
    answer = _answer_text(body[final.end():])
    markers = list(_CHOICE_MARKER.finditer(answer))
    if len(markers) > 1:
        return None
    if markers:
        answer = answer[markers[0].end():].strip() or answer
    if not answer or answer.count("(") != answer.count(")"):
        return None
    if labels is not None:
        label = match_label(answer, check_labels(labels))
        if label is None:
            return None
        answer = label
    return rationale, answer
