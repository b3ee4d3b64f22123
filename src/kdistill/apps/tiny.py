"""Tiny, config-built models and a tokenizer trained from local text.

These are the offline stand-ins for real checkpoints: the test suite and the offline examples build a
teacher and a student from a `transformers` config (no download), with a byte-level BPE tokenizer trained
on a local text file in a second or two. Everything is saved with `save_pretrained`, so the rest of
kdistill loads them exactly like a hub checkpoint, from a local path.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kdistill.apps.teacher_pretrain import TeacherTraining, pretrain
from kdistill.errors import ConfigError, MissingFileError
from kdistill.models.loader import lm_class
from kdistill.paths import check_output_dir

__all__ = ["TINY_JSON", "TinySize", "build_model", "decoder_config", "iter_text", "make_tiny_pair",
           "model_summary", "pretrain", "t5_config", "train_tokenizer"]

TINY_JSON = "tiny.json"  # what `make_tiny_pair` wrote: sizes, parameter counts, the teacher's pre-training

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


@dataclass(frozen=True)
class TinySize:
    """The size of one tiny model. For T5: hidden -> d_model, heads -> num_heads with d_kv = hidden // heads,
    intermediate -> d_ff, layers -> encoder and decoder layers each; kv_heads is causal only (default 2)."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int | None = None
    intermediate: int | None = None  # default 2 * hidden

    def check(self, role: str, kind: str) -> None:
        """Refuse a size that cannot build, naming the `--{role}-...` option."""
        for name in ("hidden", "layers", "heads", "kv_heads", "intermediate"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ConfigError(f"{_flag(role, name)}: must be a whole number >= 1, got {value!r}")
        if self.hidden % self.heads:
            raise ConfigError(f"{_flag(role, 'hidden')} {self.hidden} is not divisible by "
                              f"{_flag(role, 'heads')} {self.heads}")
        if kind == "t5" and self.kv_heads is not None:
            raise ConfigError(f"{_flag(role, 'kv_heads')}: T5 has no grouped-query attention (each head has its own "
                              f"keys and values); leave it out with --kind t5")
        if kind == "causal" and self.heads % self.causal_kv_heads:
            raise ConfigError(f"{_flag(role, 'heads')} {self.heads} is not divisible by {_flag(role, 'kv_heads')} "
                              f"{self.causal_kv_heads}" + ("" if self.kv_heads else " (its default)"))

    @property
    def causal_kv_heads(self) -> int:
        return self.kv_heads or 2

    def config(self, tokenizer, kind: str, vocab_size: int | None = None, max_position_embeddings: int = 512):
        if kind == "causal":
            return decoder_config(tokenizer, hidden_size=self.hidden, num_layers=self.layers, num_heads=self.heads,
                                  num_kv_heads=self.causal_kv_heads, intermediate_size=self.intermediate,
                                  vocab_size=vocab_size, max_position_embeddings=max_position_embeddings)
        return t5_config(tokenizer, d_model=self.hidden, num_layers=self.layers, num_heads=self.heads,
                         d_kv=self.hidden // self.heads, d_ff=self.intermediate, vocab_size=vocab_size)


def _flag(role: str, name: str) -> str:
    return f"--{role}-{name.replace('_', '-')}"


def model_summary(model) -> dict[str, Any]:
    """The size of a built model, read back from its config, with its parameter count (sum of numel)."""
    c = model.config
    if getattr(c, "is_encoder_decoder", False):
        size = {"hidden": c.d_model, "layers": c.num_layers, "decoder_layers": c.num_decoder_layers,
                "heads": c.num_heads, "d_kv": c.d_kv, "intermediate": c.d_ff}
    else:
        size = {"hidden": c.hidden_size, "layers": c.num_hidden_layers, "heads": c.num_attention_heads,
                "kv_heads": c.num_key_value_heads, "intermediate": c.intermediate_size,
                "max_position_embeddings": c.max_position_embeddings}
    return {"params": sum(p.numel() for p in model.parameters()), **size, "vocab_rows": c.vocab_size}


def make_tiny_pair(out_dir: str | Path, kind: str = "causal", data: str | Path | None = None,
                   vocab_size: int = 1024, teacher_steps: int = 0, seed: int = 0, *,
                   teacher_hidden: int = 96, teacher_layers: int = 4, teacher_heads: int = 4,
                   teacher_kv_heads: int | None = None, teacher_intermediate: int | None = None,
                   student_hidden: int = 48, student_layers: int = 2, student_heads: int = 4,
                   student_kv_heads: int | None = None, student_intermediate: int | None = None,
                   teacher_lr: float = 3e-3, teacher_batch_size: int = 16, teacher_max_length: int = 128,
                   teacher_warmup: int | None = None, teacher_data: Sequence[str | Path] | None = None,
                   max_position_embeddings: int | None = None, progress: bool = True) -> dict[str, str]:
    """Write a tiny teacher and a smaller student (sharing one tokenizer trained on `data`) under `out_dir`,
    and `out_dir/tiny.json` describing both (`TINY_JSON`).

    The teacher's embedding matrix is padded 64 rows past the tokenizer, as real checkpoints often are, so the
    vocabulary alignment path is exercised. With `teacher_steps` > 0 the teacher is first trained with plain
    cross-entropy by kdistill itself (`pretrain`) on `teacher_data` (default: `data`), so it has something to
    teach. Sizes are `TinySize` fields per role; `max_position_embeddings` (causal only) defaults to 512.
    Every option is checked before any work; a bad one is a ConfigError naming its `--flag`.
    Returns {"teacher": path, "student": path}.
    """
    if kind not in ("causal", "t5"):
        raise ValueError(f"kind must be 'causal' or 't5', got {kind!r}")
    if data is None:
        raise ValueError("data: a local .jsonl/.json/.txt file to train the tokenizer on is required")
    sizes = {"teacher": TinySize(teacher_hidden, teacher_layers, teacher_heads, teacher_kv_heads,
                                 teacher_intermediate),
             "student": TinySize(student_hidden, student_layers, student_heads, student_kv_heads,
                                 student_intermediate)}
    for role, size in sizes.items():
        size.check(role, kind)
    training = TeacherTraining(steps=teacher_steps, lr=teacher_lr, batch_size=teacher_batch_size,
                               max_length=teacher_max_length, warmup=teacher_warmup,
                               data=tuple(str(p) for p in ([data] if teacher_data is None else teacher_data)),
                               data_flag="--data" if teacher_data is None else "--teacher-data")
    training.check()
    positions = _max_positions(kind, max_position_embeddings, training)
    check_output_dir(out_dir, "--out")
    out = Path(out_dir)
    if not Path(data).is_file():
        raise MissingFileError(f"--data: file not found: {str(data)!r}")

    tokenizer = train_tokenizer(iter_text(data), vocab_size=vocab_size, kind="decoder" if kind == "causal" else "t5")
    configs = {"teacher": sizes["teacher"].config(tokenizer, kind, len(tokenizer) + 64, positions),
               "student": sizes["student"].config(tokenizer, kind, max_position_embeddings=positions)}
    paths, info = {}, {"kind": kind, "vocab_size": len(tokenizer)}
    for role, role_seed in (("teacher", seed), ("student", seed + 1)):
        path = out / role
        model = build_model(configs[role], seed=role_seed)
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
        paths[role] = str(path)
        info[role] = {"path": str(path), **model_summary(model)}
        del model
    info["teacher"].update(pretrain(paths["teacher"], training, out, seed, progress))
    (out / TINY_JSON).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    return paths


def _max_positions(kind: str, value: int | None, training: TeacherTraining) -> int:
    """max_position_embeddings for a causal pair (T5 has relative positions and no such setting)."""
    if kind == "t5":
        if value is not None:
            raise ConfigError("--max-position-embeddings: T5 uses relative positions; leave it out with --kind t5")
        return 512
    given, value = value is not None, 512 if value is None else value
    if not isinstance(value, int) or value < 1:
        raise ConfigError(f"--max-position-embeddings: must be a whole number >= 1, got {value!r}")
    if training.steps and training.max_length > value:
        raise ConfigError(f"--teacher-max-length {training.max_length} exceeds --max-position-embeddings {value}"
                          + ("" if given else " (its default)"))
    return value
