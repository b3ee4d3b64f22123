"""A scriptable OpenAI-compatible chat-completions server on loopback, for tests.

    from chat_server import ChatServer, Reply

    def script(request, attempt):          # request: the JSON body; attempt: 1, 2, ... for this prompt
        if attempt == 1:
            return Reply.status(429, retry_after=0.05)
        return "positive"                  # a str is the assistant's answer

    with ChatServer(script) as server:     # 127.0.0.1, OS-assigned port, threaded
        client = ChatClient(server.url, "tiny")        # server.url == "http://127.0.0.1:PORT/v1"
        ...
        server.requests                    # every request: path, headers (lower-case names), json, attempt

A reply is a ``str`` (answered with HTTP 200 in the chat.completion shape) or a :class:`Reply`: an HTTP
error status (with ``Retry-After`` and an OpenAI-style error body), a hang (the server sleeps before
answering, to trigger client timeouts), an answer after a delay, or a body that is not JSON. The
``attempt`` number counts requests carrying the same ``messages`` (the same prompt), from 1.

Bounded: the server binds 127.0.0.1 only, stops itself after ``max_lifetime`` seconds, and ``stop()`` (or
leaving the ``with`` block) wakes every hanging handler and shuts it down.
"""

from __future__ import annotations

import json
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable

__all__ = ["ChatServer", "Reply", "echo_last_user"]


@dataclass
class Reply:
    """What the server does with one request (build with the class methods)."""

    text: str | None = None
    status: int = 200
    retry_after: float | None = None
    error: str | None = None
    delay: float = 0.0
    invalid_json: bool = False
    headers: dict = field(default_factory=dict)

    @classmethod
    def answer(cls, text: str, delay: float = 0.0) -> "Reply":
        """HTTP 200 with ``text`` as the assistant message, after ``delay`` seconds."""
        return cls(text=text, delay=delay)

    @classmethod
    def http_status(cls, status: int, retry_after: float | None = None, error: str | None = None) -> "Reply":
        """An error status (429, 500, 400...) with an OpenAI-style ``{"error": {"message"}}`` body."""
        return cls(status=status, retry_after=retry_after, error=error or f"scripted HTTP {status}")

    @classmethod
    def hang(cls, seconds: float) -> "Reply":
        """Sleep ``seconds`` before answering (a client with a shorter timeout gives up first)."""
        return cls(text="(answer after a hang)", delay=seconds)

    @classmethod
    def garbage(cls) -> "Reply":
        """HTTP 200 whose body is not JSON."""
        return cls(invalid_json=True)


def echo_last_user(request: dict, attempt: int) -> str:
    """A default script: answer with the last user message's first 40 characters, reversed."""
    users = [m.get("content", "") for m in request.get("messages", []) if m.get("role") == "user"]
    return "echo: " + (users[-1][:40][::-1] if users else "")


class ChatServer:
    """A threaded chat-completions server on ``127.0.0.1`` (port 0: the OS picks one); see the module doc."""

    def __init__(self, script: Callable[[dict, int], Any] = echo_last_user, max_lifetime: float = 300.0,
                 model: str | None = None):
        self.script = script
        self.max_lifetime = max_lifetime
        self.model = model
        self.requests: list[dict] = []
        self._attempts: dict[str, int] = defaultdict(int)
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._timer: threading.Timer | None = None

    # -- lifecycle ---------------------------------------------------------------------------------
    def start(self) -> "ChatServer":
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"

            def log_message(self, format, *args):  # keep test output quiet
                pass

            def do_POST(self):
                owner._handle(self)

            def do_GET(self):
                if self.path.rstrip("/").endswith("/models"):
                    owner._send_json(self, 200, {"object": "list", "data": [{"id": owner.model or "scripted",
                                                                              "object": "model"}]})
                else:
                    owner._send_json(self, 404, {"error": {"message": f"no route {self.path}"}})

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="chat-server", daemon=True)
        self._thread.start()
        self._timer = threading.Timer(self.max_lifetime, self.stop)
        self._timer.daemon = True
        self._timer.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        if self._timer is not None and threading.current_thread() is not self._timer:
            self._timer.cancel()
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()

    def __enter__(self) -> "ChatServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def port(self) -> int:
        assert self._server is not None, "server not started"
        return self._server.server_address[1]

    @property
    def url(self) -> str:
        """The base URL clients use: ``http://127.0.0.1:PORT/v1``."""
        return f"http://127.0.0.1:{self.port}/v1"

    # -- requests ----------------------------------------------------------------------------------
    def attempts_for(self, messages) -> int:
        with self._lock:
            return self._attempts[json.dumps(messages, sort_keys=True)]

    def _send_json(self, handler, status: int, payload, extra_headers: dict | None = None, raw: bytes | None = None):
        body = raw if raw is not None else json.dumps(payload).encode("utf-8")
        try:
            handler.send_response(status)
            handler.send_header("Content-Type", "application/json")
            handler.send_header("Content-Length", str(len(body)))
            for name, value in (extra_headers or {}).items():
                handler.send_header(name, value)
            handler.end_headers()
            handler.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (timeout) before the answer came

    def _handle(self, handler) -> None:
        length = int(handler.headers.get("Content-Length") or 0)
        raw = handler.rfile.read(length) if length else b""
        try:
            request = json.loads(raw.decode("utf-8"))
        except ValueError:
            request = None
        path = handler.path.rstrip("/")
        if not path.endswith("/chat/completions"):
            self._send_json(handler, 404, {"error": {"message": f"no route {handler.path}"}})
            return
        prompt_key = json.dumps(request.get("messages") if isinstance(request, dict) else None, sort_keys=True)
        with self._lock:
            self._attempts[prompt_key] += 1
            attempt = self._attempts[prompt_key]
            self.requests.append({"path": handler.path, "headers": {k.lower(): v for k, v in handler.headers.items()},
                                  "body": raw.decode("utf-8", errors="replace"), "json": request,
                                  "attempt": attempt, "time": time.time()})
        if not isinstance(request, dict) or not isinstance(request.get("messages"), list):
            self._send_json(handler, 400, {"error": {"message": "body must be JSON with a 'messages' list"}})
            return
        try:
            reply = self.script(request, attempt)
        except Exception as exc:  # a broken script answers 500, visibly
            reply = Reply.http_status(500, error=f"script raised {type(exc).__name__}: {exc}")
        if isinstance(reply, str):
            reply = Reply.answer(reply)
        if reply.delay > 0 and self._stopping.wait(reply.delay):
            return  # stopping: drop the connection
        if reply.invalid_json:
            self._send_json(handler, 200, None, raw=b"{this is not json")
            return
        if reply.status != 200:
            headers = dict(reply.headers)
            if reply.retry_after is not None:
                headers["Retry-After"] = f"{reply.retry_after:g}"
            self._send_json(handler, reply.status, {"error": {"message": reply.error, "type": "scripted",
                                                              "code": reply.status}}, headers)
            return
        text = reply.text or ""
        prompt_tokens = sum(len(str(m.get("content", "")).split()) for m in request["messages"])
        self._send_json(handler, 200, {
            "id": f"chatcmpl-{len(self.requests)}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": request.get("model", self.model or "scripted"),
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": len(text.split()),
                      "total_tokens": prompt_tokens + len(text.split())},
        }, reply.headers)
