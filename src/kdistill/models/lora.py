"""LoRA adapters through peft: the one path for LM students and for an embedder's backbone."""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)

LORA_TASK_TYPES = ("CAUSAL_LM", "SEQ_2_SEQ_LM", "FEATURE_EXTRACTION")


def apply_lora(model, cfg, task_type: str | None = None):
    """Wrap `model` in peft LoRA adapters per a `LoraConfig` section and return the wrapped model.

    `task_type`: the peft task, one of `LORA_TASK_TYPES`; default: SEQ_2_SEQ_LM for an encoder-decoder LM,
    else CAUSAL_LM. An embedder's backbone (a bare transformers model, no output layer) takes
    FEATURE_EXTRACTION: `embedder.backbone = apply_lora(embedder.backbone, cfg, "FEATURE_EXTRACTION")`.
    `target_modules` is a list of module names or "all-linear"; another single string is one module name.
    """
    from peft import LoraConfig, TaskType, get_peft_model

    if task_type is None:
        task_type = "SEQ_2_SEQ_LM" if getattr(model.config, "is_encoder_decoder", False) else "CAUSAL_LM"
    if task_type not in LORA_TASK_TYPES:
        raise ValueError(f"task_type must be one of {', '.join(LORA_TASK_TYPES)}, got {task_type!r}")
    target = cfg.target_modules
    if isinstance(target, str) and target != "all-linear":
        target = [target]
    peft_cfg = LoraConfig(task_type=TaskType[task_type], r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                          target_modules=target)
    model = get_peft_model(model, peft_cfg)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    logger.info("LoRA: %d trainable of %d parameters (%.2f%%)", trainable, total, 100 * trainable / total)
    return model
