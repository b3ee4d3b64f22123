"""The one model loader: a causal LM, a seq2seq LM (T5) or an embedder's bare backbone, from a hub id or a local
folder, with the failures a user can fix reported as one `ModelUnavailableError` that names the option."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from kdistill.data.records import looks_local
from kdistill.errors import UserError
from kdistill.hub import offline_reason

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
"""`ModelConfig.dtype` names -> torch dtypes ("auto", the checkpoint's own dtype, has no entry)."""

GENERATIVE_SUFFIXES = ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration", "ForSeq2SeqLM")


class ModelUnavailableError(UserError, OSError):
    """A model the user named that cannot be loaded or is not the kind of model the command needs."""


def hub_kwargs(cfg) -> dict:
    """The `from_pretrained` arguments of a `ModelConfig` that config, tokenizer and weights share."""
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


def lm_class(config):
    """The transformers auto class of a language model with this config: seq2seq for encoder-decoders, else
    causal."""
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    return AutoModelForSeq2SeqLM if getattr(config, "is_encoder_decoder", False) else AutoModelForCausalLM


def load_pretrained(name_or_path: str | Path, key: str = "name_or_path", *, backbone: bool = False,
                    trust_remote_code: bool = False, revision: str | None = None, **model_kwargs):
    """Load a model from a hub id or folder: its LM (`lm_class` of its config), or with `backbone` the bare
    transformers model without an output layer (`AutoModel`, what an embedder pools).

    The config is read first (`pretrained_config`), so a missing folder or an unreachable hub id is one error
    naming `key`. `model_kwargs` (dtype, attn_implementation, device_map, ...) go to `from_pretrained` only."""
    from transformers import AutoModel

    name = str(name_or_path)
    shared = {"trust_remote_code": trust_remote_code, **({"revision": revision} if revision else {})}
    config = pretrained_config(name, key, **shared)
    cls = AutoModel if backbone else lm_class(config)
    return cls.from_pretrained(name, **shared, **model_kwargs)


def load_model(cfg, *, role: str = "student"):
    """Load a causal or seq2seq LM from a hub id or local folder, per a `ModelConfig`."""
    kwargs = {}
    if cfg.dtype != "auto":
        kwargs["dtype"] = DTYPES[cfg.dtype]
    if cfg.attn_implementation:
        kwargs["attn_implementation"] = cfg.attn_implementation
    if cfg.device_map:
        if role != "teacher":
            raise UserError(f"{role}.device_map: device_map is for the teacher only; place the student with "
                            f"accelerate/TrainingArguments")
        kwargs["device_map"] = cfg.device_map
    model = load_pretrained(cfg.name_or_path, f"{role}.name_or_path", **hub_kwargs(cfg), **kwargs)
    logger.info("loaded %s %s (%s, %.1fM parameters)", role, cfg.name_or_path, lm_class(model.config).__name__,
                sum(p.numel() for p in model.parameters()) / 1e6)
    return model


def require_generative(name_or_path: str, trust_remote_code: bool = False, option: str = "--model") -> None:
    """Refuse a model whose config names no generative architecture (e.g. a sentence-embedding folder: loading it
    as a causal LM would generate from a randomly initialised output layer)."""
    config = pretrained_config(name_or_path, option, trust_remote_code=trust_remote_code)
    architectures = list(getattr(config, "architectures", None) or [])
    if architectures and not any(a.endswith(GENERATIVE_SUFFIXES) for a in architectures):
        raise ModelUnavailableError(f"{option}: {name_or_path} is a {', '.join(architectures)} (no language-model "
                                    f"head), not a generative model; generation needs a causal or seq2seq LM")
