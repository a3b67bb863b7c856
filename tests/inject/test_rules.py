"""The rule engine: schema validation, first match wins, recursion, placement, clear errors."""

from __future__ import annotations

import pytest
import torch
from tiny_models import tiny_config, tiny_model, write_gguf
from torch import nn

from tandem.errors import RuleError, WeightError
from tandem.inject.injector import inject
from tandem.inject.loader import build_meta_model, optimize_and_load_gguf
from tandem.inject.rules import load_rules, parse_rules
from tandem.ops.linear import QuantLinear
from tandem.ops.norm import RMSNorm
from tandem.weights.arch import config_of
from tandem.weights.gguf_file import GGUFFile

LINEAR = "tandem.ops.linear.QuantLinear"


def _meta_model():
    return build_meta_model(tiny_config("qwen2"))


def test_first_matching_rule_wins():
    rules = parse_rules(
        f"""
- match: {{name: "mlp\\\\.down_proj$"}}
  replace: {{class: {LINEAR}, kwargs: {{dequant: call}}}}
- match: {{class: torch.nn.Linear}}
  replace: {{class: {LINEAR}}}
"""
    )
    model = _meta_model()
    placements, _ = inject(model, rules, model.config)
    down = model.model.layers[0].mlp.down_proj
    up = model.model.layers[0].mlp.up_proj
    assert isinstance(down, QuantLinear) and down.dequant == "call"
    assert isinstance(up, QuantLinear) and up.dequant == "load"
    assert {p.path for p in placements if p.rule.endswith("rule 1")} == {
        "model.layers.0.mlp.down_proj",
        "model.layers.1.mlp.down_proj",
    }


def test_recursive_false_stops_descent_and_places_subtree():
    rules = parse_rules(
        f"""
- match: {{name: "^model\\\\.layers\\\\.0$"}}
  replace: {{class: default, kwargs: {{generate_device: meta}}}}
  recursive: false
- match: {{class: torch.nn.Linear}}
  replace: {{class: {LINEAR}}}
"""
    )
    model = _meta_model()
    _, devices = inject(model, rules, model.config)
    assert isinstance(model.model.layers[0].mlp.up_proj, nn.Linear)  # not descended into
    assert isinstance(model.model.layers[1].mlp.up_proj, QuantLinear)
    assert devices["model.layers.0.mlp.up_proj"] == "meta"
    assert devices["model.layers.1.mlp"] == "cpu"


def test_class_match_by_dotted_path():
    rules = parse_rules(
        """
- match: {class: transformers.models.qwen2.modeling_qwen2.Qwen2RMSNorm}
  replace: {class: tandem.ops.norm.RMSNorm}
"""
    )
    model = _meta_model()
    inject(model, rules, model.config)
    assert isinstance(model.model.norm, RMSNorm)
    assert isinstance(model.model.layers[1].input_layernorm, RMSNorm)


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("- match: {class: tandem.ops.NoSuchOp}\n  replace: {class: default}", "rule 1"),
        (
            "- match: {class: no_such_module.Thing}\n  replace: {class: default}",
            "cannot import module 'no_such_module'",
        ),
        (
            f"- match: {{name: x}}\n  replace: {{class: {LINEAR}}}\n- match: {{name: y}}\n  replace: {{class: tandem.ops.linear.Nope}}",
            "rule 2",
        ),
        ("- match: {name: x}\n  replace: {class: torch.nn.Linear}", "not a tandem operator"),
        (
            f"- match: {{name: x}}\n  replace: {{class: {LINEAR}, kwargs: {{speed: 11}}}}",
            "takes no argument(s) speed",
        ),
        ("- match: {name: '(unclosed'}\n  replace: {class: default}", "not a valid regex"),
        ("- match: {name: x}\n  replace: {class: default}\n  recursiv: false", "unknown key(s) recursiv"),
        ("- match: {nam: x}\n  replace: {class: default}", "unknown key(s) nam"),
        ("- match: {name: x}\n  replace: {class: default, kwargs: {generate_device: gpu7}}", "not a device"),
        ("- match: {}\n  replace: {class: default}", "'match' must be a mapping"),
        ("- [1, 2]", "a rule is a mapping"),
        ("{a: 1}", "non-empty YAML list"),
        ("- match: {name: x\n  replace: [", "not valid YAML"),
        ("", "non-empty YAML list"),
    ],
)
def test_malformed_rules_name_the_problem(text, needle):
    with pytest.raises(RuleError) as info:
        parse_rules(text, "bad.yaml")
    message = str(info.value)
    assert needle in message and message.startswith("bad.yaml") and "\n" not in message


