"""Tests of the mola::moe_lora op family and mola.MoLALinear (CPU).

The oracle is tests/reference/authors_loop.py, a plain per-expert loop
written from docs/design.md, Fidelity to the papers and the authors' code, never from the op's code. float64
unless a test says otherwise, so that agreement can be asked to 1e-10.
"""

import copy
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))  # the repo root, for tests.reference

import mola  # noqa: E402  (loads the extension and registers torch.ops.mola)
from tests.reference.authors_loop import (  # noqa: E402
    ReferenceMoLALinear,
    reference_moe_lora,
    reference_route,
)

AUTO, DENSE, GROUPED = 0, 1, 2
IN_FEATURES, OUT_FEATURES = 12, 7
TIGHT = dict(rtol=1e-10, atol=1e-10)
EXPERTS_TOPK = [(e, k) for e in (1, 2, 5, 8) for k in sorted({1, 2, e}) if k <= e]


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(1234)


def make_inputs(num_experts, rank, lead_shape, bias=True, dtype=torch.float64, in_f=IN_FEATURES, out_f=OUT_FEATURES):
    """Random op inputs; x, router, lora_a and lora_b require grad, the base does not."""
    x = torch.randn(*lead_shape, in_f, dtype=dtype, requires_grad=True)
    weight = torch.randn(out_f, in_f, dtype=dtype) / math.sqrt(in_f)
    b = torch.randn(out_f, dtype=dtype) if bias else None
    router = torch.randn(num_experts, in_f, dtype=dtype, requires_grad=True)
    lora_a = (torch.randn(num_experts, rank, in_f, dtype=dtype) / math.sqrt(in_f)).requires_grad_()
    lora_b = (torch.randn(num_experts, out_f, rank, dtype=dtype) / math.sqrt(rank)).requires_grad_()
    return x, weight, b, router, lora_a, lora_b


def seed_tensor(value):
    return torch.tensor([value], dtype=torch.int64)


def probe(*tensors):
    """A fixed random linear functional of each tensor, summed: checks every gradient path at once."""
    gen = torch.Generator().manual_seed(99)
    total = 0.0
    for t in tensors:
        total = total + (t * torch.randn(t.shape, generator=gen, dtype=torch.float64).to(t.dtype)).sum()
    return total


def grads_of(y, logits, tensors):
    return torch.autograd.grad(probe(y, logits), tensors)


def run_op(inputs, top_k, scaling, compute, dropout_p=0.0, training=False, seed=None):
    return torch.ops.mola.moe_lora(
        *inputs, top_k, scaling, dropout_p=dropout_p, training=training, compute=compute, dropout_seed=seed
    )


def assert_all_close(actual, expected, **tol):
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, **tol)


# --------------------------------------------------------------------------
# op == the authors' loop, forward and gradients, float64, no dropout


