"""`tandem synth`: random-weight GGUF files with the shapes of real MoE models, for benchmarks."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tandem.cli.common import positive_int
from tandem.errors import TandemError

HELP = "write a random-weight GGUF with a real model's shapes (benchmarks; outputs are meaningless)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from tandem.synth import SHAPES

    parser.add_argument(
        "--shape", required=True, choices=sorted(SHAPES), help="the real model whose shapes to copy"
    )
    parser.add_argument("--out", "-o", required=True, metavar="FILE", help="the GGUF file to write")
    parser.add_argument(
        "--quant", default="Q4_K_M", help="llama-quantize mix: Q4_K_M, Q5_K_M, Q6_K, Q8_0 (default Q4_K_M)"
    )
    parser.add_argument("--layers", type=positive_int, metavar="N", help="write only the first N layers")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--dry-run", action="store_true", help="print the tensor plan and sizes, write nothing"
    )


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from tandem.synth import get_shape, plan, write_shape

    spec = get_shape(args.shape)
    if args.layers and args.layers > spec.n_layer:
        raise TandemError(f"{args.shape} has {spec.n_layer} layers; --layers {args.layers} is too many")
    layout = plan(spec, args.quant, args.layers)
    gib = 1 << 30
    print(f"{args.shape}: {len(layout.tensors)} tensors, {layout.data_bytes / gib:.2f} GiB", file=sys.stderr)
    for name, size in sorted(layout.bytes_by_type().items()):
        print(f"  {name:6} {size / gib:8.2f} GiB", file=sys.stderr)
    if args.dry_run:
        return 0
    out = Path(args.out)
    if out.is_dir():
        raise TandemError(f"{out} is a directory; --out names the file to write")
    bar = tqdm(total=layout.data_bytes, unit="B", unit_scale=True, desc="writing", file=sys.stderr)
    try:
        write_shape(
            args.shape, out, args.quant, args.layers, args.seed, lambda done, total: bar.update(done - bar.n)
        )
    finally:
        bar.close()
    print(out)
    return 0
