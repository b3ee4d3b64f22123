"""A training run, start to end: config -> data -> teacher/student -> DistillTrainer -> saved student.

Cheap checks come first: the tokenizer and the whole dataset are validated before any model is loaded, so a
bad row or a vocabulary mismatch is reported in seconds, not after a 7B teacher has been read from disk.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from kdistill.config import ConfigError, RunConfig, save_config, to_dict
from kdistill.data import LM_FORMATS, DataCollatorForDistillation, DataValidationError, encode_examples, load_examples
from kdistill.data.collators import TextFieldCollator, ViewCollator
from kdistill.models import (_DTYPES, apply_lora, compare_tokenizers, is_encoder_decoder, kd_vocab_size,
                             load_model, load_tokenizer, save_student, shrink)
from kdistill.objectives import build_objectives
from kdistill.paths import check_output_dir
from kdistill.provenance import (FingerprintCallback, check_resume, clear_checkpoints, config_fingerprint,
                                 data_fingerprint, last_checkpoint)
from kdistill.trainer import DistillTrainer, without_objective_parts

logger = logging.getLogger(__name__)


class ListDataset(torch.utils.data.Dataset):
    """Encoded examples held in memory (a list of dicts of token id lists); `sources[i]` says where row i came
    from ("file:line"), when known."""

    def __init__(self, rows: list[dict], sources: list[str] | None = None):
        self.rows = rows
        self.sources = sources

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        return self.rows[i]


@dataclass
class DataReport:
    """What happened to the rows of one data file."""

    source: str
    examples: int
    skipped_invalid: list[str] = field(default_factory=list)
    truncated: int = 0
    dropped_no_target: int = 0


def _data_key(cfg: RunConfig, source: str) -> str:
    """The config key that named `source` (for errors)."""
    return "data.eval" if source == cfg.data.eval and source != cfg.data.train else "data.train"


def load_split(cfg: RunConfig, tokenizer, source: str, split: str, limit, encoder_decoder: bool):
    """Validate and encode one data file per the config: (ListDataset, DataReport)."""
    if cfg.stepbystep.dataset:
        return _load_stepbystep_split(cfg, tokenizer, source, limit, encoder_decoder)
    loaded = load_examples(source, format=cfg.data.format, split=split, skip_invalid=cfg.data.skip_invalid,
                           limit=limit, option=_data_key(cfg, source), subset=cfg.data.subset)
    wrong = [ex for ex in loaded.examples if ex.kind not in LM_FORMATS]
    if wrong:
        raise DataValidationError([f"{wrong[0].source}: a {wrong[0].kind} row cannot train a language model "
                                   f"({len(wrong)} such row(s)); LM runs need alpaca, prompt/completion or messages "
                                   f"rows (embedding rows go with task: embedding)"])
    encode = dict(template=cfg.data.template, max_length=cfg.data.max_length, is_encoder_decoder=encoder_decoder,
                  max_target_length=cfg.data.max_target_length)
    if _uses_triplets(cfg):
        rows, stats = _encode_with_triplets(cfg, loaded.examples, tokenizer, source, split, encode)
    else:
        rows, stats = encode_examples(loaded.examples, tokenizer, **encode)
    report = DataReport(source=source, examples=len(rows), skipped_invalid=list(loaded.skipped),
                        truncated=stats.truncated, dropped_no_target=stats.dropped_no_target)
    if loaded.skipped:
        logger.warning("%s: skipped %d invalid row(s) (data.skip_invalid=true); first: %s", source,
                       len(loaded.skipped), loaded.skipped[0])
    if stats.dropped_no_target:
        logger.warning("%s: dropped %d row(s) whose response was cut away entirely by max_length=%d", source,
                       stats.dropped_no_target, cfg.data.max_length)
    if not rows:
        raise DataValidationError([f"{source}: no usable example is left: {len(loaded.examples)} valid row(s), "
                                   f"{stats.dropped_no_target} of them with no response token left after "
                                   f"data.max_length={cfg.data.max_length} (raise it)"])
    return ListDataset(rows, stats.sources or None), report


def _uses_triplets(cfg: RunConfig) -> bool:
    return any((o.type or name) == "triplet" for name, o in cfg.objectives.items())


def _encode_with_triplets(cfg: RunConfig, examples, tokenizer, source, split, encode):
    """LM rows plus the token ids of their `{consensus, supporting, refuting}` texts (keys anchor, positive,
    negative), joined on each row's file:line so skipped or truncated rows cannot shift the pairing."""
    from kdistill.data import EncodeStats
    from kdistill.data.embedding import tokenize_texts

    triplets = {ex.source: ex for ex in load_examples(source, format="triplet", split=split,
                                                      skip_invalid=cfg.data.skip_invalid,
                                                      option=_data_key(cfg, source), subset=cfg.data.subset).examples}
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


