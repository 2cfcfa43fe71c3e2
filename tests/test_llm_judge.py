"""The optional LLM judge against a local fake OpenAI-compatible server (http.server in a thread)."""

from __future__ import annotations

import json
import re
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from personaedit.errors import PersonaEditError
from personaedit.eval.llm_client import API_KEY_ENV, BASE_URL_ENV, MODEL_ENV
from personaedit.eval.llm_judge import LLMJudge
from personaedit.eval.llm_prompts import parse_preference, parse_rating, parse_share

MAX_REQUESTS = 64


class FakeServer:
    """Answers POST /v1/chat/completions from a script: each entry is reply text (200), a callable
    (request body -> reply text), or a dict {"status", "content", "delay", "body"}."""

    def __init__(self) -> None:
        self.script: list = []
        self.requests: list[dict] = []
        self.release = threading.Event()  # ends any delayed reply at shutdown
        self._lock = threading.Lock()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def _next(self, body: dict) -> dict:
        with self._lock:
            if len(self.requests) > MAX_REQUESTS:
                return {"status": 500, "body": "request limit reached"}
            entry = self.script.pop(0) if self.script else {"status": 500, "body": "unscripted request"}
        if callable(entry):
            entry = entry(body)
        return {"content": entry} if isinstance(entry, str) else entry

    def _handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's naming
                raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                body = json.loads(raw)
                with server._lock:
                    server.requests.append({"path": self.path, "headers": dict(self.headers), "body": body})
                entry = server._next(body)
                if entry.get("delay"):
                    server.release.wait(entry["delay"])
                status = entry.get("status", 200)
                if "body" in entry:
                    payload = entry["body"].encode()
                else:
                    payload = json.dumps({"id": "x", "object": "chat.completion", "model": body["model"],
                                          "choices": [{"index": 0, "finish_reason": "stop", "message": {
                                              "role": "assistant", "content": entry["content"]}}]}).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                except OSError:  # the client gave up (timeout test)
                    pass

            def log_message(self, *args):
                pass

        return Handler

    def close(self) -> None:
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=2)


@pytest.fixture
def server(request):
    fake = FakeServer()
    request.addfinalizer(fake.close)
    return fake


@pytest.fixture
def judge(server, tmp_path):
    return LLMJudge(server.base_url, "judge-model", "sk-test", backoff=0.001, timeout=2.0,
                    cache_dir=tmp_path / "cache")


def user_prompt(body: dict) -> str:
    return body["messages"][-1]["content"]


# --------------------------------------------------------------------------------------------- configuration

def test_from_env_names_the_missing_variable(monkeypatch):
    for name in (BASE_URL_ENV, MODEL_ENV, API_KEY_ENV):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(PersonaEditError, match=BASE_URL_ENV) as err:
        LLMJudge.from_env()
    assert "\n" not in str(err.value)
    monkeypatch.setenv(BASE_URL_ENV, "http://127.0.0.1:9/v1/")
    with pytest.raises(PersonaEditError, match=MODEL_ENV):
        LLMJudge.from_env()
    monkeypatch.setenv(MODEL_ENV, "qwen")
    judge = LLMJudge.from_env()
    assert (judge.base_url, judge.model, judge.url) == ("http://127.0.0.1:9/v1", "qwen",
                                                        "http://127.0.0.1:9/v1/chat/completions")
    assert judge.cache_dir.name == "llm-judge" and judge.cache_dir.parent.name.startswith("cache")
    with pytest.raises(PersonaEditError, match="http"):
        LLMJudge("file:///etc/passwd", "m")


def test_request_body_and_headers(server, judge):
    server.script = ["4"]
    messages = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]
    assert judge.complete(messages, max_tokens=7) == "4"
    (req,) = server.requests
    assert req["path"] == "/v1/chat/completions"
    assert req["body"] == {"model": "judge-model", "messages": messages, "temperature": 0, "max_tokens": 7}
    headers = {k.lower(): v for k, v in req["headers"].items()}
    assert headers["authorization"] == "Bearer sk-test"
    assert headers["content-type"] == "application/json"
    assert "sk-test" not in repr(judge)


def test_no_authorization_header_without_key(server, tmp_path, monkeypatch):
    monkeypatch.delenv(API_KEY_ENV, raising=False)
    server.script = ["ok"]
    LLMJudge(server.base_url + "/", "m", cache_dir=tmp_path).complete([{"role": "user", "content": "x"}])
    headers = {k.lower() for k in server.requests[0]["headers"]}
    assert "authorization" not in headers and server.requests[0]["path"] == "/v1/chat/completions"


# --------------------------------------------------------------------------------------------- parsing

