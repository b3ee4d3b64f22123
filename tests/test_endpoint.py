"""kdistill.endpoint.Endpoint against a small scripted HTTP/1.1 server on loopback (keep-alive, so connection reuse
is visible): retries, Retry-After, fatal and non-retried statuses, redirects, the API key, GET, threads."""

from __future__ import annotations

import contextlib
import email.utils
import json
import logging
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from kdistill.endpoint import Endpoint, EndpointError, parse_retry_after
from kdistill.generators import ChatClient, ChatError

KEY = "sk-endpoint-test-0123456789"


class Scripted:
    """A loopback server: ``script(request, n)`` -> ``(status, headers, body)`` (a dict/list body is sent as
    JSON, bytes as they are); ``n`` counts requests from 1. Records every request and the peak of requests in
    flight; ``stop()`` wakes handlers sleeping in ``wait``."""

    def __init__(self, script):
        self.script = script
        self.requests: list[dict] = []
        self.in_flight = self.peak = 0
        self.stopping = threading.Event()
        self._lock = threading.Lock()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):  # noqa: N802
                owner._handle(self, "GET")

            def do_POST(self):  # noqa: N802
                owner._handle(self, "POST")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_port}/v1"

    def wait(self, seconds: float) -> None:
        self.stopping.wait(seconds)

    def _handle(self, handler, method: str) -> None:
        length = int(handler.headers.get("Content-Length") or 0)
        raw = handler.rfile.read(length) if length else b""
        with self._lock:
            self.in_flight += 1
            self.peak = max(self.peak, self.in_flight)
            n = len(self.requests) + 1
            request = {"method": method, "path": handler.path, "raw": raw, "peer": handler.client_address,
                       "headers": {k.lower(): v for k, v in handler.headers.items()}, "time": time.monotonic(),
                       "json": json.loads(raw) if raw else None}
            self.requests.append(request)
        try:
            status, headers, body = self.script(request, n)
        finally:
            with self._lock:
                self.in_flight -= 1
        body = body if isinstance(body, bytes) else json.dumps(body).encode()
        try:
            handler.send_response(status)
            for name, value in {"Content-Type": "application/json", **headers}.items():
                handler.send_header(name, value)
            handler.send_header("Content-Length", str(len(body)))
            handler.end_headers()
            handler.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def stop(self) -> None:
        self.stopping.set()
        self.server.shutdown()
        self.server.server_close()


@contextlib.contextmanager
def serving(script):
    server = Scripted(script)
    try:
        yield server
    finally:
        server.stop()


def ok(request, n):
    return 200, {}, {"n": n, "got": request["json"]}


def test_retries_a_503_then_answers_and_reuses_one_connection(monkeypatch):
    monkeypatch.setenv("KD_ENDPOINT_KEY", KEY)
    script = lambda r, n: (503, {}, {"error": {"message": "warming up"}}) if n <= 2 else ok(r, n)  # noqa: E731
    with serving(script) as server, Endpoint(server.url, api_key_env="KD_ENDPOINT_KEY", backoff=0.0) as ep:
        payload = {"prompt": [[1, 2, 3]], "text": "héllo"}
        assert ep.post_json("/completions", payload) == {"n": 3, "got": payload}
        assert ep.post_json("completions", {"x": 1})["n"] == 4  # the leading slash is optional
        assert [r["path"] for r in server.requests] == ["/v1/completions"] * 4
        for r in server.requests:
            assert r["method"] == "POST" and r["headers"]["content-type"] == "application/json"
            assert r["headers"]["authorization"] == f"Bearer {KEY}"
        assert server.requests[0]["raw"] == json.dumps(payload, ensure_ascii=False).encode()  # UTF-8, not \u escapes
        assert len({r["peer"] for r in server.requests}) == 1  # one pooled keep-alive connection throughout


def test_gives_up_after_the_last_retry_with_the_reason(caplog):
    caplog.set_level(logging.DEBUG)
    with serving(lambda r, n: (500, {}, {"error": {"message": "overloaded"}})) as server:
        ep = Endpoint(server.url, max_retries=2, backoff=0.0)
        with pytest.raises(EndpointError) as info:
            ep.post_json("/completions", {})
        assert str(info.value).startswith("gave up after 3 attempt(s): HTTP 500 from ")
        assert "overloaded" in str(info.value) and info.value.status == 500 and not info.value.fatal
        assert len(server.requests) == 3
        assert "retry 2/2" in caplog.text
        assert not [r for r in caplog.records if r.name.startswith(("httpx", "httpcore"))]  # no per-request lines


