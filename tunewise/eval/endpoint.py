"""Endpoint variants: a hosted model behind an OpenAI-compatible chat API, measured like a local variant.

The client is the official `openai` SDK (it speaks to OpenAI, Azure's v1 API, vLLM, Ollama, llama.cpp's server, LiteLLM's
proxy and `tunewise serve` alike). We chose it over litellm: one well-kept dependency, and every server a migrating team
runs speaks this API; Anthropic, Gemini and Bedrock are reached through their OpenAI-compatible endpoints or a LiteLLM
proxy. Around it, what a measurement needs and the SDK does not give:
- retries of 429, 5xx, timeouts and dropped connections with exponential backoff (the server's Retry-After when sent),
  each counted by cause; the SDK's own retries are off, so every request sent is one we counted;
- bounded concurrency (a thread pool; the SDK's client is thread-safe);
- a spending cap: a request whose worst case (its prompt's UTF-8 bytes as tokens, which no byte-level tokenizer exceeds,
  plus max_tokens of output) would cross `max_usd` is not sent;
- a response cache (SQLite) keyed by base URL, model, messages and sampling settings, so a re-run sends nothing and
  gives the same answers, latencies and token counts; the cache file is part of the run's record.
The key is read from the environment variable the config names and goes nowhere else.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import sqlite3
import threading
import time
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

from ..config import EndpointConfig, PricesConfig, VariantConfig
from ..engine import Completion
from ..errors import TunewiseError


class EndpointError(TunewiseError, RuntimeError):
    """An endpoint variant that cannot be measured: the message names the variant and the key or cause."""

    def __init__(self, message: str, variant: str | None = None):
        super().__init__(message)
        self.variant = variant


class SpendCapReached(EndpointError):
    pass


RETRY_STATUS = {408, 409, 429}  # and every 5xx


@dataclass
class EndpointStats:
    requests: int = 0  # HTTP requests sent, retries included
    answered: int = 0  # answers received from the endpoint (not from the cache)
    cache_hits: int = 0
    retries: dict = field(default_factory=dict)  # cause ("429", "500", "timeout", "connection") -> count
    spent_usd: float = 0.0

    def as_dict(self) -> dict:
        return {"requests": self.requests, "answered": self.answered, "cache_hits": self.cache_hits, "retries": dict(self.retries),
                "spent_usd": round(self.spent_usd, 8)}


class SpendLedger:
    """What one command has spent on an endpoint variant, with reservations for requests in flight."""

    def __init__(self, cap: float | None):
        self.cap, self.spent, self.reserved = cap, 0.0, 0.0
        self._lock = threading.Lock()

    def reserve(self, amount: float) -> bool:
        with self._lock:
            if self.cap is not None and self.spent + self.reserved + amount > self.cap:
                return False
            self.reserved += amount
            return True

    def settle(self, reserved: float, actual: float) -> None:
        with self._lock:
            self.reserved -= reserved
            self.spent += actual


def _prices(ep: EndpointConfig, prices: PricesConfig) -> tuple[float, float]:
    """USD per prompt token and per completion token."""
    i = ep.price_per_1m_input_tokens if ep.price_per_1m_input_tokens is not None else prices.hosted_input_per_1m_usd
    o = ep.price_per_1m_output_tokens if ep.price_per_1m_output_tokens is not None else prices.hosted_output_per_1m_usd
    return i / 1e6, o / 1e6


def worst_case_prompt_tokens(messages: list[dict]) -> int:
    """An upper bound on the prompt's tokens: byte-level BPE tokenizers (OpenAI's, Llama's, Qwen's) give at most one
    token per UTF-8 byte; 8 tokens a message cover the template's role markers."""
    return sum(len(str(m.get("content") or "").encode()) + 8 for m in messages) + 8


