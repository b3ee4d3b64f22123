"""Saving a distilled LM student (full weights, or a LoRA adapter, optionally merged) and loading it back."""

from __future__ import annotations

from pathlib import Path

from kdistill.models.loader import is_encoder_decoder, load_pretrained


def save_student(model, tokenizer, output_dir: str | Path, merge_lora: bool = False) -> Path:
    """Save the student (or its LoRA adapter) and tokenizer. With `merge_lora`, the merged full model goes to
    `output_dir` and the adapter to `output_dir/adapter`."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    is_peft = hasattr(model, "peft_config")
    if is_peft and merge_lora:
        model.save_pretrained(output_dir / "adapter")
        tokenizer.save_pretrained(output_dir / "adapter")
        model = model.merge_and_unload()
    model.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    return output_dir


def load_student(path: str | Path, **kwargs):
    """Load a saved student: a full model folder, or a LoRA adapter folder (base model from its config)."""
    path = Path(path)
    if (path / "adapter_config.json").exists():
        from peft import AutoPeftModelForCausalLM, AutoPeftModelForSeq2SeqLM, PeftConfig

        base = PeftConfig.from_pretrained(path).base_model_name_or_path
        cls = AutoPeftModelForSeq2SeqLM if is_encoder_decoder(base) else AutoPeftModelForCausalLM
        return cls.from_pretrained(path, **kwargs)
    return load_pretrained(path, **kwargs)
