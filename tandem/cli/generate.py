"""`tandem generate`: one completion for scripts, streamed to stdout, timings to stderr."""

from __future__ import annotations

import argparse
import sys

from tandem.cli.common import (
    add_model_arguments,
    add_sampling_arguments,
    chat_prompt_ids,
    encode_prompt,
    generate_streaming,
    load_from_args,
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
    prompt = args.prompt if args.prompt is not None else sys.stdin.read()
    if not prompt:
        raise TandemError("the prompt is empty")
    sampling = sampling_params(args)  # validate before the slow load
    loaded = load_from_args(args)
    if args.chat:
        system = [{"role": "system", "content": args.system}] if args.system else []
        ids = chat_prompt_ids(loaded, [*system, {"role": "user", "content": prompt}])
    else:
        ids = encode_prompt(loaded.tokenizer, prompt)
    generate_streaming(loaded, ids, args, sampling)
    return 0