def test_backoff_is_exponential_with_jitter(monkeypatch):
    sleeps = []
    monkeypatch.setattr("kdistill.endpoint.time.sleep", sleeps.append)
    with serving(lambda r, n: (502, {}, b"bad gateway")) as server:
        ep = Endpoint(server.url, max_retries=4, backoff=1.0, max_backoff=3.0)
        with pytest.raises(EndpointError, match="gave up after 5 attempt"):
            ep.get_json("/models")
    assert len(sleeps) == 4
    for i, (slept, full) in enumerate(zip(sleeps, [1.0, 2.0, 3.0, 3.0])):  # min(max_backoff, backoff * 2**i)
        assert 0.5 * full <= slept <= full, (i, slept)


def test_retry_after_is_honoured_in_seconds_and_as_a_date():
    def script(request, n):
        if n == 1:
            return 429, {"Retry-After": "0.4"}, {"error": {"message": "slow down"}}
        return ok(request, n)

    with serving(script) as server:
        ep = Endpoint(server.url, backoff=0.0)  # no backoff: only Retry-After explains a wait
        assert ep.post_json("/completions", {})["n"] == 2
        first, second = (r["time"] for r in server.requests)
        assert second - first >= 0.4

    soon = email.utils.formatdate(time.time() + 120, usegmt=True)  # an HTTP date two minutes ahead
    assert 100 <= parse_retry_after(soon) <= 120
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # in the past: retry now
    assert parse_retry_after("Fri, 01 Jan 2100 00:00:00 GMT") == 600.0  # capped
    assert parse_retry_after("86400") == 600.0 and parse_retry_after("-3") == 0.0
    assert parse_retry_after(" 2 ") == 2.0
    assert parse_retry_after("soon") is None and parse_retry_after("nan") is None and parse_retry_after(None) is None


@pytest.mark.parametrize("status", [401, 403, 404])
def test_401_403_404_are_fatal_at_once(status):
    with serving(lambda r, n: (status, {}, {"error": {"message": f"nope {status}"}})) as server:
        ep = Endpoint(server.url, max_retries=3, backoff=0.0)
        with pytest.raises(EndpointError) as info:
            ep.post_json("/completions", {})
        assert info.value.fatal and info.value.status == status and len(server.requests) == 1
        assert str(info.value) == f"HTTP {status} from {server.url}/completions: nope {status}"


