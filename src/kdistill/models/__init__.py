"""Loading teacher and student, comparing their vocabularies, LoRA on the student, saving the result."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from kdistill.data.records import looks_local
from kdistill.errors import UserError
from kdistill.hub import offline_reason

logger = logging.getLogger(__name__)


class ModelUnavailableError(UserError, OSError):
    """A model the user named that cannot be loaded or is not the kind of model the command needs."""

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class VocabularyMismatchError(UserError, ValueError):
    """Teacher and student tokenise text differently: token-level logit KD is not defined between them."""


def _hf_kwargs(cfg) -> dict:
    kwargs = {"trust_remote_code": cfg.trust_remote_code}
    if cfg.revision:
        kwargs["revision"] = cfg.revision
    return kwargs


def pretrained_config(name_or_path: str, key: str = "name_or_path", **kwargs):
    """`AutoConfig.from_pretrained`, with the failures a user can fix as one ModelUnavailableError naming `key`:
    a local path that does not exist, a hub id that cannot be reached (offline) or does not exist."""
    from transformers import AutoConfig

    path = Path(name_or_path).expanduser()
    if not path.exists() and looks_local(name_or_path):
        raise ModelUnavailableError(f"{key}: {name_or_path!r}: no such local folder (resolved to "
                                    f"{str(path.absolute())!r})")
    offline = None if path.exists() else offline_reason()
    try:
        return AutoConfig.from_pretrained(name_or_path, **kwargs)
    except (OSError, ValueError) as exc:
        hint = f"{offline}, so only local folders and the hub cache are read; " if offline else ""
        reason = " ".join(str(exc).split())[:240]
        raise ModelUnavailableError(f"{key}: cannot load {name_or_path!r} ({reason}); {hint}give {key} a local "
                                    f"model folder (written by save_pretrained) instead") from None


def is_encoder_decoder(name_or_path: str, key: str = "name_or_path", **kwargs) -> bool:
    return bool(getattr(pretrained_config(name_or_path, key, **kwargs), "is_encoder_decoder", False))


def load_model(cfg, *, role: str = "student"):
    """Load a causal or seq2seq LM from a hub id or local folder, per a `ModelConfig`."""
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    kwargs = _hf_kwargs(cfg)
    config = pretrained_config(cfg.name_or_path, f"{role}.name_or_path", **kwargs)
    cls = AutoModelForSeq2SeqLM if getattr(config, "is_encoder_decoder", False) else AutoModelForCausalLM
    if cfg.dtype != "auto":
        kwargs["dtype"] = _DTYPES[cfg.dtype]
    if cfg.attn_implementation:
        kwargs["attn_implementation"] = cfg.attn_implementation
    if cfg.device_map:
        if role != "teacher":
            raise UserError(f"{role}.device_map: device_map is for the teacher only; place the student with "
                            f"accelerate/TrainingArguments")
        kwargs["device_map"] = cfg.device_map
    model = cls.from_pretrained(cfg.name_or_path, **kwargs)
    logger.info("loaded %s %s (%s, %.1fM parameters)", role, cfg.name_or_path, cls.__name__,
                sum(p.numel() for p in model.parameters()) / 1e6)
    return model


def load_tokenizer(cfg, key: str = "name_or_path"):
    from transformers import AutoTokenizer

    source = cfg.tokenizer or cfg.name_or_path
    if not Path(source).expanduser().is_dir():  # a missing folder or an unreachable hub id: said in one line
        pretrained_config(source, key, **_hf_kwargs(cfg))
    tok = AutoTokenizer.from_pretrained(source, **_hf_kwargs(cfg))
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
        "student from the teacher's model family, or distil at the sequence level without logits: train the "
        "student with the `ce` objective only (no `kd`) on text the teacher generated.")


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


def apply_lora(model, cfg):
    """Wrap the student in peft LoRA adapters per a `LoraConfig` section."""
    from peft import LoraConfig, TaskType, get_peft_model

    task = TaskType.SEQ_2_SEQ_LM if getattr(model.config, "is_encoder_decoder", False) else TaskType.CAUSAL_LM
    target = cfg.target_modules
    if isinstance(target, str) and target != "all-linear":
        target = [target]
    peft_cfg = LoraConfig(task_type=task, r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                          target_modules=target)
    model = get_peft_model(model, peft_cfg)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    logger.info("LoRA: %d trainable of %d parameters (%.2f%%)", trainable, total, 100 * trainable / total)
    return model


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
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    path = Path(path)
    if (path / "adapter_config.json").exists():
        from peft import AutoPeftModelForCausalLM, AutoPeftModelForSeq2SeqLM, PeftConfig

        base = PeftConfig.from_pretrained(path).base_model_name_or_path
        cls = AutoPeftModelForSeq2SeqLM if is_encoder_decoder(base) else AutoPeftModelForCausalLM
        return cls.from_pretrained(path, **kwargs)
    cls = AutoModelForSeq2SeqLM if is_encoder_decoder(str(path)) else AutoModelForCausalLM
    return cls.from_pretrained(path, **kwargs)


# ------------------------------------------------------------------------------------------------ shrinking
_LAYER_LIST_NAMES = ("layer", "layers", "block", "h")


def _layer_lists(model) -> dict[str, torch.nn.ModuleList]:
    """name -> ModuleList of transformer layers (one for encoders/decoders, two for T5: encoder and decoder)."""
    found = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and name.rsplit(".", 1)[-1] in _LAYER_LIST_NAMES and len(module):
            if not any(name.startswith(prev + ".") for prev in found):
                found[name] = module
    # T5 ties nothing here, but LoRA/peft wrappers may nest: keep the outermost lists only
    return found


def shrink(model, layers: list[int], decoder_layers: list[int] | None = None):
    """A copy of `model` keeping only the given layer indices (in order), e.g. [0, 2, 4] of 6.

    Works for BERT-like encoders (`encoder.layer`), Qwen/Llama-like decoders (`layers`) and T5 (`layers` picks
    encoder blocks, `decoder_layers` decoder blocks, default the same indices). The config's layer counts (and
    per-layer lists such as `layer_types`) are updated, attention layers are renumbered for the KV cache, and
    T5's relative position bias, which only the first block owns, is moved to the new first block.
    """
    import copy

    lists = _layer_lists(model)
    if not lists:
        raise ValueError(f"shrink: no transformer layer list found in {type(model).__name__}")
    model = copy.deepcopy(model)
    lists = _layer_lists(model)
    config = model.config
    is_t5 = getattr(config, "is_encoder_decoder", False)
    plan: dict[str, list[int]] = {}
    for name, module in lists.items():
        stack = name.split(".")[-2] if "." in name else ""
        keep = decoder_layers if (is_t5 and stack == "decoder" and decoder_layers is not None) else layers
        n = len(module)
        if not keep:
            raise ValueError("shrink: keep at least one layer")
        bad = [i for i in keep if not -n <= i < n]
        if bad:
            raise ValueError(f"shrink: layer(s) {bad} out of range for {name} with {n} layers")
        keep = [i % n for i in keep]
        if len(set(keep)) != len(keep):
            raise ValueError(f"shrink: duplicate layers in {keep}")
        plan[name] = keep
    for name, keep in plan.items():
        module = lists[name]
        old = list(module)
        new = torch.nn.ModuleList(old[i] for i in keep)
        if is_t5 and keep[0] != 0:
            first_attention = new[0].layer[0].SelfAttention
            first_attention.relative_attention_bias = old[0].layer[0].SelfAttention.relative_attention_bias
            first_attention.has_relative_attention_bias = True
        for new_index, layer in enumerate(new):
            for sub in layer.modules():
                if hasattr(sub, "layer_idx") and isinstance(sub.layer_idx, int):
                    sub.layer_idx = new_index
        parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
        setattr(parent, name.rsplit(".", 1)[-1], new)
        stack_config = getattr(parent, "config", None)
        if is_t5 and stack_config is not None and stack_config is not config:
            stack_config.num_layers = len(keep)
    first = next(iter(plan.values()))
    if is_t5:
        enc = next(v for k, v in plan.items() if k.startswith("encoder"))
        dec = next(v for k, v in plan.items() if k.startswith("decoder"))
        config.num_layers, config.num_decoder_layers = len(enc), len(dec)
    else:
        for attr in ("num_hidden_layers", "n_layer", "num_layers"):
            if hasattr(config, attr) and isinstance(getattr(config, attr), int):
                setattr(config, attr, len(first))
        layer_types = getattr(config, "layer_types", None)
        if isinstance(layer_types, list) and layer_types:
            config.layer_types = [layer_types[i] for i in first]
    return model


GENERATIVE_SUFFIXES = ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration", "ForSeq2SeqLM")


def require_generative(name_or_path: str, trust_remote_code: bool = False, option: str = "--model") -> None:
    """Refuse a model whose config names no generative architecture (e.g. a sentence-embedding folder: loading it
    as a causal LM would generate from a randomly initialised output layer)."""
    config = pretrained_config(name_or_path, option, trust_remote_code=trust_remote_code)
    architectures = list(getattr(config, "architectures", None) or [])
    if architectures and not any(a.endswith(GENERATIVE_SUFFIXES) for a in architectures):
        raise ModelUnavailableError(f"{option}: {name_or_path} is a {', '.join(architectures)} (no language-model "
                                    f"head), not a generative model; generation needs a causal or seq2seq LM")