@pytest.mark.parametrize("compute", [DENSE, GROUPED], ids=["dense", "grouped"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("lead_shape", [(10,), (2, 5)], ids=["T", "BS"])
@pytest.mark.parametrize("rank", [1, 8])
@pytest.mark.parametrize("num_experts,top_k", EXPERTS_TOPK)
def test_op_matches_reference(num_experts, top_k, rank, lead_shape, bias, compute):
    inputs = make_inputs(num_experts, rank, lead_shape, bias)
    x, weight, b, router, lora_a, lora_b = inputs
    scaling = 16.0 / rank
    y, logits = run_op(inputs, top_k, scaling, compute)
    y_ref, logits_ref = reference_moe_lora(*inputs, top_k, scaling)

    assert y.shape == (*lead_shape, OUT_FEATURES) and y.dtype == x.dtype
    assert logits.shape == (math.prod(lead_shape), num_experts) and logits.dtype == x.dtype
    torch.testing.assert_close(y, y_ref, **TIGHT)
    torch.testing.assert_close(logits, logits_ref, **TIGHT)

    leaves = [x, router, lora_a, lora_b]
    assert_all_close(grads_of(y, logits, leaves), grads_of(y_ref, logits_ref, leaves), **TIGHT)


@pytest.mark.parametrize("compute", [DENSE, GROUPED], ids=["dense", "grouped"])
def test_frozen_base_gets_gradients_when_asked(compute):
    x, weight, b, router, lora_a, lora_b = make_inputs(5, 4, (3, 4))
    weight.requires_grad_()
    b.requires_grad_()
    inputs = (x, weight, b, router, lora_a, lora_b)
    y, logits = run_op(inputs, 2, 2.0, compute)
    y_ref, logits_ref = reference_moe_lora(*inputs, 2, 2.0)
    leaves = [x, weight, b, router, lora_a, lora_b]
    assert_all_close(grads_of(y, logits, leaves), grads_of(y_ref, logits_ref, leaves), **TIGHT)


@pytest.mark.parametrize("compute", [DENSE, GROUPED], ids=["dense", "grouped"])
def test_empty_input(compute):
    x, weight, b, router, lora_a, lora_b = make_inputs(4, 2, (0,))
    y, logits = run_op((x, weight, b, router, lora_a, lora_b), 2, 2.0, compute)
    assert y.shape == (0, OUT_FEATURES) and logits.shape == (0, 4)
    grads = grads_of(y, logits, [router, lora_a, lora_b])
    for g in grads:
        assert torch.count_nonzero(g) == 0


# --------------------------------------------------------------------------
# dropout: one mask per call, shared by all experts, a function of the seed

DROP_P = 0.3


@pytest.mark.parametrize("num_experts,top_k", [(5, 2), (4, 4)])
def test_dropout_dense_equals_grouped(num_experts, top_k):
    inputs = make_inputs(num_experts, 4, (3, 7))
    leaves = [inputs[0], inputs[3], inputs[4], inputs[5]]
    seed = seed_tensor(2024)
    outs = {}
    for compute in (DENSE, GROUPED):
        y, logits = run_op(inputs, top_k, 2.0, compute, DROP_P, True, seed)
        outs[compute] = (y, logits, grads_of(y, logits, leaves))
    torch.testing.assert_close(outs[DENSE][0], outs[GROUPED][0], **TIGHT)
    torch.testing.assert_close(outs[DENSE][1], outs[GROUPED][1], **TIGHT)
    assert_all_close(outs[DENSE][2], outs[GROUPED][2], **TIGHT)


@pytest.mark.parametrize("compute", [DENSE, GROUPED], ids=["dense", "grouped"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("masks", ["per_expert", "shared"])
def test_dropout_matches_reference_with_its_mask(compute, bias, masks):
    inputs = make_inputs(5, 4, (3, 7), bias)
    x = inputs[0]
    seed = seed_tensor(77)
    mask = torch.ops.mola._dropout_mask(seed, 21, IN_FEATURES, DROP_P)
    assert mask.shape == (21, IN_FEATURES) and mask.dtype == torch.float32
    assert 0 < torch.count_nonzero(mask) < mask.numel()  # the mask does something at this size

    y, logits = torch.ops.mola.moe_lora(*inputs, 2, 2.0, DROP_P, True, compute, seed, masks == "shared")
    if masks == "shared":
        y_ref, logits_ref = reference_moe_lora(*inputs, 2, 2.0, dropout_mask=mask)
    else:
        per = [mola.ops.dropout_mask(seed, 21, IN_FEATURES, DROP_P, expert=e) for e in range(5)]
        y_ref, logits_ref = reference_moe_lora(*inputs, 2, 2.0, expert_masks=per)
    torch.testing.assert_close(y, y_ref, **TIGHT)
    torch.testing.assert_close(logits, logits_ref, **TIGHT)  # no dropout on the router input
    leaves = [x, inputs[3], inputs[4], inputs[5]]
    assert_all_close(grads_of(y, logits, leaves), grads_of(y_ref, logits_ref, leaves), **TIGHT)


@pytest.mark.parametrize("p", [0.05, 0.3, 0.5])
def test_dropout_mask_rate_and_values(p):
    rows, cols = 500, 400  # 2e5 elements
    mask = torch.ops.mola._dropout_mask(seed_tensor(12345), rows, cols, p)
    assert mask.shape == (rows, cols) and mask.dtype == torch.float32
    kept = mask != 0
    expected_value = torch.full_like(mask[kept], 1.0 / (1.0 - p))
    torch.testing.assert_close(mask[kept], expected_value, rtol=1e-6, atol=0)
    n = mask.numel()
    zero_fraction = 1.0 - kept.sum().item() / n
    sigma = math.sqrt(p * (1 - p) / n)
    assert abs(zero_fraction - p) < 5 * sigma, (zero_fraction, p, sigma)
    # the mask depends on the element, not only on its row or its column
    assert not torch.equal(mask[0], mask[1])
    assert not torch.equal(mask[:, 0], mask[:, 1])


def test_dropout_mask_is_a_function_of_the_seed():
    a = torch.ops.mola._dropout_mask(seed_tensor(5), 64, 32, 0.5)
    b = torch.ops.mola._dropout_mask(seed_tensor(5), 64, 32, 0.5)
    c = torch.ops.mola._dropout_mask(seed_tensor(6), 64, 32, 0.5)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


@pytest.mark.parametrize("compute", [DENSE, GROUPED], ids=["dense", "grouped"])
def test_dropout_same_seed_same_output(compute):
    inputs = make_inputs(5, 4, (16,))
    big = 2**62 - 3
    y1, _ = run_op(inputs, 2, 2.0, compute, DROP_P, True, seed_tensor(big))
    y2, _ = run_op(inputs, 2, 2.0, compute, DROP_P, True, seed_tensor(big))
    y3, _ = run_op(inputs, 2, 2.0, compute, DROP_P, True, seed_tensor(big - 1))
    y0, _ = run_op(inputs, 2, 2.0, compute)
    assert torch.equal(y1, y2)
    assert not torch.allclose(y1, y3)
    assert not torch.allclose(y1, y0)


@pytest.mark.parametrize("compute", [DENSE, GROUPED], ids=["dense", "grouped"])
def test_no_dropout_outside_training(compute):
    """training=False (or p=0) ignores dropout_p and needs no seed."""
    inputs = make_inputs(5, 4, (16,))
    y0, l0 = run_op(inputs, 2, 2.0, compute)
    y_eval, l_eval = run_op(inputs, 2, 2.0, compute, DROP_P, False, None)
    y_p0, l_p0 = run_op(inputs, 2, 2.0, compute, 0.0, True, None)
    assert torch.equal(y0, y_eval) and torch.equal(l0, l_eval)
    assert torch.equal(y0, y_p0) and torch.equal(l0, l_p0)


# --------------------------------------------------------------------------
# dense == grouped == auto in float32


def test_dense_grouped_auto_agree_float32():
    inputs = make_inputs(8, 8, (64,), dtype=torch.float32, in_f=32, out_f=32)
    leaves = [inputs[0], inputs[3], inputs[4], inputs[5]]
    results = {}
    for compute in (DENSE, GROUPED, AUTO):
        y, logits = run_op(inputs, 2, 2.0, compute)
        results[compute] = (y, logits, grads_of(y, logits, leaves))
    fwd_tol = dict(rtol=1e-5, atol=1e-5)
    grad_tol = dict(rtol=1e-4, atol=1e-4)
    for other in (GROUPED, AUTO):
        torch.testing.assert_close(results[other][0], results[DENSE][0], **fwd_tol)
        torch.testing.assert_close(results[other][1], results[DENSE][1], **fwd_tol)
        assert_all_close(results[other][2], results[DENSE][2], **grad_tol)
    torch.testing.assert_close(results[AUTO][0], results[GROUPED][0], **fwd_tol)
    # and all three against the loop, done in float64 on the same values
    ref_inputs = [t.detach().double() if t is not None else None for t in inputs]
    y_ref, _ = reference_moe_lora(*ref_inputs, 2, 2.0)
    torch.testing.assert_close(results[DENSE][0].double(), y_ref, **fwd_tol)


# --------------------------------------------------------------------------
# gradcheck in float64 (all six differentiable inputs)


@pytest.mark.parametrize("compute", [DENSE, GROUPED], ids=["dense", "grouped"])
@pytest.mark.parametrize(
    "num_experts,top_k,dropout_p",
    [(3, 2, 0.0), (3, 3, 0.0), (4, 1, 0.0), (3, 2, 0.4)],
    ids=["top2of3", "dense3", "top1of4", "dropout"],
)
def test_gradcheck(num_experts, top_k, dropout_p, compute):
    x, weight, b, router, lora_a, lora_b = make_inputs(num_experts, 2, (2, 2), in_f=5, out_f=3)
    params = [t.detach().requires_grad_() for t in (x, weight, b, router, lora_a, lora_b)]
    training = dropout_p > 0
    seed = seed_tensor(31337) if training else None

    def fn(*tensors):
        return torch.ops.mola.moe_lora(
            *tensors, top_k, 1.5, dropout_p=dropout_p, training=training, compute=compute, dropout_seed=seed
        )

    assert torch.autograd.gradcheck(fn, params, eps=1e-6, atol=1e-7, rtol=1e-5)


# --------------------------------------------------------------------------
# opcheck: schema, autograd registration, fake tensors, AOT dispatch


def _moe_lora_sample(dtype, lead_shape, num_experts, top_k, rank, bias, compute, dropout_p=0.0):
    inputs = make_inputs(num_experts, rank, lead_shape, bias, dtype=dtype, in_f=8, out_f=6)
    training = dropout_p > 0
    kwargs = dict(
        dropout_p=dropout_p,
        training=training,
        compute=compute,
        dropout_seed=seed_tensor(4242) if training else None,
    )
    return (*inputs, top_k, 2.0), kwargs


MOE_LORA_SAMPLES = {
    "f32-dense-bias": lambda: _moe_lora_sample(torch.float32, (6,), 4, 2, 3, True, DENSE),
    "f32-grouped-bias": lambda: _moe_lora_sample(torch.float32, (6,), 4, 2, 3, True, GROUPED),
    "f64-grouped-nobias-3d": lambda: _moe_lora_sample(torch.float64, (2, 3), 4, 4, 2, False, GROUPED),
    "f64-auto-nobias-1expert": lambda: _moe_lora_sample(torch.float64, (5,), 1, 1, 2, False, AUTO),
    "f32-dropout-dense": lambda: _moe_lora_sample(torch.float32, (2, 3), 4, 2, 3, True, DENSE, 0.25),
    "f64-dropout-grouped": lambda: _moe_lora_sample(torch.float64, (6,), 4, 2, 3, False, GROUPED, 0.25),
}


@pytest.mark.parametrize("sample", list(MOE_LORA_SAMPLES))
def test_opcheck_moe_lora(sample):
    args, kwargs = MOE_LORA_SAMPLES[sample]()
    torch.library.opcheck(torch.ops.mola.moe_lora.default, args, kwargs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("top_k", [1, 3, 5])
def test_opcheck_route(dtype, top_k):
    # the spec does not make moe_lora_route differentiable, so its sample does not require grad
    logits = torch.randn(9, 5, dtype=dtype)
    torch.library.opcheck(torch.ops.mola.moe_lora_route.default, (logits, top_k))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("with_mask", [False, True], ids=["nomask", "mask"])
def test_opcheck_load_balancing_loss(dtype, with_mask):
    tokens = 6
    logits = [
        torch.randn(3 * tokens, 4, dtype=dtype, requires_grad=True),  # 3 modules, 4 experts
        torch.randn(2 * tokens, 6, dtype=dtype, requires_grad=True),  # 2 modules, 6 experts
    ]
    kwargs = {}
    if with_mask:
        kwargs["mask"] = torch.tensor([True, True, False, True, False, True])
    torch.library.opcheck(torch.ops.mola.load_balancing_loss.default, (logits, [2, 1], 0.01), kwargs)


# --------------------------------------------------------------------------
# moe_lora_route against the reference routing


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("num_experts,top_k", EXPERTS_TOPK)
def test_route_matches_reference(num_experts, top_k, dtype):
    # distinct logits (steps of 0.25, exact in bfloat16) so the top-k set has no ties
    logits = torch.rand(33, num_experts).argsort(dim=-1).double() * 0.25
    if dtype != torch.bfloat16:
        logits = logits + 0.01 * torch.randn(33, num_experts, dtype=torch.float64)
    logits = logits.to(dtype)
    weights, indices, gate = torch.ops.mola.moe_lora_route(logits, top_k)
    _, ref_indices, ref_gate = reference_route(logits, top_k)

    assert weights.shape == (33, top_k) and indices.shape == (33, top_k) and gate.shape == (33, num_experts)
    assert indices.dtype == torch.int64
    if dtype != torch.float64:
        assert weights.dtype == torch.float32 and gate.dtype == torch.float32
    tol = dict(rtol=1e-12, atol=1e-12) if weights.dtype == torch.float64 else dict(rtol=1e-6, atol=1e-6)
    # order of the k slots is not part of the contract: compare the chosen sets and the gate matrix
    assert torch.equal(indices.sort(dim=-1).values, ref_indices.sort(dim=-1).values)
    torch.testing.assert_close(gate.double(), ref_gate.double(), **tol)
    torch.testing.assert_close(weights.double(), gate.double().gather(1, indices), **tol)
    torch.testing.assert_close(weights.double().sum(-1), torch.ones(33, dtype=torch.float64), **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_route_ties_go_to_the_lower_expert(dtype):
    # The routing contract on ties (the CPU kernel and the CUDA one): slots sorted by
    # probability, equal probabilities in expert order, w renormalised over the chosen.
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0],
                           [1.0, 3.0, 3.0, 1.0],
                           [2.0, -1.0, 2.0, 2.0]], dtype=dtype)
    weights, indices, gate = torch.ops.mola.moe_lora_route(logits, 3)
    assert indices.tolist() == [[0, 1, 2], [1, 2, 0], [0, 2, 3]]
    P = torch.softmax(logits.double(), -1)
    expected_w = P.gather(1, indices) / P.gather(1, indices).sum(-1, keepdim=True)
    tol = 1e-12 if dtype == torch.float64 else 1e-6
    torch.testing.assert_close(weights.double(), expected_w, rtol=tol, atol=tol)
    torch.testing.assert_close(gate.double(), torch.zeros_like(P).scatter(1, indices, expected_w),
                               rtol=tol, atol=tol)
    # k == E: dense, the softmax itself in expert order
    weights, indices, gate = torch.ops.mola.moe_lora_route(logits, 4)
    assert indices.tolist() == [[0, 1, 2, 3]] * 3
    torch.testing.assert_close(weights.double(), P, rtol=tol, atol=tol)
    torch.testing.assert_close(gate, weights)


def test_route_strided_logits():
    # a transposed view: the kernel reads through both strides
    base = torch.randn(6, 40)
    logits = base.t()  # [40, 6], column stride 40
    got = torch.ops.mola.moe_lora_route(logits, 2)
    want = torch.ops.mola.moe_lora_route(logits.contiguous(), 2)
    for a, b in zip(got, want):
        assert torch.equal(a, b)


# --------------------------------------------------------------------------
# mola.MoLALinear


def make_layer(in_f=IN_FEATURES, out_f=OUT_FEATURES, num_experts=4, top_k=2, rank=4, **kwargs):
    return mola.MoLALinear(nn.Linear(in_f, out_f), num_experts, top_k, rank, **kwargs)


def randomise_lora_b(*layers):
    with torch.no_grad():
        for layer in layers:
            layer.lora_b.normal_(0.0, 0.3)


def test_module_attributes_and_shapes():
    layer = make_layer(num_experts=5, top_k=2, rank=4, alpha=12, dropout=0.05, compute="grouped", layer_index=3)
    assert layer.router.shape == (5, IN_FEATURES)
    assert layer.lora_a.shape == (5, 4, IN_FEATURES)
    assert layer.lora_b.shape == (5, OUT_FEATURES, 4)
    assert torch.count_nonzero(layer.lora_b) == 0
    assert layer.scaling == pytest.approx(3.0)
    assert (layer.num_experts, layer.top_k, layer.layer_index, layer.compute) == (5, 2, 3, "grouped")
    assert layer.dropout == pytest.approx(0.05)
    assert not any(p.requires_grad for p in layer.base.parameters())
    trainable = {name for name, p in layer.named_parameters() if p.requires_grad}
    assert trainable == {"router", "lora_a", "lora_b"}
    layer.eval()
    y = layer(torch.randn(2, 3, IN_FEATURES))
    assert y.shape == (2, 3, OUT_FEATURES)
    assert layer.router_logits.shape == (6, 5)


@pytest.mark.parametrize("compute", ["auto", "dense", "grouped"])
def test_zero_lora_b_is_exactly_the_base(compute):
    layer = make_layer(compute=compute)
    x = torch.randn(10, IN_FEATURES)
    y = layer(x)
    assert torch.equal(y, F.linear(x, layer.base.weight, layer.base.bias))


@pytest.mark.parametrize("compute", ["auto", "dense", "grouped"])
def test_only_router_and_experts_get_gradients(compute):
    layer = make_layer(compute=compute)
    y = layer(torch.randn(2, 5, IN_FEATURES))
    (y.square().sum() + layer.router_logits.square().sum()).backward()
    assert layer.base.weight.grad is None and layer.base.bias.grad is None
    for name in ("router", "lora_a", "lora_b"):
        assert getattr(layer, name).grad is not None, name
    assert torch.count_nonzero(layer.lora_b.grad) > 0
    assert torch.count_nonzero(layer.router.grad) > 0


@pytest.mark.parametrize("compute", ["auto", "dense", "grouped"])
def test_module_matches_reference_module(compute):
    layer = make_layer(num_experts=5, top_k=2, rank=3, compute=compute).double()
    randomise_lora_b(layer)
    ref = ReferenceMoLALinear(copy.deepcopy(layer.base), 5, 2, 3).double()
    missing, _ = ref.load_state_dict(layer.state_dict(), strict=False)
    assert not missing, f"state dict keys of MoLALinear miss {missing}"
    x = torch.randn(3, 4, IN_FEATURES, dtype=torch.float64)
    x_ref = x.clone().requires_grad_()
    x.requires_grad_()
    y, y_ref = layer(x), ref(x_ref)
    torch.testing.assert_close(y, y_ref, **TIGHT)
    torch.testing.assert_close(layer.router_logits, ref.router_logits, **TIGHT)
    got = grads_of(y, layer.router_logits, [x, layer.router, layer.lora_a, layer.lora_b])
    want = grads_of(y_ref, ref.router_logits, [x_ref, ref.router, ref.lora_a, ref.lora_b])
    assert_all_close(got, want, **TIGHT)


def test_module_dropout_draws_a_fresh_mask_per_call():
    """In training, each call draws its seed from torch's RNG, so manual_seed reproduces a call."""
    layer = make_layer(dropout=0.5)
    randomise_lora_b(layer)
    x = torch.randn(16, IN_FEATURES)
    layer.train()
    torch.manual_seed(7)
    y1 = layer(x)
    y2 = layer(x)
    torch.manual_seed(7)
    y1_again = layer(x)
    assert not torch.allclose(y1, y2)
    assert torch.equal(y1, y1_again)
    layer.eval()  # no dropout outside training
    y_eval = layer(x)
    y_ref, _ = reference_moe_lora(
        x, layer.base.weight, layer.base.bias, layer.router, layer.lora_a, layer.lora_b, 2, layer.scaling
    )
    torch.testing.assert_close(y_eval, y_ref, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------
# torch.compile(fullgraph=True)


def _two_layer_model():
    torch.manual_seed(0)
    model = nn.Sequential(
        mola.MoLALinear(nn.Linear(16, 16), 4, 2, 4, layer_index=0),
        mola.MoLALinear(nn.Linear(16, 8), 3, 1, 2, compute="grouped", layer_index=1),
    )
    randomise_lora_b(*model)
    return model


def _fwd_bwd(call, model, x):
    """y and the grads of x and the trainable parameters for a loss on y and on both layers' router logits."""
    y = call(x)
    loss = probe(y, model[0].router_logits, model[1].router_logits)
    params = [x] + [p for p in model.parameters() if p.requires_grad]
    return y, torch.autograd.grad(loss, params)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compile_fullgraph_matches_eager(backend):
    torch._dynamo.reset()
    eager = _two_layer_model()
    twin = copy.deepcopy(eager)
    compiled = torch.compile(twin, backend=backend, fullgraph=True)
    x = torch.randn(3, 5, 16, requires_grad=True)
    y_eager, g_eager = _fwd_bwd(eager, eager, x)
    # the compiled call must store router_logits on the modules just as eager does
    y_comp, g_comp = _fwd_bwd(compiled, twin, x)
    torch.testing.assert_close(y_comp, y_eager, rtol=1e-5, atol=1e-5)
    assert_all_close(g_comp, g_eager, rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------
# bad inputs name the offending argument


def _error_case(num_experts=4, rank=3, top_k=2, **changes):
    x, weight, b, router, lora_a, lora_b = make_inputs(num_experts, rank, (5,), dtype=torch.float32)
    args = dict(x=x, weight=weight, bias=b, router=router, lora_a=lora_a, lora_b=lora_b)
    for name, shape in changes.items():
        args[name] = torch.randn(*shape)
    return args


E_, R_ = 4, 3
BAD_SHAPES = [
    ("lora_a_in", dict(lora_a=(E_, R_, IN_FEATURES + 1)), "lora_a"),
    ("lora_a_experts", dict(lora_a=(E_ + 1, R_, IN_FEATURES)), "lora_a|router"),
    ("lora_b_rank", dict(lora_b=(E_, OUT_FEATURES, R_ + 1)), "lora_b"),
    ("lora_b_out", dict(lora_b=(E_, OUT_FEATURES + 1, R_)), "lora_b"),
    ("lora_b_experts", dict(lora_b=(E_ + 1, OUT_FEATURES, R_)), "lora_b|router"),
    ("router_in", dict(router=(E_, IN_FEATURES + 1)), "router"),
    ("router_experts", dict(router=(E_ + 1, IN_FEATURES)), "router|lora_a"),
]


@pytest.mark.parametrize("case,changes,match", BAD_SHAPES, ids=[c[0] for c in BAD_SHAPES])
def test_mismatched_shapes_raise(case, changes, match):
    args = _error_case(E_, R_, **changes)
    with pytest.raises((RuntimeError, ValueError), match=match):
        torch.ops.mola.moe_lora(*args.values(), 2, 2.0)


@pytest.mark.parametrize("top_k", [0, E_ + 1])
@pytest.mark.parametrize("compute", [DENSE, GROUPED], ids=["dense", "grouped"])
def test_bad_top_k_raises(top_k, compute):
    args = _error_case(E_, R_)
    with pytest.raises((RuntimeError, ValueError), match="top_k"):
        torch.ops.mola.moe_lora(*args.values(), top_k, 2.0, compute=compute)
    with pytest.raises((RuntimeError, ValueError), match="top_k"):
        torch.ops.mola.moe_lora_route(torch.randn(5, E_), top_k)


def test_dropout_in_training_without_seed_raises():
    args = _error_case(E_, R_)
    with pytest.raises((RuntimeError, ValueError), match="seed"):
        torch.ops.mola.moe_lora(*args.values(), 2, 2.0, dropout_p=0.1, training=True)


@pytest.mark.parametrize("top_k", [0, 5])
def test_module_bad_top_k_raises(top_k):
    with pytest.raises((RuntimeError, ValueError), match="top_k"):
        mola.MoLALinear(nn.Linear(8, 8), 4, top_k, 2)
