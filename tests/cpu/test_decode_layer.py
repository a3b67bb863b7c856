"""Fused decode layers (one native call per layer and token) against the same layers' modules.

Tiny random models of every family load with the engine; after a prompt, one decode
step runs fused, and each layer's own modules (Hugging Face's code around tandem's
engine operators) then run on a copy of the cache from before the step, with the
same inputs. Bounds, asserted on each layer's output and on the key and value it
cached (relative L2):
- F16: below 1e-5. The fused layer reads the same weights with the same kernels;
  its SiLU and GELU, softmax and residual sums are its own float32 code (measured
  ≤ 3e-7).
- Q8_0: below 1e-3, since an activation that rounds to the other 8-bit step
  after such a last-bit difference moves one product.
"""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import DynamicCache

from tandem.cpu.engine import DEFAULT_DECODE_TASKS, _native, decode_layer_spec, default_engine
from tandem.engine.generate import prefill_and_generate
from tandem.engine.kv_cache import GrowingLayer, new_cache
from tandem.engine.model_io import cache_kwarg
from tandem.inject.model import load_model
from tandem.ops.decode_layer_cpu import FUSED_ENV, decoder_layers
from tandem.ops.decode_step_cpu import FastDecode
from tandem.synth.tiny import TINY_ARCHS, write_tiny

FUSABLE = [a for a in TINY_ARCHS if a != "deepseek2"]
BOUND = {"F16": 1e-5, "Q8_0": 1e-3}
PROMPT = torch.randint(3, 400, (1, 9), generator=torch.Generator().manual_seed(2))


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("decode_layer")


def rel(a, b) -> float:
    return float((a - b).norm() / b.norm())


def load(tiny_dir, arch, quant="F16"):
    path = tiny_dir / f"{arch}-{quant}.gguf"
    if not path.exists():
        write_tiny(arch, path, quant)
    return load_model(path, progress=False)


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_layers_fuse_when_all_their_parts_run_on_the_engine(tiny_dir, arch):
    model = load(tiny_dir, arch).model
    report = model._tandem_decode_layers
    fused = {i for i, why in report.items() if why == "fused"}
    if arch == "deepseek2":  # multi-head latent attention: not this layer's form
        assert not fused
        return
    assert fused == set(range(len(decoder_layers(model))))


@pytest.mark.parametrize("quant", ["F16", "Q8_0"])
@pytest.mark.parametrize("arch", FUSABLE)
def test_a_fused_step_equals_the_layer_modules(tiny_dir, arch, quant):
    model = load(tiny_dir, arch, quant).model
    layers = decoder_layers(model)
    seen = {}
    for i, layer in enumerate(layers):
        layer.register_forward_pre_hook(
            lambda m, a, k, i=i: seen.__setitem__(("in", i), (a, dict(k))), with_kwargs=True
        )
        layer.register_forward_hook(lambda m, a, o, i=i: seen.__setitem__(("out", i), o))
    fused = range(len(layers))
    with torch.inference_mode():
        cache = new_cache(model)
        model(input_ids=PROMPT, **{cache_kwarg(model): cache}, use_cache=True)
        before = copy.deepcopy(cache)
        calls = [layer.forward.calls for layer in layers if hasattr(layer.forward, "calls")]
        through_layers = model.forward.original  # Hugging Face's model forward, not the fast step
        through_layers(input_ids=torch.tensor([[17]]), **{cache_kwarg(model): cache}, use_cache=True)
        after = [layer.forward.calls for layer in layers if hasattr(layer.forward, "calls")]
        assert [b - a for a, b in zip(calls, after, strict=True)] == [1] * len(fused)
        for i in sorted(fused):
            args, kwargs = seen[("in", i)]
            key = "cache" if "cache" in kwargs else "past_key_values"
            kwargs[key] = before
            want = layers[i].forward.original(*args, **kwargs)
            assert rel(seen[("out", i)], want) < BOUND[quant], i
            got_layer, want_layer = cache.layers[i], before.layers[i]
            assert got_layer.get_seq_length() == want_layer.get_seq_length() == PROMPT.shape[1] + 1
            assert rel(got_layer.keys[:, :, -1], want_layer.keys[:, :, -1]) < BOUND[quant]
            assert rel(got_layer.values[:, :, -1], want_layer.values[:, :, -1]) < BOUND[quant]
            assert torch.equal(got_layer.keys[:, :, :-1], want_layer.keys[:, :, :-1])


