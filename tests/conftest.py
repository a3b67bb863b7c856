"""Shared fixtures: the two real models come from their PyPI packages, assembled once per cache."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Without a GPU, Triton kernels run under its interpreter (tests/gpu/). The switch must be
# set before anything imports triton: its language functions are made at import.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if item.get_closest_marker("gpu") is not None:  # the marker, not a folder named gpu
            item.add_marker(skip)


@pytest.fixture(scope="session")
def gemma_gguf() -> Path:
    from tandem.weights.default_model import gemma_model_path

    return gemma_model_path()


@pytest.fixture(scope="session")
def qwen_gguf() -> Path:
    from tandem.weights.default_model import default_model_path

    return default_model_path()
