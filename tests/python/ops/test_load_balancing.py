"""Tests of mola::load_balancing_loss and mola.aux_loss (docs/design.md, The balance loss, docs/design.md, Fidelity to the papers and the authors' code).

Per layer: P = softmax(logits), f_e = share of the top-k slots that went to
expert e (a constant), Pbar_e = mean of P[:, e]; loss_l = E_l * sum_e f_e Pbar_e;
the result is coef * sum_l loss_l. The oracle is
tests/reference/authors_loop.py:reference_load_balancing_loss.
"""

import math
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))  # the repo root, for tests.reference

import mola  # noqa: E402  (loads the extension and registers torch.ops.mola)
from tests.reference.authors_loop import reference_load_balancing_loss  # noqa: E402

lbl = torch.ops.mola.load_balancing_loss


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(4321)


def tol_for(t):
    return dict(rtol=1e-12, atol=1e-12) if t.dtype == torch.float64 else dict(rtol=1e-5, atol=1e-6)


def analytic_logit_grad(logits, top_k, coef, keep=None):
    """d/dz of coef * E * sum_e f_e * Pbar_e with f held constant.

    Pbar_e = (1/N) sum_n P[n, e], so dL/dP[n, e] = coef * E * f_e / N =: g_e, and
    through the softmax dz[n] = P[n] * (g - <g, P[n]>). Rows dropped by the
    mask get no gradient.
    """
    probs = torch.softmax(logits.detach().double(), dim=-1)
    rows = probs if keep is None else probs[keep]
    n, num_experts = rows.shape
    chosen = torch.topk(rows, top_k, dim=-1).indices
    f = torch.bincount(chosen.reshape(-1), minlength=num_experts).double() / (n * top_k)
    g = coef * num_experts * f / n  # [E]
    dz = probs * (g - (probs * g).sum(dim=-1, keepdim=True))  # [rows, E]
    if keep is not None:
        dz = dz * keep.unsqueeze(-1)
    return dz


def test_hand_computed_case():
    # 4 tokens, 2 experts, k = 1. A logit gap of ln 3 gives probabilities 3/4 and 1/4.
    #   rows 0-2: z = (ln 3, 0) -> P = (0.75, 0.25), top-1 = expert 0
    #   row 3:    z = (0, ln 3) -> P = (0.25, 0.75), top-1 = expert 1
    # f    = (3/4, 1/4)
    # Pbar = ((3*0.75 + 0.25)/4, (3*0.25 + 0.75)/4) = (0.625, 0.375)
    # loss = E * sum f*Pbar = 2 * (0.75*0.625 + 0.25*0.375) = 2 * 0.5625 = 1.125
    # gradient (f constant): g = E*f/N = (0.375, 0.125);
    #   rows 0-2: <g,P> = 0.3125, dz = (0.75*0.0625, 0.25*-0.1875) = (0.046875, -0.046875)
    #   row 3:    <g,P> = 0.1875, dz = (0.25*0.1875, 0.75*-0.0625) = (0.046875, -0.046875)
    ln3 = math.log(3.0)
    logits = torch.tensor([[ln3, 0.0], [ln3, 0.0], [ln3, 0.0], [0.0, ln3]], dtype=torch.float64, requires_grad=True)
    loss = lbl([logits], [1], 1.0)
    assert loss.dim() == 0
    torch.testing.assert_close(loss.double(), torch.tensor(1.125, dtype=torch.float64), **tol_for(loss))
    (grad,) = torch.autograd.grad(loss, [logits])
    expected = torch.tensor([[0.046875, -0.046875]] * 4, dtype=torch.float64)
    torch.testing.assert_close(grad, expected, **tol_for(loss))
    # and with coef: the default training coefficient scales both
    loss_small = lbl([logits], [1], 0.001)
    torch.testing.assert_close(loss_small.double(), torch.tensor(0.001125, dtype=torch.float64), **tol_for(loss))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_layers_with_different_experts_and_top_k(dtype):
    tokens = 10
    logits = [
        torch.randn(3 * tokens, 4, dtype=dtype),  # layer 0: 3 modules, 4 experts, top-2
        torch.randn(2 * tokens, 8, dtype=dtype),  # layer 1: 2 modules, 8 experts, top-1
        torch.randn(7 * tokens, 2, dtype=dtype),  # layer 2: 7 modules, 2 experts, top-1
        torch.randn(1 * tokens, 6, dtype=dtype),  # layer 3: 1 module, 6 experts, top-3
    ]
    top_k = [2, 1, 1, 3]
    loss = lbl(logits, top_k, 0.01)
    ref = reference_load_balancing_loss(logits, top_k, 0.01)
    torch.testing.assert_close(loss.double(), ref.double(), **tol_for(loss))


