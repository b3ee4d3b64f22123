"""A reference teacher server: vLLM's OpenAI-compatible `/v1/completions` with `prompt_logprobs` over a
transformers causal LM (`kdistill serve-teacher`), for users without vLLM and for the tests.

    logprobs.py  the prompt_logprobs list of one prompt, from its logits (pure)
    protocol.py  request checks and response bodies (the wire contract)
    engine.py    one no-grad forward over a right-padded batch, split back per prompt
    batcher.py   concurrent requests queued and batched into one forward in a worker thread
    app.py       the FastAPI app (create_app)
    cli.py       `kdistill serve-teacher MODEL`
"""

from kdistill.serve.app import create_app, require_serve_dependencies
from kdistill.serve.batcher import Batcher
from kdistill.serve.engine import PromptJob, TeacherEngine
from kdistill.serve.logprobs import prompt_logprobs

__all__ = ["Batcher", "PromptJob", "TeacherEngine", "create_app", "prompt_logprobs", "require_serve_dependencies"]
