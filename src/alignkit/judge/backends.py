"""Judges: anything that reads a rendered judging prompt and says how likely "A" is the better answer.

    judge.prob_a(texts) -> list[float]   # P(A) for each judging prompt, in [0, 1]

- `TransformersJudge`: a local causal LM. The judging prompt is the user turn of the model's chat template
  (with the generation prompt), and P(A) = softmax(z_A, z_B)[0], where z_A, z_B are the logits of the
  tokens "A" and "B" at the next position: the distribution over the two allowed answers, renormalised.
  Only the last position's logits are computed (`logits_to_keep=1`), never [B, T, V].
- `HTTPJudge`: any OpenAI-compatible chat endpoint (`POST …/v1/chat/completions`). With `logprobs` the
  server's top log-probabilities of the first answer token give P(A) = p_A / (p_A + p_B), summing the
  variants of each letter (" A", "A", "A."); a letter missing from the top list counts as probability 0.
  A server that gives no log-probabilities is read by the letter in its answer (P = 1 or 0; ½ when the
  answer names neither letter, counted in `unparsed`). Timeouts, refused connections, 429 and 5xx answers
  are retried with exponential backoff (a bounded number of times); anything that is not the documented
  JSON stops the run with an error naming the URL. The API key is read from an environment variable, sent
  only in the `Authorization` header, and scrubbed from every message.

Both orders, ties and rankings are the caller's business (`compare.py`, `verdicts.py`).
"""

from __future__ import annotations

import http.client
import json
import math
import os
import re
import socket
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol, runtime_checkable

import torch

from alignkit.data.records import user_prompt
from alignkit.data.tokenize import left_padded, prompt_ids
from alignkit.errors import AlignkitError

ANSWER_LETTERS = ("A", "B")


@runtime_checkable
class Judge(Protocol):
    """Reads judging prompts (the rendered template) and returns P(answer A is better) for each."""

    name: str

    def prob_a(self, texts: Sequence[str]) -> list[float]: ...


def is_url(spec: str) -> bool:
    return spec.startswith(("http://", "https://"))


# --- a local transformers model ------------------------------------------------------------------------------


class TransformersJudge:
    """A causal LM judging by the next-token logits of "A" and "B" after the chat-templated judging prompt."""

    def __init__(self, model: torch.nn.Module, tokenizer: Any, *, name: str, batch_size: int = 8):
        self.model, self.tokenizer, self.name, self.batch_size = model, tokenizer, name, batch_size
        ids = []
        for letter in ANSWER_LETTERS:
            encoded = tokenizer.encode(letter, add_special_tokens=False)
            if len(encoded) != 1:
                raise AlignkitError(
                    f"the judge's tokenizer splits the answer '{letter}' into {len(encoded)} tokens",
                    where=name,
                    fix="use a judge model whose tokenizer has single tokens for 'A' and 'B' (most do)",
                )
            ids.append(encoded[0])
        self.token_ids = ids
        import inspect

        self._keep_last = "logits_to_keep" in inspect.signature(model.forward).parameters

    @classmethod
    def load(cls, name: str, *, batch_size: int = 8, trust_remote_code: bool = False) -> "TransformersJudge":
        from alignkit.models import load_model, load_tokenizer  # transformers' model classes: an API judge never needs them

        tokenizer = load_tokenizer(name, trust_remote_code=trust_remote_code)
        model = load_model(name, trust_remote_code=trust_remote_code)
        if torch.cuda.is_available():
            model = model.to("cuda")
        model.eval()
        return cls(model, tokenizer, name=name, batch_size=batch_size)

    def encode(self, text: str) -> list[int]:
        """Token ids of the judging prompt as the model's user turn, ready for the assistant's answer."""
        return prompt_ids(self.tokenizer, user_prompt(text))

    @torch.no_grad()
    def prob_a(self, texts: Sequence[str]) -> list[float]:
        encoded = [self.encode(t) for t in texts]
        # Longest first, so a batch holds prompts of similar length and little padding.
        order = sorted(range(len(texts)), key=lambda i: -len(encoded[i]))
        out = [0.0] * len(texts)
        for start in range(0, len(order), self.batch_size):
            chunk = order[start : start + self.batch_size]
            for i, p in zip(chunk, self._batch([encoded[i] for i in chunk])):
                out[i] = p
        return out

    def _batch(self, batch: list[list[int]]) -> list[float]:
        input_ids, attention, positions = left_padded(batch, self.tokenizer.pad_token_id, next(self.model.parameters()).device)
        kwargs: dict[str, Any] = {"logits_to_keep": 1} if self._keep_last else {}
        logits = self.model(input_ids=input_ids, attention_mask=attention, position_ids=positions, **kwargs).logits
        pair = logits[:, -1, self.token_ids].float()  # [B, 2]: z_A, z_B
        return torch.softmax(pair, dim=-1)[:, 0].cpu().tolist()


