"""A teacher served over HTTP: top-k log-probs of given token ids from a vLLM-compatible completions endpoint.

    teacher:
      server: {url: http://127.0.0.1:8000/v1, model: Qwen/Qwen2.5-72B-Instruct, top_k: 20}

:class:`TeacherServer` sends token ids (never re-tokenised text) to `{url}/completions` in vLLM's shape (`prompt`
as id lists, `max_tokens: 1`, `prompt_logprobs: k`, temperature 1, no top-p / top-k / penalties) and reads
`choices[i].prompt_logprobs`: entry 0 is null, entry p the distribution that predicts token p, as the top k ids plus
the actual token when it is outside them (k + 1 entries). :class:`ServedTopK` turns that into the same
:class:`~kdistill.teachers.base.TopKRows` the cache gives (every `kd` divergence, bucket or renormalize), plus the
actual token's log-prob (on-policy `sampled_token` mode needs only that).

Temperatures: the log-probs are requested at temperature 1 with nothing else applied, so vLLM's raw and processed
log-prob modes agree; the loss temperature is `kd`'s own (`missing: renormalize` re-tempers the k log-probs
exactly; `bucket` needs loss temperature 1, checked when the config is read).

Requests are batched (`batch_size` sequences each) and concurrent (`max_concurrency`), with timeouts and retries
(`kdistill.endpoint`). Before training, :meth:`TeacherServer.check` refuses an unreachable server, a model it does not
serve, a log-prob cap below k (vLLM's `--max-logprobs`) and a vocabulary that is not the student's (the decoded
tokens of a probe text differ). A response with the wrong number of positions, ids outside the vocabulary or
non-finite log-probs is refused with the request named, never trained on.
"""

from __future__ import annotations

import json
import math
import re
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from kdistill.endpoint import Endpoint, EndpointError
from kdistill.errors import UserError
from kdistill.losses import TopKTeacher
from kdistill.teachers.base import TeacherQuery, TeacherSignalError, TeacherSource, TopKRows

__all__ = ["ServedTeacherError", "ServedTopK", "TeacherServer", "parse_prompt_logprobs"]

PROBE_TEXT = "The quick brown fox jumps over the lazy dog, 1234 times: naïve café?"
_CAP = re.compile(r"max(?:imum)? allowed[^0-9]*(\d+)", re.IGNORECASE)


class ServedTeacherError(UserError, RuntimeError):
    """The served teacher cannot be used (unreachable, wrong model, capped log-probs, another vocabulary), or it
    answered something that cannot be trained on; the message names the request."""


