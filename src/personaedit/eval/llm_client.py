"""The LLM judge's HTTP client: standard library only (urllib), temperature 0, retries with exponential
backoff on connection errors, timeouts, HTTP 429 and 5xx, and answers cached on disk, one JSON file per
request, keyed by sha256 of (base URL, model, messages, max_tokens), so a repeated request never reaches
the server. Configuration: arguments, else PERSONAEDIT_JUDGE_BASE_URL, PERSONAEDIT_JUDGE_MODEL,
PERSONAEDIT_JUDGE_API_KEY.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import re
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence, TypeVar

from personaedit.errors import PersonaEditError
from personaedit.eval.llm_prompts import Message
from personaedit.fileio import atomic_path
from personaedit.progress import Progress

BASE_URL_ENV = "PERSONAEDIT_JUDGE_BASE_URL"
MODEL_ENV = "PERSONAEDIT_JUDGE_MODEL"
API_KEY_ENV = "PERSONAEDIT_JUDGE_API_KEY"
CACHE_SUBDIR = "llm-judge"

T = TypeVar("T")
R = TypeVar("R")


@dataclass
class JudgeStats:
    """What a judge did: HTTP attempts, answers served from the cache, retries, unparseable answers per prompt."""

    requests: int = 0
    cache_hits: int = 0
    retries: int = 0
    invalid: Counter = field(default_factory=Counter)


def default_cache_dir() -> Path:
    """personaedit's cache folder / 'llm-judge'."""
    from personaedit.models.loading import cache_dir

    return cache_dir() / CACHE_SUBDIR


def plain_http_off_machine(base_url: str) -> bool:
    """True for an http:// URL whose host is not this machine (loopback): traffic a network can read."""
    import ipaddress
    from urllib.parse import urlsplit

    parts = urlsplit(base_url)
    if parts.scheme.lower() != "http":
        return False
    host = (parts.hostname or "").lower()
    if host == "localhost":
        return False
    try:
        return not ipaddress.ip_address(host).is_loopback
    except ValueError:
        return True


def _one_line(text: str, limit: int = 200) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


