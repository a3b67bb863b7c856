"""Arguments and loading shared by the verbs that run a model."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from tandem.errors import TandemError


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    group.add_argument(
        "--model",
        "-m",
        metavar="PATH",
        help="GGUF file or directory of split parts (default: the embedded Qwen2.5-Coder-1.5B-Instruct)",
    )
    group.add_argument("--rules", metavar="FILE", help="YAML rule file (default: the architecture's rules)")
    group.add_argument(
        "--config", metavar="DIR", help="take config and tokenizer from this Hugging Face model directory"
    )
    group.add_argument(
        "--threads",
        "-t",
        type=positive_int,
        metavar="N",
        help="CPU threads for torch and the C++ engine (default: one per physical core)",
    )
    group.add_argument(
        "--device", default="cpu", help="default device for modules no rule places (default: cpu)"
    )
    group.add_argument(
        "--gpu-memory",
        type=float,
        metavar="GIB",
        help="plan the placement for this much GPU memory: dense parts and the KV cache on the GPU, "
        "routed experts on the CPU engine but for whole layers that fit (docs/hybrid.md); "
        "without a GPU everything runs on the CPU",
    )


def add_sampling_arguments(parser: argparse.ArgumentParser, max_new_tokens: int) -> None:
    group = parser.add_argument_group("sampling")
    group.add_argument("--max-new-tokens", "-n", type=positive_int, default=max_new_tokens, metavar="N")
    group.add_argument("--temperature", type=float, default=0.8, help="0 means greedy (default: 0.8)")
    group.add_argument("--top-k", type=int, default=40, help="0 disables (default: 40)")
    group.add_argument("--top-p", type=float, default=0.95, help="1 disables (default: 0.95)")
    group.add_argument("--min-p", type=float, default=0.05, help="0 disables (default: 0.05)")
    group.add_argument("--repeat-penalty", type=float, default=1.0, help="1 disables (default: 1.0)")
    group.add_argument("--seed", type=int, default=None, help="random seed for reproducible sampling")
    group.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop string (repeatable)")


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def sampling_params(args: argparse.Namespace):
    from tandem.engine.sampling import SamplingParams

    return SamplingParams(
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        min_p=args.min_p,
        repetition_penalty=args.repeat_penalty,
        seed=args.seed,
    )


def resolve_model_path(model: str | None) -> Path:
    """The --model argument, or the embedded default model (assembled on first use)."""
    if model:
        path = Path(model)
        if not path.exists():
            raise TandemError(f"model not found: {path}")
        return path
    from tqdm import tqdm

    from tandem.weights.default_model import default_model_path

    bar = None

    def progress(done: int, total: int) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(
                total=total, unit="B", unit_scale=True, desc="assembling the default model", file=sys.stderr
            )
        bar.update(done - bar.n)

    try:
        return default_model_path(progress)
    finally:
        if bar is not None:
            bar.close()


def load_from_args(args: argparse.Namespace):
    """Load the model the arguments name, with a progress bar on stderr."""
    from tandem.inject.model import load_model

    if args.threads:
        from tandem.cpu.engine import configure

        torch.set_num_threads(args.threads)
        configure(threads=args.threads)  # the C++ engine's pool, before any operator takes it
    try:
        torch.device(args.device)
    except RuntimeError:
        raise TandemError(f"{args.device!r} is not a device") from None
    path = resolve_model_path(args.model)
    if args.rules and not Path(args.rules).is_file():
        raise TandemError(f"rule file not found: {args.rules}")
    gpu_memory = getattr(args, "gpu_memory", None)
    if gpu_memory is not None and args.rules:
        raise TandemError("--rules and --gpu-memory: give one of them (--gpu-memory writes the rules)")
    if gpu_memory is not None and gpu_memory < 0:
        raise TandemError(f"--gpu-memory must be at least 0, got {gpu_memory}")
    if gpu_memory is not None and not torch.cuda.is_available():
        print(
            "tandem: no CUDA device here: --gpu-memory plans nothing, everything runs on the CPU",
            file=sys.stderr,
        )
    elif gpu_memory and not args.threads:
        from tandem.cpu.engine import configure, default_threads

        # A hybrid step's experts run on CUDA's host-function thread, which leads the engine's
        # loops, and the Python thread waits beside it: one pinned worker fewer leaves them a core.
        configure(threads=max(1, default_threads() - 1))
    return load_model(
        path,
        rules=args.rules,
        config_dir=args.config,
        device=args.device,
        progress=sys.stderr.isatty(),
        gpu_memory=gpu_memory,
        plan_ctx=getattr(args, "ctx", None) or 4096,
    )


def adds_bos(tokenizer) -> bool:
    """Whether the tokenizer puts BOS in front of text (asked by tokenizing, as attributes vary by class)."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    probe = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bool(probe) and probe[0] == bos


def encode_prompt(tokenizer, text: str) -> list[int]:
    """Token ids of already-formatted text, with BOS added exactly once when the model wants one."""
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if adds_bos(tokenizer) and (not ids or ids[0] != tokenizer.bos_token_id):
        ids.insert(0, tokenizer.bos_token_id)
    if not ids:
        raise TandemError("the prompt is empty")
    return ids


def chat_prompt_ids(loaded, messages: list[dict]) -> list[int]:
    """The conversation rendered by the model's chat template, ready for generation."""
    from tandem.weights.chat_template import render_chat

    tok = loaded.tokenizer
    text = render_chat(
        loaded.chat_template,
        messages,
        add_generation_prompt=True,
        bos_token=tok.bos_token,
        eos_token=tok.eos_token,
    )
    return encode_prompt(tok, text)


def generate_streaming(loaded, ids: list[int], args: argparse.Namespace, sampling, prompt_cache=None):
    """Generate after `ids`, printing text to stdout as it comes and the timings to stderr."""
    from tandem.engine.generate import prefill_and_generate

    result = prefill_and_generate(
        loaded.model,
        loaded.tokenizer,
        ids,
        args.max_new_tokens,
        sampling=sampling,
        stop_token_ids=loaded.stop_token_ids,
        stop_strings=args.stop,
        on_text=lambda piece: print(piece, end="", flush=True),
        prompt_cache=prompt_cache,
    )
    print(flush=True)
    if not getattr(args, "quiet", False):
        print_stats(result)
    return result


def print_stats(result, stream=sys.stderr) -> None:
    cached = f" ({result.n_cached} cached)" if result.n_cached else ""
    print(
        f"[{result.n_prompt} prompt tokens{cached}, {result.prefill_tok_s:.1f} tok/s prefill; "
        f"{result.n_generated} generated, {result.decode_tok_s:.1f} tok/s decode]",
        file=stream,
        flush=True,
    )
