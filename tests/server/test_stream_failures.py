"""A generation that fails half-way: streams end with an error event and [DONE], the server lives on.

In-process (FastAPI's test client) with a tiny model, and a generation made to fail
after its first piece of text.
"""

from __future__ import annotations

import json
import time

import pytest
from fastapi.testclient import TestClient

import tandem.engine.generate as generate
from tandem.inject.model import load_model
from tandem.server.app import Server, create_app
from tandem.server.host import ModelHost
from tandem.synth.tiny import write_tiny


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    path = write_tiny("llama", tmp_path_factory.mktemp("stream") / "tiny.gguf", "F16")
    host = ModelHost(lambda: load_model(path, progress=False), max_queue=4)
    host.start()
    deadline = time.monotonic() + 120
    while not host.ready and time.monotonic() < deadline:
        time.sleep(0.05)
    assert host.ready, host.error
    return create_app(Server(host, "tiny", (), None, None, str(path)))


@pytest.fixture
def failing(monkeypatch):
    def fail_after_one_piece(*args, on_text=None, **kwargs):
        on_text("partial")
        raise RuntimeError("the engine broke")

    monkeypatch.setattr(generate, "prefill_and_generate", fail_after_one_piece)


def events(response) -> list[str]:
    return [line[len("data: ") :] for line in response.iter_lines() if line.startswith("data: ")]


def test_openai_stream_sends_an_error_event_then_done(app, failing):
    body = {"model": "tiny", "prompt": [1, 2, 3], "max_tokens": 8, "stream": True}
    with TestClient(app) as client, client.stream("POST", "/v1/completions", json=body) as r:
        got = events(r)
    assert r.status_code == 200
    assert json.loads(got[0])["choices"][0]["text"] == "partial"
    error = json.loads(got[1])["error"]
    assert error["type"] == "server_error" and "the engine broke" in error["message"]
    assert got[2:] == ["[DONE]"]


def test_ollama_stream_ends_with_an_error_line(app, failing):
    body = {"model": "tiny", "prompt": "hi", "raw": True, "options": {"num_predict": 8}}
    with TestClient(app) as client, client.stream("POST", "/api/generate", json=body) as r:
        lines = [json.loads(line) for line in r.iter_lines() if line]
    assert lines[0]["response"] == "partial" and "the engine broke" in lines[-1]["error"]


def test_a_non_streamed_failure_is_a_500_error_object_and_the_server_goes_on(app, failing, monkeypatch):
    body = {"model": "tiny", "prompt": [1, 2, 3], "max_tokens": 4}
    with TestClient(app) as client:
        r = client.post("/v1/completions", json=body)
        assert r.status_code == 500 and "the engine broke" in r.json()["error"]["message"]
        monkeypatch.undo()  # generation works again
        ok = client.post("/v1/completions", json=body)
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] >= 1
