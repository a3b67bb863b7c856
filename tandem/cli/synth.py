"""`tandem synth`: random-weight GGUF files, either with the shapes of a real MoE model
(`--shape`, for benchmarks) or tiny (`--tiny --arch X`, for trying and testing the CLI)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tandem.cli.common import positive_int
from tandem.errors import TandemError

HELP = "write a random-weight GGUF: a real model's shapes (--shape) or a tiny model (--tiny)"
TINY_DEFAULT_QUANT = "F32"
SHAPE_DEFAULT_QUANT = "Q4_K_M"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from tandem.synth import SHAPES
    from tandem.synth.tiny import TINY_ARCHS, TINY_QUANTS

    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--shape", choices=sorted(SHAPES), help="the real model whose shapes to copy")
    mode.add_argument(
        "--tiny", action="store_true", help="a tiny model of --arch with a byte-level tokenizer"
    )
    parser.add_argument("--arch", choices=TINY_ARCHS, help="with --tiny: the architecture")
    parser.add_argument(
        "--variant",
        choices=("v2", "v3"),
        default="v3",
        help="with --tiny --arch deepseek2: DeepSeek-V3 routing (default) or V2",
    )
    parser.add_argument("--out", "-o", required=True, metavar="FILE", help="the GGUF file to write")
    parser.add_argument(
        "--quant",
        help=f"--shape: llama-quantize mix Q4_K_M, Q5_K_M, Q6_K, Q8_0 (default {SHAPE_DEFAULT_QUANT}); "
        f"--tiny: tensor type {', '.join(TINY_QUANTS)} (default {TINY_DEFAULT_QUANT})",
    )
    parser.add_argument(
        "--layers", type=positive_int, metavar="N", help="with --shape: write only the first N layers"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--tokenizer-from",
        metavar="GGUF",
        help="with --shape: copy the byte-level BPE tokenizer of this GGUF (default: the embedded Qwen2.5 model's)",
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="with --shape: print the tensor plan and sizes, write nothing"
    )


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if out.is_dir():
        raise TandemError(f"{out} is a directory; --out names the file to write")
    if args.tiny:
        return _run_tiny(args, out)
    if args.arch:
        raise TandemError("--arch goes with --tiny; --shape already names the architecture")
    return _run_shape(args, out)


def _run_tiny(args: argparse.Namespace, out: Path) -> int:
    from tandem.synth.tiny import TINY_QUANTS, write_tiny

    if not args.arch:
        raise TandemError("--tiny needs --arch")
    if args.layers or args.dry_run or args.tokenizer_from:
        raise TandemError("--layers, --dry-run and --tokenizer-from go with --shape")
    quant = args.quant or TINY_DEFAULT_QUANT
    if quant not in TINY_QUANTS:
        raise TandemError(f"--quant for --tiny must be one of {', '.join(TINY_QUANTS)}, got {quant!r}")
    write_tiny(args.arch, out, quant, args.seed, args.variant)
    print(out)
    return 0


def _run_shape(args: argparse.Namespace, out: Path) -> int:
    from tqdm import tqdm

    from tandem.synth import get_shape, plan, write_shape

    spec = get_shape(args.shape)
    if args.layers and args.layers > spec.n_layer:
        raise TandemError(f"{args.shape} has {spec.n_layer} layers; --layers {args.layers} is too many")
    quant = args.quant or SHAPE_DEFAULT_QUANT
    layout = plan(spec, quant, args.layers)
    gib = 1 << 30
    print(f"{args.shape}: {len(layout.tensors)} tensors, {layout.data_bytes / gib:.2f} GiB", file=sys.stderr)
    for name, size in sorted(layout.bytes_by_type().items()):
        print(f"  {name:6} {size / gib:8.2f} GiB", file=sys.stderr)
    if args.dry_run:
        return 0
    source = _tokenizer_source(args.tokenizer_from) if args.tokenizer_from else None
    bar = tqdm(total=layout.data_bytes, unit="B", unit_scale=True, desc="writing", file=sys.stderr)
    try:
        write_shape(
            args.shape,
            out,
            quant,
            args.layers,
            args.seed,
            lambda done, total: bar.update(done - bar.n),
            tokenizer_source=source,
        )
    finally:
        bar.close()
    print(out)
    return 0


def _tokenizer_source(path: str) -> dict:
    from tandem.weights.gguf_file import read_metadata

    metadata = read_metadata(Path(path))
    if metadata.get("tokenizer.ggml.model") != "gpt2" or "tokenizer.ggml.merges" not in metadata:
        raise TandemError(f"{path} holds no byte-level BPE (gpt2) tokenizer to copy")
    return metadata