class Cache:
    """Answers by key, in one SQLite file shared by the variants of a run (thread-safe)."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._db = sqlite3.connect(str(path), check_same_thread=False, timeout=30)
        self._db.execute("CREATE TABLE IF NOT EXISTS answers (key TEXT PRIMARY KEY, answer TEXT NOT NULL, created REAL NOT NULL)")
        self._db.commit()
        self._lock = threading.Lock()

    def get(self, key: str) -> dict | None:
        with self._lock:
            row = self._db.execute("SELECT answer FROM answers WHERE key = ?", (key,)).fetchone()
        return json.loads(row[0]) if row else None

    def put(self, key: str, answer: dict) -> None:
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO answers VALUES (?, ?, ?)", (key, json.dumps(answer), time.time()))
            self._db.commit()

    def close(self) -> None:
        self._db.close()


class EndpointClient:
    """One endpoint variant's client: check(), then generate() as the local engine does."""

    def __init__(self, variant: VariantConfig, prices: PricesConfig, cache_path: Path | None):
        assert variant.endpoint is not None
        self.variant, self.ep = variant, variant.endpoint
        self.in_price, self.out_price = _prices(self.ep, prices)
        self.ledger = SpendLedger(self.ep.max_usd)
        self.stats = EndpointStats()
        self.cache = Cache(cache_path) if self.ep.cache and cache_path is not None else None
        self._client = None
        self._stats_lock = threading.Lock()

    @property
    def name(self) -> str:
        return self.variant.name

    def _where(self, key: str = "") -> str:
        """The config key, the variant by name (a copy of the config, as the demo's, may list fewer variants)."""
        return f"evaluation.variants[{self.name}].endpoint{'.' + key if key else ''}"

    def _key(self) -> str:
        env = self.ep.api_key_env
        if env is None:
            return "none"  # the SDK wants some string; a server without auth ignores it
        value = os.environ.get(env)
        if not value:
            raise self._error(f"{self._where('api_key_env')}: the environment variable {env} is not set; export the key as {env}, "
                                "or set api_key_env: null for an endpoint without a key")
        return value

    def client(self):
        if self._client is None:
            import openai

            self._client = openai.OpenAI(api_key=self._key(), base_url=self.ep.base_url, timeout=self.ep.timeout_s, max_retries=0)
        return self._client

    def check(self, on_premises: bool = False) -> None:
        """Before any work: the data may go there (use_case.on_premises allows only this machine and private addresses),
        the key is set, the endpoint answers, and it serves the model (when it lists its models)."""
        import openai

        if on_premises and not is_local(self.ep.base_url):
            raise self._error(f"{self._where('base_url')}: use_case.on_premises is true, and {self.ep.base_url} is not on this machine or a "
                              "private address: the data would leave our machines (set use_case.on_premises: false to measure it)")
        client = self.client()
        try:
            listed = [m.id for m in client.models.list()]
        except openai.NotFoundError:
            return  # a server without /models: the first request tells
        except openai.AuthenticationError as e:
            raise self._error(f"{self._where('api_key_env')}: {self.ep.base_url} refused the key in {self.ep.api_key_env} (401: {_message(e)})") from None
        except (openai.APIConnectionError, openai.APITimeoutError) as e:
            raise self._error(f"{self._where('base_url')}: cannot reach {self.ep.base_url}: {_message(e)}") from None
        except openai.APIStatusError as e:
            raise self._error(f"{self._where('base_url')}: {self.ep.base_url}/models answered {e.status_code}: {_message(e)}") from None
        if listed and self.ep.model not in listed:
            raise self._error(f"{self._where('model')}: {self.ep.base_url} does not serve {self.ep.model!r} (it lists "
                                f"{', '.join(sorted(listed)[:10])}{', ...' if len(listed) > 10 else ''})")

    def cache_key(self, messages: list[dict], max_tokens: int, extra: dict) -> str:
        return hashlib.sha256(json.dumps({"base_url": self.ep.base_url.rstrip("/"), "model": self.ep.model, "messages": messages,
                                          "max_tokens": max_tokens, "temperature": self.ep.temperature, "seed": self.ep.seed,
                                          "extra": extra}, sort_keys=True).encode()).hexdigest()

    def generate(self, conversations: list[list[dict]], max_new_tokens: int, choices: list[str] | None = None,
                 on_done=None) -> list[Completion]:
        """The answers in order; on_done(done, total) after each. Raises EndpointError (SpendCapReached) with what was
        answered kept in the cache."""
        extra = {"guided_choice": choices} if choices and self.ep.labels == "guided_choice" else {}
        outs: list[Completion | None] = [None] * len(conversations)
        done = [0]
        progress_lock = threading.Lock()

        def one(i: int) -> None:
            outs[i] = self._answer(conversations[i], max_new_tokens, extra)
            if on_done:
                with progress_lock:
                    done[0] += 1
                    on_done(done[0], len(conversations))

        with ThreadPoolExecutor(max_workers=self.ep.concurrency, thread_name_prefix=f"endpoint-{self.name}") as pool:
            futures = [pool.submit(one, i) for i in range(len(conversations))]
            wait(futures, return_when=FIRST_EXCEPTION)
            failed = next((f for f in futures if f.done() and f.exception() is not None), None)
            if failed is not None:
                for f in futures:
                    f.cancel()
                wait(futures)
                err = failed.exception()
                if isinstance(err, SpendCapReached):
                    got = sum(o is not None for o in outs)
                    raise SpendCapReached(f"{err} after {got} of {len(conversations)} items; their answers are cached, so a "
                                          "re-run with a higher cap pays only for the rest", self.name) from None
                raise err
        return outs  # type: ignore[return-value]

    def _answer(self, messages: list[dict], max_tokens: int, extra: dict) -> Completion:
        key = self.cache_key(messages, max_tokens, extra)
        if self.cache is not None:
            hit = self.cache.get(key)
            if hit is not None:
                with self._stats_lock:
                    self.stats.cache_hits += 1
                return Completion(**hit)
        worst = worst_case_prompt_tokens(messages) * self.in_price + max_tokens * self.out_price
        if not self.ledger.reserve(worst):
            raise SpendCapReached(variant=self.name, message=f"{self._where('max_usd')}: the spending cap ${self.ep.max_usd:g} would be crossed by the next request "
                                  f"(spent ${self.ledger.spent:.6f}, next at most ${worst:.6f})")
        actual = 0.0
        try:
            out = self._request(messages, max_tokens, extra)
            actual = out.prompt_tokens * self.in_price + out.completion_tokens * self.out_price
        finally:
            self.ledger.settle(worst, actual)
            with self._stats_lock:
                self.stats.spent_usd = self.ledger.spent
        if self.cache is not None:
            self.cache.put(key, out.__dict__)
        return out

    def _request(self, messages: list[dict], max_tokens: int, extra: dict) -> Completion:
        import openai

        client = self.client()
        for attempt in range(self.ep.max_retries + 1):
            with self._stats_lock:
                self.stats.requests += 1
            t0 = time.perf_counter()
            try:
                resp = client.chat.completions.create(model=self.ep.model, messages=messages, max_tokens=max_tokens,
                                                      temperature=self.ep.temperature, **({"seed": self.ep.seed} if self.ep.seed is not None else {}),
                                                      **({"extra_body": extra} if extra else {}))
            except openai.APITimeoutError:
                cause, wait_s, err = "timeout", None, f"no answer within timeout_s={self.ep.timeout_s:g}"
            except openai.APIConnectionError as e:
                cause, wait_s, err = "connection", None, f"connection failed: {_message(e)}"
            except openai.APIStatusError as e:
                if e.status_code not in RETRY_STATUS and e.status_code < 500:
                    raise self._error(self._refusal(e)) from None
                cause, wait_s, err = str(e.status_code), _retry_after(e), f"{e.status_code}: {_message(e)}"
            else:
                latency = time.perf_counter() - t0
                choice = resp.choices[0]
                usage = resp.usage
                with self._stats_lock:
                    self.stats.answered += 1
                return Completion(text=choice.message.content or "", prompt_tokens=int(getattr(usage, "prompt_tokens", 0) or 0),
                                  completion_tokens=int(getattr(usage, "completion_tokens", 0) or 0), latency_s=latency,
                                  finish_reason=choice.finish_reason or "stop")
            if attempt == self.ep.max_retries:
                tries = f"{attempt + 1} tr{'y' if attempt == 0 else 'ies'}"
                key = "timeout_s" if cause == "timeout" else "base_url"
                raise self._error(f"{self._where(key)}: {self.ep.base_url}: {err} ({tries}; max_retries={self.ep.max_retries})")
            with self._stats_lock:
                self.stats.retries[cause] = self.stats.retries.get(cause, 0) + 1
            backoff = self.ep.backoff_s * 2 ** attempt * (0.5 + random.random())
            time.sleep(min(60.0, wait_s if wait_s is not None else backoff))
        raise AssertionError("unreachable")

    def _error(self, message: str) -> EndpointError:
        return EndpointError(message, self.name)

    def _refusal(self, e) -> str:
        msg = _message(e)
        if e.status_code == 401:
            return f"{self._where('api_key_env')}: {self.ep.base_url} refused the key in {self.ep.api_key_env} (401: {msg})"
        if e.status_code == 404:
            return f"{self._where('model')}: {self.ep.base_url} refused the model {self.ep.model!r} (404: {msg})"
        return f"{self._where()}: {self.ep.base_url} refused the request ({e.status_code}: {msg})"

    def close(self) -> None:
        if self.cache is not None:
            self.cache.close()
        if self._client is not None:
            self._client.close()


