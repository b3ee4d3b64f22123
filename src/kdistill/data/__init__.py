"""Data loading, validation, prompt rendering, tokenisation and collation for distillation
(LM rows and embedding rows: triplets, scored pairs, sentences)."""

from .collators import DataCollatorForDistillation
from .formatting import (
    ALPACA_PROMPT_NO_INPUT,
    ALPACA_PROMPT_WITH_INPUT,
    IGNORE_INDEX,
    TEMPLATES,
    EncodeStats,
    encode_example,
    encode_examples,
    prompt_text,
    render_segments,
)
from .embedding import TEXT_FIELDS, EmbeddingCollator, encode_embedding_examples, tokenize_texts
from .records import (
    EMBEDDING_FORMATS,
    FORMATS,
    LM_FORMATS,
    ROLES,
    DataValidationError,
    Example,
    LoadedData,
    load_examples,
    load_rows,
)

__all__ = [
    "ALPACA_PROMPT_NO_INPUT",
    "ALPACA_PROMPT_WITH_INPUT",
    "DataCollatorForDistillation",
    "DataValidationError",
    "EMBEDDING_FORMATS",
    "EmbeddingCollator",
    "EncodeStats",
    "Example",
    "FORMATS",
    "IGNORE_INDEX",
    "LM_FORMATS",
    "LoadedData",
    "ROLES",
    "TEMPLATES",
    "TEXT_FIELDS",
    "encode_embedding_examples",
    "encode_example",
    "encode_examples",
    "load_examples",
    "load_rows",
    "prompt_text",
    "render_segments",
    "tokenize_texts",
]
