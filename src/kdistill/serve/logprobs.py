"""vLLM's `prompt_logprobs` from the logits of one prompt: a pure function of tensors (no model, no I/O).

For a prompt of n tokens the answer is a list of n entries. Entry 0 is None (nothing predicts the first token).
Entry i >= 1 describes the distribution that predicts token i from tokens < i, i.e. `log_softmax(logits[i - 1] / T)`
of a causal LM: the K most likely token ids with their log-probs and 1-based ranks, plus the actual token i when
it is not among them (then K + 1 entries; its rank is its rank in the full vocabulary, 1 + the number of ids with
a strictly larger log-prob). Keys are token ids as strings, as JSON has them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

__all__ = ["LOGPROB_FLOOR", "prompt_logprobs"]

LOGPROB_FLOOR = -9999.0
"""Log-probs below this (a -inf from a masked logit) are reported as this value: JSON has no infinity."""

ROWS_PER_CHUNK = 512  # positions scored at once: bounds the float32 (rows, V) working memory


def prompt_logprobs(logits: torch.Tensor, ids: Sequence[int], k: int, decode: Callable[[int], str],
                    temperature: float = 1.0) -> list[dict[str, dict] | None]:
    """The `prompt_logprobs` list of one prompt.

    logits: (T, V) with T >= len(ids), the causal LM's logits for the prompt (position i predicts token i + 1);
    ids: the prompt's n token ids; k >= 0: how many most likely ids each entry lists (capped at V; 0 lists only
    the actual token); decode(id): the text of one token alone; temperature > 0: the log-probs are those of
    `log_softmax(logits / temperature)` (computed in float32).
    Returns n entries: None, then for i = 1..n-1 {str(id): {"logprob", "rank", "decoded_token"}}, the top k in
    rank order followed by the actual token i when it is outside the top k."""
    n = len(ids)
    if logits.dim() != 2 or logits.shape[0] < n:
        raise ValueError(f"logits must be (T, V) with T >= {n} prompt tokens, got {tuple(logits.shape)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    k = max(0, min(int(k), logits.shape[1]))
    out: list[dict[str, dict] | None] = [None]
    for start in range(0, n - 1, ROWS_PER_CHUNK):
        stop = min(start + ROWS_PER_CHUNK, n - 1)
        out.extend(_entries(logits[start:stop], ids[start + 1:stop + 1], k, decode, temperature))
    return out


def _entries(logits: torch.Tensor, targets: Sequence[int], k: int, decode: Callable[[int], str],
             temperature: float) -> list[dict[str, dict]]:
    """Entries for rows of `logits` (R, V) that predict `targets` (R ids)."""
    logprobs = torch.log_softmax(logits.float() / temperature, dim=-1)  # (R, V)
    target = torch.as_tensor(list(targets), dtype=torch.long, device=logprobs.device)
    actual = logprobs.gather(1, target[:, None])  # (R, 1)
    rank = (logprobs > actual).sum(dim=-1) + 1  # (R,) 1-based rank in the full vocabulary
    top_values, top_ids = logprobs.topk(k, dim=-1)  # (R, k), largest first
    top_values = top_values.clamp(min=LOGPROB_FLOOR).tolist()
    top_ids, actual, rank = top_ids.tolist(), actual.squeeze(1).clamp(min=LOGPROB_FLOOR).tolist(), rank.tolist()
    entries = []
    for row, token in enumerate(targets):
        entry = {str(t): {"logprob": v, "rank": r, "decoded_token": decode(t)}
                 for r, (t, v) in enumerate(zip(top_ids[row], top_values[row]), start=1)}
        key = str(int(token))
        if key not in entry:
            entry[key] = {"logprob": actual[row], "rank": rank[row], "decoded_token": decode(int(token))}
        entries.append(entry)
    return entries
