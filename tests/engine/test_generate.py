import pytest
import torch
from transformers import LlamaConfig

from tandem.engine.errors import EngineError
from tandem.engine.generate import GenerationResult, prefill_and_generate
from tandem.engine.sampling import SamplingParams


@pytest.fixture(scope="module")
def prompt(byte_tokenizer) -> list[int]:
    return byte_tokenizer.encode("hello world, the answer is", add_special_tokens=False)


@pytest.fixture(scope="module")
def greedy32(tiny_model, byte_tokenizer, prompt) -> GenerationResult:
    return prefill_and_generate(tiny_model, byte_tokenizer, prompt, 32)


class ScriptedLM(torch.nn.Module):
    """Answers any prompt with a fixed token sequence, so stop handling can be tested exactly."""

    def __init__(self, vocab_size: int, n_prompt: int, script: list[int]) -> None:
        super().__init__()
        self.config = LlamaConfig(
            vocab_size=vocab_size, hidden_size=8, num_hidden_layers=1, num_attention_heads=1
        )
        self.anchor = torch.nn.Parameter(torch.zeros(1))
        self.n_prompt, self.script, self.n_seen = n_prompt, script, 0

    def forward(self, input_ids, past_key_values=None, use_cache=True):
        self.n_seen += input_ids.shape[1]
        logits = torch.zeros(1, input_ids.shape[1], self.config.vocab_size)  # [1, T, V]
        logits[0, -1, self.script[self.n_seen - self.n_prompt]] = 10.0
        return type("Out", (), {"logits": logits})()


def _scripted(tokenizer, text: str, prompt: list[int]) -> tuple[ScriptedLM, list[int]]:
    script = tokenizer.encode(text, add_special_tokens=False)
    return ScriptedLM(len(tokenizer), len(prompt), script), script


def test_greedy_matches_transformers_generate(tiny_model, prompt, greedy32):
    ids = torch.tensor([prompt])
    ref = tiny_model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=32, min_new_tokens=32, do_sample=False
    )[0, len(prompt) :].tolist()
    assert greedy32.token_ids == ref
    assert len(set(ref)) > 3  # the tiny model does not just repeat one token
    assert greedy32.finish_reason == "length"
    assert greedy32.n_generated == 32 and greedy32.n_prompt == len(prompt)
    assert greedy32.prefill_tok_s > 0 and greedy32.decode_tok_s > 0


def test_result_text_is_the_decoded_tokens(byte_tokenizer, greedy32):
    assert greedy32.text == byte_tokenizer.decode(greedy32.token_ids)


@pytest.mark.parametrize("chunk", [1, 3, 100])
def test_chunked_prefill_equals_unchunked(tiny_model, byte_tokenizer, prompt, greedy32, chunk):
    got = prefill_and_generate(tiny_model, byte_tokenizer, prompt, 32, prefill_chunk=chunk)
    assert got.token_ids == greedy32.token_ids


def test_tensor_prompts_equal_list_prompts(tiny_model, byte_tokenizer, prompt, greedy32):
    for ids in (torch.tensor(prompt), torch.tensor([prompt])):
        assert prefill_and_generate(tiny_model, byte_tokenizer, ids, 32).token_ids == greedy32.token_ids


def test_seeded_sampling_reproducible_and_seeds_differ(tiny_model, byte_tokenizer, prompt):
    def run(seed):
        params = SamplingParams(temperature=1.5, seed=seed)
        return prefill_and_generate(tiny_model, byte_tokenizer, prompt, 24, sampling=params).token_ids

    assert run(1) == run(1)
    assert run(1) != run(2)


def test_top_k_1_equals_greedy(tiny_model, byte_tokenizer, prompt, greedy32):
    params = SamplingParams(temperature=0.8, top_k=1, seed=3)
    got = prefill_and_generate(tiny_model, byte_tokenizer, prompt, 32, sampling=params)
    assert got.token_ids == greedy32.token_ids


def test_stop_token_id_ends_with_stop_and_is_not_in_text(tiny_model, byte_tokenizer, prompt, greedy32):
    stop = greedy32.token_ids[5]
    k = greedy32.token_ids.index(stop)
    pieces = []
    got = prefill_and_generate(
        tiny_model, byte_tokenizer, prompt, 32, stop_token_ids=[stop], on_text=pieces.append
    )
    assert got.finish_reason == "stop"
    assert got.token_ids == greedy32.token_ids[: k + 1]
    assert got.text == byte_tokenizer.decode(greedy32.token_ids[:k])
    assert "".join(pieces) == got.text


def test_stop_string_split_across_tokens(byte_tokenizer, prompt):
    model, script = _scripted(byte_tokenizer, "hello wor</ld> x </stop> tail", prompt)
    stop_ids = byte_tokenizer.encode(" </stop>", add_special_tokens=False)
    assert len(stop_ids) > 2  # the stop string spans several tokens
    pieces = []
    got = prefill_and_generate(
        model, byte_tokenizer, prompt, 50, stop_strings=["</stop>"], on_text=pieces.append
    )
    assert got.finish_reason == "stop"
    assert got.text == "hello wor</ld> x "
    assert "".join(pieces) == got.text
    # "</" of the real stop was held back, never streamed; the false alarm "</ld>" was released.
    assert not any(p.endswith("<") or p.endswith("</") or "</s" in p for p in pieces)
    end = len(byte_tokenizer.encode("hello wor</ld> x </stop>", add_special_tokens=False))
    assert got.token_ids == script[:end]