@pytest.mark.parametrize("reply,expected", [("4", 4), ("Rating: 5/5", 5), ("10, no: 3", 3), ("3.5", None),
                                            ("0", None), ("6", None), ("no idea", None), ("", None)])
def test_parse_rating(reply, expected):
    assert parse_rating(reply) == expected


@pytest.mark.parametrize("reply,expected", [("70%", 0.7), ("about 35.5 %", 0.355), ("42", 0.42), ("0%", 0.0),
                                            ("100%", 1.0), ("150%", None), ("none", None)])
def test_parse_share(reply, expected):
    assert parse_share(reply) == expected


@pytest.mark.parametrize("reply,expected", [("A", "A"), ("b", "B"), ("**B**.", "B"), ("Reply A", "A"),
                                            ("Response B shows it more", "B"), ("TIE", "TIE"), ("A tie.", "TIE"),
                                            ("They are equal", "TIE"), ("A is better", None), ("hmm", None)])
def test_parse_preference(reply, expected):
    assert parse_preference(reply) == expected


# --------------------------------------------------------------------------------------------- the three prompts

def test_rate_pae_parses_and_counts_invalid(server, judge):
    server.script = ["4", "Rating: 2/5", "I cannot rate this."]
    ratings = judge.rate_pae(["t-one", "t-two", "t-three"], "extraversion", "high")
    assert ratings == [4, 2, None]
    assert judge.stats.invalid["pae"] == 1 and judge.stats.requests == 3
    prompt = user_prompt(server.requests[0]["body"])
    assert "high extraversion" in prompt and "outgoing, talkative" in prompt and "t-one" in prompt
    assert "reserved" not in prompt  # only the target pole's adjectives


def test_pae_drops_pairs_with_an_unparseable_rating(server, judge):
    ratings = {"b1": "2", "b2": "3", "b3": "?", "e1": "5", "e2": "3", "e3": "4"}
    server.script = [lambda body, r=ratings: r[re.search(r"<text>\n(\w+)", user_prompt(body)).group(1)]] * 6
    assert judge.pae(["b1", "b2", "b3"], ["e1", "e2", "e3"], "neuroticism", "low") == pytest.approx((3 + 0) / 2)
    assert "low neuroticism" in user_prompt(server.requests[0]["body"])


def test_pole_shares_names_both_poles(server, judge):
    server.script = ["70%", "30%", "garbage", "95 %"]
    shares = judge.pole_shares(["u1", "u2", "u3", "u4"], ["r1", "r2", "r3", "r4"], "ei", "I")
    assert shares == [0.7, 0.3, None, 0.95]
    assert judge.stats.invalid["share"] == 1
    prompt = user_prompt(server.requests[0]["body"])
    assert "Introversion (I): reflective, energised by solitude" in prompt
    assert "Extraversion (E): outgoing" in prompt and "u1" in prompt and "r1" in prompt
    server.script = ["70%", "30%", "garbage", "95 %"]
    judge.use_cache = False
    assert judge.expression_rate(["u1", "u2", "u3", "u4"], ["r1", "r2", "r3", "r4"], "ei", "I") == pytest.approx(2 / 3)


def _order(body: dict) -> tuple[str, str]:
    a, b = re.findall(r"<reply>\n(.*?)\n</reply>", user_prompt(body))
    return a, b


def test_pairwise_alternates_order_and_maps_back(server, judge):
    # a fair judge: always picks the edited reply, wherever it stands
    server.script = [lambda body: "A" if _order(body)[0].startswith("edited") else "B"] * 4
    utterances, edited, base = ["u0", "u1", "u2", "u3"], ["edited0", "edited1", "edited2", "edited3"], \
        ["base0", "base1", "base2", "base3"]
    assert judge.pairwise(utterances, edited, base, "agreeableness", "high") == [1, 1, 1, 1]
    orders = [_order(r["body"]) for r in server.requests]
    assert orders == [("edited0", "base0"), ("base1", "edited1"), ("edited2", "base2"), ("base3", "edited3")]


def test_pairwise_cancels_position_bias_and_ties(server, judge):
    server.script = ["A", "A", "A", "A", "TIE", "Cannot say"]
    prefs = judge.pairwise([f"u{i}" for i in range(6)], [f"e{i}" for i in range(6)], [f"b{i}" for i in range(6)],
                           "tf", "F")
    assert prefs == [1, -1, 1, -1, 0, 0]
    assert judge.stats.invalid["pairwise"] == 1
    assert "Feeling (F)" in user_prompt(server.requests[0]["body"])
    server.script = ["B", "B"]
    assert judge.win_rate(["x", "y"], ["e", "f"], ["b", "c"], "tf", "F") == pytest.approx(0.5)


# --------------------------------------------------------------------------------------------- failures