def _stepbystep_rows(cfg: RunConfig, source: str, limit, encoder_decoder: bool, label_type: str | None = None):
    from kdistill.data.stepbystep import build_views, load_stepbystep

    sbs = cfg.stepbystep
    examples = load_stepbystep(source, sbs.dataset, skip_invalid=cfg.data.skip_invalid, limit=limit)
    suffix = sbs.prompt_suffix if sbs.prompt_suffix is not None else ("" if encoder_decoder else "\n")
    return examples, build_views(examples, label_type=label_type or sbs.label_type, model_type=sbs.model_type,
                                 label_prefix=sbs.label_prefix, rationale_prefix=sbs.rationale_prefix,
                                 prompt_suffix=suffix)


def _load_stepbystep_split(cfg: RunConfig, tokenizer, source: str, limit, encoder_decoder: bool):
    """Two token views per example: the label view (input_ids/labels) and the rationale view
    (rationale_input_ids/rationale_labels). An example without a rationale gets an empty rationale view
    (every label -100), so it adds nothing to the rationale loss or its token count."""
    from kdistill.data import Example

    _, views = _stepbystep_rows(cfg, source, limit, encoder_decoder)
    kwargs = dict(template="plain", max_length=cfg.data.max_length, is_encoder_decoder=encoder_decoder,
                  max_target_length=cfg.data.max_target_length)

    def encode(prompt, completion, where):
        return encode_examples([Example("prompt_completion", {"prompt": prompt, "completion": completion}, where)],
                               tokenizer, **kwargs)

    rows, truncated, dropped = [], 0, 0
    for i, view in enumerate(views):
        where = f"{source}:example {i}"
        label_rows, stats = encode(view["prompt"], view["completion"], where)
        truncated += stats.truncated
        if not label_rows:
            dropped += 1
            continue
        row = dict(label_rows[0])
        rationale_rows = []
        if view.get("rationale_completion"):
            rationale_rows, stats = encode(view["rationale_prompt"], view["rationale_completion"], where)
            truncated += stats.truncated
        if rationale_rows:
            row.update({f"rationale_{k}": v for k, v in rationale_rows[0].items()})
        else:
            row["rationale_input_ids"] = list(row["input_ids"])
            row["rationale_labels"] = [-100] * len(row["labels"])
        rows.append(row)
    if not rows:
        raise DataValidationError([f"{source}: no usable examples: all {dropped} lost their target to truncation "
                                   f"at data.max_length={cfg.data.max_length}; raise it"])
    return ListDataset(rows), DataReport(source=source, examples=len(rows), truncated=truncated,
                                         dropped_no_target=dropped)


def evaluate_stepbystep(cfg: RunConfig, model, tokenizer) -> dict:
    """Label accuracy on data.eval: greedy generation from the label view's input, normalised exact match
    (numeric comparison of the evaluated expressions for SVAMP)."""
    from kdistill.evaluation.accuracy import label_accuracy
    from kdistill.generators import LocalTeacher

    encoder_decoder = bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))
    # evaluation scores against ground truth: llm labels only ever replace the training targets
    examples, views = _stepbystep_rows(cfg, cfg.data.eval, cfg.data.eval_limit, encoder_decoder, label_type="gt")
    generator = LocalTeacher(model, tokenizer=tokenizer, batch_size=cfg.stepbystep.eval_batch_size)
    predictions = generator.generate([v["prompt"] for v in views], max_new_tokens=cfg.stepbystep.max_new_tokens,
                                     do_sample=False)
    result = label_accuracy(predictions, [ex.label for ex in examples], numeric=cfg.stepbystep.dataset == "svamp")
    result["examples"] = [{"input": ex.input, "gold": ex.label, "prediction": p}
                          for ex, p in zip(examples[:20], predictions[:20])]
    return result


