"""The OpenAI-compatible app in-process: listing, batching of concurrent requests, errors, streaming, CLI."""

import asyncio
import json
import sys

import httpx
import pytest

import personaedit.methods
from clirun import run_cli
from personaedit.cli_serve import is_loopback, parse_named_edit
from personaedit.serve.app import create_app
from test_serve_rowwise import served_edits

EDITS = ("steer", "low_rank", "dense", "context")


@pytest.fixture
def app(lm):
    edits = served_edits(lm)
    return create_app(lm, {name: (edits[name], 1.0) for name in EDITS}, batch_wait_ms=300, max_batch=8,
                      default_max_tokens=8, fit_options={"steer": {"pairs": 8}})


def _chat(model="default", content="What do you like?", **extra):
    return {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": 8, **extra}


async def _post_all(app, bodies, path="/v1/chat/completions"):
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
        return await asyncio.gather(*(client.post(path, json=body) for body in bodies))


def post(app, body, path="/v1/chat/completions"):
    return asyncio.run(_post_all(app, [body], path))[0]


def test_models_lists_default_and_the_named_edits(app):
    response = asyncio.run(_get(app, "/v1/models"))
    assert response.status_code == 200
    assert [m["id"] for m in response.json()["data"]] == ["default", *EDITS]


async def _get(app, path):
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
        return await client.get(path)


def test_concurrent_requests_with_different_edits_run_as_one_batch_and_match_alone(app):
    models = ["default", *EDITS]
    alone = [post(app, _chat(m)).json() for m in models]
    assert list(app.state.batcher.admissions) == [1] * len(models)
    together = [r.json() for r in asyncio.run(_post_all(app, [_chat(m) for m in models]))]
    assert app.state.batcher.admissions[-1] == len(models)
    for single, mixed in zip(alone, together):
        assert mixed["choices"][0]["message"] == single["choices"][0]["message"]
        assert mixed["usage"] == single["usage"]
    contents = [r["choices"][0]["message"]["content"] for r in alone]
    assert len(set(contents)) == len(contents)  # each edit changed its reply
    first = alone[0]
    assert first["object"] == "chat.completion" and first["choices"][0]["finish_reason"] == "length"
    assert first["usage"]["completion_tokens"] == 8
    assert first["usage"]["total_tokens"] == first["usage"]["prompt_tokens"] + 8


BAD_REQUESTS = [
    ("/v1/chat/completions", b"{not json", 400, None),
    ("/v1/chat/completions", b"[1, 2]", 400, None),
    ("/v1/chat/completions", {"messages": "hello"}, 400, "messages"),
    ("/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, 400, "messages"),
    ("/v1/chat/completions", _chat(max_tokens=-3), 400, "max_tokens"),
    ("/v1/chat/completions", _chat(temperature=7), 400, "temperature"),
    ("/v1/chat/completions", _chat(n=3), 400, "n"),
    ("/v1/chat/completions", _chat(model="no-such-edit"), 404, "model"),
    ("/v1/chat/completions", _chat(persona="extrovertedness=high"), 400, "persona"),
    ("/v1/chat/completions", _chat(persona="extraversion=high", method="no-such-method"), 400, "method"),
    ("/v1/chat/completions", _chat(persona="extraversion=high", method="rome"), 400, "method"),
    ("/v1/chat/completions", _chat(model="steer", persona="extraversion=high"), 400, "persona"),
    ("/v1/chat/completions", _chat(method="steer"), 400, "method"),
    ("/v1/completions", {"prompt": []}, 400, "prompt"),
    ("/v1/completions", {"prompt": "Hi", "model": "context"}, 400, "model"),
    ("/v1/completions", {"max_tokens": 4}, 400, "prompt"),
    ("/v1/nowhere", {}, 404, None),
]


@pytest.mark.parametrize("path,body,status,param", BAD_REQUESTS)
def test_bad_requests_get_openai_style_errors_and_the_server_keeps_serving(app, path, body, status, param):
    async def both():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            if isinstance(body, bytes):
                bad = await client.post(path, content=body, headers={"content-type": "application/json"})
            else:
                bad = await client.post(path, json=body)
            good = await client.post("/v1/chat/completions", json=_chat())
            return bad, good

    bad, good = asyncio.run(both())
    assert bad.status_code == status
    error = bad.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["param"] == param
    assert good.status_code == 200 and good.json()["choices"][0]["message"]["content"] is not None


def _events(response):
    assert response.headers["content-type"].startswith("text/event-stream")
    blocks = response.text.split("\n\n")
    assert blocks[-1] == "" and blocks[-2] == "data: [DONE]"
    assert all(block.startswith("data: ") for block in blocks[:-1])
    return [json.loads(block[len("data: "):]) for block in blocks[:-2]]


def test_chat_streaming_sends_chunks_that_add_up_to_the_reply(app):
    whole = post(app, _chat("steer")).json()
    chunks = _events(post(app, _chat("steer", stream=True, stream_options={"include_usage": True})))
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == whole["choices"][0]["message"]["content"]
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == whole["usage"]


def test_completions_streaming_and_plain(app):
    whole = post(app, {"prompt": "I love meeting", "max_tokens": 6}, "/v1/completions").json()
    assert whole["object"] == "text_completion" and whole["usage"]["completion_tokens"] == 6
    chunks = _events(post(app, {"prompt": "I love meeting", "max_tokens": 6, "stream": True}, "/v1/completions"))
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole["choices"][0]["text"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    two = post(app, {"prompt": ["Hi", "I love meeting"], "max_tokens": 6}, "/v1/completions").json()
    assert [c["index"] for c in two["choices"]] == [0, 1]
    assert two["choices"][1]["text"] == whole["choices"][0]["text"]


def test_stop_string_ends_the_reply(app):
    full = post(app, _chat(max_tokens=16)).json()["choices"][0]["message"]["content"]
    assert len(full) > 6
    cut = post(app, _chat(max_tokens=16, stop=[full[4:6]])).json()["choices"][0]
    assert cut["finish_reason"] == "stop" and cut["message"]["content"] == full[:full.find(full[4:6])]


def test_persona_is_fitted_once_then_cached(app, monkeypatch):
    calls = []
    real = personaedit.methods.fit_edit

    def counting(name, lm, persona, **options):
        calls.append((name, persona.spec(), options))
        return real(name, lm, persona, **options)

    monkeypatch.setattr(personaedit.methods, "fit_edit", counting)
    plain = post(app, _chat()).json()["choices"][0]["message"]["content"]
    first = post(app, _chat(persona="extraversion=high", strength=2.0)).json()["choices"][0]["message"]["content"]
    again = post(app, _chat(persona="extraversion=high", strength=2.0)).json()["choices"][0]["message"]["content"]
    off = post(app, _chat(persona="extraversion=high", strength=0.0)).json()["choices"][0]["message"]["content"]
    assert calls == [("steer", "extraversion=high", {"pairs": 8})]
    assert first == again and first != plain and off == plain


def test_serve_without_the_extra_names_the_install_command(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "uvicorn", None)  # as if not installed
    code, _, err = run_cli(["serve"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "pip install 'personaedit[serve]'" in err


def test_serve_refuses_malformed_or_missing_edits(capsys, tmp_path):
    code, _, err = run_cli(["serve", "--edit", "just-a-folder"], capsys)
    assert code == 2 and "NAME=DIR" in err
    code, _, err = run_cli(["serve", "--edit", f"x={tmp_path / 'missing'}"], capsys)
    assert code == 2 and "not an edit folder" in err


def test_named_edit_options_and_loopback_check(tmp_path):
    assert parse_named_edit(f"calm={tmp_path}:0.5") == ("calm", tmp_path, 0.5)
    assert parse_named_edit(f"calm={tmp_path}") == ("calm", tmp_path, 1.0)
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.4")
