"""A real `tandem serve` process on loopback with the Gemma 3 270M package, for the client tests."""

from __future__ import annotations

import pytest

from tests.server.serve_process import API_KEY, start_server, stop_server


@pytest.fixture(scope="session")
def server(gemma_gguf):
    s = start_server(gemma_gguf, "--api-key", API_KEY, "--threads", "2")
    yield s
    stop_server(s)


@pytest.fixture(scope="session")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=120)
