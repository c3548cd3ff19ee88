"""Fake (meta) kernels of the mola ops: shapes and dtypes only.

torch.compile, FakeTensor and FSDP trace through the ops with these instead of
running them. The C++ library names this module in its schema
(``set_python_module("mola._fake")``), so these must stay in step with
src/ops/moe_lora.cpp. load_balancing_loss needs none: it is
CompositeImplicitAutograd and traces by decomposition.
"""
import torch

from . import _C
from .ops import COMPUTE

_DENSE = COMPUTE["dense"]


def _resolve_compute(compute, num_experts, rank, per_expert_dropout=False):
    # The one rule, mola::ops::resolve_compute (src/ops/moe_lora.cpp), asked of C++.
    return _C.resolve_compute(int(compute), int(num_experts), int(rank), bool(per_expert_dropout))


def _tokens(x):
    n = 1
    for s in x.shape[:-1]:
        n = n * s
    return n


@torch.library.register_fake("mola::moe_lora")
def _moe_lora_fake(x, weight, bias, router, lora_a, lora_b, top_k, scaling,
                   dropout_p=0.0, training=False, compute=0, dropout_seed=None, shared_dropout_mask=False):
    y = x.new_empty((*x.shape[:-1], lora_b.shape[1]))  # out (weight may be empty: no base)
    logits = x.new_empty((_tokens(x), router.shape[0]))
    return y, logits


@torch.library.register_fake("mola::_moe_lora_forward")
def _moe_lora_forward_fake(x, weight, bias, router, lora_a, lora_b, top_k, scaling,
                           dropout_p, training, compute, dropout_seed, shared_dropout_mask=False):
    y, logits = _moe_lora_fake(x, weight, bias, router, lora_a, lora_b, top_k, scaling)
    num_experts, rank = lora_a.shape[0], lora_a.shape[1]
    tokens = _tokens(x)
    per_expert = bool(training) and dropout_p > 0 and not shared_dropout_mask
    if _resolve_compute(compute, num_experts, rank, per_expert) == _DENSE:
        hidden = x.new_empty((tokens, num_experts * rank))
    else:
        hidden = x.new_empty((tokens, top_k, rank))
    return y, logits, hidden


@torch.library.register_fake("mola::_moe_lora_backward")
def _moe_lora_backward_fake(grad_y, grad_router_logits, x, weight, router, lora_a, lora_b,
                            router_logits, lora_hidden, top_k, scaling, dropout_p, training,
                            compute, dropout_seed, shared_dropout_mask, output_mask):
    likes = (x, weight, lora_b[0, :, 0], router, lora_a, lora_b)  # bias [out]
    # contiguous whatever the inputs' strides: the CPU and CUDA backwards return fresh
    # contiguous gradients, and inductor plans layouts from this
    return tuple(torch.empty(t.shape, dtype=t.dtype, device=t.device) if need else None
                 for t, need in zip(likes, output_mask))


@torch.library.register_fake("mola::moe_lora_route")
def _moe_lora_route_fake(router_logits, top_k):
    tokens, experts = router_logits.shape
    # fp32 routing, fp64 for fp64 logits (mola::detail::routing_dtype)
    rdtype = torch.float64 if router_logits.dtype == torch.float64 else torch.float32
    weights = router_logits.new_empty((tokens, top_k), dtype=rdtype)
    indices = router_logits.new_empty((tokens, top_k), dtype=torch.int64)
    gate = router_logits.new_empty((tokens, experts), dtype=rdtype)
    return weights, indices, gate


@torch.library.register_fake("mola::_dropout_mask")
def _dropout_mask_fake(seed, rows, cols, p, expert=-1):
    return seed.new_empty((rows, cols), dtype=torch.float32)
