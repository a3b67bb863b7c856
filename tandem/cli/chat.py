"""`tandem chat`: an interactive, multi-turn conversation through the model's chat template."""

from __future__ import annotations

import argparse
import sys

from tandem.cli.common import (
    add_model_arguments,
    add_sampling_arguments,
    chat_prompt_ids,
    generate_streaming,
    load_from_args,
    sampling_params,
)
from tandem.errors import TandemError

HELP = "chat with a model (default: the embedded Qwen2.5-Coder-1.5B-Instruct); /clear, /exit"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--system", help="system message at the start of the conversation")
    add_model_arguments(parser)
    add_sampling_arguments(parser, max_new_tokens=512)


def run(args: argparse.Namespace) -> int:
    sampling = sampling_params(args)
    loaded = load_from_args(args)
    interactive = sys.stdin.isatty()
    print(
        f"tandem chat: {loaded.name}. Type /clear to forget the conversation, /exit to quit.", file=sys.stderr
    )
    if loaded.chat_template_is_fallback:
        print(
            "note: this model has no chat template; using tandem's plain fallback template", file=sys.stderr
        )
    from tandem.engine.generate import PromptCache

    start = [{"role": "system", "content": args.system}] if args.system else []
    history = list(start)
    cache = PromptCache()  # each turn prefills only what the conversation added
    while True:
        try:
            line = input("> " if interactive else "")
        except EOFError:
            break
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            break
        if text == "/clear":
            history = list(start)
            cache.clear()
            print("(conversation cleared)", file=sys.stderr)
            continue
        history.append({"role": "user", "content": line})
        try:
            ids = chat_prompt_ids(loaded, history)
        except TandemError as error:  # e.g. the template refuses the conversation: keep chatting
            history.pop()
            print(f"tandem: error: {error}", file=sys.stderr)
            continue
        if len(ids) + args.max_new_tokens > loaded.config.max_position_embeddings:
            history.pop()
            print(
                f"the conversation ({len(ids)} tokens) no longer fits the context; use /clear",
                file=sys.stderr,
            )
            continue
        result = generate_streaming(loaded, ids, args, sampling, cache)
        history.append({"role": "assistant", "content": result.text})
    return 0
