"""What the MoE families share: expert metadata, the routed experts' tensor map, shape checks.

llama.cpp stacks a layer's routed experts into 3-D tensors `ffn_{gate,up,down}_exps`
([E, I, H], [E, I, H], [E, H, I] in torch order) and keeps the router as
`ffn_gate_inp` [E, H]. transformers 5.x fuses gate and up into
`mlp.experts.gate_up_proj` [E, 2I, H] (gate first); `down_proj` is [E, H, I] as in GGUF.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass

from tandem.errors import GGUFError, UnsupportedError
from tandem.weights.arch.base import Meta
from tandem.weights.arch.llama import DENSE_LAYER_TENSORS

ATTENTION_TENSORS = {k: v for k, v in DENSE_LAYER_TENSORS.items() if not k.startswith("mlp.")}
ROUTED_EXPERT_TENSORS = {
    "mlp.gate.weight": "ffn_gate_inp.weight",
    "mlp.experts.down_proj": "ffn_down_exps.weight",
}
FUSED_EXPERT_TENSORS = {"mlp.experts.gate_up_proj": ("ffn_gate_exps.weight", "ffn_up_exps.weight")}

_EXPERT_SUFFIXES = (".ffn_gate_exps.weight", ".ffn_up_exps.weight", ".ffn_down_exps.weight")


def has_routed_experts(tensor_names: Collection[str]) -> bool:
    return any(name.endswith(_EXPERT_SUFFIXES) for name in tensor_names)


@dataclass(frozen=True)
class Experts:
    """The routed experts of every MoE layer, as the metadata describes them."""

    count: int  # E
    used: int  # k: experts per token
    width: int  # I: intermediate size of one expert
    width_key: str  # the metadata key `width` came from, for messages


def read_experts(m: Meta, arch: str, width_key: str, width_default: int | None) -> Experts:
    count = m.int("expert_count", maximum=1 << 16)
    used = m.int("expert_used_count", maximum=count)
    width = m.int(width_key, width_default)
    # llama.cpp scales the routing weights by this factor when it is neither 0 nor 1;
    # these families' Hugging Face routers have no such factor.
    scale = m.float("expert_weights_scale", 1.0)
    if scale not in (0.0, 1.0):
        raise UnsupportedError(f"{arch}.expert_weights_scale = {scale} is not supported for {arch}")
    return Experts(count, used, width, f"{arch}.{width_key}")


def check_expert_shapes(
    shapes: Mapping[str, tuple[int, ...]], arch: str, experts: Experts, hidden: int, layers: int
) -> None:
    """Every layer's router and stacked experts must have the shapes the metadata gives."""
    e, i, h = experts.count, experts.width, hidden
    says = (
        f"metadata {arch}.expert_count = {e}, {experts.width_key} = {i}, {arch}.embedding_length = {h} give"
    )
    for layer in range(layers):
        prefix = f"blk.{layer}."
        if prefix + "ffn_gate_inp.weight" in shapes and not has_routed_experts(
            [n for n in shapes if n.startswith(prefix)]
        ):
            raise UnsupportedError(
                f"layer {layer} stores its experts one tensor each (an old llama.cpp layout); "
                "convert the model again with a current llama.cpp"
            )
        expected = {
            "ffn_gate_inp.weight": (e, h),
            "ffn_gate_exps.weight": (e, i, h),
            "ffn_up_exps.weight": (e, i, h),
            "ffn_down_exps.weight": (e, h, i),
        }
        check_shapes(shapes, prefix, expected, says)


def check_shapes(
    shapes: Mapping[str, tuple[int, ...]], prefix: str, expected: Mapping[str, tuple[int, ...]], says: str
) -> None:
    for short, shape in expected.items():
        name = prefix + short
        actual = shapes.get(name)
        if actual is None:
            raise GGUFError(f"tensor {name!r} is missing")
        if tuple(actual) != tuple(shape):
            raise GGUFError(f"tensor {name!r} has shape {list(actual)}, but {says} {list(shape)}")


def check_attention_shapes(shapes: Mapping[str, tuple[int, ...]], arch: str, kwargs: Mapping) -> None:
    """Q, K and V of every layer must match the head counts and head size of the metadata."""
    heads, kv_heads = kwargs["num_attention_heads"], kwargs["num_key_value_heads"]
    head_dim, hidden = kwargs["head_dim"], kwargs["hidden_size"]
    says = (
        f"metadata {arch}.attention.head_count = {heads}, head_count_kv = {kv_heads}, "
        f"key_length = {head_dim}, embedding_length = {hidden} give"
    )
    expected = {
        "attn_q.weight": (heads * head_dim, hidden),
        "attn_k.weight": (kv_heads * head_dim, hidden),
        "attn_v.weight": (kv_heads * head_dim, hidden),
    }
    for layer in range(kwargs["num_hidden_layers"]):
        check_shapes(shapes, f"blk.{layer}.", expected, says)
