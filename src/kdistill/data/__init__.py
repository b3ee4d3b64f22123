"""Data loading, validation, prompt rendering, tokenisation and collation for distillation."""

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
from .records import FORMATS, ROLES, DataValidationError, Example, LoadedData, load_examples, load_rows

__all__ = [
    "ALPACA_PROMPT_NO_INPUT",
    "ALPACA_PROMPT_WITH_INPUT",
    "DataCollatorForDistillation",
    "DataValidationError",
    "EncodeStats",
    "Example",
    "FORMATS",
    "IGNORE_INDEX",
    "LoadedData",
    "ROLES",
    "TEMPLATES",
    "encode_example",
    "encode_examples",
    "load_examples",
    "load_rows",
    "prompt_text",
    "render_segments",
]
