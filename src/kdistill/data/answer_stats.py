"""Do a set of answers look like a teacher that failed to answer? (sequence-level KD data check)

A teacher whose generation never stopped, looped, or answered nothing still produces "answers", and a student
trained on them with ``ce`` learns the failure. :func:`answer_stats` measures a list of answer strings, text
only, in one pass:

* ``count``: answers measured;
* ``distinct_ratio``: distinct answers / count (answers compared with whitespace collapsed);
* ``mean_words``: mean length in whitespace-separated words;
* ``empty_fraction``: fraction of answers that are empty or whitespace only;
* ``repeated_ngram_fraction``: over the answers of at least ``REPEAT_N`` words, the mean fraction of an
  answer's word ``REPEAT_N``-grams that repeat an earlier one of the same answer ("a b c d a b c d" has 5
  4-grams, 1 of them a repeat: 0.2; a loop of one phrase tends to 1); 0 when no answer is that long;
* ``degenerate`` and ``reasons``: the verdict, true when any threshold below is crossed, with one reason per
  crossed threshold.

Thresholds (named constants): ``distinct_ratio < DISTINCT_RATIO_MIN`` (0.5: most answers are copies of
others), ``repeated_ngram_fraction > REPEATED_NGRAM_MAX`` (0.5: answers mostly repeat themselves),
``empty_fraction > EMPTY_FRACTION_MAX`` (0.2), or no answer at all. Short label-like answers ("yes", "no")
are legitimately not distinct; the verdict is a warning to look, never a refusal.
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["DISTINCT_RATIO_MIN", "EMPTY_FRACTION_MAX", "REPEATED_NGRAM_MAX", "REPEAT_N", "answer_stats",
           "example_response", "format_stats", "repeated_ngram_fraction"]

DISTINCT_RATIO_MIN = 0.5
REPEATED_NGRAM_MAX = 0.5
EMPTY_FRACTION_MAX = 0.2
REPEAT_N = 4


def repeated_ngram_fraction(words: list[str], n: int = REPEAT_N) -> float | None:
    """The fraction of the word ``n``-grams of ``words`` that repeat an earlier one; ``None`` with fewer than
    ``n`` words (no n-gram)."""
    total = len(words) - n + 1
    if total < 1:
        return None
    distinct = len({tuple(words[i:i + n]) for i in range(total)})
    return (total - distinct) / total


def answer_stats(answers: Iterable[str]) -> dict:
    """The measures and verdict of the module docstring, as a JSON-ready dict."""
    count = empty = words_total = 0
    distinct: set[str] = set()
    repeats: list[float] = []
    for answer in answers:
        words = str(answer).split()
        count += 1
        words_total += len(words)
        empty += not words
        distinct.add(" ".join(words))
        fraction = repeated_ngram_fraction(words)
        if fraction is not None:
            repeats.append(fraction)
    stats = {"count": count,
             "distinct_ratio": len(distinct) / count if count else 0.0,
             "mean_words": words_total / count if count else 0.0,
             "empty_fraction": empty / count if count else 0.0,
             "repeated_ngram_fraction": sum(repeats) / len(repeats) if repeats else 0.0}
    reasons = []
    if not count:
        reasons.append("no answers")
    else:
        if stats["distinct_ratio"] < DISTINCT_RATIO_MIN:
            reasons.append(f"only {len(distinct)} distinct of {count} answers (ratio {stats['distinct_ratio']:.2f} "
                           f"< {DISTINCT_RATIO_MIN})")
        if stats["repeated_ngram_fraction"] > REPEATED_NGRAM_MAX:
            reasons.append(f"answers repeat themselves ({stats['repeated_ngram_fraction']:.0%} of word "
                           f"{REPEAT_N}-grams are repeats, > {REPEATED_NGRAM_MAX:.0%})")
        if stats["empty_fraction"] > EMPTY_FRACTION_MAX:
            reasons.append(f"{empty} of {count} answers are empty ({stats['empty_fraction']:.0%} > "
                           f"{EMPTY_FRACTION_MAX:.0%})")
    stats.update(degenerate=bool(reasons), reasons=reasons)
    return stats


def format_stats(stats: dict) -> str:
    """One line: ``"12 answers, 92% distinct, 31.5 words on average, 0% empty, 3% repeated 4-grams"``."""
    return (f"{stats['count']} answers, {stats['distinct_ratio']:.0%} distinct, {stats['mean_words']:.1f} words on "
            f"average, {stats['empty_fraction']:.0%} empty, {stats['repeated_ngram_fraction']:.0%} repeated "
            f"{REPEAT_N}-grams")


def example_response(example) -> str:
    """The response an LM :class:`~kdistill.data.records.Example` trains on: alpaca ``output``, prompt/completion
    ``completion``, messages the final assistant turn ("" when there is none)."""
    fields = example.fields
    if example.kind == "alpaca":
        return fields.get("output") or ""
    if example.kind == "prompt_completion":
        return fields.get("completion") or ""
    messages = fields.get("messages") or []
    if messages and messages[-1].get("role") == "assistant":
        return messages[-1].get("content") or ""
    return ""
