"""Where a teacher's *text* comes from: an OpenAI-compatible HTTP endpoint (:mod:`.chat`) or a local
transformers model (:mod:`.local`); both follow the small protocol described in :mod:`.protocol`.
:mod:`.stops` finds where a local model's answer ends; :mod:`.options` holds the generation options that
``kdistill generate`` and ``kdistill annotate`` share."""

from .chat import ChatClient, ChatError
from .local import LocalTeacher
from .protocol import GenerationOptionError, generation_params, lm_prompt_messages
from .stops import stop_token_ids, turn_end_tokens

__all__ = ["ChatClient", "ChatError", "GenerationOptionError", "LocalTeacher", "generation_params",
           "lm_prompt_messages", "stop_token_ids", "turn_end_tokens"]
