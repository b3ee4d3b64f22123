"""From a collated micro-batch to prompts, and from sampled answers back to a micro-batch the objectives train on.

A collated LM micro-batch (right-padded, `kdistill.data.collators`) carries each row's `prompt_length`
(`kdistill.data.prompt_rows`). :func:`left_padded_prompts` takes each row's prompt (causal LMs: its first
`prompt_length` tokens; encoder-decoders: the encoder input) and left-pads them for generation.
:func:`sampled_batch` builds the batch that replaces the dataset's: for a causal LM each row is its prompt followed
by its answer, right-padded, with labels only on the answer; for an encoder-decoder the encoder input is kept and
the answer becomes the labels. An answer is trained up to and including its first stop token and nothing after it
(also when the pad id is the EOS id: the first stop counts, whatever follows); an answer with no stop token within
`max_new_tokens` is trained as it is and counted as truncated.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kdistill.batch import SAMPLED_BY
from kdistill.data.prompt_rows import PROMPT_LENGTH

__all__ = ["SampleStats", "answer_lengths", "left_padded_prompts", "sampled_batch"]

IGNORE = -100


@dataclass
class SampleStats:
    """One micro-batch's answers: how many, their total trained length, and how many hit max_new_tokens."""

    answers: int = 0
    tokens: int = 0
    truncated: int = 0

    def add(self, other: "SampleStats") -> None:
        self.answers += other.answers
        self.tokens += other.tokens
        self.truncated += other.truncated


def _prompts(batch: dict, encoder_decoder: bool) -> list[torch.Tensor]:
    ids, mask = batch["input_ids"], batch["attention_mask"].bool()
    if encoder_decoder:
        return [row[m] for row, m in zip(ids, mask)]
    if PROMPT_LENGTH not in batch:
        raise KeyError(f"the micro-batch has no {PROMPT_LENGTH!r}: on-policy rows are encoded by "
                       "kdistill.data.prompt_rows.encode_for_sampling (a custom collator must keep that key)")
    return [row[: int(n)] for row, n in zip(ids, batch[PROMPT_LENGTH])]


def left_padded_prompts(batch: dict, pad_id: int, encoder_decoder: bool = False
                        ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """(B, P) prompt ids left-padded with `pad_id`, their (B, P) attention mask, and the prompts unpadded."""
    prompts = _prompts(batch, encoder_decoder)
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long, device=batch["input_ids"].device)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = p
        mask[i, width - len(p):] = 1
    return ids, mask, prompts


def answer_lengths(new_tokens: torch.Tensor, stop_ids: tuple[int, ...], max_new_tokens: int
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(B,) trained length of each answer (through its first stop token), and (B,) whether it was cut short."""
    n = new_tokens.shape[1]
    if n == 0:
        zeros = torch.zeros(new_tokens.shape[0], dtype=torch.long, device=new_tokens.device)
        return zeros, zeros.bool()
    is_stop = torch.isin(new_tokens, torch.tensor(stop_ids, dtype=new_tokens.dtype, device=new_tokens.device)) \
        if stop_ids else torch.zeros_like(new_tokens, dtype=torch.bool)
    stopped = is_stop.any(-1)
    first = is_stop.int().argmax(-1)
    lengths = torch.where(stopped, first + 1, torch.full_like(first, n))
    return lengths.long(), ~stopped & (n >= max_new_tokens)


def sampled_batch(batch: dict, prompts: list[torch.Tensor], new_tokens: torch.Tensor, stop_ids: tuple[int, ...],
                  max_new_tokens: int, pad_id: int, sampled_by: str, encoder_decoder: bool = False
                  ) -> tuple[dict, SampleStats]:
    """The micro-batch that trains on the answers (see the module docstring), and its :class:`SampleStats`."""
    lengths, truncated = answer_lengths(new_tokens, stop_ids, max_new_tokens)
    device = batch["input_ids"].device
    rows = len(prompts)
    answers = [new_tokens[i, : int(lengths[i])] for i in range(rows)]
    stats = SampleStats(answers=rows, tokens=int(lengths.sum()), truncated=int(truncated.sum()))
    if encoder_decoder:
        width = max(1, max(len(a) for a in answers))
        labels = torch.full((rows, width), IGNORE, dtype=torch.long, device=device)
        for i, a in enumerate(answers):
            labels[i, : len(a)] = a
        out = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "labels": labels}
    else:
        width = max(len(p) + len(a) for p, a in zip(prompts, answers))
        ids = torch.full((rows, width), pad_id, dtype=torch.long, device=device)
        mask = torch.zeros_like(ids)
        labels = torch.full_like(ids, IGNORE)
        for i, (p, a) in enumerate(zip(prompts, answers)):
            ids[i, : len(p)] = p
            ids[i, len(p): len(p) + len(a)] = a
            mask[i, : len(p) + len(a)] = 1
            labels[i, len(p): len(p) + len(a)] = a
        out = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    out[SAMPLED_BY] = sampled_by
    return out, stats
