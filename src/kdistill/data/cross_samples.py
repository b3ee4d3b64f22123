"""On-policy steps of a cross-tokenizer run: the student's sampled answers in both tokenisations, aligned.

`kdistill.onpolicy` samples each row's answer in the student's tokens and builds the main view (prompt + answer).
The teacher reads text in its own tokens, so :class:`SampledAnswerAligner` rebuilds the micro-batch as
`kdistill.data.cross_rows` encodes dataset rows: the answer is decoded to text (its stop token set aside), that text
is tokenised by each side (`kdistill.data.alignment.token_spans`) and cut into chunks that spell the same characters
(`align_chunks`), after each side's own prompt (the rows' `prompt_length` / `xt_prompt_length`).

The student is trained on the canonical tokenisation of the text it sampled. A sampled token sequence that is not
canonical (a word spelled with other pieces than its tokenizer would choose: rare) is re-tokenised and counted
(`retokenized`); the text, which is what the teacher scores, is the sampled one. The stop token stays trained (in
no chunk, like a template's end-of-turn marker). An answer whose text one side cannot spell (an unknown-token piece,
a normaliser) keeps its sampled tokens, gets no chunk and is counted (`unaligned`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kdistill.batch import SAMPLED_BY
from kdistill.data.alignment import AlignmentError, align_chunks, token_spans
from kdistill.data.cross_rows import CHUNK_KEYS, TEACHER_PROMPT_LENGTH, TEACHER_VIEW, CrossTokenizerCollator
from kdistill.data.formatting import IGNORE_INDEX
from kdistill.data.prompt_rows import PROMPT_LENGTH

__all__ = ["SampledAnswerAligner"]


@dataclass
class SampledAnswerAligner:
    """(the dataset's micro-batch, the sampled one) -> the sampled micro-batch with the teacher's view and chunks,
    and counts {"retokenized", "unaligned"} of its answers (see the module docstring)."""

    student_tokenizer: object
    teacher_tokenizer: object
    stop_ids: tuple[int, ...]

    def __call__(self, batch: dict, sampled: dict) -> tuple[dict, dict[str, int]]:
        counts = {"retokenized": 0, "unaligned": 0}
        features = []
        for i in range(sampled["input_ids"].shape[0]):
            p, q = int(batch[PROMPT_LENGTH][i]), int(batch[TEACHER_PROMPT_LENGTH][i])
            labels = sampled["labels"][i]
            answer = labels[labels != IGNORE_INDEX].tolist()
            stop = answer[-1:] if answer and answer[-1] in self.stop_ids else []
            body = answer[: len(answer) - len(stop)]
            s_ids, t_ids, s_chunks, t_chunks = self._align(body, counts)
            features.append({
                "input_ids": sampled["input_ids"][i, :p].tolist() + s_ids + stop,
                "labels": [IGNORE_INDEX] * p + s_ids + stop,
                f"{TEACHER_VIEW}_input_ids": batch[f"{TEACHER_VIEW}_input_ids"][i, :q].tolist() + t_ids,
                f"{TEACHER_VIEW}_labels": [IGNORE_INDEX] * q + t_ids,
                CHUNK_KEYS[0]: [-1] * p + s_chunks + [-1] * len(stop),
                CHUNK_KEYS[1]: [-1] * q + t_chunks,
                PROMPT_LENGTH: p, TEACHER_PROMPT_LENGTH: q,
            })
        pad = (self.student_tokenizer.pad_token_id, self.teacher_tokenizer.pad_token_id)
        out = CrossTokenizerCollator(*pad)(features)
        device = sampled["input_ids"].device
        out = {k: v.to(device) for k, v in out.items()}
        out[SAMPLED_BY] = sampled[SAMPLED_BY]
        return out, counts

    def _align(self, body: list[int], counts: dict[str, int]):
        """The answer's student and teacher tokens and their chunk ids (chunk c spells the same text on both)."""
        text = self.student_tokenizer.decode(body, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        try:
            s_spans = token_spans(self.student_tokenizer, text, name="student")
            t_spans = token_spans(self.teacher_tokenizer, text, name="teacher")
            chunks = align_chunks(s_spans, t_spans)
        except AlignmentError:
            counts["unaligned"] += 1
            return body, [], [-1] * len(body), []
        s_ids, t_ids = list(s_spans.ids), list(t_spans.ids)
        counts["retokenized"] += int(s_ids != body)
        s_chunks, t_chunks = [-1] * len(s_ids), [-1] * len(t_ids)
        for c, chunk in enumerate(chunks):
            for k in chunk.student:
                s_chunks[k] = c
            for k in chunk.teacher:
                t_chunks[k] = c
        return s_ids, t_ids, s_chunks, t_chunks