def test_operator_refusing_its_module_names_rule_and_module():
    rules = parse_rules(f"- match: {{name: 'input_layernorm$'}}\n  replace: {{class: {LINEAR}}}", "r.yaml")
    model = _meta_model()
    with pytest.raises(
        RuleError, match=r"r.yaml: rule 1 on model.layers.0.input_layernorm: .*replaces nn.Linear"
    ):
        inject(model, rules, model.config)


def test_invalid_operator_kwarg_value():
    rules = parse_rules(
        f"- match: {{class: torch.nn.Linear}}\n  replace: {{class: {LINEAR}, kwargs: {{dequant: never}}}}"
    )
    model = _meta_model()
    with pytest.raises(RuleError, match="dequant must be one of load, call"):
        inject(model, rules, model.config)


def test_missing_rule_file(tmp_path):
    with pytest.raises(RuleError, match="cannot read rule file"):
        load_rules(tmp_path / "absent.yaml")


def test_shipped_rule_files_parse():
    from tandem.inject.loader import RULES_DIR

    files = sorted(RULES_DIR.glob("*.yaml"))
    assert {f.stem for f in files} >= {"llama", "qwen2", "gemma3"}
    for f in files:
        assert load_rules(f)


def _write_with(tmp_path, arch, mutate):
    """A tiny GGUF whose tensor set was changed by `mutate(model)` before writing."""
    model = tiny_model(arch)
    mutate(model)
    return write_gguf(model, arch, tmp_path / "m.gguf")


def test_missing_tensor_is_named(tmp_path):
    def drop(model):
        del model.model.layers[1].mlp.up_proj.weight

    path = _write_with(tmp_path, "qwen2", drop)
    gguf_file = GGUFFile.open(path)
    config = config_of(gguf_file)
    with pytest.raises(WeightError, match=r"'blk\.1\.ffn_up\.weight'.*missing"):
        optimize_and_load_gguf(build_meta_model(config), "tandem/rules/qwen2.yaml", gguf_file, config)


def test_shape_mismatch_is_named(tmp_path):
    def shrink(model):
        layer = model.model.layers[0].mlp
        layer.down_proj.weight = nn.Parameter(torch.zeros(64, 32))

    path = _write_with(tmp_path, "qwen2", shrink)
    gguf_file = GGUFFile.open(path)
    config = config_of(gguf_file)
    with pytest.raises(
        WeightError, match=r"'blk\.0\.ffn_down\.weight' has shape \[64, 32\].*needs \[64, 96\]"
    ):
        optimize_and_load_gguf(build_meta_model(config), "tandem/rules/qwen2.yaml", gguf_file, config)


def test_unreplaced_modules_get_plain_weights(tmp_path):
    """With a rule file that replaces nothing, every parameter is dequantized into the HF modules."""
    reference = tiny_model("qwen2")
    path = write_gguf(reference, "qwen2", tmp_path / "m.gguf")
    rules = tmp_path / "none.yaml"
    rules.write_text("- match: {name: '.*'}\n  replace: {class: default, kwargs: {generate_device: cpu}}\n")
    gguf_file = GGUFFile.open(path)
    config = config_of(gguf_file)
    model = build_meta_model(config)
    optimize_and_load_gguf(model, rules, gguf_file, config)
    assert type(model.model.layers[0].mlp.up_proj) is nn.Linear
    assert torch.equal(model.model.layers[0].mlp.up_proj.weight, reference.model.layers[0].mlp.up_proj.weight)
