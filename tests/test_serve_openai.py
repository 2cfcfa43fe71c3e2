"""A real server on a loopback port, answered by the OpenAI Python client with a persona per request."""

import socket
import threading
import time

import openai
import pytest
import uvicorn

from personaedit.serve.app import create_app


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def client(lm):
    app = create_app(lm, {}, batch_wait_ms=5, default_max_tokens=8, fit_options={"steer": {"pairs": 8}})
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=_free_port(), log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.05)
    port = server.servers[0].sockets[0].getsockname()[1]
    local = openai.DefaultHttpxClient(trust_env=False)  # no proxy from the environment for a loopback server
    yield openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=60,
                        http_client=local)
    server.should_exit = True
    thread.join(20)


def test_openai_client_chats_with_a_persona_per_request(client):
    assert [m.id for m in client.models.list()] == ["default"]
    messages = [{"role": "user", "content": "What do you do at parties?"}]
    persona = {"persona": "extraversion=high", "strength": 2.0}
    plain = client.chat.completions.create(model="default", messages=messages, max_tokens=8)
    steered = client.chat.completions.create(model="default", messages=messages, max_tokens=8, extra_body=persona)
    assert steered.choices[0].finish_reason == "length" and steered.usage.completion_tokens == 8
    assert steered.choices[0].message.content != plain.choices[0].message.content

    stream = client.chat.completions.create(model="default", messages=messages, max_tokens=8, stream=True,
                                            extra_body=persona)
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == steered.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == "length"

    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="no-such-edit", messages=messages)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="default", messages=messages, extra_body={"persona": "nonsense=high"})
    assert client.completions.create(model="default", prompt="I love", max_tokens=4).usage.completion_tokens == 4
