"""The distilling step-by-step recipe (Hsieh et al., 2023): a label view and a rationale view per example.

An example becomes two token views: the label view (`input_ids` / `labels`: task prefix + input -> label) and the
rationale view (`rationale_input_ids` / `rationale_labels`: rationale prefix + input -> the LLM's rationale), so
`ce` on each view with weights alpha and 1 - alpha gives alpha * L_label + (1 - alpha) * L_rationale. After
training, label accuracy on data.eval by greedy generation.
"""

from __future__ import annotations

import logging

from kdistill.config import RunConfig
from kdistill.data import DataValidationError, Example, encode_examples
from kdistill.data.collators import ViewCollator
from kdistill.data.stepbystep import build_views, load_stepbystep
from kdistill.evaluation.accuracy import label_accuracy
from kdistill.generators import LocalTeacher
from kdistill.recipes.base import DataReport, ListDataset, Parts
from kdistill.recipes.lm import LMRecipe

__all__ = ["StepByStepRecipe", "stepbystep_rows"]

logger = logging.getLogger(__name__)


def stepbystep_rows(cfg: RunConfig, source: str, limit, encoder_decoder: bool, label_type: str | None = None):
    """(examples, views) of a step-by-step data file: see `kdistill.data.stepbystep.build_views`."""
    sbs = cfg.stepbystep
    examples = load_stepbystep(source, sbs.dataset, skip_invalid=cfg.data.skip_invalid, limit=limit)
    suffix = sbs.prompt_suffix if sbs.prompt_suffix is not None else ("" if encoder_decoder else "\n")
    return examples, build_views(examples, label_type=label_type or sbs.label_type, model_type=sbs.model_type,
                                 label_prefix=sbs.label_prefix, rationale_prefix=sbs.rationale_prefix,
                                 prompt_suffix=suffix)


class StepByStepRecipe(LMRecipe):
    """LM training on label and rationale views; evaluation = label accuracy on data.eval."""

    name = "stepbystep"

    def load_split(self, cfg: RunConfig, tokenizer, source: str, split: str, limit, encoder_decoder: bool,
                   teacher_tokenizer=None):
        """Two token views per example. An example without a rationale gets an empty rationale view (every label
        -100), so it adds nothing to the rationale loss or its token count. (`teacher_tokenizer`: cross-tokenizer
        objectives do not run on step-by-step data; always None here.)"""
        _, views = stepbystep_rows(cfg, source, limit, encoder_decoder)
        kwargs = dict(template="plain", max_length=cfg.data.max_length, is_encoder_decoder=encoder_decoder,
                      max_target_length=cfg.data.max_target_length)

        def encode(prompt, completion, where):
            return encode_examples([Example("prompt_completion", {"prompt": prompt, "completion": completion},
                                            where)], tokenizer, **kwargs)

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

    def collator(self, cfg: RunConfig, tokenizer, teacher_tokenizer=None):
        return ViewCollator(super().collator(cfg, tokenizer))

    def evaluate(self, cfg: RunConfig, parts: Parts, model) -> dict | None:
        """Label accuracy on data.eval: greedy generation from the label view's input, normalised exact match
        (numeric comparison of the evaluated expressions for SVAMP)."""
        if not cfg.data.eval:
            return None
        encoder_decoder = bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))
        # evaluation scores against ground truth: llm labels only ever replace the training targets
        examples, views = stepbystep_rows(cfg, cfg.data.eval, cfg.data.eval_limit, encoder_decoder, label_type="gt")
        generator = LocalTeacher(model, tokenizer=parts.tokenizer, batch_size=cfg.stepbystep.eval_batch_size)
        predictions = generator.generate([v["prompt"] for v in views], max_new_tokens=cfg.stepbystep.max_new_tokens,
                                         do_sample=False)
        result = label_accuracy(predictions, [ex.label for ex in examples],
                                numeric=cfg.stepbystep.dataset == "svamp")
        result["examples"] = [{"input": ex.input, "gold": ex.label, "prediction": p}
                              for ex, p in zip(examples[:20], predictions[:20])]
        logger.info("label accuracy on %s: %.4f (%d/%d, %d invalid)", cfg.data.eval, result["accuracy"],
                    result["correct"], result["total"], result["invalid"])
        return {"label_accuracy": result}