def test_stop_string_not_reached_ends_with_length_and_flushes(byte_tokenizer, prompt):
    model, _ = _scripted(byte_tokenizer, "abc </st", prompt)
    pieces = []
    n = len(byte_tokenizer.encode("abc </st", add_special_tokens=False))
    got = prefill_and_generate(
        model, byte_tokenizer, prompt, n, stop_strings=["</stop>"], on_text=pieces.append
    )
    assert got.finish_reason == "length" and got.text == "abc </st"
    assert pieces[-2:] == [" ", "</st"]  # held as a possible stop, released at the end
    assert "".join(pieces) == got.text


def test_streamed_multibyte_text_is_never_split(byte_tokenizer, prompt):
    text = "naïve ✓ 日本 ok"
    model, script = _scripted(byte_tokenizer, text, prompt)
    pieces = []
    got = prefill_and_generate(model, byte_tokenizer, prompt, len(script), on_text=pieces.append)
    assert got.text == text and "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)
    assert len(pieces) < len(script)  # some tokens were held until their character completed


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_new_tokens": 0},
        {"max_new_tokens": -3},
        {"input_ids": []},
        {"input_ids": torch.zeros(2, 3, dtype=torch.long)},
        {"input_ids": [1, 100000]},
        {"prefill_chunk": 0},
        {"stop_strings": [""]},
    ],
)
def test_bad_requests_raise_clear_errors(tiny_model, byte_tokenizer, kwargs):
    args = {"input_ids": [3, 4, 5], "max_new_tokens": 4, **kwargs}
    with pytest.raises(EngineError):
        prefill_and_generate(tiny_model, byte_tokenizer, **args)


def test_runs_on_another_model_seed(make_tiny_llama, byte_tokenizer, prompt):
    # Guards against a greedy match that only holds because a model repeats itself.
    model = make_tiny_llama(len(byte_tokenizer), seed=1)
    ids = torch.tensor([prompt])
    ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=False)
    got = prefill_and_generate(model, byte_tokenizer, prompt, 16, prefill_chunk=4)
    assert got.token_ids == ref[0, len(prompt) :].tolist()


def test_prompt_cache_reuses_a_conversation_prefix(tiny_model, byte_tokenizer, prompt):
    from tandem.engine.generate import PromptCache

    cache = PromptCache()
    first = prefill_and_generate(tiny_model, byte_tokenizer, prompt, 8, prompt_cache=cache)
    assert first.n_cached == 0 and cache.ids == prompt + first.token_ids[:-1]
    follow_up = prompt + first.token_ids + byte_tokenizer("and then?", add_special_tokens=False)["input_ids"]
    reused = prefill_and_generate(tiny_model, byte_tokenizer, follow_up, 12, prompt_cache=cache)
    fresh = prefill_and_generate(tiny_model, byte_tokenizer, follow_up, 12)
    assert reused.n_cached == len(prompt) + len(first.token_ids) - 1
    assert reused.token_ids == fresh.token_ids
    # A prompt that does not extend the cached ids starts afresh, with the same result as no cache.
    other = prefill_and_generate(tiny_model, byte_tokenizer, prompt[1:], 6, prompt_cache=cache)
    assert other.n_cached == 0
    assert other.token_ids == prefill_and_generate(tiny_model, byte_tokenizer, prompt[1:], 6).token_ids


def test_a_cancel_event_ends_generation_before_the_next_step(tiny_model, byte_tokenizer, prompt, greedy32):
    import threading

    cancel = threading.Event()
    pieces: list[str] = []

    def on_text(piece: str) -> None:  # the consumer goes away after the first few tokens
        pieces.append(piece)
        if len(pieces) == 3:
            cancel.set()

    got = prefill_and_generate(tiny_model, byte_tokenizer, prompt, 32, on_text=on_text, cancel=cancel)
    assert got.finish_reason == "cancelled"
    assert 3 <= got.n_generated < 32
    assert got.token_ids == greedy32.token_ids[: got.n_generated]


def test_a_gpu_model_prefills_long_prompts_in_chunks_and_a_cpu_model_at_once():
    from tandem.engine.generate import GPU_PREFILL_CHUNK, default_prefill_chunk

    cpu_model = torch.nn.Linear(2, 2)
    assert default_prefill_chunk(cpu_model, 10_000) == 10_000

    class Gpu(torch.nn.Module):  # a model with a parameter on a GPU, without one here
        def parameters(self, recurse=True):
            class P:
                device = torch.device("cuda:0")

            yield P()

    assert default_prefill_chunk(Gpu(), 10_000) == GPU_PREFILL_CHUNK
    assert default_prefill_chunk(Gpu(), 100) == 100