def is_local(url: str) -> bool:
    """A base URL on this machine or a private network (loopback, RFC 1918, link-local, localhost, *.local / *.internal)."""
    import ipaddress
    from urllib.parse import urlparse

    host = (urlparse(url).hostname or "").lower()
    if host == "localhost" or host.endswith((".localhost", ".local", ".internal")):
        return True
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    return ip.is_loopback or ip.is_private or ip.is_link_local


def _message(e) -> str:
    body = getattr(e, "body", None)
    if isinstance(body, dict):
        inner = body.get("error")
        m = inner.get("message") if isinstance(inner, dict) else body.get("message")
        if m:
            return str(m)[:300]
    return str(getattr(e, "message", None) or e)[:300]


def _retry_after(e) -> float | None:
    try:
        value = e.response.headers.get("retry-after")
        return max(0.0, float(value)) if value is not None else None
    except (AttributeError, TypeError, ValueError):
        return None


def label_instruction(labels: list[str]) -> str:
    return "Answer with exactly one of these labels and nothing else: " + ", ".join(labels) + "."


def match_label(text: str, labels: list[str]) -> str:
    """The label a free-text reply names: the label itself (case, quotes and surrounding punctuation aside), else the
    longest label the reply contains as a word sequence; else the reply as it is (scored wrong)."""
    import re

    t = text.strip().strip("\"'`.").strip()
    by_lower = {lab.lower(): lab for lab in labels}
    if t.lower() in by_lower:
        return by_lower[t.lower()]
    norm = lambda s: re.sub(r"[\s_\-]+", " ", s.lower()).strip()  # noqa: E731
    nt = f" {norm(t)} "
    for lab in sorted(labels, key=len, reverse=True):
        if f" {norm(lab)} " in nt:
            return lab
    return text


