"""The smallest GPU budget (GiB) whose plan keeps every routed expert on the CPU engine and
puts the rest, the token table included, on the GPU: the placement the hybrid benchmarks
measure. Usage: python benchmarks/experts_on_cpu_budget.py FILE.gguf [CTX]  (CTX: 4096,
tandem's planning default)."""

from __future__ import annotations

import math
import sys

from tandem.inject.loader import default_rules
from tandem.inject.plan import GIB, RESERVE_FIXED, RESERVE_FRACTION, plan_placement
from tandem.inject.rules import load_rules
from tandem.weights.arch import config_of
from tandem.weights.gguf_file import GGUFFile


def main() -> int:
    path, ctx = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 4096
    with GGUFFile.open(path) as gguf:
        config = config_of(gguf)
        rules = load_rules(default_rules(gguf.architecture, gguf.tensors))
        alone = plan_placement(gguf, config, rules, 1 << 50, ctx, reserve=0)
        needed = alone.dense_bytes + alone.kv_bytes
        gib = math.ceil((needed + RESERVE_FIXED) / (1 - RESERVE_FRACTION) / GIB * 100) / 100
        planned = plan_placement(gguf, config, rules, int(gib * GIB), ctx)
        if planned.gpu_expert_layers or not planned.table_on_gpu:
            raise SystemExit(f"no budget in hundredths of a GiB keeps {path}'s experts on the CPU alone")
    print(f"{gib:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
