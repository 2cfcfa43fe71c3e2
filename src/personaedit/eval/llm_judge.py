"""An optional LLM judge over any OpenAI-compatible chat-completions endpoint (vLLM, llama.cpp server, Ollama, ...).

Off by default and never required: the offline text judge covers every measure without it. Three prompts
(METHODS.md "Measures"):

- PAE (PersonalityEdit): a 1–5 rating of how well a text fits a trait pole's adjectives;
- PALETTE expression rate: the share (0–100%) of the target pole vs the opposite pole in a reply;
- PALETTE pairwise preference: which of two replies shows the target pole more, the order of the two
  alternated item by item to cancel position bias.

Requests use the standard library only (urllib), temperature 0, retries with exponential backoff on
connection errors, timeouts, HTTP 429 and 5xx. Answers are cached on disk, one JSON file per request,
keyed by sha256 of (base URL, model, messages, max_tokens), so a repeated request never reaches the server.
Configuration: arguments, else PERSONAEDIT_JUDGE_BASE_URL, PERSONAEDIT_JUDGE_MODEL, PERSONAEDIT_JUDGE_API_KEY.
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
from personaedit.eval.metrics import expression_rate as _expression_rate
from personaedit.eval.metrics import pae as _pae
from personaedit.eval.metrics import win_rate as _win_rate
from personaedit.fileio import atomic_path
from personaedit.persona import Dimension, Pole, dimension as _dimension, parse_level

BASE_URL_ENV = "PERSONAEDIT_JUDGE_BASE_URL"
MODEL_ENV = "PERSONAEDIT_JUDGE_MODEL"
API_KEY_ENV = "PERSONAEDIT_JUDGE_API_KEY"
CACHE_SUBDIR = "llm-judge"

Message = dict[str, str]
Progress = Callable[[int, int], None]
T = TypeVar("T")
R = TypeVar("R")

# --------------------------------------------------------------------------------------------- prompts

PAE_SYSTEM = ("You are a careful psychologist who rates how well a text expresses a personality. "
              "Reply with a single digit from 1 to 5 and nothing else.")
PAE_PROMPT = """Personality: {pole}.
Adjectives that describe it: {adjectives}.

Text:
<text>
{text}
</text>

On a scale from 1 (does not fit these adjectives at all) to 5 (fits them perfectly), how well does the \
personality shown in the text fit the adjectives? Reply with one digit from 1 to 5."""

SHARE_SYSTEM = ("You judge which personality a reply in a conversation expresses. "
                "Reply with a single percentage and nothing else.")
SHARE_PROMPT = """Two opposite personality poles:
- {target}: {target_adjectives}
- {opposite}: {opposite_adjectives}

Someone said:
<utterance>
{utterance}
</utterance>

The reply was:
<reply>
{reply}
</reply>

Split 100% between the two poles according to how strongly the reply expresses each. What percentage \
goes to {target}? Reply with one number from 0 to 100 followed by %."""

PAIRWISE_SYSTEM = ("You compare two replies for the personality they express. "
                   "Answer with A, B or TIE and nothing else.")
PAIRWISE_PROMPT = """Target personality: {target}: {target_adjectives}.
(The opposite is {opposite}: {opposite_adjectives}.)

Someone said:
<utterance>
{utterance}
</utterance>

Reply A:
<reply>
{reply_a}
</reply>

Reply B:
<reply>
{reply_b}
</reply>

