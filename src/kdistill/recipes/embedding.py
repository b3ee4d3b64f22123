"""The embedding recipe: one vector per text (contrastive fine-tuning, embedding KD) for encoders or decoder LMs.

Rows are triplet, pair_score or sentence records; the student is an `Embedder` (backbone + pooling); a teacher
embedder, when given, runs once over every distinct text before training (`kdistill.teachers.embeddings`).
"""

from __future__ import annotations

import logging

from kdistill.config import RunConfig
from kdistill.data import DataValidationError, EmbeddingCollator, encode_embedding_examples, load_examples
from kdistill.embedder import Embedder
from kdistill.models import DTYPES, apply_lora, shrink
from kdistill.objectives import build_objectives
from kdistill.recipes.base import DataReport, ListDataset, Parts, Recipe, data_key
from kdistill.teachers.embeddings import PrecomputedEmbeddings, attach_teacher_embeddings

__all__ = ["EMBEDDING_KINDS", "EmbeddingRecipe", "load_embedder"]

logger = logging.getLogger(__name__)

EMBEDDING_KINDS = ("triplet", "pair_score", "sentence")


def load_embedder(model_cfg, emb_cfg, role: str) -> Embedder:
    """An Embedder per the `student`/`teacher` and `embedding` sections (layers kept as `model_cfg.layers`)."""
    kwargs = {"dtype": DTYPES[model_cfg.dtype]} if model_cfg.dtype != "auto" else {}
    embedder = Embedder.from_pretrained(
        model_cfg.name_or_path, pooling=None if emb_cfg.pooling == "auto" else emb_cfg.pooling,
        normalize=emb_cfg.normalize, append_eos=emb_cfg.append_eos,
        max_length=emb_cfg.max_length if role == "student" else None,
        trust_remote_code=model_cfg.trust_remote_code, key=f"{role}.name_or_path", **kwargs)
    if model_cfg.layers:
        embedder.backbone = shrink(embedder.backbone, model_cfg.layers)
    logger.info("loaded %s embedder %s (%s pooling, %d layers kept of the checkpoint's, %.1fM parameters)", role,
                model_cfg.name_or_path, embedder.pooling, embedder.config.num_hidden_layers,
                sum(p.numel() for p in embedder.parameters()) / 1e6)
    return embedder


class EmbeddingRecipe(Recipe):
    name = "embedding"

    def load_split(self, cfg: RunConfig, source: str, split: str, limit, tokenizer, append_eos: bool):
        loaded = load_examples(source, format=cfg.data.format, split=split, skip_invalid=cfg.data.skip_invalid,
                               limit=limit, option=data_key(cfg, source), subset=cfg.data.subset)
        wrong = sorted({ex.kind for ex in loaded.examples} - set(EMBEDDING_KINDS))
        if wrong:
            raise DataValidationError([f"{source}: task embedding needs triplet, pair_score or sentence rows, found "
                                       f"{wrong}"])
        rows = encode_embedding_examples(loaded.examples, tokenizer, max_length=cfg.embedding.max_length,
                                         append_eos=append_eos)
        return loaded.examples, rows, DataReport(source=source, examples=len(rows),
                                                 skipped_invalid=list(loaded.skipped))

    def build(self, cfg: RunConfig) -> Parts:
        student = load_embedder(cfg.student, cfg.embedding, "student")
        examples, rows, report = self.load_split(cfg, cfg.data.train, cfg.data.split, cfg.data.limit,
                                                 student.tokenizer, student.append_eos)
        objectives = build_objectives(cfg.objectives)
        teacher = source = None
        if cfg.teacher.name_or_path:
            teacher = load_embedder(cfg.teacher, cfg.embedding, "teacher")
            attach_teacher_embeddings(examples, rows, teacher, cfg.embedding.encode_batch_size)
            source = PrecomputedEmbeddings()
        if cfg.lora.enabled:
            student.backbone = apply_lora(student.backbone, cfg.lora, "FEATURE_EXTRACTION")
        for objective, _ in objectives.values():
            objective.setup(student, teacher)
        return Parts(tokenizer=student.tokenizer, student=student, objectives=objectives,
                     train_dataset=ListDataset(rows), rows=rows, reports=[report], teacher=source,
                     teacher_model=teacher, collator=EmbeddingCollator(pad_token_id=student.tokenizer.pad_token_id))

    def save(self, cfg: RunConfig, parts: Parts, model, output_dir: str) -> None:
        parts.student.save(output_dir)  # the encoder and pooling only: objective parts are not part of it
