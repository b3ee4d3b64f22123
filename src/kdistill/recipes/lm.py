"""The LM recipe: logit KD, hidden/attention alignment and contrastive triplets for causal and seq2seq LMs.

Cheap checks come first: the tokenizer and the whole dataset are validated before any model is loaded, so a bad
row or a vocabulary mismatch is reported in seconds, not after a 7B teacher has been read from disk. The teacher
source is a live model, or the top-k cache when `cache.dir` is set (`kdistill.teachers`); `build_cache` writes
that cache.
"""

from __future__ import annotations

import dataclasses
import logging

import torch

from kdistill.config import ConfigError, RunConfig
from kdistill.data import (LM_FORMATS, DataCollatorForDistillation, DataValidationError, EmbeddingCollator,
                           EncodeStats, encode_examples, load_examples, tokenize_texts)
from kdistill.data.answer_stats import answer_stats, example_response, format_stats
from kdistill.data.collators import TextFieldCollator
from kdistill.data.cross_rows import TEACHER_VIEW, CrossTokenizerCollator, encode_cross
from kdistill.data.cross_samples import SampledAnswerAligner
from kdistill.data.prompt_rows import encode_for_sampling, has_response
from kdistill.models import (apply_lora, compare_tokenizers, is_encoder_decoder, kd_vocab_size, load_model,
                             load_tokenizer, save_student, shrink)
from kdistill.objectives import OBJECTIVES, build_objectives
from kdistill.onpolicy import OnPolicy, stop_ids_for
from kdistill.paths import check_output_dir
from kdistill.recipes.base import DataReport, ListDataset, Parts, Recipe, data_key
from kdistill.teachers.cache_writer import warn_if_short_of_space, write_split
from kdistill.teachers.live import LiveTeacher
from kdistill.teachers.served import ServedTopK, TeacherServer
from kdistill.teachers.topk_cache import CachedTeacherDataset, CachedTopK, TopKCollator, open_cache, view_rows
from kdistill.trainer import without_objective_parts

__all__ = ["LMRecipe", "build_cache", "load_split"]

logger = logging.getLogger(__name__)

# what a row without its response is told (kdistill.data.validation), to add that on_policy would take it
_PROMPT_ONLY_HINTS = ("missing required field 'output'", "missing required field 'completion'",
                      "messages has no assistant message", "last message must be from the assistant, found role 'user'")


def _objective_classes(cfg: RunConfig):
    return [OBJECTIVES[o.type] for o in cfg.objectives.values()]


