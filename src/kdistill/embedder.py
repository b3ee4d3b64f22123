"""Embedder: a transformers backbone + pooling (+ L2 normalisation) that turns text into one vector.

Works for BERT-like encoders (mean or [CLS] pooling) and for decoder LMs used as embedders (EOS pooling: an EOS
token is appended to every text and its last hidden state is the embedding). Saved as a sentence-transformers
folder (`modules.json`, `1_Pooling/`, `2_Normalize/`), so `SentenceTransformer(path)` loads a kdistill student
directly and gives the same vectors.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Iterable

import numpy as np
import torch

from kdistill.data.embedding import tokenize_texts
from kdistill.errors import UserError
from kdistill.models.loader import load_pretrained
from kdistill.pooling import POOLING_MODES, pool

logger = logging.getLogger(__name__)

KDISTILL_EMBEDDING_FILE = "kdistill_embedding.json"
_ST_POOLING_KEYS = {"mean": "pooling_mode_mean_tokens", "cls": "pooling_mode_cls_token",
                    "eos": "pooling_mode_lasttoken"}
_ST6_POOLING = {"mean": "mean", "cls": "cls", "lasttoken": "eos"}  # sentence-transformers 6 "pooling_mode" values


class Embedder(torch.nn.Module):
    """Text -> (B, H) embeddings. `forward` takes token tensors; `encode` takes strings."""

    def __init__(self, backbone, tokenizer, pooling: str = "mean", normalize: bool = True,
                 append_eos: bool = False, max_length: int = 256):
        super().__init__()
        if pooling not in POOLING_MODES:
            raise ValueError(f"pooling must be one of {POOLING_MODES}, got {pooling!r}")
        if append_eos and tokenizer.eos_token_id is None:
            raise ValueError("append_eos=True needs a tokenizer with an eos token")
        self.backbone = backbone
        self.tokenizer = tokenizer
        self.pooling = pooling
        self.normalize = normalize
        self.append_eos = append_eos
        self.max_length = max_length

    @property
    def config(self):
        return self.backbone.config

    @property
    def dim(self) -> int:
        return int(self.backbone.config.hidden_size)

    @property
    def device(self) -> torch.device:
        return next(self.backbone.parameters()).device

    def activation_checkpointing_enable(self, **kwargs) -> None:
        """Recompute the backbone's activations in backward (TrainingArguments.gradient_checkpointing)."""
        backbone = self.backbone
        enable = getattr(backbone, "activation_checkpointing_enable", None) or backbone.gradient_checkpointing_enable
        enable(**kwargs)
        if hasattr(backbone, "enable_input_require_grads"):
            backbone.enable_input_require_grads()  # LoRA: frozen embeddings still pass gradients to checkpoints

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, T, H)
        return pool(hidden, attention_mask, self.pooling, self.normalize)

    # ------------------------------------------------------------------------------------------------ text
    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        """Tokenise and pad a list of texts (EOS appended when `append_eos`, and kept through truncation)."""
        ids = tokenize_texts(list(texts), self.tokenizer, max_length=self.max_length, append_eos=self.append_eos)
        return self.tokenizer.pad({"input_ids": ids}, return_tensors="pt")

    @torch.no_grad()
    def encode(self, texts: Iterable[str], batch_size: int = 64, show_progress: bool = False) -> np.ndarray:
        """(N, H) float32 numpy embeddings, in the order of `texts`. Texts are batched by length."""
        texts = list(texts)
        was_training = self.training
        self.eval()
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        starts = range(0, len(texts), batch_size)
        if show_progress:
            from tqdm.auto import tqdm

            starts = tqdm(starts, desc="encode", unit="batch")
        for start in starts:
            index = order[start:start + batch_size]
            batch = self.tokenize([texts[i] for i in index])
            emb = self(batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device))
            out[index] = emb.float().cpu().numpy()
        self.train(was_training)
        return out

    # ------------------------------------------------------------------------------------------- save/load
    def save(self, path: str | Path) -> Path:
        """Write a sentence-transformers folder (LoRA adapters, if any, are merged into the saved weights)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        backbone = self.backbone
        if hasattr(backbone, "peft_config"):
            backbone.save_pretrained(path / "adapter")
            backbone = backbone.merge_and_unload()
            self.backbone = backbone
        backbone.save_pretrained(path)
        self.tokenizer.save_pretrained(path)
        modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
                   {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
        if self.normalize:
            modules.append({"idx": 2, "name": "2", "path": "2_Normalize",
                            "type": "sentence_transformers.models.Normalize"})
            (path / "2_Normalize").mkdir(exist_ok=True)
        (path / "modules.json").write_text(json.dumps(modules, indent=2))
        (path / "sentence_bert_config.json").write_text(
            json.dumps({"max_seq_length": self.max_length, "do_lower_case": False}, indent=2))
        pooling = {"word_embedding_dimension": self.dim, "pooling_mode_cls_token": False,
                   "pooling_mode_mean_tokens": False, "pooling_mode_max_tokens": False,
                   "pooling_mode_mean_sqrt_len_tokens": False, "pooling_mode_weightedmean_tokens": False,
                   "pooling_mode_lasttoken": False, "include_prompt": True}
        pooling[_ST_POOLING_KEYS[self.pooling]] = True
        (path / "1_Pooling").mkdir(exist_ok=True)
        (path / "1_Pooling" / "config.json").write_text(json.dumps(pooling, indent=2))
        (path / KDISTILL_EMBEDDING_FILE).write_text(json.dumps(
            {"pooling": self.pooling, "normalize": self.normalize, "append_eos": self.append_eos,
             "max_length": self.max_length}, indent=2))
        if self.append_eos:
            _install_eos_postprocessor(path)
        return path

    @classmethod
    def from_pretrained(cls, path: str, pooling: str | None = None, normalize: bool | None = None,
                        append_eos: bool | None = None, max_length: int | None = None, *,
                        key: str = "name_or_path", **model_kwargs):
        """Load from a sentence-transformers folder, a kdistill embedder folder, or any transformers model
        (then pooling defaults to mean, or eos for decoder LMs, which also get an appended EOS). A folder or hub
        id that cannot be loaded is a `ModelUnavailableError` naming `key`."""
        from transformers import AutoTokenizer

        settings = read_embedding_settings(path, need_pooling=pooling is None)
        backbone = load_pretrained(path, key, backbone=True, **model_kwargs)
        tokenizer = AutoTokenizer.from_pretrained(path)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        decoder = not getattr(backbone.config, "is_encoder_decoder", False) and _is_decoder(backbone)
        default_pooling = "eos" if decoder else "mean"
        chosen_pooling = pooling or settings.get("pooling", default_pooling)
        chosen_eos = append_eos if append_eos is not None else settings.get("append_eos", chosen_pooling == "eos")
        return cls(backbone, tokenizer, pooling=chosen_pooling,
                   normalize=normalize if normalize is not None else settings.get("normalize", True),
                   append_eos=chosen_eos,
                   max_length=max_length or settings.get("max_length", 256))


def _is_decoder(backbone) -> bool:
    arch = " ".join(getattr(backbone.config, "architectures", None) or [])
    return bool(getattr(backbone.config, "is_decoder", False)) or "CausalLM" in arch or \
        type(backbone).__name__.endswith(("Qwen2Model", "LlamaModel", "MistralModel", "GemmaModel", "PhiModel"))


def read_embedding_settings(path: str | Path, need_pooling: bool = True) -> dict:
    """Pooling/normalize/max_length from a kdistill or sentence-transformers folder; {} for a plain model. A pooling
    kdistill does not have is an error, unless ``need_pooling`` is false (the caller chooses the pooling)."""
    path = Path(path)
    if (path / KDISTILL_EMBEDDING_FILE).exists():
        return json.loads((path / KDISTILL_EMBEDDING_FILE).read_text())
    settings: dict = {}
    if (path / "modules.json").exists():
        modules = json.loads((path / "modules.json").read_text())
        types = [m.get("type", "") for m in modules]
        settings["normalize"] = any(t.endswith("Normalize") for t in types)
        for module in modules:
            if module.get("type", "").endswith("Pooling"):
                cfg = json.loads((path / module["path"] / "config.json").read_text())
                for mode, key in _ST_POOLING_KEYS.items():
                    if cfg.get(key):
                        settings["pooling"] = mode
                if isinstance(cfg.get("pooling_mode"), str):  # sentence-transformers >= 6: one "pooling_mode" key
                    mode = _ST6_POOLING.get(cfg["pooling_mode"])
                    if mode:
                        settings["pooling"] = mode
                if "pooling" not in settings and need_pooling:
                    found = cfg.get("pooling_mode") or [k for k, v in cfg.items() if k.startswith("pooling_mode") and v]
                    raise UserError(f"{path / module['path'] / 'config.json'}: pooling {found!r} is not supported "
                                    f"(kdistill supports {', '.join(POOLING_MODES)}); pass --pooling to choose one")
    if (path / "sentence_bert_config.json").exists():
        settings["max_length"] = json.loads((path / "sentence_bert_config.json").read_text()).get("max_seq_length")
    return {k: v for k, v in settings.items() if v is not None}


def _install_eos_postprocessor(path: Path) -> None:
    """Make the saved tokenizer itself append EOS, so sentence-transformers reproduces EOS pooling."""
    from tokenizers import Tokenizer, processors
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    if not getattr(tok, "is_fast", False):
        logger.warning("slow tokenizer: SentenceTransformer(%s) will not append EOS by itself", path)
        return
    probe = tok("a")["input_ids"]
    if probe and probe[-1] == tok.eos_token_id:
        return
    backend: Tokenizer = tok.backend_tokenizer
    eos = processors.TemplateProcessing(single=f"$A {tok.eos_token}", pair=f"$A {tok.eos_token} $B {tok.eos_token}",
                                        special_tokens=[(tok.eos_token, tok.eos_token_id)])
    backend.post_processor = eos if backend.post_processor is None else processors.Sequence(
        [backend.post_processor, eos])
    backend.save(str(path / "tokenizer.json"))