# --- an OpenAI-compatible server -----------------------------------------------------------------------------


class _Transient(Exception):
    """A failure worth retrying: timeout, refused or dropped connection, 429 or 5xx."""


def chat_completions_url(url: str) -> str:
    """`http://host:8000`, `…/v1` and `…/v1/chat/completions` all name the same endpoint."""
    base = url.rstrip("/")
    if base.endswith("/chat/completions"):
        return base
    if base.endswith("/v1"):
        return base + "/chat/completions"
    return base + "/v1/chat/completions"


def public_url(url: str) -> str:
    """The URL without user:password or query string, fit for logs and output files."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host += f":{parts.port}"
    return urllib.parse.urlunsplit((parts.scheme, host, parts.path, "", ""))


_LETTER_TOKEN = re.compile(r"\W*([AB])\W*")
# "A" is also an English article: a letter followed by a lowercase word ("A bit of both") is not an answer.
_LETTER = r"([AB])(?=$|[^\w\s]|\s+(?![a-z]))"
_LEADING_LETTER = re.compile(r"^\W*" + _LETTER)
_NAMED_LETTER = re.compile(r"\b(?:answer|response|prefer|choose|pick)\s*(?:is\s*)?:?\s*\W{0,3}([AB])\b", re.IGNORECASE)
_ANY_LETTER = re.compile(r"\b" + _LETTER)


def letter_in(content: str) -> str | None:
    """The answer letter in a judge's reply: a leading A/B, else "Answer: B"-like, else the only one named."""
    text = content.strip()
    for pattern in (_LEADING_LETTER, _NAMED_LETTER):
        if m := pattern.search(text):
            return m[1]
    named = set(re.findall(r"\b([AB])\b", text))
    if named == {"B"}:
        return "B"
    return "A" if named == {"A"} and _ANY_LETTER.search(text) else None


def prob_from_top_logprobs(top: Any) -> float | None:
    """P(A) = p_A / (p_A + p_B) from a list of {token, logprob}; None when neither letter is listed."""
    if not isinstance(top, list):
        return None
    mass = {"A": 0.0, "B": 0.0}
    for entry in top:
        if not isinstance(entry, dict) or not isinstance(entry.get("token"), str):
            continue
        logprob = entry.get("logprob")
        if not isinstance(logprob, (int, float)) or isinstance(logprob, bool):
            continue
        if m := _LETTER_TOKEN.fullmatch(entry["token"]):
            mass[m[1]] += math.exp(min(float(logprob), 0.0))
    total = mass["A"] + mass["B"]
    return mass["A"] / total if total > 0 else None