def load_split(cfg: RunConfig, tokenizer, source: str, split: str, limit, encoder_decoder: bool,
               teacher_tokenizer=None):
    """Validate and encode one LM data file per the config: (ListDataset, DataReport). With `teacher_tokenizer`
    (a cross-tokenizer objective), rows also carry the teacher's own tokens and their chunk alignment."""
    sampling = cfg.on_policy is not None
    try:
        loaded = load_examples(source, format=cfg.data.format, split=split, skip_invalid=cfg.data.skip_invalid,
                               limit=limit, option=data_key(cfg, source), subset=cfg.data.subset,
                               require_response=not sampling)
    except DataValidationError as exc:
        if sampling or not any(hint in e for e in exc.errors for hint in _PROMPT_ONLY_HINTS):
            raise
        raise DataValidationError([*exc.errors, "rows without a response (prompt-only) train only with on_policy: "
                                   "the student answers them during training"]) from None
    wrong = [ex for ex in loaded.examples if ex.kind not in LM_FORMATS]
    if wrong:
        raise DataValidationError([f"{wrong[0].source}: a {wrong[0].kind} row cannot train a language model "
                                   f"({len(wrong)} such row(s)); LM runs need alpaca, prompt/completion or messages "
                                   f"rows (embedding rows go with task: embedding)"])
    answered, prompt_only = [], []  # prompt-only rows: on-policy runs only
    for ex in loaded.examples:
        (answered if not sampling or has_response(ex) else prompt_only).append(ex)
    if answered:  # prompt-only rows have no responses to judge
        _warn_if_degenerate(source, answered)
    encode = dict(template=cfg.data.template, max_length=cfg.data.max_length, is_encoder_decoder=encoder_decoder,
                  max_target_length=cfg.data.max_target_length)
    unaligned: list[str] = []
    if teacher_tokenizer is not None:
        if encoder_decoder:
            raise ConfigError("a cross-tokenizer objective aligns causal LMs only")
        rows, stats, unaligned = encode_cross(loaded.examples, tokenizer, teacher_tokenizer,
                                              template=cfg.data.template, max_length=cfg.data.max_length,
                                              skip_invalid=cfg.data.skip_invalid, sampling=sampling)
    elif sampling:
        rows, stats, _ = encode_for_sampling(loaded.examples, tokenizer, **encode)
    elif any(c.uses_text_fields for c in _objective_classes(cfg)):
        rows, stats = _encode_with_triplets(cfg, loaded.examples, tokenizer, source, split, encode)
    else:
        rows, stats = encode_examples(loaded.examples, tokenizer, **encode)
    if prompt_only and cfg.on_policy.lmbda < 1 and not cfg.on_policy.seq_kd:
        raise DataValidationError([f"{prompt_only[0].source}: no response to train the off-policy steps on "
                                   f"(on_policy.lmbda is {cfg.on_policy.lmbda}, so {1 - cfg.on_policy.lmbda:.0%} "
                                   f"of the steps train on the dataset's responses; {len(prompt_only)} row(s) "
                                   "have none): give responses, set on_policy.seq_kd: true (the teacher "
                                   "answers) or on_policy.lmbda: 1"])
    report = DataReport(source=source, examples=len(rows), skipped_invalid=list(loaded.skipped) + unaligned,
                        truncated=stats.truncated, dropped_no_target=stats.dropped_no_target)
    if loaded.skipped:
        logger.warning("%s: skipped %d invalid row(s) (data.skip_invalid=true); first: %s", source,
                       len(loaded.skipped), loaded.skipped[0])
    if stats.dropped_no_target:
        logger.warning("%s: dropped %d row(s) whose %s cut away entirely by max_length=%d", source,
                       stats.dropped_no_target, "prompt does not fit or response was" if sampling else "response was",
                       cfg.data.max_length)
    if not rows:
        raise DataValidationError([f"{source}: no usable example is left: {len(loaded.examples)} valid row(s), "
                                   f"{stats.dropped_no_target} of them with no response token left after "
                                   f"data.max_length={cfg.data.max_length} (raise it)"])
    return ListDataset(rows, stats.sources or None), report


def _warn_if_degenerate(source: str, examples) -> None:
    """A WARNING naming the file when its responses look like a failed teacher's (SeqKD data that never
    stopped, loops, or is empty: :mod:`kdistill.data.answer_stats`); training goes on."""
    stats = answer_stats(example_response(ex) for ex in examples)
    if stats["degenerate"]:
        logger.warning("%s: the responses look degenerate (%s): %s. If they are a teacher's answers (sequence-level "
                       "KD), check how they were generated; if they are short labels, ignore this", source,
                       format_stats(stats), "; ".join(stats["reasons"]))


def _encode_with_triplets(cfg: RunConfig, examples, tokenizer, source, split, encode):
    """LM rows plus the token ids of their `{consensus, supporting, refuting}` texts (keys anchor, positive,
    negative), joined on each row's file:line so skipped or truncated rows cannot shift the pairing."""
    triplets = {ex.source: ex for ex in load_examples(source, format="triplet", split=split,
                                                      skip_invalid=cfg.data.skip_invalid,
                                                      option=data_key(cfg, source), subset=cfg.data.subset).examples}
    missing = [ex.source for ex in examples if ex.source not in triplets]
    if missing:
        raise DataValidationError([f"{missing[0]}: the triplet objective needs consensus/supporting/refuting (or "
                                   f"anchor/positive/negative) fields on every row ({len(missing)} row(s) lack "
                                   f"them)"])
    rows, total = [], EncodeStats(total=0, truncated=0, dropped_no_target=0)
    kept = []
    for ex in examples:
        encoded, stats = encode_examples([ex], tokenizer, **encode)
        total.total += stats.total
        total.truncated += stats.truncated
        total.dropped_no_target += stats.dropped_no_target
        if encoded:
            rows.append(encoded[0])
            kept.append(triplets[ex.source].fields)
    for key in ("anchor", "positive"):
        ids = tokenize_texts([f[key] for f in kept], tokenizer, max_length=cfg.data.max_length)
        for row, value in zip(rows, ids):
            row[key] = value
    negatives = tokenize_texts([f["negative"][0] for f in kept], tokenizer, max_length=cfg.data.max_length)
    for row, value in zip(rows, negatives):
        row["negative"] = [value]
    return rows, total


