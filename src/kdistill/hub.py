"""Reaching the Hugging Face hub, or failing in seconds.

Offline, transformers and datasets retry every request before they give up (about 30 s per model here, and a
minute or more for a run that loads two models and a dataset). :func:`offline_reason` checks once per process,
with one short TCP connection to the hub's host, whether the hub can be reached; when it cannot, it switches
this process to offline mode (as ``HF_HUB_OFFLINE=1`` does), so models and datasets come from the local cache or
fail at once, and callers can name the reason in their one-line error. Behind an HTTP(S) proxy the check is
skipped (a direct connection says nothing about the proxy).
"""

from __future__ import annotations

import logging
import os
import socket
from urllib.parse import urlparse

__all__ = ["offline_reason"]

logger = logging.getLogger(__name__)

_PROBE_TIMEOUT_S = 3.0
_state: dict[str, str | None] = {}


def _offline_flag() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _go_offline() -> None:
    from huggingface_hub import constants

    constants.HF_HUB_OFFLINE = True
    try:
        import datasets.config

        datasets.config.HF_HUB_OFFLINE = True
    except ImportError:  # pragma: no cover - datasets is a dependency
        pass


def offline_reason() -> str | None:
    """Why hub downloads are off in this process ("HF_HUB_OFFLINE is set", or the failed connection), or None."""
    if _offline_flag():
        return _state.get("reason") or "HF_HUB_OFFLINE is set"
    if "reason" in _state:
        return _state["reason"]
    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        _state["reason"] = None
        return None
    endpoint = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    host, port = endpoint.hostname or "huggingface.co", endpoint.port or (80 if endpoint.scheme == "http" else 443)
    try:
        socket.create_connection((host, port), timeout=_PROBE_TIMEOUT_S).close()
        _state["reason"] = None
    except OSError as exc:
        _state["reason"] = f"cannot reach {host}:{port} ({exc.strerror or exc})"
        logger.warning("the Hugging Face hub is unreachable (%s): reading models and datasets from the local "
                       "cache only", _state["reason"])
        _go_offline()
    return _state["reason"]
