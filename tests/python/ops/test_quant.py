"""Quantized base weights (docs/quantization.md): NF4 and int8 against a
reference written here from their definitions (QLoRA's NF4: normal quantiles,
block absmax; int8 per output channel), the block-wise linear against the
dequantized weight, and the MoLA op's base-free form over it against the op
on the dequantized weight.
"""
import pytest
import torch

import mola
from mola import quant


def _nf4_values_from_the_definition():
    # QLoRA builds NF4 from quantiles of N(0, 1): 8 for the positive half and
    # 7 for the negative half, between 0.5 and the offset 0.9677 (the mean of
    # the outermost quantile levels for 15 and 16 bins), plus an exact zero,
    # scaled so the extremes are -1 and 1.
    offset = 0.9677083
    pos = torch.special.ndtri(torch.linspace(offset, 0.5, 9, dtype=torch.float64)[:-1])
    neg = -torch.special.ndtri(torch.linspace(offset, 0.5, 8, dtype=torch.float64)[:-1])
    v = torch.cat([pos, torch.zeros(1, dtype=torch.float64), neg]).sort().values
    return v / v.abs().max()


def _reference_nf4(w):
    """(indices [numel], dequantized absmax per block) per the stored form of quant.h."""
    values = torch.tensor(quant.NF4_VALUES)
    flat = w.float().reshape(-1)
    n = flat.numel()
    blocks = -(-n // 64)
    absmax = torch.nn.functional.pad(flat, (0, blocks * 64 - n)).view(blocks, 64).abs().amax(1)
    offset = absmax.mean()
    groups = -(-blocks // 256)
    centred = torch.nn.functional.pad(absmax - offset, (0, groups * 256 - blocks)).view(groups, 256)
    gmax = centred.abs().amax(1)
    gscale = torch.where(gmax > 0, gmax / 127.0, torch.ones_like(gmax))
    codes = (centred / gscale[:, None]).round().clamp(-127, 127).reshape(-1)[:blocks]
    absq = codes * gscale.repeat_interleave(256)[:blocks] + offset
    scaled = flat / absq.repeat_interleave(64)[:n]
    mids = (values[1:] + values[:-1]) / 2
    idx = torch.searchsorted(mids, scaled, right=False)  # midpoints strictly below: ties go down
    return idx, absq


def _unpack(data, n):
    hi, lo = data >> 4, data & 0x0F
    return torch.stack([hi, lo], 1).reshape(-1)[:n].long()


def test_nf4_values_are_qloras_normal_quantiles():
    assert len(quant.NF4_VALUES) == 16
    assert torch.allclose(torch.tensor(quant.NF4_VALUES, dtype=torch.float64), _nf4_values_from_the_definition(),
                          atol=1e-6)
    assert quant.NF4_VALUES[7] == 0.0 and quant.NF4_VALUES[0] == -1.0 and quant.NF4_VALUES[15] == 1.0


@pytest.mark.parametrize("shape", [(96, 200), (3, 37), (600, 64)])
def test_nf4_matches_the_reference_and_its_error_bound(shape):
    torch.manual_seed(0)
    w = torch.randn(shape) * 0.02
    q = quant.quantize(w, "nf4")
    n = w.numel()
    idx, absq = _reference_nf4(w)
    got = _unpack(q.tensors["data"], n)
    assert (got == idx).float().mean() > 0.9999  # ties at a midpoint may round either way in float
    assert q.tensors["data"].dtype == torch.uint8 and q.tensors["data"].numel() == -(-n // 2)
    assert q.tensors["scale"].dtype == torch.int8 and q.tensors["scale"].numel() == -(-n // 64)
    deq = quant.dequantize(q)
    values = torch.tensor(quant.NF4_VALUES)
    expected = (values[idx] * absq.repeat_interleave(64)[:n]).view(shape)
    assert torch.allclose(deq, expected, atol=1e-7, rtol=1e-6)
    # The bound: half the widest gap between NF4 values times the block's
    # absmax as stored, plus what the stored absmax lost (a weight beyond it clamps to +-1).
    true_absmax = torch.nn.functional.pad(w.reshape(-1).abs(), (0, -(-n // 64) * 64 - n)).view(-1, 64).amax(1)
    half_gap = (values[1:] - values[:-1]).max() / 2
    bound = (half_gap * absq + (true_absmax - absq).clamp(min=0)).repeat_interleave(64)[:n].view(shape)
    assert ((w - deq).abs() <= bound + 1e-7).all()
    # 4 bits per weight, 8 per block of 64, a float per 256 blocks and the offset.
    blocks = -(-n // 64)
    assert q.nbytes == -(-n // 2) + blocks + 4 * -(-blocks // 256) + 4


def test_int8_round_trip_is_within_half_a_step_per_channel():
    torch.manual_seed(1)
    w = torch.randn(40, 70, dtype=torch.bfloat16)
    w[3] = 0  # an all-zero row keeps a valid scale
    q = quant.quantize(w, "int8")
    scale = q.tensors["scale"]
    wf = w.float()
    assert torch.allclose(scale, wf.abs().amax(1).where(wf.abs().amax(1) > 0, torch.tensor(127.0)) / 127.0)
    deq = quant.dequantize(q)
    assert ((wf - deq).abs() <= scale[:, None] * (0.5 + 1e-5)).all()
    inverse = torch.where(wf.abs().amax(1) > 0, wf.abs().amax(1).reciprocal() * 127.0, torch.tensor(0.0))
    assert torch.equal(q.tensors["data"], (wf * inverse[:, None]).round().clamp(-127, 127).to(torch.int8))
    assert torch.equal(deq[3], torch.zeros(70))


@pytest.mark.parametrize("kind", quant.KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_quantized_linear_equals_the_dequantized_weight(kind, dtype):
    torch.manual_seed(2)
    w = torch.randn(300, 96)
    q = quant.quantize(w, kind)
    deq = quant.dequantize(q, dtype)
    x = torch.randn(2, 5, 96, dtype=dtype, requires_grad=True)
    b = torch.randn(300, dtype=dtype)
    y = quant.linear(x, q, b)
    ref = x @ deq.T + b
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    assert y.shape == (2, 5, 300) and y.dtype == dtype
    assert torch.allclose(y, ref, atol=tol, rtol=tol)
    dy = torch.randn_like(y)
    (gx,) = torch.autograd.grad(y, x, dy)
    assert torch.allclose(gx, dy @ deq, atol=tol, rtol=tol)


def test_blockwise_linear_covers_many_row_blocks():
    # 1 << 20 floats per block: with in = 8192 a block is 128 rows, so 300 rows take three blocks.
    torch.manual_seed(3)
    w = torch.randn(300, 8192) * 0.01
    q = quant.quantize(w, "nf4")
    x = torch.randn(3, 8192)
    assert torch.allclose(quant.linear(x, q), x @ quant.dequantize(q).T, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", quant.KINDS)
@pytest.mark.parametrize("compute", ["dense", "grouped"])
def test_mola_over_a_quantized_base_equals_the_op_on_the_dequantized_weight(kind, compute):
    torch.manual_seed(4)
    T, IN, OUT, E, R, K = 12, 64, 48, 4, 3, 2
    q = quant.quantize(torch.randn(OUT, IN) * 0.1, kind)
    deq = quant.dequantize(q)
    bias = torch.randn(OUT)
    x = torch.randn(T, IN, requires_grad=True)
    router = (torch.randn(E, IN) * 0.3).requires_grad_()
    a = (torch.randn(E, R, IN) * 0.1).requires_grad_()
    b = (torch.randn(E, OUT, R) * 0.1).requires_grad_()
    leaves = [x, router, a, b]

    y_ref, logits_ref = mola.ops.moe_lora(x, deq, bias, router, a, b, K, 2.0, compute=compute)
    # The base-free form: an empty weight; the quantized linear gives the base.
    y_exp, logits = mola.ops.moe_lora(x, torch.empty(0), None, router, a, b, K, 2.0, compute=compute)
    y = quant.linear(x, q, bias) + y_exp
    assert torch.allclose(y, y_ref, atol=1e-5, rtol=1e-5)
    assert torch.equal(logits, logits_ref)
    dy = torch.randn_like(y)
    g_ref = torch.autograd.grad((y_ref * dy).sum() + logits_ref.square().sum(), leaves)
    g = torch.autograd.grad((y * dy).sum() + logits.square().sum(), leaves)
    for name, got, want in zip(("x", "router", "lora_a", "lora_b"), g, g_ref):
        assert torch.allclose(got, want, atol=1e-5, rtol=1e-4), name


def test_base_free_op_with_dropout_matches_and_checks_its_gradient():
    torch.manual_seed(5)
    T, IN, OUT, E, R = 6, 8, 5, 3, 2
    d = torch.float64
    x = torch.randn(T, IN, dtype=d, requires_grad=True)
    router = torch.randn(E, IN, dtype=d, requires_grad=True)
    a = torch.randn(E, R, IN, dtype=d, requires_grad=True)
    b = torch.randn(E, OUT, R, dtype=d, requires_grad=True)
    bias = torch.randn(OUT, dtype=d)
    seed = torch.tensor([11])
    w = torch.randn(OUT, IN, dtype=d)
    full, _ = mola.ops.moe_lora(x, w, bias, router, a, b, 2, 0.5, 0.3, True, dropout_seed=seed)
    free, _ = mola.ops.moe_lora(x, torch.empty(0, dtype=d), bias, router, a, b, 2, 0.5, 0.3, True,
                                dropout_seed=seed)
    assert torch.allclose(free, full - x @ w.T, atol=1e-12)
    fn = lambda x, router, a, b: mola.ops.moe_lora(x, torch.empty(0, dtype=d), bias, router, a, b, 2, 0.5, 0.3,
                                                    True, dropout_seed=seed)[0]
    assert torch.autograd.gradcheck(fn, (x, router, a, b))


def test_errors_name_the_value_and_the_fix():
    with pytest.raises(ValueError, match=r'"nf5".*"nf4"'):
        quant.quantize(torch.randn(4, 4), "nf5")
    with pytest.raises(ValueError, match=r"\[out, in\]"):
        quant.quantize(torch.randn(4), "int8")
    with pytest.raises(ValueError, match="floating point"):
        quant.quantize(torch.ones(4, 4, dtype=torch.long), "int8")
    q = quant.quantize(torch.randn(4, 8), "int8")
    with pytest.raises(ValueError, match="8"):
        quant.linear(torch.randn(2, 7), q)
    with pytest.raises(ValueError, match=r"weight must be \[out, in\]"):
        mola.ops.moe_lora(torch.randn(2, 8), torch.randn(2, 2, 2), None, torch.randn(2, 8), torch.randn(2, 1, 8),
                          torch.randn(2, 4, 1), 1, 1.0)
    with pytest.raises(ValueError, match="floating point"):
        quant.linear(torch.ones(2, 8, dtype=torch.long), q)
    with pytest.raises(ValueError, match="floating point"):
        quant.dequantize(q, torch.int32)


def test_the_stored_tensors_move_together_and_a_split_weight_is_named():
    q = quant.quantize(torch.randn(6, 64), "nf4")
    assert q.device == torch.device("cpu")
    same = q.to("cpu")
    assert same.kind == q.kind and all(torch.equal(same.tensors[k], t) for k, t in q.tensors.items())
    split = quant.QuantizedWeight(q.kind, q.out_features, q.in_features,
                                  {**q.tensors, "scale": q.tensors["scale"].to("meta")})
    with pytest.raises(ValueError, match=r'"scale" is on meta but "data" on cpu.*QuantizedWeight.to'):
        quant.dequantize(split)
    missing = quant.QuantizedWeight(q.kind, q.out_features, q.in_features, {"data": q.tensors["data"]})
    with pytest.raises(ValueError, match=r'"data" and "scale" are both needed'):
        quant.dequantize(missing)
