"""`tandem generate`: one completion for scripts, streamed to stdout, timings to stderr."""

from __future__ import annotations

import argparse
import sys

from tandem.cli.common import (
    add_model_arguments,
    add_sampling_arguments,
    encode_prompt,
    load_from_args,
    print_stats,
    sampling_params,
)
from tandem.errors import TandemError

HELP = "generate a completion of a prompt (greedy with --temperature 0)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prompt", "-p", help="the prompt text (default: read standard input)")
    parser.add_argument(
        "--chat", action="store_true", help="send the prompt as a user message through the chat template"
    )
    parser.add_argument("--system", help="system message, with --chat")
    parser.add_argument("--quiet", "-q", action="store_true", help="don't print timings")
    add_model_arguments(parser)
    add_sampling_arguments(parser, max_new_tokens=128)


def run(args: argparse.Namespace) -> int:
    from tandem.engine.generate import prefill_and_generate
    from tandem.weights.chat_template import render_chat

    prompt = args.prompt if args.prompt is not None else sys.stdin.read()
    if not prompt:
        raise TandemError("the prompt is empty")
    sampling = sampling_params(args)  # validate before the slow load
    loaded = load_from_args(args)
    tok = loaded.tokenizer
    if args.chat:
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
            {"role": "user", "content": prompt}
        ]
        prompt = render_chat(
            loaded.chat_template,
            messages,
            add_generation_prompt=True,
            bos_token=tok.bos_token,
            eos_token=tok.eos_token,
        )
    result = prefill_and_generate(
        loaded.model,
        tok,
        encode_prompt(tok, prompt),
        args.max_new_tokens,
        sampling=sampling,
        stop_token_ids=loaded.stop_token_ids,
        stop_strings=args.stop,
        on_text=lambda piece: print(piece, end="", flush=True),
    )
    print(flush=True)
    if not args.quiet:
        print_stats(result)
    return 0
