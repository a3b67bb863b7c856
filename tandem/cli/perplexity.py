"""`tandem perplexity`: perplexity of a text file, computed as llama.cpp's llama-perplexity does."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tandem.cli.common import add_model_arguments, adds_bos, encode_prompt, load_from_args, positive_int
from tandem.errors import TandemError

HELP = "measure perplexity on a text file (non-overlapping windows, second half of each scored)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--text-file", "-f", required=True, metavar="FILE", help="UTF-8 text to score")
    parser.add_argument(
        "--ctx",
        "-c",
        type=positive_int,
        default=512,
        metavar="N",
        help="window size in tokens (default: 512)",
    )
    parser.add_argument("--chunks", type=positive_int, metavar="K", help="score at most K windows")
    add_model_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from tandem.engine.perplexity import perplexity

    path = Path(args.text_file)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise TandemError(f"{path} is not UTF-8 text") from None
    if args.ctx < 4:
        raise TandemError("--ctx must be at least 4")
    loaded = load_from_args(args)
    tok = loaded.tokenizer
    ids = encode_prompt(tok, text)  # starts with BOS where the model adds one, as llama.cpp tokenizes
    bos = tok.bos_token_id if adds_bos(tok) else None

    def progress(chunk: int, total: int, running: float) -> None:
        if chunk == 1:
            print(f"{len(ids)} tokens, {total} windows of {args.ctx}", file=sys.stderr)
        print(f"[{chunk}]{running:.4f}", end=" " if chunk < total else "\n", file=sys.stderr, flush=True)

    result = perplexity(loaded.model, ids, args.ctx, n_chunks=args.chunks, bos_id=bos, progress=progress)
    print(
        f"PPL = {result.ppl:.4f} +/- {result.ppl_stderr:.4f} ({result.n_chunks} chunks of {args.ctx}, {result.n_tokens_scored} tokens scored)"
    )
    return 0
