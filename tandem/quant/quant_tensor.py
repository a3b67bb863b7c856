"""QuantTensor: raw GGUF blocks plus their ggml type and logical shape.

Every kernel (torch reference, C++, Triton) takes a QuantTensor; nothing else
knows block layouts. `data` is usually a zero-copy view of the mmapped file.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from tandem.errors import WeightError


@dataclass(frozen=True)
class QuantTensor:
    """Raw blocks of one tensor.

    data: uint8 [n_bytes], row-major; a row is shape[-1] values stored as
        shape[-1] / block_size blocks of type_size bytes each.
    ggml_type: the ggml type of the blocks.
    shape: logical shape in torch order (outermost first), e.g. [out, in] for
        a linear weight. GGUF lists dimensions the other way round.
    name: the tensor's name in the file, for error messages.
    """

    data: torch.Tensor
    ggml_type: GGMLQuantizationType
    shape: tuple[int, ...]
    name: str = ""

    def __post_init__(self) -> None:
        if self.data.dtype != torch.uint8 or self.data.dim() != 1:
            raise WeightError(f"tensor {self.name!r}: raw data must be a 1-D uint8 tensor")
        block_size, _ = block_layout(self.ggml_type, self.name)
        if not self.shape or self.shape[-1] % block_size != 0:
            raise WeightError(
                f"tensor {self.name!r}: row length {self.shape[-1] if self.shape else 0} "
                f"is not a multiple of the {self.ggml_type.name} block size {block_size}"
            )
        if self.data.numel() != self.n_bytes:
            raise WeightError(
                f"tensor {self.name!r}: {self.data.numel()} bytes of data, "
                f"expected {self.n_bytes} for {self.ggml_type.name} {list(self.shape)}"
            )

    @property
    def n_rows(self) -> int:
        n = 1
        for d in self.shape[:-1]:
            n *= d
        return n

    @property
    def row_bytes(self) -> int:
        block_size, type_size = block_layout(self.ggml_type, self.name)
        return self.shape[-1] // block_size * type_size

    @property
    def n_bytes(self) -> int:
        return self.n_rows * self.row_bytes

    @property
    def numel(self) -> int:
        return self.n_rows * self.shape[-1]

    def rows(self) -> torch.Tensor:
        """The raw data viewed as uint8 [n_rows, row_bytes]."""
        return self.data.view(self.n_rows, self.row_bytes)

    def select_rows(self, index: torch.Tensor) -> QuantTensor:
        """A new QuantTensor of the given rows of a 2-D tensor (copies the bytes).

        Blocks run along the last dimension, so whole rows can be moved
        without touching their contents (used to undo llama.cpp's Q/K permutation).
        """
        if len(self.shape) != 2:
            raise WeightError(f"tensor {self.name!r}: select_rows needs a 2-D tensor")
        data = self.rows()[index].reshape(-1).contiguous()
        return QuantTensor(data, self.ggml_type, (int(index.numel()), self.shape[1]), self.name)

    def expert(self, index: int) -> QuantTensor:
        """Matrix `index` of a 3-D tensor (e.g. experts stacked as [E, I, H]): a 2-D zero-copy view.

        Rows are whole blocks and the matrices are stored one after another, so
        expert e is the byte range of rows e*I .. (e+1)*I.
        """
        if len(self.shape) != 3:
            raise WeightError(f"tensor {self.name!r}: expert() needs a 3-D tensor, not {list(self.shape)}")
        if not 0 <= index < self.shape[0]:
            raise IndexError(f"tensor {self.name!r}: index {index} is outside [0, {self.shape[0]})")
        size = self.shape[1] * self.row_bytes
        data = self.data[index * size : (index + 1) * size]
        return QuantTensor(data, self.ggml_type, self.shape[1:], f"{self.name}[{index}]")

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Values as a dense tensor of `shape`, via the torch reference."""
        from tandem.quant.dequant import dequantize

        return dequantize(self, dtype)


def block_layout(ggml_type: GGMLQuantizationType, name: str = "") -> tuple[int, int]:
    """(values per block, bytes per block) of a ggml type."""
    try:
        return GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
    except (KeyError, ValueError):
        raise WeightError(f"tensor {name!r}: unknown ggml type {int(ggml_type)}") from None