def training_arguments(cfg: RunConfig):
    from transformers import TrainingArguments

    kwargs: dict[str, Any] = {"report_to": "none", "seed": cfg.seed, "remove_unused_columns": False,
                              "label_names": ["labels"],
                              # pinned host memory only helps when batches are copied to a GPU
                              "dataloader_pin_memory": torch.cuda.is_available()}
    if not _has_accelerator() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # A multi-process launch (torchrun, `accelerate launch --multi_gpu`) on a machine with no accelerator:
        # without use_cpu, transformers would quietly run every process as an independent single-process job.
        kwargs["use_cpu"] = True
    kwargs.update(cfg.training)
    return TrainingArguments(**kwargs)


def _has_accelerator() -> bool:
    accelerator = getattr(torch, "accelerator", None)
    if accelerator is not None and hasattr(accelerator, "is_available"):
        return bool(accelerator.is_available())
    return torch.cuda.is_available()


@dataclass
class Prepared:
    cfg: RunConfig
    tokenizer: Any
    student: Any
    teacher: Any
    trainer: DistillTrainer
    data: list[DataReport]


def prepare(cfg: RunConfig, callbacks: list | None = None) -> Prepared:
    """Everything up to (not including) `trainer.train()`."""
    from transformers import set_seed

    set_seed(cfg.seed)
    if cfg.task == "embedding":
        return _prepare_embedding(cfg, callbacks)
    tokenizer = load_tokenizer(cfg.student, "student.name_or_path")
    cached = bool(cfg.cache.dir)  # teacher signals come from a top-k cache: no teacher model is loaded
    has_teacher = bool(cfg.teacher.name_or_path) and not cached
    encoder_decoder = is_encoder_decoder(cfg.student.name_or_path, "student.name_or_path",
                                         trust_remote_code=cfg.student.trust_remote_code)
    if has_teacher:
        teacher_encdec = is_encoder_decoder(cfg.teacher.name_or_path, "teacher.name_or_path",
                                            trust_remote_code=cfg.teacher.trust_remote_code)
        if teacher_encdec != encoder_decoder:
            kinds = {True: "an encoder-decoder LM", False: "a causal LM"}
            raise ConfigError(f"teacher.name_or_path: {cfg.teacher.name_or_path} is {kinds[teacher_encdec]} but "
                              f"student.name_or_path: {cfg.student.name_or_path} is {kinds[encoder_decoder]}; logit "
                              f"KD needs both of one kind (sequence-level KD on the teacher's answers does not: "
                              f"kdistill annotate --task output, then train with ce only)")
        compare_tokenizers(load_tokenizer(cfg.teacher, "teacher.name_or_path"), tokenizer)

    train_ds, train_report = load_split(cfg, tokenizer, cfg.data.train, cfg.data.split, cfg.data.limit,
                                         encoder_decoder)
    reports = [train_report]
    eval_ds = None
    if cfg.data.eval:
        eval_ds, eval_report = load_split(cfg, tokenizer, cfg.data.eval, cfg.data.eval_split,
                                           cfg.data.eval_limit, encoder_decoder)
        reports.append(eval_report)
    if cached:  # checked against the data and tokenizer before any model is loaded
        from kdistill.teacher_cache import CachedTeacherDataset, open_cache

        train_ds = CachedTeacherDataset(train_ds, open_cache(cfg, "train", train_ds, tokenizer, encoder_decoder))
        if eval_ds is not None:
            eval_ds = CachedTeacherDataset(eval_ds, open_cache(cfg, "eval", eval_ds, tokenizer, encoder_decoder))

    if any((o.type or name) == "attention" for name, o in cfg.objectives.items()):
        for role, model_cfg in (("student", cfg.student), ("teacher", cfg.teacher)):
            if model_cfg.attn_implementation not in (None, "eager"):
                raise ConfigError(f"{role}.attn_implementation is {model_cfg.attn_implementation!r}, but the "
                                  "attention objective needs attention weights, which only eager attention returns")
            model_cfg.attn_implementation = "eager"
    student = load_model(cfg.student, role="student")
    if cfg.student.layers:
        student = shrink(student, cfg.student.layers)
    teacher = load_model(cfg.teacher, role="teacher") if has_teacher else None
    kd_vocab = kd_vocab_size(tokenizer, teacher, student) if (teacher is not None or cached) else None
    if cfg.lora.enabled:
        student = apply_lora(student, cfg.lora)
    objectives = build_objectives(cfg.objectives)
    for objective, _ in objectives.values():
        objective.setup(student, teacher)

    args = training_arguments(cfg)
    collator = DataCollatorForDistillation(pad_token_id=tokenizer.pad_token_id)
    if cfg.stepbystep.dataset:
        collator = ViewCollator(collator)
    if _uses_triplets(cfg):
        from kdistill.data.embedding import EmbeddingCollator

        collator = TextFieldCollator(collator, EmbeddingCollator(pad_token_id=tokenizer.pad_token_id))
    if cached:
        from kdistill.teacher_cache import TopKCollator

        collator = TopKCollator(collator)
    trainer = DistillTrainer(model=student, teacher=teacher, objectives=objectives,
                             kd_vocab=kd_vocab, chunking=dataclasses.asdict(cfg.chunked_loss),
                             topk_temperature=cfg.cache.temperature if cached else None, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
                             data_collator=collator, processing_class=tokenizer, callbacks=callbacks)
    return Prepared(cfg=cfg, tokenizer=tokenizer, student=student, teacher=teacher, trainer=trainer, data=reports)