class HTTPJudge:
    """An OpenAI-compatible chat endpoint as a judge (see the module docstring for how P(A) is read)."""

    def __init__(
        self,
        url: str,
        *,
        model: str = "",
        api_key_env: str = "OPENAI_API_KEY",
        timeout: float = 60.0,
        retries: int = 4,
        backoff: float = 1.0,
        max_backoff: float = 30.0,
        workers: int = 4,
        logprobs: bool = True,
        top_logprobs: int = 20,
        sleep: Callable[[float], None] = time.sleep,
        log: Callable[[str], None] | None = None,
    ):
        self.url = chat_completions_url(url)
        self.shown_url = public_url(self.url)
        self.model, self.timeout, self.retries = model, timeout, retries
        self.backoff, self.max_backoff, self.workers = backoff, max_backoff, max(1, workers)
        self.logprobs, self.top_logprobs = logprobs, top_logprobs
        self.sleep = sleep
        self.log = log or (lambda message: print(message, file=sys.stderr))
        self._key = os.environ.get(api_key_env, "") if api_key_env else ""
        self.api_key_env = api_key_env
        self.name = judge_name(url, model)
        self.unparsed = 0
        """answers that named neither letter (read as P = ½)"""
        self.retried = 0
        """requests that needed more than one attempt"""
        self._lock = threading.Lock()

    def __repr__(self) -> str:  # never show the key
        return f"HTTPJudge(url={self.shown_url!r}, model={self.model!r}, api_key_env={self.api_key_env!r})"

    def prob_a(self, texts: Sequence[str]) -> list[float]:
        if self.workers == 1 or len(texts) <= 1:
            return [self.ask(t) for t in texts]
        with ThreadPoolExecutor(max_workers=self.workers) as pool:
            return list(pool.map(self.ask, texts))

    # -- one question --

    def ask(self, text: str) -> float:
        """P(A) for one judging prompt, with retries and backoff on transient failures."""
        last = ""
        for attempt in range(self.retries + 1):
            if attempt:
                delay = min(self.backoff * 2 ** (attempt - 1), self.max_backoff)
                with self._lock:
                    self.retried += attempt == 1
                self.sleep(delay)
            try:
                return self._read(self._post(self._payload(text)))
            except _Transient as exc:
                last = str(exc)
        raise AlignkitError(
            f"no usable answer after {self.retries + 1} attempts; the last one: {self._scrub(last)}",
            where=self.shown_url,
            fix="check that the server is up and reachable, or raise --timeout / --retries",
        )

    def _payload(self, text: str) -> dict[str, Any]:
        payload: dict[str, Any] = {
            "messages": [{"role": "user", "content": text}],
            "max_tokens": 1,  # the answer is one letter; its first token is all we read
            "temperature": 0.0,
        }
        if self.model:
            payload["model"] = self.model
        if self.logprobs:
            payload["logprobs"] = True
            payload["top_logprobs"] = self.top_logprobs
        return payload

    def _post(self, payload: dict[str, Any]) -> bytes:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self._key:
            headers["Authorization"] = f"Bearer {self._key}"
        request = urllib.request.Request(self.url, data=json.dumps(payload).encode("utf-8"), headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return response.read()
        except urllib.error.HTTPError as exc:
            body = _safe_read(exc)
            if exc.code == 429 or exc.code >= 500:
                raise _Transient(f"HTTP {exc.code} {exc.reason}: {body[:200]!r}") from None
            if exc.code == 400 and payload.get("logprobs") and "logprob" in body.lower():
                # A server without log-probabilities: ask again for the letter itself, from now on.
                with self._lock:
                    if self.logprobs:
                        self.logprobs = False
                        self.log(f"note: {self.shown_url} does not give log-probabilities; reading the answer letter instead (P = 1 or 0)")
                payload = {k: v for k, v in payload.items() if k not in ("logprobs", "top_logprobs")}
                return self._post(payload)
            hint = "check --api-key-env and that the key is valid" if exc.code in (401, 403) else (
                "check the URL (…/v1/chat/completions) and --api-model" if exc.code in (404, 400, 422) else "see the server's message"
            )
            raise AlignkitError(
                f"the server refused the request: HTTP {exc.code} {exc.reason}: {self._scrub(body[:300])!r}",
                where=self.shown_url,
                fix=hint,
            ) from None
        except (TimeoutError, socket.timeout) as exc:
            raise _Transient(f"timed out after {self.timeout:g} s") from exc
        except urllib.error.URLError as exc:
            if isinstance(exc.reason, (TimeoutError, socket.timeout)):
                raise _Transient(f"timed out after {self.timeout:g} s") from exc
            raise _Transient(f"cannot connect: {exc.reason}") from exc
        except (ConnectionError, http.client.HTTPException, OSError) as exc:
            raise _Transient(f"connection failed: {type(exc).__name__}: {exc}") from exc

    def _read(self, body: bytes) -> float:
        def garbage(what: str) -> AlignkitError:
            snippet = body[:200].decode("utf-8", "replace")
            return AlignkitError(
                f"the server's answer {what}: {self._scrub(snippet)!r}",
                where=self.shown_url,
                fix="--judge must be the URL of an OpenAI-compatible chat server (POST …/v1/chat/completions "
                "answering {\"choices\": [{\"message\": {\"content\": …}}]})",
            )

        try:
            data = json.loads(body)
        except ValueError:
            raise garbage("is not JSON") from None
        if not isinstance(data, dict):
            raise garbage("is not a JSON object")
        if "error" in data and "choices" not in data:
            raise garbage("is an error")
        choices = data.get("choices")
        if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
            raise garbage("has no 'choices' list")
        choice = choices[0]
        if self.logprobs:
            p = _first_token_prob(choice.get("logprobs"))
            if p is not None:
                return p
        message = choice.get("message")
        content = message.get("content") if isinstance(message, dict) else None
        if not isinstance(content, str):
            raise garbage("has no 'choices[0].message.content' text")
        letter = letter_in(content)
        if letter is None:
            with self._lock:
                self.unparsed += 1
            return 0.5
        return 1.0 if letter == "A" else 0.0

    def _scrub(self, text: str) -> str:
        return text.replace(self._key, "***") if self._key else text


def _first_token_prob(logprobs: Any) -> float | None:
    """P(A) from the chat format `logprobs.content[0].top_logprobs`, or None when it is not there."""
    if not isinstance(logprobs, dict):
        return None
    content = logprobs.get("content")
    if not isinstance(content, list) or not content or not isinstance(content[0], dict):
        return None
    return prob_from_top_logprobs(content[0].get("top_logprobs"))


def _safe_read(exc: urllib.error.HTTPError) -> str:
    try:
        return exc.read().decode("utf-8", "replace")
    except Exception:  # the body of an error is only for the message
        return ""


def judge_name(spec: str, api_model: str = "") -> str:
    """The name a judge's results carry: the model as given, or `MODEL@URL` (no credentials) for a server."""
    return f"{api_model or 'default'}@{public_url(chat_completions_url(spec))}" if is_url(spec) else spec


def build_judge(
    spec: str,
    *,
    batch_size: int = 8,
    trust_remote_code: bool = False,
    api_model: str = "",
    api_key_env: str = "OPENAI_API_KEY",
    timeout: float = 60.0,
    retries: int = 4,
    backoff: float = 1.0,
    workers: int = 4,
    logprobs: bool = True,
) -> Judge:
    """An `HTTPJudge` for an http(s) URL, else a `TransformersJudge` for a model name, path or alias."""
    if is_url(spec):
        if api_key_env and api_key_env not in os.environ:
            print(f"note: ${api_key_env} is not set; asking {public_url(spec)} without an API key", file=sys.stderr)
        return HTTPJudge(
            spec, model=api_model, api_key_env=api_key_env, timeout=timeout, retries=retries, backoff=backoff,
            workers=workers, logprobs=logprobs,
        )  # fmt: skip
    return TransformersJudge.load(spec, batch_size=batch_size, trust_remote_code=trust_remote_code)
