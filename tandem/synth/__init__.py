"""Full-size random GGUF files with the shapes of real MoE models, for benchmarks.

    from tandem.synth import write_shape
    write_shape("qwen3-30b-a3b", "/tmp/q3.gguf", quant="Q4_K_M", layers=4)

- shapes.py: the model specs (SHAPES, get_shape), numbers from each config.json
- tensors.py: a spec's tensor table, named and shaped as llama.cpp loads it
- quant_mix.py: llama-quantize's per-tensor type choice (Q4_K_M, Q5_K_M, Q6_K, Q8_0)
- random_blocks.py: random blocks with sane scales, streamed from templates
- metadata.py: the architecture's GGUF keys and the tokenizer
- writer.py: plan() and write_shape() / write_spec()
- tiny.py, tiny_deepseek.py: tiny random Hugging Face models of every family written as
  llama.cpp writes them (write_tiny, `tandem synth --tiny`; the tests' reference models)

The weights are random (values of std ~0.02, norms ~1), so outputs are
finite but meaningless; the tokenizer is the embedded Qwen2.5 one, padded or
cut down to the shape's vocabulary size (see metadata.add_tokenizer).
"""

from tandem.synth.shapes import SHAPES, ShapeSpec, get_shape
from tandem.synth.writer import Plan, plan, write_shape, write_spec

__all__ = ["SHAPES", "Plan", "ShapeSpec", "get_shape", "plan", "write_shape", "write_spec"]
