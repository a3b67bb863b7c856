"""schemathesis against the server's own /openapi.json: no generated request may get a 5xx.

The server runs with a 48-token context, so any request the fuzzer makes valid
generates a few dozen tokens at most.
"""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error

from tests.server.serve_process import start_server, stop_server


@pytest.fixture(scope="module")
def fuzzed(gemma_gguf):
    server = start_server(gemma_gguf, "--ctx", "48", "--max-queue", "64", "--threads", "2")
    yield server
    stop_server(server)


def test_no_request_gets_a_server_error(fuzzed):
    schema = schemathesis.openapi.from_url(fuzzed.url + "/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 10  # OpenAI's and Ollama's endpoints, health, metrics
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def fuzz(case):
            if isinstance(case.body, dict) and "model" in case.body:
                case.body["model"] = fuzzed.model_id  # past the model check, into the rest
            case.call_and_validate(checks=[not_a_server_error])

        fuzz()
    # The fuzzer reached generation, not only the validation in front of it.
    served = fuzzed.get("/metrics").text
    for endpoint in ("/v1/chat/completions", "/v1/completions", "/api/chat", "/api/generate"):
        assert f'endpoint="{endpoint}",status="200"' in served, endpoint