def _check_kinds(cfg: RunConfig, encoder_decoder: bool) -> None:
    teacher_encdec = is_encoder_decoder(cfg.teacher.name_or_path, "teacher.name_or_path",
                                        trust_remote_code=cfg.teacher.trust_remote_code)
    if teacher_encdec != encoder_decoder:
        kinds = {True: "an encoder-decoder LM", False: "a causal LM"}
        raise ConfigError(f"teacher.name_or_path: {cfg.teacher.name_or_path} is {kinds[teacher_encdec]} but "
                          f"student.name_or_path: {cfg.student.name_or_path} is {kinds[encoder_decoder]}; logit "
                          f"KD needs both of one kind (sequence-level KD on the teacher's answers does not: "
                          f"kdistill annotate --task output, then train with ce only)")


class LMRecipe(Recipe):
    """Token views from alpaca / prompt-completion / messages rows (plus triplet text fields when an objective
    reads them); a live teacher or the top-k cache."""

    name = "lm"

    def load_split(self, cfg: RunConfig, tokenizer, source: str, split: str, limit, encoder_decoder: bool,
                   teacher_tokenizer=None):
        return load_split(cfg, tokenizer, source, split, limit, encoder_decoder, teacher_tokenizer)

    def collator(self, cfg: RunConfig, tokenizer, teacher_tokenizer=None):
        if teacher_tokenizer is not None:
            return CrossTokenizerCollator(tokenizer.pad_token_id, teacher_tokenizer.pad_token_id)
        collator = DataCollatorForDistillation(pad_token_id=tokenizer.pad_token_id)
        if any(c.uses_text_fields for c in _objective_classes(cfg)):
            collator = TextFieldCollator(collator, EmbeddingCollator(pad_token_id=tokenizer.pad_token_id))
        return collator

    def _model_config(self, cfg: RunConfig, role: str):
        """The student/teacher section as loaded: eager attention when an objective reads attention maps."""
        model_cfg = getattr(cfg, role)
        if not any(c.requires_eager_attention for c in _objective_classes(cfg)):
            return model_cfg
        if model_cfg.attn_implementation not in (None, "eager"):
            raise ConfigError(f"{role}.attn_implementation is {model_cfg.attn_implementation!r}, but the "
                              "attention objective needs attention weights, which only eager attention returns")
        return dataclasses.replace(model_cfg, attn_implementation="eager")

    def build(self, cfg: RunConfig) -> Parts:
        tokenizer = load_tokenizer(cfg.student, "student.name_or_path")
        cached = bool(cfg.cache.dir)  # teacher signals come from a top-k cache: no teacher model is loaded
        served = cfg.teacher.server is not None and not cached  # ... or from a server: none is loaded either
        has_teacher = bool(cfg.teacher.name_or_path) and not cached and not served
        if has_teacher and not any(c.teacher_needs for c in _objective_classes(cfg)):
            logger.info("teacher %s not loaded: no objective reads it (%s)", cfg.teacher.name_or_path,
                        ", ".join(cfg.objectives))
            has_teacher = False
        encoder_decoder = is_encoder_decoder(cfg.student.name_or_path, "student.name_or_path",
                                             trust_remote_code=cfg.student.trust_remote_code)
        teacher_tokenizer = None
        cross = any(c.cross_tokenizer for c in _objective_classes(cfg))
        if (served or cached) and cross:  # the server / cache scores the teacher's own tokens: its tokenizer is read
            if not (cfg.teacher.tokenizer or cfg.teacher.name_or_path):
                raise ConfigError(f"teacher.tokenizer: a cross-tokenizer objective with "
                                  f"{'teacher.server' if served else 'cache.dir'} needs the teacher's tokenizer (a "
                                  "folder or hub id) to tokenise the rows its way")
            teacher_tokenizer = load_tokenizer(cfg.teacher, "teacher.tokenizer")
        if has_teacher:
            _check_kinds(cfg, encoder_decoder)
            teacher_tokenizer = load_tokenizer(cfg.teacher, "teacher.name_or_path")
            if any(c.teacher_needs and not c.cross_tokenizer for c in _objective_classes(cfg)):
                compare_tokenizers(teacher_tokenizer, tokenizer)
            if not any(c.cross_tokenizer for c in _objective_classes(cfg)):
                teacher_tokenizer = None

        train_ds, train_report = self.load_split(cfg, tokenizer, cfg.data.train, cfg.data.split, cfg.data.limit,
                                                 encoder_decoder, teacher_tokenizer)
        reports, rows, eval_ds = [train_report], train_ds.rows, None
        if cfg.data.eval:
            eval_ds, eval_report = self.load_split(cfg, tokenizer, cfg.data.eval, cfg.data.eval_split,
                                                   cfg.data.eval_limit, encoder_decoder, teacher_tokenizer)
            reports.append(eval_report)
        collator = self.collator(cfg, tokenizer, teacher_tokenizer)
        source = None
        if served and any(c.teacher_needs for c in _objective_classes(cfg)):
            if encoder_decoder:
                raise ConfigError("teacher.server: a served teacher scores causal LMs (vLLM's prompt_logprobs); "
                                  f"{cfg.student.name_or_path} is an encoder-decoder: load the teacher instead")
            served_tokenizer = teacher_tokenizer or tokenizer  # the tokens the server is sent
            server = TeacherServer(cfg.teacher.server, vocab=len(served_tokenizer))
            server.check(served_tokenizer)  # before any model loads: reachable, the model, k, the vocabulary
            source = ServedTopK(server)
        if cached:  # checked against the data and tokenizer before any model is loaded
            view, cached_tokenizer = (TEACHER_VIEW, teacher_tokenizer) if cross else ("", tokenizer)
            train_ds = CachedTeacherDataset(train_ds, open_cache(cfg, "train", train_ds, cached_tokenizer,
                                                                 encoder_decoder, view))
            if eval_ds is not None:
                eval_ds = CachedTeacherDataset(eval_ds, open_cache(cfg, "eval", eval_ds, cached_tokenizer,
                                                                   encoder_decoder, view))
            collator = TopKCollator(collator)
            source = CachedTopK(cfg.cache.temperature, view)

        student = load_model(self._model_config(cfg, "student"), role="student")
        if cfg.student.layers:
            student = shrink(student, cfg.student.layers)
        teacher = load_model(self._model_config(cfg, "teacher"), role="teacher") if has_teacher else None
        if teacher is not None:
            source = LiveTeacher(teacher)
        kd_vocab = kd_vocab_size(tokenizer, teacher, student) if source is not None and teacher_tokenizer is None \
            else None
        if cfg.lora.enabled:
            student = apply_lora(student, cfg.lora)
        objectives = build_objectives(cfg.objectives)
        for objective, _ in objectives.values():
            objective.setup(student, teacher)
            if objective.cross_tokenizer:
                objective.setup_tokenizers(tokenizer, teacher_tokenizer or tokenizer)
        on_policy = None
        if cfg.on_policy is not None:
            stop_ids = stop_ids_for(tokenizer, student, cfg.on_policy.stop_at_turn_end)
            # a cross-tokenizer run: the answers are given to the teacher in its tokens, aligned
            rebatch = SampledAnswerAligner(tokenizer, teacher_tokenizer, stop_ids) if cross else None
            on_policy = OnPolicy(cfg.on_policy, seed=cfg.seed, encoder_decoder=encoder_decoder,
                                 vocab_limit=len(tokenizer) if cross else kd_vocab, stop_ids=stop_ids,
                                 pad_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None
                                 else tokenizer.eos_token_id, rebatch=rebatch)
        return Parts(tokenizer=tokenizer, student=student, objectives=objectives, train_dataset=train_ds,
                     eval_dataset=eval_ds, collator=collator, reports=reports, rows=rows, teacher=source,
                     teacher_model=teacher, kd_vocab=kd_vocab, chunking=dataclasses.asdict(cfg.chunked_loss),
                     on_policy=on_policy)

    def save(self, cfg: RunConfig, parts: Parts, model, output_dir: str) -> None:
        with without_objective_parts(model):  # projections of objectives are not part of the student
            save_student(model, parts.tokenizer, output_dir, merge_lora=cfg.lora.merge)