@pytest.mark.parametrize("arch", ["qwen2", "qwen3moe", "qwen2moe", "gemma3"])
def test_greedy_generation_is_the_same_fused_or_not(tiny_dir, arch, monkeypatch):
    fused = load(tiny_dir, arch)
    monkeypatch.setenv(FUSED_ENV, "0")
    plain = load(tiny_dir, arch)
    assert all(why == f"{FUSED_ENV} is off" for why in plain.model._tandem_decode_layers.values())
    prompt = PROMPT[0].tolist()
    runs = [prefill_and_generate(m.model, m.tokenizer, prompt, 24) for m in (fused, plain)]
    assert runs[0].token_ids == runs[1].token_ids
    assert fused.model.forward.calls == 23  # every decode step after the prompt took the fast step


@pytest.mark.parametrize("quant", ["F16", "Q8_0"])
@pytest.mark.parametrize("arch", FUSABLE)
def test_the_fast_step_equals_the_model_forward(tiny_dir, arch, quant):
    model = load(tiny_dir, arch, quant).model
    assert isinstance(model.forward, FastDecode)
    with torch.inference_mode():
        cache = new_cache(model)
        model(input_ids=PROMPT, **{cache_kwarg(model): cache}, use_cache=True)
        for token in (17, 3, 250):  # past the tiny Gemma's 8-position window
            before = copy.deepcopy(cache)
            calls = model.forward.calls
            got = model(input_ids=torch.tensor([[token]]), **{cache_kwarg(model): cache}, use_cache=True)
            want = model.forward.original(
                input_ids=torch.tensor([[token]]), **{cache_kwarg(model): before}, use_cache=True
            )
            assert model.forward.calls == calls + 1
            assert got.logits.shape == want.logits.shape == (1, 1, model.config.vocab_size)
            assert rel(got.logits, want.logits) < 1e-6  # the same native steps, called from elsewhere
            for a, b in zip(cache.layers, before.layers, strict=True):
                assert a.get_seq_length() == b.get_seq_length()
                assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)


def test_the_split_of_a_steps_work_leaves_its_logits_alone(tiny_dir):
    """How one-token loops divide their rows (TANDEM_CPU_DECODE_TASKS: the fused layers'
    matrix-vector loops and the experts; TANDEM_CPU_DECODE_TASK_KIB: the most bytes a task
    reads; TANDEM_CPU_DECODE_LOOPS: the experts in one loop or two) changes no bit: every output row is one kernel's dot, summed in a fixed order."""
    model = load(tiny_dir, "qwen3moe", "Q8_0").model
    logits = []
    with torch.inference_mode():
        cache = new_cache(model)
        model(input_ids=PROMPT, **{cache_kwarg(model): cache}, use_cache=True)
        splits = [
            (True, DEFAULT_DECODE_TASKS, 256),
            (True, 1, 256),
            (True, 64, 256),
            (True, 1, 16),
            (False, 1, 256),
        ]
        for one_loop, tasks, kib in splits:
            _native().set_decode_split(one_loop, tasks, kib << 10)
            step_cache = copy.deepcopy(cache)
            calls = model.forward.calls
            out = model(input_ids=torch.tensor([[17]]), **{cache_kwarg(model): step_cache}, use_cache=True)
            assert model.forward.calls == calls + 1  # the fused step
            logits.append(out.logits)
    _native().set_decode_split(True, DEFAULT_DECODE_TASKS)
    for other in logits[1:]:
        assert torch.equal(other, logits[0])


