"""The server while its model loads and after a load that failed: 503s that say why, never a crash."""

from __future__ import annotations

import threading
import time

from fastapi.testclient import TestClient

from tandem.errors import WeightError
from tandem.server.app import Server, create_app
from tandem.server.host import ModelHost

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def app_with(load) -> tuple[object, ModelHost]:
    host = ModelHost(load, max_queue=2)
    host.start()
    return create_app(Server(host, "m", (), None, None)), host


def test_a_failed_load_is_reported_by_health_and_every_request():
    def broken():
        raise WeightError("blk.0.attn_q.weight: truncated file")

    app, host = app_with(broken)
    deadline = time.monotonic() + 10
    while host.state == "loading" and time.monotonic() < deadline:
        time.sleep(0.01)
    with TestClient(app) as client:
        health = client.get("/health")
        assert health.status_code == 503 and health.json()["status"] == "failed"
        assert "truncated file" in health.json()["error"]
        r = client.post("/v1/chat/completions", json=CHAT)
        assert r.status_code == 503 and r.json()["error"]["code"] == "model_load_failed"
        r = client.post("/api/chat", json=CHAT)
        assert r.status_code == 503 and "truncated file" in r.json()["error"]


def test_requests_during_loading_get_503_model_loading():
    release = threading.Event()

    def slow():
        release.wait(10)
        raise WeightError("never mind")

    app, _ = app_with(slow)
    try:
        with TestClient(app) as client:
            assert client.get("/health").json()["status"] == "loading"
            r = client.post("/v1/chat/completions", json=CHAT)
            assert r.status_code == 503 and r.json()["error"]["code"] == "model_loading"
            assert client.get("/api/ps").json() == {"models": []}
    finally:
        release.set()