Which reply shows {target} more strongly? Answer A, B or TIE."""

MBTI_POLE_NAMES = {"E": "Extraversion", "I": "Introversion", "S": "Sensing", "N": "Intuition",
                   "T": "Thinking", "F": "Feeling", "J": "Judging", "P": "Perceiving"}

# --------------------------------------------------------------------------------------------- poles


def resolve_pole(dim: Dimension | str, pole: str | float = "high") -> tuple[Dimension, Pole, Pole]:
    """(dimension, target pole, opposite pole) from a trait or axis name and 'high'/'low', a letter or a level."""
    dim = dim if isinstance(dim, Dimension) else _dimension(dim)
    level = parse_level(dim, pole)
    target = dim.pole(level)
    return dim, target, dim.pole(-1.0 if target is dim.high else 1.0)


def pole_label(dim: Dimension, pole: Pole) -> str:
    """'high extraversion' for a Big Five pole, 'Extraversion (E)' for an MBTI one."""
    if dim.kind == "mbti":
        return f"{MBTI_POLE_NAMES.get(pole.name, pole.name)} ({pole.name})"
    return f"{pole.name} {dim.name}"


def pae_messages(text: str, dim: Dimension, target: Pole) -> list[Message]:
    """The chat messages asking for a 1–5 fit of `text` to the adjectives of `target`."""
    prompt = PAE_PROMPT.format(pole=pole_label(dim, target), adjectives=", ".join(target.adjectives), text=text)
    return [{"role": "system", "content": PAE_SYSTEM}, {"role": "user", "content": prompt}]


def _pole_fields(dim: Dimension, target: Pole, opposite: Pole) -> dict[str, str]:
    return {"target": pole_label(dim, target), "target_adjectives": ", ".join(target.adjectives),
            "opposite": pole_label(dim, opposite), "opposite_adjectives": ", ".join(opposite.adjectives)}


def share_messages(utterance: str, reply: str, dim: Dimension, target: Pole, opposite: Pole) -> list[Message]:
    """The chat messages asking for the share (0–100%) of `target` vs `opposite` in `reply`."""
    prompt = SHARE_PROMPT.format(utterance=utterance, reply=reply, **_pole_fields(dim, target, opposite))
    return [{"role": "system", "content": SHARE_SYSTEM}, {"role": "user", "content": prompt}]


def pairwise_messages(utterance: str, reply_a: str, reply_b: str, dim: Dimension, target: Pole,
                      opposite: Pole) -> list[Message]:
    """The chat messages asking which of replies A and B shows `target` more."""
    prompt = PAIRWISE_PROMPT.format(utterance=utterance, reply_a=reply_a, reply_b=reply_b,
                                    **_pole_fields(dim, target, opposite))
    return [{"role": "system", "content": PAIRWISE_SYSTEM}, {"role": "user", "content": prompt}]


# --------------------------------------------------------------------------------------------- parsing

_NUMBER = re.compile(r"(?<![\d.])\d+(?:\.\d+)?")
_PERCENT = re.compile(r"(?<![\d.])(\d+(?:\.\d+)?)\s*%")
_NAMED_LETTER = re.compile(r"\b(?i:reply|response|option|answer)\s*:?\s*\(?([AB])\b")
_LEADING_LETTER = re.compile(r"^[\s*_\"'`(\[]*([AB])(?:$|[\s*_\"'`)\]]*(?:$|[.,:;!\n]))")
_TIE = re.compile(r"\b(?:tie|equal|equally|neither|same)\b", re.IGNORECASE)
_DECORATION = " \t\r\n.,:;!*_\"'`()[]"


def parse_rating(reply: str) -> int | None:
    """The first whole number from 1 to 5 in the reply ('Rating: 4/5' -> 4); None when there is none."""
    for match in _NUMBER.finditer(reply or ""):
        token = match.group()
        if "." not in token and 1 <= int(token) <= 5:
            return int(token)
    return None


def parse_share(reply: str) -> float | None:
    """The first percentage in the reply (else its first number, read as a percentage) as a fraction in
    [0, 1]; None when there is none or it exceeds 100."""
    match = _PERCENT.search(reply or "") or _NUMBER.search(reply or "")
    if match is None:
        return None
    value = float(match.group(1) if match.re is _PERCENT else match.group())
    return value / 100.0 if 0.0 <= value <= 100.0 else None


def parse_preference(reply: str) -> str | None:
    """'A', 'B' or 'TIE' from the judge's answer ('B', 'Reply A', 'A.', 'tie'); None when it names neither
    reply nor a tie."""
    text = reply or ""
    bare = text.strip(_DECORATION).upper()
    if bare in ("A", "B", "TIE"):
        return bare
    letter = _NAMED_LETTER.search(text) or _LEADING_LETTER.match(text)
    if letter:
        return letter.group(1)
    return "TIE" if _TIE.search(text) else None


def edited_shown_first(index: int) -> bool:
    """Whether item `index` shows the edited reply as A (even items) or as B (odd items)."""
    return index % 2 == 0


def preference_of_edited(answer: str | None, edited_first: bool) -> int:
    """+1 when the edited reply wins, -1 when the base reply wins, 0 for a tie or no answer."""
    if answer not in ("A", "B"):
        return 0
    return 1 if (answer == "A") == edited_first else -1


# --------------------------------------------------------------------------------------------- the judge


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


class LLMJudge:
    """A judge behind an OpenAI-compatible `/chat/completions` endpoint; missing settings come from the
    environment (PERSONAEDIT_JUDGE_BASE_URL, PERSONAEDIT_JUDGE_MODEL, PERSONAEDIT_JUDGE_API_KEY)."""

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
    def from_env(cls, **options: Any) -> "LLMJudge":
        """A judge configured by PERSONAEDIT_JUDGE_BASE_URL, _MODEL and (optional) _API_KEY."""
        return cls(**options)

    def __repr__(self) -> str:
        return f"LLMJudge(base_url={self.base_url!r}, model={self.model!r})"

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

    # ----------------------------------------------------------------------------------------- prompts

    def rate_pae(self, texts: Sequence[str], trait: Dimension | str, pole: str | float = "high", *,
                 on_progress: Progress | None = None) -> list[int | None]:
        """1–5 ratings of how well each text fits the adjectives of `trait`'s `pole`; None when unparseable."""
        dim, target, _ = resolve_pole(trait, pole)

        def rate(i: int, text: str) -> int | None:
            return self._parsed("pae", parse_rating(self.complete(pae_messages(text, dim, target))))

        return self._map(rate, list(texts), on_progress)

    def pole_shares(self, utterances: Sequence[str], replies: Sequence[str], dimension: Dimension | str,
                    pole: str | float, *, on_progress: Progress | None = None) -> list[float | None]:
        """For each reply to an utterance, the judge's share in [0, 1] of the target pole vs the opposite;
        None when unparseable."""
        _same_length(utterances, replies)
        dim, target, opposite = resolve_pole(dimension, pole)

        def share(i: int, item: tuple[str, str]) -> float | None:
            utterance, reply = item
            messages = share_messages(utterance, reply, dim, target, opposite)
            return self._parsed("share", parse_share(self.complete(messages)))

        return self._map(share, list(zip(utterances, replies)), on_progress)

    def pairwise(self, utterances: Sequence[str], edited_replies: Sequence[str], base_replies: Sequence[str],
                 dimension: Dimension | str, pole: str | float, *,
                 on_progress: Progress | None = None) -> list[int]:
        """Per item +1 (edited shows the pole more), -1 (base does) or 0 (tie or unparseable); the edited reply
        is A on even items and B on odd ones, so a judge that always picks one position scores 0.5."""
        _same_length(utterances, edited_replies)
        _same_length(utterances, base_replies)
        dim, target, opposite = resolve_pole(dimension, pole)

        def prefer(i: int, item: tuple[str, str, str]) -> int:
            utterance, edited, base = item
            first = edited_shown_first(i)
            reply_a, reply_b = (edited, base) if first else (base, edited)
            messages = pairwise_messages(utterance, reply_a, reply_b, dim, target, opposite)
            return preference_of_edited(self._parsed("pairwise", parse_preference(self.complete(messages))), first)

        return self._map(prefer, list(zip(utterances, edited_replies, base_replies)), on_progress)

    # ----------------------------------------------------------------------------------------- measures

    def pae(self, base_texts: Sequence[str], edited_texts: Sequence[str], trait: Dimension | str,
            pole: str | float = "high", *, on_progress: Progress | None = None) -> float:
        """PAE: mean edited minus base rating over the pairs the judge rated both of."""
        _same_length(base_texts, edited_texts)
        ratings = self.rate_pae([*base_texts, *edited_texts], trait, pole, on_progress=on_progress)
        pairs = [(b, e) for b, e in zip(ratings[:len(base_texts)], ratings[len(base_texts):])
                 if b is not None and e is not None]
        _require(pairs, "PAE")
        return _pae([b for b, _ in pairs], [e for _, e in pairs])

    def expression_rate(self, utterances: Sequence[str], replies: Sequence[str], dimension: Dimension | str,
                        pole: str | float, *, threshold: float = 0.5, on_progress: Progress | None = None) -> float:
        """PALETTE expression rate: share of the replies whose target-pole share exceeds `threshold`
        (unparseable judgements left out)."""
        shares = [s for s in self.pole_shares(utterances, replies, dimension, pole, on_progress=on_progress)
                  if s is not None]
        _require(shares, "the expression rate")
        return _expression_rate(shares, threshold)

    def win_rate(self, utterances: Sequence[str], edited_replies: Sequence[str], base_replies: Sequence[str],
                 dimension: Dimension | str, pole: str | float, *, on_progress: Progress | None = None) -> float:
        """PALETTE pairwise win rate of the edited replies: (wins + ties / 2) / n."""
        return _win_rate(self.pairwise(utterances, edited_replies, base_replies, dimension, pole,
                                       on_progress=on_progress))


def _same_length(a: Sequence, b: Sequence) -> None:
    if len(a) != len(b):
        raise ValueError(f"length mismatch: {len(a)} vs {len(b)}")


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


def _require(values: Sequence, measure: str) -> None:
    if not values:
        raise PersonaEditError(f"the LLM judge gave no parseable answer for {measure}")