EMBEDDING_KINDS = ("triplet", "pair_score", "sentence")


def load_embedder(model_cfg, emb_cfg, role: str):
    """An Embedder per the `student`/`teacher` and `embedding` sections (layers kept as `model_cfg.layers`)."""
    from kdistill.embedder import Embedder

    kwargs = {"dtype": _DTYPES[model_cfg.dtype]} if model_cfg.dtype != "auto" else {}
    embedder = Embedder.from_pretrained(
        model_cfg.name_or_path, pooling=None if emb_cfg.pooling == "auto" else emb_cfg.pooling,
        normalize=emb_cfg.normalize, append_eos=emb_cfg.append_eos,
        max_length=emb_cfg.max_length if role == "student" else None,
        trust_remote_code=model_cfg.trust_remote_code, **kwargs)
    if model_cfg.layers:
        embedder.backbone = shrink(embedder.backbone, model_cfg.layers)
    logger.info("loaded %s embedder %s (%s pooling, %d layers kept of the checkpoint's, %.1fM parameters)", role,
                model_cfg.name_or_path, embedder.pooling, embedder.config.num_hidden_layers,
                sum(p.numel() for p in embedder.parameters()) / 1e6)
    return embedder


def attach_teacher_embeddings(examples, rows: list[dict], teacher, batch_size: int) -> None:
    """Run the frozen teacher once over every distinct text and store `teacher_<field>` vectors in each row.

    The teacher reads the raw text with its own tokenizer, so teacher and student need not share a vocabulary,
    and an epoch of training costs no teacher forward pass.
    """
    from kdistill.data.embedding import TEXT_FIELDS

    fields = [*TEXT_FIELDS, "sentence1", "sentence2", "text"]
    texts = sorted({t for ex in examples for f in fields
                    for t in ([ex.fields[f]] if isinstance(ex.fields.get(f), str) else ex.fields.get(f) or [])})
    vectors = teacher.encode(texts, batch_size=batch_size, show_progress=True)
    index = {t: i for i, t in enumerate(texts)}
    for ex, row in zip(examples, rows):
        for f in fields:
            value = ex.fields.get(f)
            if isinstance(value, str):
                row[f"teacher_{f}"] = vectors[index[value]].tolist()
            elif isinstance(value, list):
                row[f"teacher_{f}"] = [vectors[index[t]].tolist() for t in value]


def _load_embedding_split(cfg, source, split, limit, tokenizer, append_eos):
    from kdistill.data import load_examples
    from kdistill.data.embedding import encode_embedding_examples

    loaded = load_examples(source, format=cfg.data.format, split=split, skip_invalid=cfg.data.skip_invalid,
                           limit=limit, option=_data_key(cfg, source), subset=cfg.data.subset)
    wrong = sorted({ex.kind for ex in loaded.examples} - set(EMBEDDING_KINDS))
    if wrong:
        raise DataValidationError([f"{source}: task embedding needs triplet, pair_score or sentence rows, found "
                                   f"{wrong}"])
    rows = encode_embedding_examples(loaded.examples, tokenizer, max_length=cfg.embedding.max_length,
                                     append_eos=append_eos)
    report = DataReport(source=source, examples=len(rows), skipped_invalid=list(loaded.skipped))
    return loaded.examples, rows, report


