"""Quantized frozen base weights (docs/quantization.md): int8 with one scale per
output channel, and NF4 (QLoRA's 4-bit NormalFloat) in blocks of 64 with
double-quantized block scales. The C++ models use them through
``mola.CausalLM.from_pretrained(dir, quantize="nf4")``; this module exposes the
same functions for tests, analysis and users who want the numbers.

    q = mola.quant.quantize(weight, "nf4")        # QuantizedWeight
    w = mola.quant.dequantize(q)                  # [out, in] float32
    y = mola.quant.linear(x, q, bias)             # x W^T + b, differentiable in x
"""
from dataclasses import dataclass
from typing import Dict, Optional

import torch

from . import _C

__all__ = ["QuantizedWeight", "quantize", "dequantize", "linear", "NF4_VALUES", "KINDS"]

#: NF4's sixteen values, ascending, from -1 to 1 with an exact 0.
NF4_VALUES = tuple(_C.nf4_values())
#: The kinds ``quantize`` takes.
KINDS = ("int8", "nf4")


@dataclass
class QuantizedWeight:
    """A quantized ``[out_features, in_features]`` weight: its kind and stored
    tensors (``data``, ``scale``; NF4 with double quantization also
    ``scale_scale``, ``scale_offset``), as
    include/mola/quant.h describes them."""
    kind: str
    out_features: int
    in_features: int
    tensors: Dict[str, torch.Tensor]

    @property
    def nbytes(self) -> int:
        """Bytes held by the stored tensors."""
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    @property
    def device(self) -> torch.device:
        """Where the stored tensors are."""
        return self.tensors["data"].device

    def to(self, device) -> "QuantizedWeight":
        """The same weight with its stored tensors on ``device`` (their dtypes stay)."""
        return QuantizedWeight(self.kind, self.out_features, self.in_features,
                               {name: t.to(device) for name, t in self.tensors.items()})


def quantize(weight: torch.Tensor, kind: str, double_quant: bool = True) -> QuantizedWeight:
    """Quantize ``weight`` (``[out, in]``, any float dtype) to ``kind`` ("int8" or "nf4"),
    on the CPU; the stored tensors are placed on ``weight``'s device.
    ``double_quant`` (NF4): store the block absmaxes as 8-bit codes (QLoRA's
    double quantization, the default) rather than as fp32 values."""
    tensors = _C.quantize_weight(weight, kind, double_quant)
    return QuantizedWeight(kind, int(weight.shape[0]), int(weight.shape[1]), dict(tensors))


def dequantize(q: QuantizedWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The whole weight back, ``[out, in]`` in ``dtype``, on the weight's device."""
    return _C.dequantize_weight(q.tensors, q.kind, q.out_features, q.in_features, dtype)


def linear(x: torch.Tensor, q: QuantizedWeight, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``x W^T + b``, differentiable in ``x``. On the CPU W is dequantized a
    block of rows at a time (no full copy); on a GPU whole, in ``x``'s dtype,
    for the one product."""
    return _C.quantized_linear(x, q.tensors, q.kind, q.out_features, q.in_features, bias)