class ChatClient:
    """The LLM judge's connection to an OpenAI-compatible `/chat/completions` endpoint: requests with retries,
    the answer cache, counts, and batches; missing settings come from the environment
    (PERSONAEDIT_JUDGE_BASE_URL, PERSONAEDIT_JUDGE_MODEL, PERSONAEDIT_JUDGE_API_KEY)."""

    def __init__(self, base_url: str | None = None, model: str | None = None, api_key: str | None = None, *,
                 timeout: float = 30.0, retries: int = 3, backoff: float = 1.0, max_backoff: float = 30.0,
                 max_tokens: int = 16, cache_dir: str | os.PathLike | None = None, use_cache: bool = True,
                 max_workers: int = 1) -> None:
        base_url = base_url or os.environ.get(BASE_URL_ENV)
        model = model or os.environ.get(MODEL_ENV)
        if not base_url:
            raise PersonaEditError(f"the LLM judge needs a server: set {BASE_URL_ENV} "
                                   "(e.g. http://127.0.0.1:8000/v1) or pass base_url")
        if not model:
            raise PersonaEditError(f"the LLM judge needs a model name: set {MODEL_ENV} or pass model")
        if not re.match(r"^https?://", base_url, re.IGNORECASE):
            raise PersonaEditError(f"the LLM judge's base URL must start with http:// or https://, got {base_url!r}")
        if retries < 0 or timeout <= 0 or max_tokens < 1 or max_workers < 1:
            raise ValueError("need retries >= 0, timeout > 0, max_tokens >= 1 and max_workers >= 1")
        self.base_url = base_url.rstrip("/")
        self.model = model
        self._api_key = api_key if api_key is not None else os.environ.get(API_KEY_ENV) or None
        self.timeout, self.retries, self.backoff, self.max_backoff = timeout, retries, backoff, max_backoff
        self.max_tokens, self.max_workers, self.use_cache = max_tokens, max_workers, use_cache
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self.stats = JudgeStats()
        self._lock = threading.Lock()

    @classmethod
    def from_env(cls, **options: Any) -> "ChatClient":
        """A judge configured by PERSONAEDIT_JUDGE_BASE_URL, _MODEL and (optional) _API_KEY."""
        return cls(**options)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(base_url={self.base_url!r}, model={self.model!r})"

    @property
    def url(self) -> str:
        return f"{self.base_url}/chat/completions"

    # ----------------------------------------------------------------------------------------- requests

    def complete(self, messages: Sequence[Message], max_tokens: int | None = None) -> str:
        """The judge's reply to `messages` (temperature 0), from the cache when it was asked before."""
        max_tokens = max_tokens or self.max_tokens
        path = self._cache_path(messages, max_tokens)
        cached = self._read_cache(path)
        if cached is not None:
            self._count("cache_hits")
            return cached
        content = self._request(messages, max_tokens)
        if self.use_cache:
            self._write_cache(path, messages, max_tokens, content)
        return content

    def _request(self, messages: Sequence[Message], max_tokens: int) -> str:
        body = json.dumps({"model": self.model, "messages": list(messages), "temperature": 0,
                           "max_tokens": max_tokens}).encode("utf-8")
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        for attempt in range(self.retries + 1):
            self._count("requests")
            try:
                request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    return self._content(response.read())
            except urllib.error.HTTPError as exc:
                reason = f"HTTP {exc.code} ({self._http_reason(exc)})"
                if exc.code != 429 and exc.code < 500:
                    raise self._failure(reason, attempt + 1) from None
                wait = self._retry_after(exc)
            except (OSError, http.client.HTTPException) as exc:  # refused or dropped connections, timeouts
                reason = self._network_reason(exc)
                wait = None
            if attempt == self.retries:
                raise self._failure(reason, attempt + 1) from None
            self._count("retries")
            time.sleep(min(self.max_backoff, wait if wait is not None else self.backoff * 2 ** attempt))
        raise AssertionError("unreachable")  # pragma: no cover

    def _content(self, raw: bytes) -> str:
        try:
            reply = json.loads(raw.decode("utf-8"))
            content = reply["choices"][0]["message"].get("content")
        except (ValueError, KeyError, IndexError, TypeError, AttributeError):
            raise PersonaEditError(f"the LLM judge at {self.url} sent a malformed chat-completions response: "
                                   f"{self._redact(_one_line(raw.decode('utf-8', 'replace'), 120))!r}") from None
        return content if isinstance(content, str) else ""

    def _http_reason(self, exc: urllib.error.HTTPError) -> str:
        reason = str(exc.reason or "") or "no reason given"
        message = _error_message(exc)
        return self._redact(_one_line(f"{reason}: {message}" if message else reason, 160))

    @staticmethod
    def _retry_after(exc: urllib.error.HTTPError) -> float | None:
        try:
            return max(0.0, float(exc.headers.get("Retry-After", "")))
        except (TypeError, ValueError, AttributeError):
            return None

    def _network_reason(self, exc: BaseException) -> str:
        reason = getattr(exc, "reason", None) or exc
        if isinstance(reason, TimeoutError) or "timed out" in str(reason):
            return f"timed out after {self.timeout:g} s"
        return self._redact(_one_line(f"connection failed: {reason}", 160))

    def _failure(self, reason: str, attempts: int) -> PersonaEditError:
        tries = "1 attempt" if attempts == 1 else f"{attempts} attempts"
        return PersonaEditError(f"the LLM judge at {self.url} failed after {tries}: {reason}")

    def _redact(self, text: str) -> str:
        return text.replace(self._api_key, "***") if self._api_key else text

    def _count(self, name: str, key: str | None = None) -> None:
        with self._lock:
            if key is None:
                setattr(self.stats, name, getattr(self.stats, name) + 1)
            else:
                getattr(self.stats, name)[key] += 1

    # ----------------------------------------------------------------------------------------- cache

    def cache_key(self, messages: Sequence[Message], max_tokens: int | None = None) -> str:
        """sha256 of (base URL, model, messages, max_tokens)."""
        payload = [self.base_url, self.model, list(messages), max_tokens or self.max_tokens]
        return hashlib.sha256(json.dumps(payload, sort_keys=True, ensure_ascii=False).encode("utf-8")).hexdigest()

    def _cache_path(self, messages: Sequence[Message], max_tokens: int) -> Path:
        key = self.cache_key(messages, max_tokens)
        return self.cache_dir / key[:2] / f"{key}.json"

    def _read_cache(self, path: Path) -> str | None:
        if not self.use_cache or not path.is_file():
            return None
        try:
            content = json.loads(path.read_text(encoding="utf-8"))["content"]
        except (OSError, ValueError, KeyError, TypeError):
            return None  # unreadable entry: ask again and overwrite it
        return content if isinstance(content, str) else None

    def _write_cache(self, path: Path, messages: Sequence[Message], max_tokens: int, content: str) -> None:
        entry = {"model": self.model, "max_tokens": max_tokens, "messages": list(messages), "content": content}
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(entry, ensure_ascii=False) + "\n", encoding="utf-8")

    # ----------------------------------------------------------------------------------------- batches

    def _map(self, fn: Callable[[int, T], R], items: Sequence[T], on_progress: Progress | None) -> list[R]:
        """[fn(i, item)] in order, `max_workers` requests at a time; the first error cancels the rest."""
        def report(done: int) -> None:
            if on_progress:
                on_progress(done, len(items))

        if self.max_workers == 1:
            results = []
            for i, item in enumerate(items):
                results.append(fn(i, item))
                report(i + 1)
            return results
        pool = ThreadPoolExecutor(max_workers=self.max_workers)
        try:
            futures = [pool.submit(fn, i, item) for i, item in enumerate(items)]
            results = []
            for future in futures:
                results.append(future.result())
                report(len(results))
            return results
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    def _parsed(self, kind: str, value: R | None) -> R | None:
        if value is None:
            self._count("invalid", kind)
        return value


def _error_message(exc: urllib.error.HTTPError) -> str:
    """The message of an OpenAI-style error body ({"error": {"message": ...}}), or ''."""
    try:
        body = json.loads(exc.read().decode("utf-8", "replace"))
    except Exception:  # no body, or not JSON: the status reason suffices
        return ""
    if not isinstance(body, dict):
        return ""
    error = body.get("error")
    message = error.get("message") if isinstance(error, dict) else error or body.get("message")
    return str(message) if message else ""
