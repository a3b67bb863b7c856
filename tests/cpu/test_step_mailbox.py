"""The engine's mailbox thread: what a CUDA stream's memory operations ask of it, played
here by the test writing and polling the two words."""

from __future__ import annotations

import time

import pytest
import torch
from gguf import GGMLQuantizationType as T

from tandem.cpu.engine import host_run_fn
from tests.cpu.test_engine_ops import H, engine, expert_set, routing

REQUEST, DONE = 0, 1


def answer(words: torch.Tensor, code: int, timeout_s: float = 10.0) -> None:
    """The stream's side of one call: request it, wait for the answer, clear it."""
    words[REQUEST] = code
    deadline = time.monotonic() + timeout_s
    while int(words[DONE]) != code:
        assert time.monotonic() < deadline, f"no answer to request {code}"
        time.sleep(0)
    assert int(words[REQUEST]) == 0  # the server took the request before answering
    words[DONE] = 0


def test_requests_run_their_calls_in_the_order_asked():
    gate, up, down = expert_set((T.Q8_0, T.Q8_0), seed=5)
    experts = engine(2).experts(gate, up, down)
    words = torch.zeros(16, dtype=torch.int32)
    box = engine(2).step_mailbox(words)
    calls = []
    for n, seed in ((1, 3), (3, 4)):
        x, ids, weights = routing(n, 2, seed=seed)
        out = torch.zeros(n, H)
        record = experts.host_call(x.contiguous(), ids.contiguous(), weights.contiguous(), out)
        calls.append((box.add(host_run_fn(), record.address), record, out))
    assert [code for code, _, _ in calls] == [1, 2]
    for step in range(4):  # replayed with new contents, as a CUDA graph does
        for code, record, out in calls:
            x, ids, weights = record.buffers[:3]
            x.copy_(torch.randn(x.shape, generator=torch.Generator().manual_seed(step)))
            out.fill_(float("nan"))
            answer(words, code)
            torch.testing.assert_close(out, experts(x, ids, weights), rtol=0, atol=0)
    assert box.served == 8 and box.failed == 0


def test_a_dry_mailbox_answers_without_running_the_call():
    gate, up, down = expert_set((T.Q8_0, T.Q8_0), seed=5)
    experts = engine(2).experts(gate, up, down)
    words = torch.zeros(16, dtype=torch.int32)
    box = engine(2).step_mailbox(words)
    x, ids, weights = routing(1, 2, seed=3)
    out = torch.full((1, H), 7.0)
    record = experts.host_call(x.contiguous(), ids.contiguous(), weights.contiguous(), out)  # kept while used
    code = box.add(host_run_fn(), record.address)
    box.dry = True
    answer(words, code)
    assert torch.all(out == 7.0) and box.served == 0 and box.failed == 0
    box.dry = False
    answer(words, code)
    assert not torch.all(out == 7.0) and box.served == 1


def test_an_unknown_request_is_answered_and_counted_so_nothing_waits_forever():
    words = torch.zeros(16, dtype=torch.int32)
    box = engine(2).step_mailbox(words)
    answer(words, 5)
    assert box.served == 0 and box.failed == 1


def test_a_sleeping_server_still_answers():
    words = torch.zeros(16, dtype=torch.int32)
    box = engine(2).step_mailbox(words)
    time.sleep(0.05)  # past the spin: the server polls between sleeps
    answer(words, 3)
    assert box.failed == 1


def test_mailbox_words_are_checked():
    with pytest.raises(ValueError, match="int32"):
        engine(2).step_mailbox(torch.zeros(2, dtype=torch.int64))


def test_a_bad_hand_over_choice_is_refused_before_any_gpu_call(monkeypatch):
    from tandem.errors import TandemError
    from tandem.gpu.mailbox import HANDOVER_ENV, handover

    monkeypatch.setenv(HANDOVER_ENV, "pigeon")
    with pytest.raises(TandemError, match="must be one of mailbox, host-function"):
        handover()
    monkeypatch.setenv(HANDOVER_ENV, "host-function")
    assert handover() == "host-function"


@pytest.mark.parametrize(
    "name, value",
    [
        ("TANDEM_CUDA_GRAPH", "sometimes"),
        ("TANDEM_GPU_PREFILL_SPLIT", "half"),
        ("TANDEM_GPU_ATTENTION", "flash"),
        ("TANDEM_GPU_HANDOVER", "pigeon"),
    ],
)
def test_a_bad_gpu_switch_is_a_one_line_error_before_loading(name, value, monkeypatch):
    from tandem.errors import TandemError
    from tandem.inject.loader import check_gpu_switches

    monkeypatch.setenv(name, value)
    with pytest.raises(TandemError, match=f"{name} must be"):
        check_gpu_switches()
    monkeypatch.setenv(name, "")
    check_gpu_switches()  # empty: the default
