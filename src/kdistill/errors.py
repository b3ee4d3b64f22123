"""The one exception base for user mistakes.

A :class:`UserError` is something the user can fix (a config value, a data row, a missing file or optional
package, a hub id while offline); its message names the place (``file:line: reason``, or the flag / key to
change). ``kdistill`` prints it as one line and exits with status 2; anything else is a bug and keeps its
traceback. Subclasses also derive from the built-in type callers caught before (``ValueError``,
``FileNotFoundError``, ...), so existing ``except`` clauses keep working.
"""

from __future__ import annotations

__all__ = ["ConfigError", "UserError", "HubUnavailableError", "MissingFileError"]


class UserError(Exception):
    """A mistake in what the user gave kdistill (config, data, paths, environment), with the place named."""


class HubUnavailableError(UserError, ValueError):
    """A Hugging Face hub id could not be loaded (offline, unreachable or unknown); the message names the
    option that takes a local file instead."""


class MissingFileError(UserError, FileNotFoundError):
    """A local file or folder the user named does not exist."""


class ConfigError(UserError, ValueError):
    """A configuration problem, with the place (file:line or key) named."""
