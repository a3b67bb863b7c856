"""The tensor table of a shape: every tensor's llama.cpp name and shape, in file order.

Shapes are in torch order (outermost first), the reverse of the ggml `ne`
that llama.cpp's loader lists (src/models/<arch>.cpp create_tensor calls).
Expert tensors are the merged 3-D form [n_expert, out, in] every current
converter writes.
"""

from __future__ import annotations

from dataclasses import dataclass

from tandem.synth.shapes import ShapeSpec


@dataclass(frozen=True)
class TensorSpec:
    """One tensor to write. kind: "weight" (quantized by the mix), "norm" (F32,
    around 1), "router" (F32 ffn_gate_inp, never quantized by llama.cpp),
    "bias" (F32 exp_probs_b)."""

    name: str
    shape: tuple[int, ...]
    kind: str = "weight"

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def row(self) -> int:
        """Row length: what a block type must divide."""
        return self.shape[-1]


def tensor_table(spec: ShapeSpec, layers: int | None = None) -> list[TensorSpec]:
    """All tensors of `spec` with its first `layers` layers (default: all)."""
    n_layer = spec.n_layer if layers is None else layers
    if not 1 <= n_layer <= spec.n_layer:
        raise ValueError(f"shape {spec.name!r}: layers must be 1 to {spec.n_layer}, got {n_layer}")
    h = spec.hidden
    out = [TensorSpec("token_embd.weight", (spec.vocab, h))]
    for i in range(n_layer):
        out += _layer(spec, i)
    out += [TensorSpec("output_norm.weight", (h,), "norm"), TensorSpec("output.weight", (spec.vocab, h))]
    return out


def _layer(spec: ShapeSpec, i: int) -> list[TensorSpec]:
    p = f"blk.{i}."
    h = spec.hidden
    t = [TensorSpec(p + "attn_norm.weight", (h,), "norm")]
    t += _mla(spec, p) if spec.arch == "deepseek2" else _gqa(spec, p)
    t.append(TensorSpec(p + "ffn_norm.weight", (h,), "norm"))
    if i < spec.leading_dense:
        f = spec.ffn
        return [
            *t,
            TensorSpec(p + "ffn_gate.weight", (f, h)),
            TensorSpec(p + "ffn_up.weight", (f, h)),
            TensorSpec(p + "ffn_down.weight", (h, f)),
        ]
    e, f = spec.n_expert, spec.moe_ffn
    t.append(TensorSpec(p + "ffn_gate_inp.weight", (e, h), "router"))
    if spec.has_exp_probs_b:
        t.append(TensorSpec(p + "exp_probs_b.bias", (e,), "bias"))
    t += [
        TensorSpec(p + "ffn_gate_exps.weight", (e, f, h)),
        TensorSpec(p + "ffn_up_exps.weight", (e, f, h)),
        TensorSpec(p + "ffn_down_exps.weight", (e, h, f)),
    ]
    if spec.n_shared_expert:
        s = f * spec.n_shared_expert  # llama.cpp: n_ff_exp * n_expert_shared
        t += [
            TensorSpec(p + "ffn_gate_shexp.weight", (s, h)),
            TensorSpec(p + "ffn_up_shexp.weight", (s, h)),
            TensorSpec(p + "ffn_down_shexp.weight", (h, s)),
        ]
    return t


def _gqa(spec: ShapeSpec, p: str) -> list[TensorSpec]:
    h, d = spec.hidden, spec.head_dim
    q, kv = spec.n_head * d, spec.n_head_kv * d
    t = [
        TensorSpec(p + "attn_q.weight", (q, h)),
        TensorSpec(p + "attn_k.weight", (kv, h)),
        TensorSpec(p + "attn_v.weight", (kv, h)),
        TensorSpec(p + "attn_output.weight", (h, q)),
    ]
    if spec.qk_norm:
        t += [
            TensorSpec(p + "attn_q_norm.weight", (d,), "norm"),
            TensorSpec(p + "attn_k_norm.weight", (d,), "norm"),
        ]
    return t


def _mla(spec: ShapeSpec, p: str) -> list[TensorSpec]:
    m = spec.mla
    assert m is not None  # checked by ShapeSpec
    h, n = spec.hidden, spec.n_head
    q_head = m.qk_nope_head_dim + m.qk_rope_head_dim
    if m.q_lora_rank:
        t = [
            TensorSpec(p + "attn_q_a.weight", (m.q_lora_rank, h)),
            TensorSpec(p + "attn_q_a_norm.weight", (m.q_lora_rank,), "norm"),
            TensorSpec(p + "attn_q_b.weight", (n * q_head, m.q_lora_rank)),
        ]
    else:
        t = [TensorSpec(p + "attn_q.weight", (n * q_head, h))]
    # kv_b_proj is split and k_b transposed by the converter (MLA absorption):
    # attn_k_b ne {qk_nope, kv_lora, n_head}, attn_v_b ne {kv_lora, v_head, n_head}.
    return [
        *t,
        TensorSpec(p + "attn_kv_a_mqa.weight", (m.kv_lora_rank + m.qk_rope_head_dim, h)),
        TensorSpec(p + "attn_kv_a_norm.weight", (m.kv_lora_rank,), "norm"),
        TensorSpec(p + "attn_k_b.weight", (n, m.kv_lora_rank, m.qk_nope_head_dim)),
        TensorSpec(p + "attn_v_b.weight", (n, m.v_head_dim, m.kv_lora_rank)),
        TensorSpec(p + "attn_output.weight", (h, n * m.v_head_dim)),
    ]