def parse_prompt_logprobs(entries, ids: list[int], k: int, vocab: int, where: str
                          ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One prompt's `prompt_logprobs` -> (len(ids) - 1, k) top ids, their log-probs (descending), and the actual
    tokens' log-probs (len(ids) - 1,): row p - 1 is the distribution that predicts ids[p]."""
    if not isinstance(entries, list) or len(entries) != len(ids):
        got = len(entries) if isinstance(entries, list) else type(entries).__name__
        raise ServedTeacherError(f"{where}: prompt_logprobs has {got} positions for a prompt of {len(ids)} tokens")
    n = len(ids) - 1
    top_ids = np.zeros((n, k), dtype=np.int64)
    top_lp = np.zeros((n, k), dtype=np.float32)
    actual = np.zeros(n, dtype=np.float32)
    for p in range(1, len(ids)):
        entry = entries[p]
        if not isinstance(entry, dict) or len(entry) < k:
            size = len(entry) if isinstance(entry, dict) else type(entry).__name__
            raise ServedTeacherError(f"{where}: position {p}: {size} log-probs, {k} were requested")
        pairs = []
        for key, value in entry.items():
            try:
                token, logprob = int(key), float(value["logprob"] if isinstance(value, dict) else value)
            except (TypeError, ValueError, KeyError):
                raise ServedTeacherError(f"{where}: position {p}: unreadable entry {key!r}: {value!r}") from None
            if not 0 <= token < vocab:
                raise ServedTeacherError(f"{where}: position {p}: token id {token} is outside the vocabulary "
                                         f"(0..{vocab - 1}): the server's tokenizer is not the student's")
            if not math.isfinite(logprob) and logprob != -math.inf or logprob > 1e-4:
                raise ServedTeacherError(f"{where}: position {p}: log-prob {logprob} of token {token} is not a "
                                         "log-probability")
            pairs.append((logprob, token))
        pairs.sort(key=lambda pair: (-pair[0], pair[1]))
        target = {token: logprob for logprob, token in pairs}.get(int(ids[p]))
        if target is None:
            raise ServedTeacherError(f"{where}: position {p}: the actual token {ids[p]} has no log-prob (vLLM "
                                     "always includes it)")
        top_lp[p - 1] = [lp for lp, _ in pairs[:k]]
        top_ids[p - 1] = [t for _, t in pairs[:k]]
        actual[p - 1] = target
    return top_ids, top_lp, actual


class TeacherServer:
    """Requests to one served teacher (see the module docstring). `vocab`: the student tokenizer's length;
    `k`: log-probs per position (default `cfg.top_k`)."""

    def __init__(self, cfg, vocab: int, k: int | None = None):
        self.cfg = cfg
        self.vocab = int(vocab)
        self.k = int(k or cfg.top_k)
        self.endpoint = Endpoint(cfg.url, api_key_env=cfg.api_key_env, timeout=cfg.timeout,
                                 max_retries=cfg.max_retries, max_connections=cfg.max_concurrency)
        self._pool = ThreadPoolExecutor(max_workers=cfg.max_concurrency, thread_name_prefix="kdistill-teacher")
        self._lock = threading.Lock()
        self.requests = 0
        self.response_bytes = 0  # JSON bytes of the answers (what crossed the wire, uncompressed)
        self.count_bytes = False

    def _request(self, sequences: list[list[int]], where: str) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        return self._parse(self._post(sequences, where), sequences, where)

    def _parse(self, choices: list, sequences: list[list[int]], where: str):
        return [parse_prompt_logprobs(c.get("prompt_logprobs") if isinstance(c, dict) else None, seq, self.k,
                                      self.vocab, f"{where}, prompt {i}")
                for i, (c, seq) in enumerate(zip(choices, sequences))]

    def _post(self, sequences: list[list[int]], where: str) -> list:
        """The answer's choices, in prompt order (their count checked)."""
        payload = {"model": self.cfg.model, "prompt": sequences, "max_tokens": 1, "prompt_logprobs": self.k,
                   "temperature": 1.0, "top_p": 1.0, "top_k": -1, "repetition_penalty": 1.0, "logprobs": None}
        try:
            answer = self.endpoint.post_json("/completions", payload)
        except EndpointError as exc:
            raise ServedTeacherError(f"{where}: {exc}") from None
        choices = answer.get("choices") if isinstance(answer, dict) else None
        if not isinstance(choices, list) or len(choices) != len(sequences):
            got = len(choices) if isinstance(choices, list) else "no"
            raise ServedTeacherError(f"{where}: {got} choices for {len(sequences)} prompts")
        with self._lock:
            self.requests += 1
            if self.count_bytes:
                self.response_bytes += len(json.dumps(answer, separators=(",", ":")))
        return sorted(choices, key=lambda c: c.get("index", 0) if isinstance(c, dict) else 0)

    def score(self, sequences: list[list[int]], what: str = "batch"):
        """Per sequence: (len - 1, k) top ids, their log-probs, and the actual tokens' log-probs."""
        size = self.cfg.batch_size
        starts = list(range(0, len(sequences), size))
        futures = [self._pool.submit(self._request, sequences[s:s + size],
                                     f"{self.cfg.url}/completions ({what}, sequences {s}..{s + len(sequences[s:s + size]) - 1})")
                   for s in starts]
        return [row for future in futures for row in future.result()]

    def check(self, tokenizer) -> None:
        """Refuse, before training, a server that cannot serve this run (see the module docstring)."""
        try:
            listed = self.endpoint.get_json("/models")
        except EndpointError as exc:
            raise ServedTeacherError(f"teacher.server: cannot use {self.cfg.url}: {exc}") from None
        names = [m.get("id") for m in listed.get("data", []) if isinstance(m, dict)] if isinstance(listed, dict) else []
        if self.cfg.model not in names:
            raise ServedTeacherError(f"teacher.server.model: {self.cfg.url} serves {', '.join(map(str, names)) or 'no model'}, "
                                     f"not {self.cfg.model!r}")
        probe = list(tokenizer(PROBE_TEXT, add_special_tokens=False)["input_ids"])
        where = f"{self.cfg.url}/completions (start-up probe)"
        try:
            choices = self._post([probe], where)
        except ServedTeacherError as exc:
            cap = _CAP.search(str(exc))
            if cap and int(cap.group(1)) < self.k:
                raise ServedTeacherError(
                    f"teacher.server.top_k: {self.cfg.url} returns at most {cap.group(1)} log-probs per position, "
                    f"{self.k} were asked: start vLLM with --max-logprobs {self.k} (kdistill serve-teacher: "
                    f"--max-logprobs {self.k}) or lower top_k") from None
            if "HTTP 400" in str(exc):
                raise ServedTeacherError(f"teacher.server: the served model refused the student's tokens of a probe "
                                         f"text, so it does not use the student's tokenizer: {exc}") from None
            raise
        self._parse(choices, [probe], where)  # k log-probs per position, ids inside the vocabulary
        self._check_vocabulary(probe, tokenizer, choices[0]["prompt_logprobs"])

    def _check_vocabulary(self, probe: list[int], tokenizer, entries: list) -> None:
        """Each probe token decodes on the server (its `decoded_token`) as it does for the student."""
        for p in range(1, len(probe)):
            served = (entries[p] or {}).get(str(probe[p]), {})
            decoded = served.get("decoded_token") if isinstance(served, dict) else None
            ours = tokenizer.decode([probe[p]])
            if decoded is not None and "\ufffd" not in ours and decoded != ours:
                raise ServedTeacherError(
                    f"teacher.server: {self.cfg.model} does not use the student's tokenizer: token id {probe[p]} is "
                    f"{decoded!r} on the server and {ours!r} for the student (cross-tokenizer KD is issue #17)")

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self.endpoint.close()


class ServedTopK(TeacherSource):
    """The served teacher's top-k at every trained position of a (right-padded, causal) token view."""

    name = "served teacher"
    provides = frozenset({"tokens"})

    def __init__(self, server: TeacherServer):
        self.server = server
        self.encoder_decoder = False
        self.trained_positions = 0  # rows answered so far (bytes per trained token: server.response_bytes / this)

    def setup(self, *, encoder_decoder, chunked, outputs=frozenset()):
        if encoder_decoder:
            raise TeacherSignalError("a served teacher scores causal LMs only (vLLM's prompt_logprobs); load an "
                                     "encoder-decoder teacher with teacher.name_or_path")

    def tokens(self, query: TeacherQuery) -> TopKRows:
        return query.once("served_teacher", lambda: self._fetch(query))

    def _fetch(self, query: TeacherQuery) -> TopKRows:
        tokens, mask = query.tokens, query.mask
        attention = tokens.attention_mask if tokens.attention_mask is not None else torch.ones_like(tokens.input_ids)
        sequences, positions = [], []
        for b in range(mask.shape[0]):
            trained = mask[b].nonzero().flatten().tolist()
            real = int(attention[b].sum())
            if not bool(attention[b, :real].all()):
                raise TeacherSignalError("a served teacher reads right-padded batches (the collator's default)")
            if trained:
                sequences.append(tokens.input_ids[b, : trained[-1] + 2].tolist())
                positions.append(trained)
        scored = self.server.score(sequences, f"a batch of {len(sequences)} sequences") if sequences else []
        ids, lps, actual = [], [], []
        for (top_ids, top_lp, target), trained in zip(scored, positions):
            ids.append(top_ids[trained])  # position j predicts token j + 1: row j of the parsed entries
            lps.append(top_lp[trained])
            actual.append(target[trained])
        device = tokens.labels.device
        k = self.server.k
        cat = (lambda parts, dtype: torch.from_numpy(np.concatenate(parts)).to(device=device, dtype=dtype)
               if parts else torch.zeros((0, k), dtype=dtype, device=device))
        teacher = TopKTeacher(indices=cat(ids, torch.long), logprobs=cat(lps, torch.float32), capture_temperature=1.0)
        target = torch.from_numpy(np.concatenate(actual)).to(device) if actual else torch.zeros(0, device=device)
        self.trained_positions += int(teacher.indices.shape[0])
        return TopKRows(teacher, target_logprobs=target)
