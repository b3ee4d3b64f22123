"""Teacher and student tokenizers: loading one, refusing a pair that tokenises differently, and the vocabulary
length both logit tensors are cut to (padded embedding matrices)."""

from __future__ import annotations

from pathlib import Path

from kdistill.errors import UserError
from kdistill.models.loader import hub_kwargs, pretrained_config


class VocabularyMismatchError(UserError, ValueError):
    """Teacher and student tokenise text differently: token-level logit KD is not defined between them."""


def load_tokenizer(cfg, key: str = "name_or_path"):
    """The tokenizer of a `ModelConfig` (`tokenizer`, else `name_or_path`); a missing pad token becomes eos."""
    from transformers import AutoTokenizer

    source = cfg.tokenizer or cfg.name_or_path
    if not Path(source).expanduser().is_dir():  # a missing folder or an unreachable hub id: said in one line
        pretrained_config(source, key, **hub_kwargs(cfg))
    tok = AutoTokenizer.from_pretrained(source, **hub_kwargs(cfg))
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise UserError(f"{key}: the tokenizer of {cfg.name_or_path} has neither a pad nor an eos token")
        tok.pad_token = tok.eos_token
    return tok


def compare_tokenizers(teacher_tok, student_tok) -> None:
    """Refuse teacher/student pairs whose vocabularies differ (same id must mean the same token)."""
    t_vocab, s_vocab = teacher_tok.get_vocab(), student_tok.get_vocab()
    if t_vocab == s_vocab:
        return
    only_t = sorted(set(t_vocab) - set(s_vocab))
    only_s = sorted(set(s_vocab) - set(t_vocab))
    moved = sorted(k for k in set(t_vocab) & set(s_vocab) if t_vocab[k] != s_vocab[k])
    details = []
    if only_t:
        details.append(f"{len(only_t)} token(s) only in the teacher's (e.g. {only_t[:3]})")
    if only_s:
        details.append(f"{len(only_s)} token(s) only in the student's (e.g. {only_s[:3]})")
    if moved:
        details.append(f"{len(moved)} token(s) with different ids (e.g. {moved[:3]})")
    raise VocabularyMismatchError(
        "teacher and student use different tokenizers (" + "; ".join(details) + "). Token-level logit KD "
        "compares next-token distributions id by id, so it needs one shared vocabulary. Options: choose a "
        "student from the teacher's model family, use the cross-tokenizer objective (objectives: {xkd: {type: "
        "crosstok, method: alm}}), or distil at the sequence level without logits: train the student with the `ce` "
        "objective only (no `kd`) on text the teacher generated.")


def kd_vocab_size(tokenizer, teacher, student) -> int:
    """Vocabulary entries the loss compares: the shared tokenizer's length.

    Embedding matrices are often padded past the tokenizer (Qwen2.5-7B 152,064 rows, Qwen2.5-0.5B 151,936,
    tokenizer 151,665); rows past the tokenizer are never real tokens, so both logit tensors are cut to
    `len(tokenizer)`.
    """
    n = len(tokenizer)
    for role, model in (("teacher", teacher), ("student", student)):
        if model is None:  # no teacher model (a top-k cache)
            continue
        rows = model.get_output_embeddings().weight.shape[0]
        if rows < n:
            raise VocabularyMismatchError(
                f"the {role}'s output layer has {rows} rows but the tokenizer has {n} tokens; resize its "
                "embeddings (model.resize_token_embeddings) or use the tokenizer it was trained with")
    return n
