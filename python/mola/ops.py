"""Python entry points of the mola op family (``torch.ops.mola.*``).

Thin wrappers that accept ``compute`` by name; the math lives in C++
(src/ops/). Each function is traceable by torch.compile.
"""
from typing import List, Optional, Sequence, Tuple

import torch

from . import _C

# The op's compute codes by name, from C++'s one list (AdapterConfig::compute_modes).
COMPUTE = {name: code for code, name in enumerate(_C.compute_names())}


def compute_code(compute) -> int:
    """``"auto" | "dense" | "grouped"`` (or 0, 1, 2) -> the op's integer code."""
    if isinstance(compute, str):
        if compute not in COMPUTE:
            raise ValueError(
                f"compute={compute!r} is not a strategy; use one of {sorted(COMPUTE)}")
        return COMPUTE[compute]
    if compute in COMPUTE.values():
        return int(compute)
    raise ValueError(f"compute={compute!r} is not a strategy; use one of {sorted(COMPUTE)}")


def moe_lora(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
             router: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, top_k: int,
             scaling: float, dropout_p: float = 0.0, training: bool = False,
             compute="auto", dropout_seed: Optional[torch.Tensor] = None,
             dropout_masks: str = "per_expert") -> Tuple[torch.Tensor, torch.Tensor]:
    """The MoLA layer (docs/design.md, The MoLA layer): ``y = x W^T + b + scaling * sum_j w_j B_j A_j dropout(x)``.

    Shapes: x ``[..., in]``, weight ``[out, in]``, router ``[E, in]``, lora_a
    ``[E, r, in]``, lora_b ``[E, out, r]``. Returns ``(y [..., out], router_logits [T, E])``.
    An empty ``weight`` (``torch.empty(0)``) is the base-free form: ``y = b + the
    experts``, for a base layer computed elsewhere (a quantized linear,
    :mod:`mola.quant`), whose output the caller adds; x's gradient then carries
    only the experts' and the router's parts.
    ``dropout_seed`` (int64, one element) is required when training with dropout.
    ``dropout_masks``: ``"per_expert"`` (each routed expert of a token draws its own
    mask, as the MoLA authors' per-expert dropout calls) or ``"shared"`` (one mask
    for every expert: faster, a deviation from the authors).
    """
    return torch.ops.mola.moe_lora(x, weight, bias, router, lora_a, lora_b, int(top_k),
                                   float(scaling), float(dropout_p), bool(training),
                                   compute_code(compute), dropout_seed, shared_mask(dropout_masks))


def load_balancing_loss(router_logits: Sequence[torch.Tensor], top_k: Sequence[int],
                        coef: float = 1e-3, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Switch-style balance loss summed over layers (docs/design.md, The balance loss), times ``coef``.

    One ``[rows, E_l]`` logits tensor and one ``top_k`` per transformer layer.
    """
    return torch.ops.mola.load_balancing_loss(list(router_logits), [int(k) for k in top_k],
                                              float(coef), mask)


def moe_lora_route(router_logits: torch.Tensor, top_k: int):
    """fp32 softmax, top-k and renormalisation: ``(weights, indices, gate)``."""
    return torch.ops.mola.moe_lora_route(router_logits, int(top_k))


def dropout_mask(seed: torch.Tensor, rows: int, cols: int, p: float, expert: Optional[int] = None
                 ) -> torch.Tensor:
    """The multiplier (0 or 1/(1-p), float32 ``[rows, cols]``) moe_lora applies to
    x for ``seed``: expert ``expert``'s mask under per-expert masks, or the shared
    mask (``expert=None``)."""
    return torch.ops.mola._dropout_mask(seed, int(rows), int(cols), float(p), -1 if expert is None else int(expert))


#: The two dropout-mask modes of the op (MoLAConfig.dropout_masks).
DROPOUT_MASKS = ("per_expert", "shared")


def shared_mask(dropout_masks: str) -> bool:
    """``"per_expert"`` -> False, ``"shared"`` -> True (the op's shared_dropout_mask)."""
    if dropout_masks not in DROPOUT_MASKS:
        raise ValueError(f"dropout_masks={dropout_masks!r} is not one of {', '.join(DROPOUT_MASKS)}")
    return dropout_masks == "shared"


def resolve_compute(compute, num_experts: int, rank: int, per_expert_dropout: bool = False) -> str:
    """The strategy ``compute`` stands for at this shape (C++'s one rule):
    ``"dense"`` or ``"grouped"``."""
    code = _C.resolve_compute(compute_code(compute), int(num_experts), int(rank), bool(per_expert_dropout))
    return _C.compute_names()[code]


__all__: List[str] = ["moe_lora", "load_balancing_loss", "moe_lora_route", "dropout_mask",
                      "compute_code", "COMPUTE", "cpu_computes_in_fp32", "DROPOUT_MASKS", "shared_mask",
                      "resolve_compute"]


def cpu_computes_in_fp32(dtype: torch.dtype) -> bool:
    """Whether this CPU runs ``dtype`` (bf16, fp16) work in fp32 from 16-bit storage:
    true without native 16-bit matrix units (AVX-512 BF16 / AMX), where ATen's 16-bit
    matmul falls to a slow path; the op and mola.CausalLM's frozen linears then compute
    in fp32 and return 16-bit results."""
    from . import _C
    return bool(_C.cpu_computes_in_fp32(dtype))