def test_dense_layer_contributes_exactly_one_and_no_gradient():
    # k = E: every expert gets 1/E of the slots, so loss_l = sum_e Pbar_e = 1 (docs/design.md, Fidelity to the papers and the authors' code)
    logits = torch.randn(12, 3, dtype=torch.float64, requires_grad=True)
    loss = lbl([logits], [3], 1.0)
    torch.testing.assert_close(loss.double(), torch.tensor(1.0, dtype=torch.float64), **tol_for(loss))
    (grad,) = torch.autograd.grad(loss, [logits])
    torch.testing.assert_close(grad, torch.zeros_like(grad), rtol=0, atol=1e-12)


@pytest.mark.parametrize("num_experts,top_k", [(2, 1), (4, 2), (8, 2), (5, 3)])
def test_gradient_flows_through_pbar_only(num_experts, top_k):
    logits = torch.randn(24, num_experts, dtype=torch.float64, requires_grad=True)
    other = torch.randn(16, 3, dtype=torch.float64, requires_grad=True)
    loss = lbl([logits, other], [top_k, 1], 0.7)
    grads = torch.autograd.grad(loss, [logits, other])
    torch.testing.assert_close(grads[0], analytic_logit_grad(logits, top_k, 0.7), **tol_for(loss))
    torch.testing.assert_close(grads[1], analytic_logit_grad(other, 1, 0.7), **tol_for(loss))
    # and the reference's autograd agrees (its f is a Python number)
    ref_grads = torch.autograd.grad(reference_load_balancing_loss([logits, other], [top_k, 1], 0.7), [logits, other])
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, **tol_for(loss))


def test_coef_scales_linearly():
    logits = [torch.randn(20, 4, dtype=torch.float64, requires_grad=True), torch.randn(10, 6, dtype=torch.float64)]
    one = lbl(logits, [2, 2], 1.0)
    for coef in (0.001, 0.5, 3.0):
        torch.testing.assert_close(lbl(logits, [2, 2], coef), coef * one, **tol_for(one))
    zero = lbl(logits, [2, 2], 0.0)
    assert zero.item() == 0.0
    (grad,) = torch.autograd.grad(zero, [logits[0]])
    assert torch.count_nonzero(grad) == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_mask_drops_padding_rows(dtype):
    tokens = 8
    mask = torch.tensor([True, True, False, True, True, False, False, True])  # True = a real token
    modules = [3, 2]  # rows are `modules` stacked copies of the tokens
    logits = [torch.randn(m * tokens, e, dtype=dtype, requires_grad=True) for m, e in zip(modules, (4, 6))]
    top_k = [2, 1]

    loss = lbl(logits, top_k, 0.1, mask=mask)
    ref = reference_load_balancing_loss(logits, top_k, 0.1, mask=mask)
    torch.testing.assert_close(loss.double(), ref.double(), **tol_for(loss))

    # the same as the loss over the kept rows alone (the mask tiled once per module)
    keeps = [mask.repeat(m) for m in modules]
    kept_only = lbl([z[k] for z, k in zip(logits, keeps)], top_k, 0.1)
    torch.testing.assert_close(loss, kept_only, **tol_for(loss))

    grads = torch.autograd.grad(loss, logits)
    for grad, z, k, keep in zip(grads, logits, top_k, keeps):
        assert torch.count_nonzero(grad[~keep]) == 0  # padding rows get nothing
        torch.testing.assert_close(grad.double(), analytic_logit_grad(z, k, 0.1, keep), **tol_for(loss))

    # an all-true mask is no mask
    all_true = torch.ones(tokens, dtype=torch.bool)
    torch.testing.assert_close(lbl(logits, top_k, 0.1, mask=all_true), lbl(logits, top_k, 0.1), **tol_for(loss))