@pytest.mark.parametrize("prompt_len", [9, 300])  # one chunk of the cache, then several merged
def test_o_by_kv_head_groups_gives_the_whole_rows_logits(tiny_dir, prompt_len):
    """TANDEM_CPU_DECODE_O_GROUPS: o by kv-head groups of columns inside the attention's loop
    (2 groups of 64 Q8_0 columns here) sums the groups' partials in group order: the logits
    of the whole-row dots within float rounding, and the same bits for every split."""
    model = load(tiny_dir, "qwen3moe", "Q8_0").model
    config = model.config
    assert config.num_key_value_heads >= 2  # the grouped path applies
    assert config.num_attention_heads * config.head_dim // config.num_key_value_heads % 32 == 0
    prompt = torch.randint(3, 400, (1, prompt_len), generator=torch.Generator().manual_seed(prompt_len))
    logits = {}
    with torch.inference_mode():
        cache = new_cache(model)
        model(input_ids=prompt, **{cache_kwarg(model): cache}, use_cache=True)
        for groups, tasks in (
            (False, DEFAULT_DECODE_TASKS),
            (True, DEFAULT_DECODE_TASKS),
            (True, 1),
            (True, 64),
        ):
            _native().set_decode_output_by_groups(groups)
            _native().set_decode_split(True, tasks, 256 << 10)
            step_cache = copy.deepcopy(cache)
            calls = model.forward.calls
            out = model(input_ids=torch.tensor([[17]]), **{cache_kwarg(model): step_cache}, use_cache=True)
            assert model.forward.calls == calls + 1  # the fused step
            logits[(groups, tasks)] = out.logits
    _native().set_decode_output_by_groups(False)
    _native().set_decode_split(True, DEFAULT_DECODE_TASKS)
    whole, grouped = logits[(False, DEFAULT_DECODE_TASKS)], logits[(True, DEFAULT_DECODE_TASKS)]
    assert rel(grouped, whole) < 1e-5
    for tasks in (1, 64):
        assert torch.equal(logits[(True, tasks)], grouped)


def test_the_o_groups_switch(monkeypatch):
    from tandem.cpu.engine import DECODE_O_GROUPS_ENV, CPUEngine
    from tandem.errors import TandemError

    for value, on in (("1", True), ("0", False), ("", False)):
        monkeypatch.setenv(DECODE_O_GROUPS_ENV, value)
        engine = CPUEngine(threads=2, variant=None, prefill="off")
        assert engine.decode_o_groups == on == _native().decode_output_by_groups()
    monkeypatch.setenv(DECODE_O_GROUPS_ENV, "sometimes")
    with pytest.raises(TandemError, match=DECODE_O_GROUPS_ENV):
        CPUEngine(threads=2, variant=None, prefill="off")
    monkeypatch.delenv(DECODE_O_GROUPS_ENV)
    CPUEngine(threads=2, variant=None, prefill="off")  # the process-wide switch back off


def test_other_calls_take_the_layer_modules(tiny_dir):
    model = load(tiny_dir, "qwen3moe").model
    layer = decoder_layers(model)[0]
    with torch.inference_mode():
        dynamic = DynamicCache(config=model.config)  # a cache the fused path cannot write into
        model(input_ids=PROMPT, **{cache_kwarg(model): dynamic}, use_cache=True)
        model(input_ids=torch.tensor([[5]]), **{cache_kwarg(model): dynamic}, use_cache=True)
        batch = new_cache(model)  # two sequences
        model(input_ids=PROMPT.repeat(2, 1), **{cache_kwarg(model): batch}, use_cache=True)
        model(input_ids=torch.tensor([[5], [6]]), **{cache_kwarg(model): batch}, use_cache=True)
        masked = new_cache(model)  # an explicit padding mask
        model(input_ids=PROMPT, **{cache_kwarg(model): masked}, use_cache=True)
        mask = torch.ones(1, PROMPT.shape[1] + 1, dtype=torch.long)
        mask[0, 0] = 0
        model(
            input_ids=torch.tensor([[5]]), attention_mask=mask, **{cache_kwarg(model): masked}, use_cache=True
        )
    assert layer.forward.calls == 0
    assert (
        isinstance(batch.layers[0], GrowingLayer) and batch.layers[0].get_seq_length() == PROMPT.shape[1] + 1
    )


def test_an_incomplete_spec_is_a_one_line_error():
    spec = decode_layer_spec()
    spec.hidden, spec.n_heads, spec.n_kv_heads, spec.head_dim = 64, 4, 2, 16
    with pytest.raises(ValueError, match=r"^decode layer: q is missing$"):
        default_engine().decode_layer(spec)
    spec.n_kv_heads = 3
    with pytest.raises(ValueError, match="not a multiple"):
        default_engine().decode_layer(spec)
    with pytest.raises(ValueError, match="activation"):
        spec.act = "relu"