def test_other_4xx_fail_at_once_with_the_servers_message(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    message = ("Requested prompt logprobs of 64, which is greater than max allowed: 20 (key " + KEY + ")  "
               + "x" * 800)
    vllm = {"error": {"message": message, "type": "BadRequestError", "code": 400}, "object": "error"}
    with serving(lambda r, n: (400, {}, vllm) if n == 1 else (422, {"Content-Type": "text/plain"}, b"plain text")) \
            as server:
        ep = Endpoint(server.url, backoff=0.0)
        with pytest.raises(EndpointError) as info:
            ep.post_json("/completions", {"prompt_logprobs": 64})
        text = str(info.value)
        assert "HTTP 400" in text and "greater than max allowed: 20" in text and not info.value.fatal
        assert KEY not in text and "(key ***)" in text
        assert text.endswith("...") and len(text) < 600  # truncated
        with pytest.raises(EndpointError, match="HTTP 422 from .*: plain text$"):
            ep.post_json("/completions", {})
        assert len(server.requests) == 2  # neither was retried


def test_a_redirect_is_refused_and_the_target_sees_nothing(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    with serving(ok) as elsewhere, \
            serving(lambda r, n: (307, {"Location": elsewhere.url + "/completions"}, b"")) as server:
        ep = Endpoint(server.url, max_retries=3)
        for call in (lambda: ep.post_json("/completions", {}), lambda: ep.get_json("/models")):
            with pytest.raises(EndpointError, match="redirect") as info:
                call()
            assert info.value.fatal and info.value.status == 307
            assert elsewhere.url + "/completions" in str(info.value)
        assert len(server.requests) == 2 and elsewhere.requests == []


def test_the_key_is_read_per_request_and_never_shown(monkeypatch):
    monkeypatch.delenv("KD_ENDPOINT_KEY", raising=False)
    with serving(lambda r, n: ok(r, n) if n != 3 else (200, {}, b"<html>" + KEY.encode() + b"</html>")) as server:
        ep = Endpoint(server.url, api_key_env="KD_ENDPOINT_KEY", max_retries=0)
        ep.get_json("/models")
        monkeypatch.setenv("KD_ENDPOINT_KEY", KEY)  # set after the endpoint was made: used from now on
        ep.get_json("/models")
        assert "authorization" not in server.requests[0]["headers"]
        assert server.requests[1]["headers"]["authorization"] == f"Bearer {KEY}"
        with pytest.raises(EndpointError, match="invalid JSON") as info:
            ep.get_json("/models")  # the server echoes the key in a body that is not JSON
        assert KEY not in str(info.value) and "***" in str(info.value)
        assert KEY not in repr(ep) and KEY not in json.dumps(vars(ep), default=str)
        Endpoint(server.url, api_key_env=None).get_json("/models")
        assert "authorization" not in server.requests[-1]["headers"]

        monkeypatch.setenv("KD_ENDPOINT_KEY", KEY + "\n")  # no header can carry it: fatal, and the key not named
        with pytest.raises(EndpointError, match=r"\$KD_ENDPOINT_KEY .*control or non-ASCII") as info:
            ep.get_json("/models")
        assert info.value.fatal and KEY not in str(info.value) and len(server.requests) == 4


def test_get_json_and_non_json_answers_are_retried():
    def script(request, n):
        if n == 1:
            return 200, {}, b"{truncated"
        return 200, {}, {"object": "list", "data": [{"id": "tiny", "object": "model", "max_model_len": 2048}]}

    with serving(script) as server:
        models = Endpoint(server.url, backoff=0.0).get_json("/models")
        assert models["data"][0]["id"] == "tiny" and len(server.requests) == 2
        assert all(r["method"] == "GET" and r["path"] == "/v1/models" and r["raw"] == b"" for r in server.requests)


def test_timeouts_and_refused_connections_are_retried_then_reported():
    with serving(lambda r, n: (server.wait(3), ok(r, n))[1] if n == 1 else ok(r, n)) as server:
        ep = Endpoint(server.url, timeout=0.3, max_retries=1, backoff=0.0)
        start = time.monotonic()
        assert ep.post_json("/completions", {})["n"] == 2  # the first attempt timed out
        assert time.monotonic() - start < 2.5
    with serving(lambda r, n: (server.wait(3), ok(r, n))[1]) as server:
        with pytest.raises(EndpointError, match=r"gave up after 2 attempt\(s\): timed out after 0.3 s") as info:
            Endpoint(server.url, timeout=0.3, max_retries=1, backoff=0.0).post_json("/completions", {})
        assert info.value.status is None and not info.value.fatal
    port = server.server.server_address[1]  # closed now: nothing listens there
    with pytest.raises(EndpointError, match="gave up after 1 attempt.*cannot reach"):
        Endpoint(f"http://127.0.0.1:{port}/v1", max_retries=0).get_json("/models")


def test_concurrent_calls_from_threads_share_a_bounded_pool():
    def script(request, n):
        server.wait(0.05)
        return 200, {}, {"echo": request["json"]["i"]}

    with serving(script) as server, Endpoint(server.url, max_connections=4, backoff=0.0) as ep:
        results, errors = {}, []

        def worker(t):
            try:
                for j in range(5):
                    i = t * 100 + j
                    results[i] = ep.post_json("/completions", {"i": i})["echo"]
            except Exception as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        threads = [threading.Thread(target=worker, args=(t,)) for t in range(12)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        assert errors == [] and len(results) == 60 and all(k == v for k, v in results.items())
        assert 1 < server.peak <= 4  # in parallel, never more than max_connections at once
        assert len({r["peer"] for r in server.requests}) <= 4  # connections are reused


def test_close_and_reopen_and_bad_settings():
    with serving(ok) as server:
        ep = Endpoint(server.url + "/")
        assert ep.base_url == server.url and ep.url("/models") == server.url + "/models"
        assert ep.get_json("models")["n"] == 1
        ep.close()
        ep.close()  # twice is fine
        assert ep.get_json("/models")["n"] == 2  # a new connection
        assert len({r["peer"] for r in server.requests}) == 2
    for bad, message in [("", "base_url is required"), ("localhost:8000/v1", "http:// or https://"),
                         ("ftp://host/v1", "http:// or https://")]:
        with pytest.raises(ValueError, match=message):
            Endpoint(bad)
    for kwargs, message in [({"max_retries": -1}, "max_retries"), ({"timeout": 0}, "timeout"),
                            ({"backoff": -1}, "backoff"), ({"max_connections": 0}, "max_connections")]:
        with pytest.raises(ValueError, match=message):
            Endpoint("http://127.0.0.1:1/v1", **kwargs)


def test_chat_errors_are_endpoint_errors():
    """ChatClient delegates to an Endpoint; its errors stay ChatError (callers catch that) and are EndpointErrors."""
    def script(request, n):
        if request["json"]["model"] == "x":
            return 404, {}, {"error": {"message": "The model `x` does not exist."}}
        return 500, {}, {"error": {"message": "overloaded"}}

    with serving(script) as server:
        client = ChatClient(server.url, "x", max_retries=2)
        with pytest.raises(ChatError, match="does not exist") as info:
            client.complete("hi")
        assert isinstance(info.value, EndpointError) and info.value.fatal and info.value.status == 404
        assert server.requests[0]["path"] == "/v1/chat/completions"
        assert server.requests[0]["json"] == {"model": "x", "messages": [{"role": "user", "content": "hi"}]}
        other = ChatClient(server.url, "y", max_retries=3, backoff=0.0)
        other.max_retries = 1  # a setting changed on the client reaches its endpoint
        with pytest.raises(ChatError, match="gave up after 2 attempt") as info:
            other.complete("hi")
        assert info.value.status == 500 and not info.value.fatal and other.max_retries == 1
