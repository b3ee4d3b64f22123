"""kdistill.models: the one loader (LM or bare backbone) and the one LoRA path (LM students, embedder backbones)."""

from __future__ import annotations

import pytest
import torch

from kdistill.apps.tiny import build_model, decoder_config, t5_config, train_tokenizer
from kdistill.config import LoraConfig
from kdistill.embedder import Embedder
from kdistill.models import DTYPES, ModelUnavailableError, apply_lora, lm_class, load_pretrained

TEXTS = ["the cat sat on the mat", "a dog ran in the park", "birds sing in the morning"] * 20


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """{'causal': folder, 't5': folder}: tiny random models saved with their tokenizers."""
    out = {}
    for kind, make in (("causal", decoder_config), ("t5", t5_config)):
        tok = train_tokenizer(TEXTS, vocab_size=300, kind="decoder" if kind == "causal" else "t5")
        path = tmp_path_factory.mktemp(kind)
        build_model(make(tok, num_layers=1)).save_pretrained(path)
        tok.save_pretrained(path)
        out[kind] = str(path)
    return out


def test_load_pretrained_picks_the_lm_class_or_the_bare_backbone(folders):
    causal = load_pretrained(folders["causal"])
    t5 = load_pretrained(folders["t5"])
    backbone = load_pretrained(folders["causal"], backbone=True, dtype=DTYPES["float32"])
    assert type(causal).__name__ == "Qwen2ForCausalLM" and lm_class(causal.config).__name__ == "AutoModelForCausalLM"
    assert type(t5).__name__ == "T5ForConditionalGeneration"
    assert type(backbone).__name__ == "Qwen2Model" and backbone.dtype == torch.float32
    with pytest.raises(ModelUnavailableError, match="student.name_or_path: .*no such local folder"):
        load_pretrained(folders["causal"] + "-missing", "student.name_or_path")


def test_apply_lora_serves_lm_students_and_embedder_backbones(folders):
    cfg = LoraConfig(enabled=True, r=2, alpha=4, dropout=0.0)
    assert type(apply_lora(load_pretrained(folders["causal"]), cfg)).__name__ == "PeftModelForCausalLM"
    assert type(apply_lora(load_pretrained(folders["t5"]), cfg)).__name__ == "PeftModelForSeq2SeqLM"
    embedder = Embedder.from_pretrained(folders["causal"])
    embedder.backbone = apply_lora(embedder.backbone, cfg, task_type="FEATURE_EXTRACTION")
    assert type(embedder.backbone).__name__ == "PeftModelForFeatureExtraction"
    trainable = [n for n, p in embedder.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert embedder.encode(["the cat"]).shape == (1, embedder.dim)
    with pytest.raises(ValueError, match="task_type must be one of"):
        apply_lora(load_pretrained(folders["causal"]), cfg, task_type="TOKEN_CLS")
