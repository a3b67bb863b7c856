"""`tandem serve`'s Ollama API driven by the official `ollama` Python client."""

from __future__ import annotations

import json

import httpx
import ollama
import pytest

from tests.server.serve_process import API_KEY

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
GREEDY = {"temperature": 0, "num_predict": 20}


@pytest.fixture(scope="module")
def olla(server):
    return ollama.Client(host=server.url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=120)


def test_chat_streamed_and_not_give_the_same_text_and_stats(olla, server):
    whole = olla.chat(model=server.model_id, messages=QUESTION, options=GREEDY, stream=False)
    assert whole.done and whole.done_reason == "length" and whole.message.role == "assistant"
    assert "Paris" in whole.message.content
    assert whole.eval_count == 20 and whole.prompt_eval_count > 5
    assert whole.total_duration >= whole.eval_duration > 0 and whole.prompt_eval_duration > 0
    parts = list(olla.chat(model=server.model_id + ":latest", messages=QUESTION, options=GREEDY, stream=True))
    assert [p.done for p in parts].count(True) == 1 and parts[-1].done
    assert "".join(p.message.content for p in parts) == whole.message.content
    assert parts[-1].eval_count == 20


def test_generate_raw_and_templated(olla, server):
    raw = olla.generate(
        model=server.model_id,
        prompt="The capital of France is",
        raw=True,
        options={"temperature": 0, "num_predict": 16},
    )
    assert raw.response.startswith(" the capital of the country of France.")  # as llama.cpp, greedy
    assert raw.done_reason == "length"
    stopped = olla.generate(
        model=server.model_id,
        prompt="The capital of France is",
        raw=True,
        options={"temperature": 0, "num_predict": 16, "stop": ["ntry of"]},
    )
    assert stopped.response == raw.response[: raw.response.index("ntry of")] and stopped.done_reason == "stop"
    templated = olla.generate(
        model=server.model_id, prompt="Say hello.", options={"temperature": 0, "num_predict": 8}
    )
    assert templated.done and templated.eval_count == 8


def test_list_show_ps_and_version(olla, server):
    listed = olla.list().models
    assert [m.model for m in listed] == [server.model_id]
    assert listed[0].details.format == "gguf" and listed[0].details.family == "gemma3"
    assert listed[0].details.quantization_level == "Q4_K_M" and listed[0].size > 100_000_000
    shown = olla.show(server.model_id)
    # The Gemma 3 270M file carries no chat template: the fallback is used, and said so.
    assert "fallback" in shown.modelfile and shown.template
    assert shown.modelinfo["general.architecture"] == "gemma3"
    assert "tokenizer.ggml.tokens" not in shown.modelinfo  # long arrays left out
    running = olla.ps().models
    assert [m.model for m in running] == [server.model_id] and running[0].context_length > 0
    r = httpx.get(server.url + "/api/version", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30)
    assert r.status_code == 200 and r.json()["version"]


def test_errors_are_ollama_errors(olla, server):
    with pytest.raises(ollama.ResponseError) as error:
        olla.chat(model="no-such-model", messages=QUESTION)
    assert error.value.status_code == 404 and "no-such-model" in error.value.error
    with pytest.raises(ollama.ResponseError) as error:
        olla.generate(model=server.model_id, prompt="x", options={"temperature": 9})
    assert error.value.status_code == 400 and "temperature" in error.value.error
    r = httpx.post(
        server.url + "/api/chat",
        content=b"{",
        headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"},
        timeout=30,
    )
    assert r.status_code == 400 and r.json() == {"error": "the request body is not valid JSON"}
    r = httpx.post(server.url + "/api/chat", json={"model": server.model_id}, timeout=30)  # no key
    assert r.status_code == 401 and set(r.json()) == {"error"}


def test_an_empty_request_only_loads(olla, server):
    r = httpx.post(
        server.url + "/api/generate",
        json={"model": server.model_id},
        headers={"Authorization": f"Bearer {API_KEY}"},
        timeout=30,
    )
    assert r.status_code == 200 and r.json()["done_reason"] == "load"


def test_streams_are_ndjson(server):
    body = {"model": server.model_id, "prompt": "Hi", "options": {"num_predict": 4, "temperature": 0}}
    with httpx.stream(
        "POST",
        server.url + "/api/generate",
        json=body,
        headers={"Authorization": f"Bearer {API_KEY}"},
        timeout=60,
    ) as r:
        assert r.headers["content-type"].startswith("application/x-ndjson")
        lines = [json.loads(line) for line in r.iter_lines() if line]
    assert lines[-1]["done"] is True and all(not x["done"] for x in lines[:-1])
