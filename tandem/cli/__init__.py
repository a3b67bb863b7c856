"""The `tandem` command: one module per verb, each with HELP, add_arguments(parser) and run(args) -> int."""

from __future__ import annotations

import argparse
import importlib
import sys

VERBS = ("chat", "generate", "serve", "perplexity", "bench", "inspect", "synth", "doctor")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tandem", description="Run MoE language models on CPU and GPU.")
    sub = parser.add_subparsers(dest="verb", metavar="VERB", required=True)
    for verb in VERBS:
        module = importlib.import_module(f"tandem.cli.{verb}")
        verb_parser = sub.add_parser(verb, help=module.HELP, description=module.HELP)
        module.add_arguments(verb_parser)
        verb_parser.set_defaults(run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    from tandem.errors import TandemError

    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except TandemError as error:
        print(f"tandem: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except OSError as error:
        # Files the user named: missing, unreadable, disk full. One line, no traceback.
        print(
            f"tandem: error: {error.strerror or error}: {error.filename or ''}".rstrip(": "), file=sys.stderr
        )
        return 1
