"""torch.library.opcheck on the private ops behind moe_lora's autograd.

The public ops are checked in test_moe_lora.py; these are the forward that also
returns the experts' activations, the backward, and the dropout mask. They have
no autograd of their own (moe_lora's autograd calls them), so their samples
require no grad; opcheck then checks schemas, fake kernels (with dynamic
shapes) and AOT dispatch, which torch.compile and FSDP rely on.
"""
import pytest
import torch

import mola  # noqa: F401


def _forward_args(compute, dropout_p, dtype, shared=False):
    g = torch.Generator().manual_seed(compute * 10 + int(dropout_p > 0))
    T, din, dout, E, r = 6, 5, 4, 3, 2
    x = torch.randn(T, din, generator=g, dtype=dtype)
    w = torch.randn(dout, din, generator=g, dtype=dtype)
    b = torch.randn(dout, generator=g, dtype=dtype)
    router = torch.randn(E, din, generator=g, dtype=dtype)
    a = torch.randn(E, r, din, generator=g, dtype=dtype)
    bb = torch.randn(E, dout, r, generator=g, dtype=dtype)
    seed = torch.tensor([5]) if dropout_p else None
    return (x, w, b, router, a, bb, 2, 2.0, dropout_p, dropout_p > 0, compute, seed, shared)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("compute", [1, 2])
@pytest.mark.parametrize("dropout_p,shared", [(0.0, False), (0.2, False), (0.2, True)],
                         ids=["p0", "p0.2-per-expert", "p0.2-shared"])
def test_opcheck_forward_and_backward(dtype, compute, dropout_p, shared):
    args = _forward_args(compute, dropout_p, dtype, shared)
    torch.library.opcheck(torch.ops.mola._moe_lora_forward.default, args)
    y, logits, hidden = torch.ops.mola._moe_lora_forward(*args)
    x, w, _, router, a, bb, k, s, p, training, compute_, seed, shared_ = args
    grad_y = torch.randn_like(y)
    grad_logits = torch.randn_like(logits)
    for mask in ([True, False, False, True, True, True], [True, True, True, True, True, True],
                 [False, False, False, False, True, False]):
        bwd_args = (grad_y, grad_logits, x, w, router, a, bb, logits, hidden, k, s, p, training,
                    compute_, seed, shared_, mask)
        torch.library.opcheck(torch.ops.mola._moe_lora_backward.default, bwd_args)
        outs = torch.ops.mola._moe_lora_backward(*bwd_args)
        assert [o is not None for o in outs] == mask


def test_opcheck_dropout_mask():
    torch.library.opcheck(torch.ops.mola._dropout_mask.default, (torch.tensor([3]), 7, 9, 0.25))
    torch.library.opcheck(torch.ops.mola._dropout_mask.default, (torch.tensor([3]), 7, 9, 0.25, 2))
