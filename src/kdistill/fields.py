"""The one way a setting is declared: a dataclass field with its default, help text, allowed choices and range.

`kdistill.config` (the run's sections) and every objective's config (`kdistill.objectives`) declare their fields
with :func:`option` on a :class:`Checked` dataclass, which checks its values against that metadata when it is built;
the YAML loader places a refusal (`FieldError`) at the offending line, and `kdistill train --help` prints the
metadata. A field's default and help live here and nowhere else.
"""

from __future__ import annotations

import dataclasses
from typing import Any

__all__ = ["Checked", "FieldError", "check_bounds", "option"]


class FieldError(ValueError):
    """A value a config's `__post_init__` refuses; `field` names the key, so the loader can give its line."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


def option(default: Any = dataclasses.MISSING, help: str = "", choices: tuple | None = None, factory=None,
           ge: float | None = None, gt: float | None = None, le: float | None = None):
    """A config field: `default` (or `factory`), `help`, allowed `choices`, bounds `ge` / `gt` / `le`."""
    metadata: dict[str, Any] = {"help": help}
    for key, value in (("choices", choices), ("ge", ge), ("gt", gt), ("le", le)):
        if value is not None:
            metadata[key] = value
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def check_bounds(cls_fields, values: dict[str, Any]) -> None:
    """Raise FieldError for the first value outside its field's choices or bounds."""
    for f in cls_fields:
        if f.name not in values:
            continue
        value = values[f.name]
        choices = f.metadata.get("choices")
        if choices and value not in choices:
            raise FieldError(f.name, f"{value!r} is not one of {', '.join(map(str, choices))}")
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            continue
        if "ge" in f.metadata and value < f.metadata["ge"]:
            raise FieldError(f.name, f"must be >= {f.metadata['ge']}, got {value!r}")
        if "gt" in f.metadata and value <= f.metadata["gt"]:
            raise FieldError(f.name, f"must be > {f.metadata['gt']}, got {value!r}")
        if "le" in f.metadata and value > f.metadata["le"]:
            raise FieldError(f.name, f"must be <= {f.metadata['le']}, got {value!r}")


class Checked:
    """Base of config dataclasses: on construction, every field is checked against its `option` metadata
    (choices, bounds); subclasses add their own checks after calling `super().__post_init__()`."""

    def __post_init__(self) -> None:
        fields = dataclasses.fields(self)
        check_bounds(fields, {f.name: getattr(self, f.name) for f in fields})