def build_cache(cfg: RunConfig, progress: bool = True) -> dict[str, dict]:
    """Run the teacher over data.train (and data.eval) and write cache.dir/<split>; returns stats per split.

    Every row is validated before the teacher loads. Resumes a partial cache (same settings) where it stopped; a
    complete one is checked and left as it is."""
    if not cfg.cache.dir:
        raise ConfigError("cache.dir is not set: where should the cache be written?")
    served = cfg.teacher.server is not None
    if not cfg.teacher.name_or_path and not served:
        raise ConfigError("teacher.name_or_path (or teacher.server) is required to write a cache")
    if served and cfg.cache.temperature != 1.0:
        raise ConfigError(f"cache.temperature is {cfg.cache.temperature}, but a served teacher's log-probs are "
                          "requested at temperature 1 (its top k cannot be re-tempered exactly): cache at 1 and train "
                          "with missing: renormalize for another loss temperature")
    check_output_dir(cfg.cache.dir, "cache.dir")
    tokenizer = load_tokenizer(cfg.student, "student.name_or_path")
    # a cross-tokenizer objective: the cache holds the teacher's own tokens (view "xt"), in its vocabulary
    cross = any(c.cross_tokenizer for c in _objective_classes(cfg))
    teacher_tokenizer = load_tokenizer(cfg.teacher, "teacher.tokenizer" if cfg.teacher.tokenizer or served
                                       else "teacher.name_or_path") if cross or not served else None
    view, cached_tokenizer = (TEACHER_VIEW, teacher_tokenizer) if cross else ("", tokenizer)
    if served:
        encoder_decoder = is_encoder_decoder(cfg.student.name_or_path, "student.name_or_path",
                                             trust_remote_code=cfg.student.trust_remote_code)
        if encoder_decoder:
            raise ConfigError("teacher.server: a served teacher scores causal LMs only")
    else:
        if not cross:
            compare_tokenizers(teacher_tokenizer, tokenizer)
        encoder_decoder = is_encoder_decoder(cfg.teacher.name_or_path, "teacher.name_or_path",
                                             trust_remote_code=cfg.teacher.trust_remote_code)
    splits = [("train", cfg.data.train, cfg.data.split, cfg.data.limit)]
    if cfg.data.eval:
        splits.append(("eval", cfg.data.eval, cfg.data.eval_split, cfg.data.eval_limit))
    datasets = {name: load_split(cfg, tokenizer, source, split, limit, encoder_decoder,
                                 teacher_tokenizer if cross else None)[0]
                for name, source, split, limit in splits}
    warn_if_short_of_space(cfg, [view_rows(ds.rows, view) for ds in datasets.values()])
    if served:
        vocab = kd_vocab_size(cached_tokenizer, None, None)
        teacher = TeacherServer(cfg.teacher.server, vocab=vocab, k=min(cfg.cache.k, vocab))
        teacher.check(cached_tokenizer)
    else:
        teacher = load_model(cfg.teacher, role="teacher")
        if getattr(teacher, "hf_device_map", None) is None:  # write_split's LiveTeacher freezes it where it is
            teacher.to("cuda" if torch.cuda.is_available() else "cpu")
        vocab = kd_vocab_size(cached_tokenizer, teacher, None)
    return {name: write_split(cfg, teacher, cached_tokenizer, datasets[name], name, source, encoder_decoder, vocab,
                              progress, view=view)
            for name, source, _, _ in splits}