def test_masked_padding_changes_the_loss():
    # without the mask the padding rows count (the authors' default, docs/design.md, The balance loss)
    tokens = 6
    mask = torch.tensor([True, True, True, False, False, False])
    logits = torch.randn(2 * tokens, 4, dtype=torch.float64)
    assert not torch.allclose(lbl([logits], [2], 1.0, mask=mask), lbl([logits], [2], 1.0))


# --------------------------------------------------------------------------
# mola.aux_loss over a model


class TinyBlock(nn.Module):
    """Two adapted projections of one transformer layer, sharing that layer's E and k."""

    def __init__(self, width, num_experts, top_k, layer_index):
        super().__init__()
        self.q_proj = mola.MoLALinear(nn.Linear(width, width), num_experts, top_k, 4, layer_index=layer_index)
        self.v_proj = mola.MoLALinear(nn.Linear(width, width), num_experts, top_k, 4, layer_index=layer_index)

    def forward(self, x):
        return x + self.q_proj(x) + self.v_proj(x)


def test_aux_loss_groups_modules_by_layer_index():
    model = nn.Sequential(TinyBlock(16, 4, 2, layer_index=0), TinyBlock(16, 6, 1, layer_index=1))
    x = torch.randn(2, 5, 16)
    model(x)

    grouped = [
        torch.cat([model[0].q_proj.router_logits, model[0].v_proj.router_logits], dim=0),
        torch.cat([model[1].q_proj.router_logits, model[1].v_proj.router_logits], dim=0),
    ]
    assert grouped[0].shape == (20, 4) and grouped[1].shape == (20, 6)
    ref = reference_load_balancing_loss(grouped, [2, 1], 0.001)
    aux = mola.aux_loss(model)  # coef None means 0.001
    assert aux.dim() == 0
    torch.testing.assert_close(aux.double(), ref.double(), rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(
        mola.aux_loss(model, coef=0.5).double(), reference_load_balancing_loss(grouped, [2, 1], 0.5).double(),
        rtol=1e-5, atol=1e-7,
    )

    # the balance loss trains the routers
    mola.aux_loss(model, coef=1.0).backward()
    for block in model:
        for proj in (block.q_proj, block.v_proj):
            assert proj.router.grad is not None and torch.count_nonzero(proj.router.grad) > 0
            assert proj.base.weight.grad is None


def test_aux_loss_modules_without_layer_index_are_their_own_groups():
    first = mola.MoLALinear(nn.Linear(8, 8), 3, 1, 2)
    second = mola.MoLALinear(nn.Linear(8, 8), 5, 2, 2)
    never_called = mola.MoLALinear(nn.Linear(8, 8), 4, 2, 2)
    model = nn.ModuleList([first, second, never_called])
    x = torch.randn(7, 8)
    second(first(x))
    ref = reference_load_balancing_loss([first.router_logits, second.router_logits], [1, 2], 0.001)
    torch.testing.assert_close(mola.aux_loss(model).double(), ref.double(), rtol=1e-5, atol=1e-8)


def test_aux_loss_mask_leaves_padding_out():
    # Two modules of one layer see the same 6 tokens; masking the last two must
    # equal the loss on the first four tokens alone.
    torch.manual_seed(4)
    layers = nn.Sequential(mola.MoLALinear(nn.Linear(8, 8), 4, 2, 2, layer_index=0),
                           mola.MoLALinear(nn.Linear(8, 8), 4, 2, 2, layer_index=0))
    x = torch.randn(6, 8)
    layers(x)
    mask = torch.tensor([True, True, True, True, False, False])
    masked = mola.aux_loss(layers, coef=1.0, mask=mask)
    kept = [torch.cat([m.router_logits[:4] for m in layers])]
    want = reference_load_balancing_loss(kept, [2], 1.0)
    torch.testing.assert_close(masked, torch.as_tensor(want, dtype=masked.dtype))
    assert not torch.allclose(masked, mola.aux_loss(layers, coef=1.0))