def _prepare_embedding(cfg: RunConfig, callbacks) -> Prepared:
    from kdistill.data.embedding import EmbeddingCollator

    student = load_embedder(cfg.student, cfg.embedding, "student")
    examples, rows, report = _load_embedding_split(cfg, cfg.data.train, cfg.data.split, cfg.data.limit,
                                                   student.tokenizer, student.append_eos)
    objectives = build_objectives(cfg.objectives)
    teacher = None
    if cfg.teacher.name_or_path:
        teacher = load_embedder(cfg.teacher, cfg.embedding, "teacher")
        attach_teacher_embeddings(examples, rows, teacher, cfg.embedding.encode_batch_size)
    if cfg.lora.enabled:
        from peft import LoraConfig as PeftLoraConfig, TaskType, get_peft_model

        student.backbone = get_peft_model(student.backbone, PeftLoraConfig(
            task_type=TaskType.FEATURE_EXTRACTION, r=cfg.lora.r, lora_alpha=cfg.lora.alpha,
            lora_dropout=cfg.lora.dropout, target_modules=cfg.lora.target_modules))
    for objective, _ in objectives.values():
        objective.setup(student, teacher)
    args = training_arguments(cfg)
    trainer = DistillTrainer(model=student, teacher=None, objectives=objectives, args=args,
                             train_dataset=ListDataset(rows),
                             data_collator=EmbeddingCollator(pad_token_id=student.tokenizer.pad_token_id),
                             processing_class=student.tokenizer, callbacks=callbacks)
    return Prepared(cfg=cfg, tokenizer=student.tokenizer, student=student, teacher=teacher, trainer=trainer,
                    data=[report])


def _encoded_rows(dataset) -> list[dict]:
    """The token rows of a training dataset (a cached one wraps its encoded dataset)."""
    while not hasattr(dataset, "rows") and hasattr(dataset, "dataset"):
        dataset = dataset.dataset
    return dataset.rows


def run_training(cfg: RunConfig, callbacks: list | None = None, resume: bool = True) -> dict:
    """Train, save student + tokenizer + resolved config in `training.output_dir`, return a summary.

    With `resume` (default), a run whose output_dir holds a `checkpoint-*` folder continues from the newest one,
    if that checkpoint was written by a run with the same settings and data (`kdistill.provenance`); otherwise it is
    refused with the differences named. Without `resume`, old checkpoints are deleted first.
    """
    check_output_dir(cfg.training["output_dir"], "training.output_dir")
    fingerprint = {"config": config_fingerprint(to_dict(cfg))}
    checkpoint = None
    if not resume:
        if int(os.environ.get("RANK", "0")) == 0:
            clear_checkpoints(cfg.training["output_dir"])
    else:
        checkpoint = last_checkpoint(cfg.training["output_dir"])
        if checkpoint:
            check_resume(checkpoint, fingerprint)  # settings first: before any model loads
    prepared = prepare(cfg, callbacks)
    trainer = prepared.trainer
    output_dir = trainer.args.output_dir
    fingerprint["data"] = data_fingerprint(_encoded_rows(trainer.train_dataset))
    if checkpoint:
        check_resume(checkpoint, fingerprint)
        logger.info("resuming from %s", checkpoint)
    trainer.add_callback(FingerprintCallback(fingerprint))
    result = trainer.train(resume_from_checkpoint=checkpoint)
    if trainer.is_world_process_zero():
        if cfg.task == "embedding":
            prepared.student.save(output_dir)
        else:
            with without_objective_parts(trainer.model):  # projections of objectives are not part of the student
                save_student(trainer.model, prepared.tokenizer, output_dir, merge_lora=cfg.lora.merge)
        save_config(cfg, output_dir)
    evaluation = None
    if cfg.stepbystep.dataset and cfg.data.eval and trainer.is_world_process_zero():
        evaluation = evaluate_stepbystep(cfg, trainer.model, prepared.tokenizer)
        logger.info("label accuracy on %s: %.4f (%d/%d, %d invalid)", cfg.data.eval, evaluation["accuracy"],
                    evaluation["correct"], evaluation["total"], evaluation["invalid"])
    summary = {
        "output_dir": output_dir,
        "global_step": result.global_step,
        "train_loss": result.training_loss,
        "resumed_from": checkpoint,
        "data": [dataclasses.asdict(r) | {"skipped_invalid": len(r.skipped_invalid)} for r in prepared.data],
        "log_history": trainer.state.log_history,
    }
    if evaluation is not None:
        summary["label_accuracy"] = evaluation
    if trainer.is_world_process_zero():
        (Path(output_dir) / "kdistill_summary.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary
