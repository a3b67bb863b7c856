"""`tandem serve` driven by the official `openai` Python client (and raw HTTP where a client can't go)."""

from __future__ import annotations

import concurrent.futures
import json
import re
import time

import httpx
import openai
import pytest

from tests.server.serve_process import API_KEY, start_server, stop_server

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def metric(server, name: str) -> float:
    text = server.get("/metrics").text
    found = re.search(rf"^{name} ([0-9.e+]+)$", text, re.M)
    assert found, f"{name} not in /metrics"
    return float(found.group(1))


def test_health_answers_503_while_loading_then_200(server):
    assert server.health_seen[-1] == 200
    assert 503 in server.health_seen  # the port opened before the model was ready
    body = server.get("/health").json()
    assert body == {"status": "ready", "model": server.model_id}


def test_models_lists_the_one_model(client, server):
    models = client.models.list().data
    assert [m.id for m in models] == [server.model_id]


def test_chat_streamed_and_not_give_the_same_greedy_text(client, server):
    whole = client.chat.completions.create(
        model=server.model_id, messages=QUESTION, max_tokens=24, temperature=0
    )
    assert whole.choices[0].finish_reason == "length"
    assert whole.usage.completion_tokens == 24 and whole.usage.prompt_tokens > 5
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + 24
    text = whole.choices[0].message.content
    assert "Paris" in text
    chunks = list(
        client.chat.completions.create(
            model=server.model_id,
            messages=QUESTION,
            max_tokens=24,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == text
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 24


def test_completions_stop_strings_cut_across_tokens(client, server):
    free = client.completions.create(
        model=server.model_id, prompt="The capital of France is", max_tokens=16, temperature=0
    )
    text = free.choices[0].text
    assert text.startswith(" the capital of the country of France.")  # llama.cpp's greedy text
    cut = client.completions.create(
        model=server.model_id,
        prompt="The capital of France is",
        max_tokens=16,
        temperature=0,
        stop=["ntry of"],
    )
    assert cut.choices[0].text == text[: text.index("ntry of")]
    assert cut.choices[0].finish_reason == "stop"
    streamed = client.completions.create(
        model=server.model_id,
        prompt="The capital of France is",
        max_tokens=16,
        temperature=0,
        stop="ntry of",
        stream=True,
    )
    assert "".join(c.choices[0].text for c in streamed) == cut.choices[0].text


def test_max_completion_tokens_wins_over_max_tokens(client, server):
    r = client.chat.completions.create(
        model=server.model_id, messages=QUESTION, max_tokens=10, max_completion_tokens=3, temperature=0
    )
    assert r.usage.completion_tokens == 3


def test_seeded_sampling_repeats_and_penalties_are_taken(client, server):
    def run(**kw):
        r = client.completions.create(model=server.model_id, prompt="Once upon a time", max_tokens=12, **kw)
        return r.choices[0].text

    a = run(temperature=1.0, top_p=0.9, seed=7, presence_penalty=0.5, frequency_penalty=0.5)
    assert a == run(temperature=1.0, top_p=0.9, seed=7, presence_penalty=0.5, frequency_penalty=0.5)
    assert run(temperature=0) == run(temperature=0, extra_body={"top_k": 1})


@pytest.mark.parametrize(
    "kwargs, param",
    [
        ({"n": 2}, "n"),
        ({"temperature": 2.5}, "temperature"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"logprobs": True}, "logprobs"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, "tools"),
    ],
)
def test_invalid_parameters_are_400_with_the_parameter_named(client, server, kwargs, param):
    with pytest.raises(openai.BadRequestError) as error:
        client.chat.completions.create(model=server.model_id, messages=QUESTION, **kwargs)
    assert error.value.status_code == 400
    assert error.value.body["param"] == param and error.value.body["type"] == "invalid_request_error"


def test_a_prompt_over_the_context_is_400_context_length_exceeded(client, server):
    with pytest.raises(openai.BadRequestError) as error:
        client.chat.completions.create(model=server.model_id, messages=QUESTION, max_tokens=10_000_000)
    assert error.value.body["code"] == "context_length_exceeded"


def test_an_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError) as error:
        client.chat.completions.create(model="no-such-model", messages=QUESTION, max_tokens=2)
    assert error.value.body["code"] == "model_not_found"


def test_a_missing_or_wrong_key_is_401(server):
    from openai import OpenAI

    wrong = OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()
    r = httpx.post(server.url + "/v1/completions", json={"model": server.model_id, "prompt": "a"}, timeout=30)
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"


def test_bad_json_is_400_not_a_crash(server):
    r = httpx.post(
        server.url + "/v1/chat/completions",
        content=b"{not json",
        headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"},
        timeout=30,
    )
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]


def test_eight_concurrent_clients_get_their_own_complete_answers(client, server):
    prompts = [f"Write the number {i} in words:" for i in range(8)]

    def ask(prompt: str) -> str:
        r = client.completions.create(model=server.model_id, prompt=prompt, max_tokens=8, temperature=0)
        assert r.usage.completion_tokens == 8 or r.choices[0].finish_reason == "stop"
        return r.choices[0].text

    alone = [ask(p) for p in prompts]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        together = list(pool.map(ask, prompts))
    assert together == alone  # served in turn: every answer complete and its own
    assert len(set(alone)) > 1


def test_a_client_that_disconnects_stops_its_generation(server):
    before = metric(server, "tandem_generated_tokens_total")
    body = {
        "model": server.model_id,
        "prompt": "Tell me a very long story.",
        "max_tokens": 2000,
        "temperature": 0,
        "stream": True,
    }
    headers = {"Authorization": f"Bearer {API_KEY}"}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, headers=headers, timeout=60) as r:
        got = []
        for line in r.iter_lines():
            if line.startswith("data: {"):
                got.append(json.loads(line[len("data: ") :]))
            if len(got) == 3:
                break  # leave after three chunks
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # the generation ends and is counted
        generated = metric(server, "tandem_generated_tokens_total") - before
        if generated > 0:
            break
        time.sleep(0.2)
    assert 3 <= generated < 200  # far short of the 2000 asked for


def test_a_full_queue_is_503(gemma_gguf):
    busy = start_server(gemma_gguf, "--max-queue", "1", "--threads", "2")
    try:
        # Counting goes on for all 400 tokens (greedy), so the first request is still running.
        body = {
            "model": busy.model_id,
            "prompt": "1, 2, 3, 4, 5, 6, 7, 8,",
            "max_tokens": 400,
            "temperature": 0,
        }
        with httpx.stream(
            "POST", busy.url + "/v1/completions", json={**body, "stream": True}, timeout=60
        ) as running:
            lines = running.iter_lines()  # kept: dropping the iterator would close the connection
            for line in lines:
                if line.startswith("data: {"):
                    break  # generating now
            with httpx.stream(
                "POST", busy.url + "/v1/completions", json={**body, "stream": True}, timeout=60
            ) as waiting:
                assert waiting.status_code == 200 and metric(busy, "tandem_queue_depth") == 1  # queued
                r = httpx.post(busy.url + "/v1/completions", json=body, timeout=60)
                assert r.status_code == 503 and r.json()["error"]["code"] == "server_overloaded"
    finally:
        stop_server(busy)