def test_retries_after_500_and_429_then_succeeds(server, judge):
    server.script = [{"status": 500, "body": "boom"}, {"status": 429, "body": '{"error": {"message": "slow down"}}'},
                     "3"]
    assert judge.rate_pae(["text"], "openness") == [3]
    assert len(server.requests) == 3 and judge.stats.retries == 2


def test_fails_after_the_last_retry_with_one_line(server, judge):
    server.script = [{"status": 503, "body": '{"error": {"message": "overloaded\\nby sk-test"}}'}] * 4
    with pytest.raises(PersonaEditError) as err:
        judge.complete([{"role": "user", "content": "x"}])
    message = str(err.value)
    assert len(server.requests) == 4  # 1 + 3 retries
    assert "\n" not in message and "503" in message and "4 attempts" in message and "overloaded" in message
    assert "sk-test" not in message


def test_client_errors_are_not_retried(server, judge):
    server.script = [{"status": 401, "body": '{"error": {"message": "Incorrect API key provided: sk-test"}}'}]
    with pytest.raises(PersonaEditError, match="HTTP 401") as err:
        judge.complete([{"role": "user", "content": "x"}])
    assert len(server.requests) == 1 and "sk-test" not in str(err.value)


def test_malformed_response_is_a_clear_error(server, judge):
    server.script = [{"status": 200, "body": "<html>proxy</html>"}]
    with pytest.raises(PersonaEditError, match="malformed"):
        judge.complete([{"role": "user", "content": "x"}])


def test_timeout_is_retried_then_reported(server, tmp_path):
    judge = LLMJudge(server.base_url, "m", timeout=0.2, retries=1, backoff=0.001, cache_dir=tmp_path)
    server.script = [{"content": "5", "delay": 3.0}, "2"]
    start = time.perf_counter()
    assert judge.complete([{"role": "user", "content": "x"}]) == "2"
    assert judge.stats.retries == 1 and time.perf_counter() - start < 1.5
    server.script = [{"content": "5", "delay": 3.0}] * 2
    with pytest.raises(PersonaEditError, match="timed out after 0.2 s") as err:
        judge.complete([{"role": "user", "content": "y"}])
    assert "\n" not in str(err.value)


def test_connection_refused_is_retried_then_reported(tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    judge = LLMJudge(f"http://127.0.0.1:{port}/v1", "m", retries=2, backoff=0.001, cache_dir=tmp_path)
    with pytest.raises(PersonaEditError, match="3 attempts: connection failed") as err:
        judge.complete([{"role": "user", "content": "x"}])
    assert judge.stats.requests == 3 and "\n" not in str(err.value)


# --------------------------------------------------------------------------------------------- cache

def test_cache_serves_repeated_requests(server, judge, tmp_path):
    server.script = ["4", "2"]
    assert judge.rate_pae(["same text", "same text"], "extraversion") == [4, 4]
    assert len(server.requests) == 1 and judge.stats.cache_hits == 1
    files = list((tmp_path / "cache").rglob("*.json"))
    assert len(files) == 1 and json.loads(files[0].read_text())["content"] == "4"
    again = LLMJudge(server.base_url, "judge-model", cache_dir=tmp_path / "cache")  # a new process, same folder
    assert again.rate_pae(["same text"], "extraversion") == [4] and len(server.requests) == 1
    other = LLMJudge(server.base_url, "other-model", cache_dir=tmp_path / "cache")
    assert other.rate_pae(["same text"], "extraversion") == [2] and len(server.requests) == 2
    uncached = LLMJudge(server.base_url, "judge-model", cache_dir=tmp_path / "cache", use_cache=False)
    server.script = ["1"]
    assert uncached.rate_pae(["same text"], "extraversion") == [1] and len(server.requests) == 3


def test_parallel_requests_keep_order_and_report_progress(server, tmp_path):
    judge = LLMJudge(server.base_url, "m", cache_dir=tmp_path, max_workers=3)
    server.script = [lambda body: re.search(r"<text>\nt(\d)", user_prompt(body)).group(1)] * 5
    seen = []
    ratings = judge.rate_pae([f"t{i}" for i in range(1, 6)], "openness",
                             on_progress=lambda done, total: seen.append((done, total)))
    assert ratings == [1, 2, 3, 4, 5] and seen[-1] == (5, 5) and len(seen) == 5


@pytest.mark.parametrize("url, warned", [
    ("http://127.0.0.1:8000/v1", False), ("http://localhost:8000/v1", False), ("http://[::1]:8000/v1", False),
    ("https://judge.example.org/v1", False), ("http://judge.example.org/v1", True), ("http://10.0.0.5:8000/v1", True),
])
def test_plain_http_to_another_machine_is_flagged(url, warned):
    from personaedit.eval.llm_client import plain_http_off_machine

    assert plain_http_off_machine(url) is warned
