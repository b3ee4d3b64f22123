"""Where a teacher's *text* comes from: an OpenAI-compatible HTTP endpoint (:mod:`.chat`) or a local
transformers model (:mod:`.local`); both follow the small protocol described in :mod:`.protocol`."""

from .chat import ChatClient, ChatError
from .local import LocalTeacher
from .protocol import generation_params, lm_prompt_messages

__all__ = ["ChatClient", "ChatError", "LocalTeacher", "lm_prompt_messages", "generation_params"]
