"""Tiny, config-built models and a tokenizer trained from local text.

These are the offline stand-ins for real checkpoints: the test suite and the offline examples build a
teacher and a student from a `transformers` config (no download), with a byte-level BPE tokenizer trained
on a local text file in a second or two. Everything is saved with `save_pretrained`, so the rest of
kdistill loads them exactly like a hub checkpoint, from a local path.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Iterable, Iterator

import torch

from kdistill.config import config_from_dict
from kdistill.models.loader import lm_class
from kdistill.pipeline import run_training

# A ChatML-style template written for kdistill's tiny models (the same conversation layout Qwen2.5 uses).
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

DECODER_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
T5_SPECIALS = ["<pad>", "</s>", "<unk>"]


def iter_text(path: str | Path, fields: Iterable[str] = ("instruction", "input", "output", "prompt",
                                                        "completion", "text", "sentence1", "sentence2")
              ) -> Iterator[str]:
    """Yield the string fields of a JSONL file (or each line of a plain text file)."""
    path = Path(path)
    with path.open(encoding="utf-8") as fh:
        for line in fh:
            line = line.strip()
            if not line:
                continue
            if path.suffix in (".jsonl", ".json"):
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(row, dict):
                    for key in fields:
                        value = row.get(key)
                        if isinstance(value, str) and value:
                            yield value
                    for message in row.get("messages") or []:
                        if isinstance(message, dict) and isinstance(message.get("content"), str):
                            yield message["content"]
            else:
                yield line


def train_tokenizer(texts: Iterable[str], vocab_size: int = 512, kind: str = "decoder",
                    chat_template: bool = True):
    """Train a byte-level BPE tokenizer and wrap it as a `PreTrainedTokenizerFast`.

    kind="decoder": Qwen-like specials (`<|endoftext|>` is eos and pad, no bos) and, if `chat_template`,
    a ChatML chat template. kind="t5": `<pad>`=0, `</s>`=1 appended to every sequence, `<unk>`=2.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if kind not in ("decoder", "t5"):
        raise ValueError(f"kind must be 'decoder' or 't5', got {kind!r}")
    specials = DECODER_SPECIALS if kind == "decoder" else T5_SPECIALS
    tok = Tokenizer(models.BPE(unk_token="<unk>" if kind == "t5" else None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    if kind == "t5":
        eos_id = tok.token_to_id("</s>")
        tok.post_processor = processors.TemplateProcessing(
            single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", eos_id)])
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>",
                                       unk_token="<unk>")
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                                       pad_token="<|endoftext|>",
                                       additional_special_tokens=["<|im_start|>", "<|im_end|>"])
        if chat_template:
            fast.chat_template = CHATML_TEMPLATE
    return fast


def decoder_config(tokenizer, hidden_size: int = 64, num_layers: int = 2, num_heads: int = 4,
                   num_kv_heads: int = 2, intermediate_size: int | None = None, vocab_size: int | None = None,
                   model_type: str = "qwen2", max_position_embeddings: int = 512, seed_tie: bool = True):
    """A small Qwen2/Llama-style causal LM config sized for CPU tests."""
    from transformers import AutoConfig

    return AutoConfig.for_model(
        model_type,
        vocab_size=vocab_size or len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=seed_tie,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
        attention_dropout=0.0,
    )


def t5_config(tokenizer, d_model: int = 64, num_layers: int = 2, num_decoder_layers: int | None = None,
              num_heads: int = 4, d_kv: int = 16, d_ff: int | None = None, vocab_size: int | None = None):
    """A small T5 (v1.1-style gated-gelu) config sized for CPU tests."""
    from transformers import T5Config

    return T5Config(
        vocab_size=vocab_size or len(tokenizer),
        d_model=d_model,
        d_kv=d_kv,
        d_ff=d_ff or d_model * 2,
        num_layers=num_layers,
        num_decoder_layers=num_decoder_layers or num_layers,
        num_heads=num_heads,
        feed_forward_proj="gated-gelu",
        dropout_rate=0.0,
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )


def build_model(config, seed: int = 0):
    """Instantiate a randomly initialised causal or seq2seq LM from a config, deterministically."""
    torch.manual_seed(seed)
    return lm_class(config).from_config(config)


def make_tiny_pair(out_dir: str | Path, kind: str = "causal", data: str | Path | None = None,
                   vocab_size: int = 1024, teacher_steps: int = 0, seed: int = 0) -> dict[str, str]:
    """Write a tiny teacher and a smaller student (sharing one tokenizer trained on `data`) under `out_dir`.

    The teacher's embedding matrix is padded 64 rows past the tokenizer, as real checkpoints often are, so the
    vocabulary alignment path is exercised. With `teacher_steps` > 0 the teacher is first fine-tuned with plain
    cross-entropy on `data` by kdistill itself, so it has something to teach.
    Returns {"teacher": path, "student": path}.
    """
    if kind not in ("causal", "t5"):
        raise ValueError(f"kind must be 'causal' or 't5', got {kind!r}")
    if data is None:
        raise ValueError("data: a local .jsonl/.json/.txt file to train the tokenizer on is required")
    out = Path(out_dir)
    tokenizer = train_tokenizer(iter_text(data), vocab_size=vocab_size, kind="decoder" if kind == "causal" else "t5")
    if kind == "causal":
        teacher_cfg = decoder_config(tokenizer, hidden_size=96, num_layers=4, num_heads=4, num_kv_heads=2,
                                     vocab_size=len(tokenizer) + 64)
        student_cfg = decoder_config(tokenizer, hidden_size=48, num_layers=2, num_heads=4, num_kv_heads=2)
    else:
        teacher_cfg = t5_config(tokenizer, d_model=96, num_layers=4, num_heads=4, d_kv=24,
                                vocab_size=len(tokenizer) + 64)
        student_cfg = t5_config(tokenizer, d_model=48, num_layers=2, num_heads=4, d_kv=12)
    paths = {}
    for role, config, role_seed in (("teacher", teacher_cfg, seed), ("student", student_cfg, seed + 1)):
        path = out / role
        build_model(config, seed=role_seed).save_pretrained(path)
        tokenizer.save_pretrained(path)
        paths[role] = str(path)
    if teacher_steps > 0:
        pretrain(paths["teacher"], data, teacher_steps, out / "teacher-sft", seed)
    return paths


def pretrain(model_path: str, data, steps: int, work_dir: Path, seed: int) -> None:
    """Plain SFT of a tiny model with kdistill's own trainer (objective `ce`, no teacher), saved in place."""
    cfg = config_from_dict({
        "student": {"name_or_path": model_path},
        "data": {"train": str(data), "max_length": 128, "skip_invalid": True},
        "objectives": {"ce": {"weight": 1.0}},
        "training": {"output_dir": str(work_dir), "max_steps": steps, "per_device_train_batch_size": 16,
                     "learning_rate": 3e-3, "lr_scheduler_type": "cosine", "warmup_steps": max(steps // 10, 1),
                     "logging_steps": max(steps // 5, 1), "save_strategy": "no", "disable_tqdm": True},
        "seed": seed,
    }, source="tiny teacher pre-training")
    run_training(cfg, resume=False)
    for name in ("model.safetensors", "config.json", "generation_config.json"):
        if (work_dir / name).exists():
            shutil.copy(work_dir / name, Path(model_path) / name)
    shutil.rmtree(work_dir)
