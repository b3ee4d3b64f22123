"""LM rows for on-policy distillation: every row carries where its prompt ends, and may have no response.

On-policy steps replace a row's response by an answer sampled during training, so a row needs its *prompt*: the
tokens up to the last trainable segment (for a chat row: everything up to and including the generation prompt of
its final assistant turn). :func:`encode_for_sampling` encodes rows as :func:`kdistill.data.formatting.encode_examples`
does and adds ``prompt_length`` (an integer the collator stacks):

* a row with a response: ``input_ids`` / ``labels`` as usual, ``prompt_length`` = where the final response starts
  (causal LMs) or the encoder input's length (encoder-decoder);
* a prompt-only row (an Alpaca row without ``output``, ``{"prompt"}``, a chat ending in a user turn): the prompt
  alone, every label -100 (nothing of the dataset is trained); it is rendered with a one-token placeholder answer
  and cut before it, so chat templates place the generation prompt exactly as for a row with a response.

A row whose prompt does not fit ``max_length`` is dropped and counted as ``dropped_no_target``, as a row whose
response was cut away entirely is.
"""

from __future__ import annotations

from collections.abc import Iterable

from kdistill.data.formatting import IGNORE_INDEX, EncodeStats, encode_examples
from kdistill.data.records import Example

__all__ = ["PROMPT_LENGTH", "encode_for_sampling", "final_response_start", "has_response", "with_placeholder"]

PROMPT_LENGTH = "prompt_length"
_PLACEHOLDER = "x"


def has_response(example: Example) -> bool:
    """Whether an LM row carries the answer to its prompt."""
    f = example.fields
    if example.kind == "alpaca":
        return bool((f.get("output") or "").strip())
    if example.kind == "prompt_completion":
        return bool((f.get("completion") or "").strip())
    if example.kind == "messages":
        return bool(f["messages"]) and f["messages"][-1]["role"] == "assistant"
    raise ValueError(f"{example.source}: not a language-model row (kind {example.kind!r})")


def with_placeholder(example: Example) -> Example:
    """A prompt-only row with a one-token placeholder answer (encoded, then cut before it)."""
    f = example.fields
    if example.kind == "alpaca":
        return Example("alpaca", {**f, "input": f.get("input") or "", "output": _PLACEHOLDER}, example.source)
    if example.kind == "prompt_completion":
        return Example("prompt_completion", {**f, "completion": _PLACEHOLDER}, example.source)
    messages = list(f["messages"]) + [{"role": "assistant", "content": _PLACEHOLDER}]
    return Example("messages", {"messages": messages}, example.source)


def final_response_start(labels: list[int]) -> int:
    """Index of the first label of the last run of trained labels."""
    end = max(i for i, label in enumerate(labels) if label != IGNORE_INDEX)
    start = end
    while start > 0 and labels[start - 1] != IGNORE_INDEX:
        start -= 1
    return start


def encode_for_sampling(examples: Iterable[Example], tokenizer, *, is_encoder_decoder: bool = False,
                        **encode) -> tuple[list[dict], EncodeStats, list[str]]:
    """Encode rows with their ``prompt_length`` (see the module docstring). Returns (features, stats, where each
    prompt-only row came from)."""
    features, stats, prompt_only = [], EncodeStats(), []
    for example in examples:
        answered = has_response(example)
        row = example if answered else with_placeholder(example)
        encoded, one = encode_examples([row], tokenizer, is_encoder_decoder=is_encoder_decoder, **encode)
        stats.total += 1
        stats.truncated += one.truncated
        stats.dropped_no_target += one.dropped_no_target
        if not encoded:
            continue
        feature = encoded[0]
        if is_encoder_decoder:
            feature[PROMPT_LENGTH] = len(feature["input_ids"])
            if not answered:
                feature["labels"] = [IGNORE_INDEX]
        else:
            start = final_response_start(feature["labels"])
            if start == 0:  # nothing to generate from
                stats.dropped_no_target += 1
                continue
            feature[PROMPT_LENGTH] = start
            if not answered:
                feature["input_ids"] = feature["input_ids"][:start]
                feature["labels"] = [IGNORE_INDEX] * start
        if not answered:
            prompt_only.append(example.source)
        features.append(feature)
        stats.sources.append(example.source)
    return features, stats, prompt_only
