"""moe_lora on CUDA against the CPU op (the oracle), forward and gradients.

The CPU op (src/ops/cpu/moe_lora.cpp) in float64 is the oracle: every CUDA result, in
every dtype, is compared with the CPU op run in float64 on the same (dtype-rounded)
values, with a tolerance derived from the dtype and the reduction length (`tolerance`).
Beyond that: dense and grouped agree on CUDA, gradcheck in float64 on the GPU, opcheck
with CUDA tensors, a CUDA seed tensor equals a CPU one, forward + backward make no host
synchronisation, and two runs are bit-identical. CUDA graphs and torch.compile are in
test_moe_lora_cuda_graph.py. Everything here needs a GPU and skips without one.

Routing is discontinuous (top-k), so a comparison across dtypes is only fair when both
sides route alike. `make_case` builds the router so that the logits are exact in every
dtype (each expert reads one input column, scaled by a power of two, and those columns
hold distinct small multiples of a power of two): both sides then pick the same experts
and any difference is rounding.
"""
import math

import pytest
import torch

import mola

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
if torch.cuda.is_available() and not mola.built_with_cuda:
    pytestmark = pytest.mark.skip(reason="mola was built without CUDA (-DMOLA_WITH_CUDA=ON)")

DENSE, GROUPED = 1, 2
COMPUTES = [DENSE, GROUPED]
COMPUTE_IDS = ["dense", "grouped"]
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
DTYPE_IDS = ["f64", "f32", "bf16", "f16"]
LEAVES = ("x", "weight", "bias", "router", "lora_a", "lora_b")
SCALING = 2.0
LBL_COEF = 1.0  # the balance loss at full weight, so its gradient on the logits is visible

DEVICE = "cuda"  # the device under test; the CPU op on float64 is the oracle

# --------------------------------------------------------------------------
# tolerances derived from the dtype

# Error model of one output element against the float64 oracle fed the same rounded inputs:
#  (a) a fixed number of roundings to the storage dtype along its path (forward: h, u = s g h,
#      the expand product, y + delta; backward: du, dh, the products, the accumulation into
#      dx), each at most eps/2 relative: at most ~6 of them, 3 eps. C_ROUND = 8 leaves a
#      factor ~2.5 for the cancellation in the softmax backward, dz = P (.) (dP - <dP, P>).
#  (b) the accumulation of a K-term sum in the accumulation dtype (fp32 for fp32, bf16 and
#      fp16: tensor cores and ATen's CPU kernels both accumulate in fp32; fp64 for fp64),
#      which grows like sqrt(K) for rounding errors of random sign (Higham and Mary's
#      probabilistic bound, 2019). C_ACC = 2 gives a factor ~2 over the random-walk estimate.
# Both were checked on the CPU (the fp32, bf16 and fp16 CPU op against the fp64 one, on every
# case of STRESS): the largest error seen is below a quarter of this bound. For fp32 and a
# reduction of ~1000 terms the bound is ~9e-6, inside the 1e-5 the op promises.
C_ROUND = 8.0
C_ACC = 2.0


def accumulation_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def tolerance(dtype, reduction_length):
    """Relative error bound of a result of `dtype` whose terms went through a sum of
    `reduction_length` terms (the longest chain of sums feeding it)."""
    acc = accumulation_dtype(dtype)
    return (C_ROUND * torch.finfo(dtype).eps
            + C_ACC * torch.finfo(acc).eps * math.sqrt(reduction_length))


def reduction_lengths(case):
    """The longest chain of sums (docs/design.md, Strategies and kernels) behind each output and gradient of `case`."""
    T, din, dout = case["T"], case["din"], case["dout"]
    E, r, k = case["E"], case["r"], case["k"]
    return {
        "y": din + E * r,               # x W^T over in; h over in, then the expand over E*r
        "logits": din,                  # x Wr^T
        "x": dout + E * r + E + dout,   # du = dy B over out, dh A over E*r, dz Wr over E
        "weight": T,                    # dy^T x
        "bias": T,
        "router": T + dout,             # dz^T x, dz from du (over out)
        "lora_a": T + dout,             # dh^T x~, dh from du
        "lora_b": T + din,              # dy^T u, u from h (over in)
    }


def blockwise_relative_error(got, want, token_rows=False):
    """max over rows of |got_i - want_i| / max(|want_i|, rms): rows are the tokens (every
    leading dim flattened) when `token_rows`, else the slices along dim 0 (experts).

    Per row, so that a wrong tail tile (T not a multiple of the tile) cannot hide in the
    norm of the whole tensor; floored at the rows' root-mean-square norm, so a row whose
    exact value nearly cancels is held to the accuracy its terms allow.
    """
    got = got.detach().to("cpu", torch.float64)
    want = want.detach().to("cpu", torch.float64)
    assert got.shape == want.shape, f"shape {tuple(got.shape)} != {tuple(want.shape)}"
    if want.numel() == 0:
        return 0.0
    if token_rows:
        got2, want2 = got.reshape(-1, want.shape[-1]), want.reshape(-1, want.shape[-1])
    else:
        got2, want2 = got.reshape(want.shape[0], -1), want.reshape(want.shape[0], -1)
    rows = want2.norm(dim=1)
    rms = want2.norm() / math.sqrt(want2.shape[0])
    denom = torch.maximum(rows, rms)
    diff = (got2 - want2).norm(dim=1)
    if float(rms) == 0.0:  # an exactly zero result must be reproduced exactly
        return float(diff.max())
    return float((diff / denom).max())


TOKEN_ROWS = ("y", "logits", "x")  # outputs with one row per token


def assert_matches(name, got, want, tol):
    assert torch.isfinite(got.detach().double().cpu()).all(), f"{name}: non-finite values"
    err = blockwise_relative_error(got, want, token_rows=name in TOKEN_ROWS)
    assert err <= tol, f"{name}: relative error {err:.3e} above the bound {tol:.3e}"


# --------------------------------------------------------------------------
# inputs


def _distinct_grid(gen, tokens, experts):
    """[tokens, experts]: per row, `experts` distinct integers from [-2E, 2E), times
    2^-ceil(log2 E), so logits lie in [-2, 2), at least one step apart (no ties), and are
    exact in bfloat16 (|integer| <= 128) and float16."""
    step = 2.0 ** -math.ceil(math.log2(experts)) if experts > 1 else 1.0
    ints = torch.stack([torch.randperm(4 * experts, generator=gen)[:experts] for _ in range(tokens)])
    return (ints - 2 * experts).to(torch.float64) * step


def make_case(case, dtype, seed=0):
    """The op's inputs for `case` as float64 CPU tensors holding values exact in `dtype`:
    (x [*lead, in], weight, bias or None, router, lora_a, lora_b).

    Expert e's router row is s_e (a signed power of two) at one column c_e, zero elsewhere,
    and x[:, c_e] = z[:, e] / s_e with z from `_distinct_grid`: the logits x Wr^T = z are
    exact in any dtype and tie-free, so the fp32 routing picks the same experts on both
    sides. The other columns of x, and all other tensors, are Gaussian (rounded to dtype).
    """
    gen = torch.Generator().manual_seed(seed)
    lead, din, dout, E, r = case["lead"], case["din"], case["dout"], case["E"], case["r"]
    assert din >= E, "make_case gives each expert its own input column: needs in >= E"
    T = math.prod(lead)
    f64 = dict(generator=gen, dtype=torch.float64)
    cols = torch.randperm(din, generator=gen)[:E]
    scales = 2.0 ** torch.randint(-1, 2, (E,), generator=gen).double()
    scales = scales * (torch.randint(0, 2, (E,), generator=gen).double() * 2 - 1)
    router = torch.zeros(E, din, dtype=torch.float64)
    router[torch.arange(E), cols] = scales
    x = torch.randn(T, din, **f64)
    x[:, cols] = _distinct_grid(gen, T, E) / scales
    weight = torch.randn(dout, din, **f64) / math.sqrt(din)
    bias = torch.randn(dout, **f64) if case.get("bias", True) else None
    lora_a = torch.randn(E, r, din, **f64) / math.sqrt(din)
    lora_b = torch.randn(E, dout, r, **f64) / math.sqrt(r)
    tensors = [x.reshape(*lead, din), weight, bias, router, lora_a, lora_b]
    return [None if t is None else t.to(dtype).to(torch.float64) for t in tensors]


def with_layout(x, layout):
    """x (same values) as a contiguous tensor, a transposed view or an offset column slice."""
    if layout == "contiguous":
        return x.contiguous()
    if layout == "transpose":  # unit stride along tokens: [..., T, in] stored as [..., in, T]
        return x.transpose(-1, -2).contiguous().transpose(-1, -2)
    if layout == "slice":  # rows of in+5 elements, starting 2 in: a storage offset and a row stride
        pad = x.new_zeros(*x.shape[:-1], 5)
        wide = torch.cat([pad[..., :2], x, pad[..., 2:]], dim=-1)
        return wide[..., 2:2 + x.shape[-1]]
    raise ValueError(f"unknown layout {layout!r}")


def probes(shapes, seed=99):
    """Fixed random weights (float64, CPU) for a linear functional of each output."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]


def run_op(case, tensors, device, dtype, compute, dropout_p, seed, grads=None, layout="contiguous",
           values_dtype=None):
    """moe_lora on `device` in `dtype` and the gradients of the leaves named in `grads`
    (default case["grads"]) of <y, gy> + <logits, gl> + balance loss(logits), with the
    probes gy, gl rounded to `values_dtype` (default `dtype`), so that the oracle
    differentiates with the very probes the low-precision run uses.

    Returns {name: tensor} with y, logits and one entry per differentiated leaf. The other
    leaves do not require grad, so the op's backward sees that subset in needs_input_grad.
    """
    grads = case.get("grads", ("x", "router", "lora_a", "lora_b")) if grads is None else grads
    leaves = {}
    for name, t in zip(LEAVES, tensors):
        if t is None:
            leaves[name] = None
            continue
        t = t.to(device=device, dtype=dtype)
        if name == "x":
            t = with_layout(t, layout)
        leaves[name] = t.detach().requires_grad_(name in grads)
    y, logits = torch.ops.mola.moe_lora(
        *(leaves[n] for n in LEAVES), case["k"], SCALING, dropout_p, dropout_p > 0, compute, seed,
        case.get("shared", False))
    out = {"y": y.detach(), "logits": logits.detach()}
    gy, gl = (p.to(values_dtype or dtype).to(y) for p in probes([y.shape, logits.shape]))
    loss = (y * gy).sum() + (logits * gl).sum()
    loss = loss + torch.ops.mola.load_balancing_loss([logits], [case["k"]], LBL_COEF)
    wanted = [n for n in LEAVES if n in grads and leaves[n] is not None]
    got = torch.autograd.grad(loss, [leaves[n] for n in wanted])
    out.update(zip(wanted, got))
    return out


def seed_for(dropout_p, device="cpu", value=20241123):
    return torch.tensor([value], dtype=torch.int64, device=device) if dropout_p else None


# --------------------------------------------------------------------------
# the stress matrix: CUDA in every dtype vs the CPU op in float64


def _case(name, lead, din, dout, E, k, r, **extra):
    c = dict(name=name, lead=lead, din=din, dout=dout, E=E, k=k, r=r, T=math.prod(lead))
    c.update(extra)
    return c


ALL_GRADS = LEAVES
STRESS = [
    _case("T1", (1,), 24, 40, 8, 2, 8),
    _case("T37", (37,), 24, 40, 8, 2, 4),
    _case("T133-transposed-x", (133,), 40, 72, 4, 2, 16, layout="transpose"),
    _case("T1000-nobias", (1000,), 72, 24, 8, 2, 8, bias=False),
    _case("E1", (37,), 24, 40, 1, 1, 8),
    _case("k=E", (133,), 40, 24, 8, 8, 4),
    _case("r64", (133,), 72, 40, 4, 2, 64),
    _case("E64-r8", (133,), 72, 72, 64, 2, 8),
    _case("E8-r64", (133,), 72, 40, 8, 2, 64),
    _case("BxS-sliced-x", (3, 45), 40, 24, 8, 3, 8, layout="slice"),
    _case("BxS-transposed-x", (2, 19), 24, 40, 4, 2, 8, layout="transpose", bias=False),
    _case("wide-out", (257,), 256, 1024, 8, 2, 16),
    _case("wide-in", (64,), 1024, 256, 16, 4, 8),
    _case("frozen-x", (37,), 24, 40, 8, 2, 8, grads=("router", "lora_a", "lora_b")),
    _case("frozen-router", (133,), 40, 24, 8, 2, 8, grads=("x", "lora_a", "lora_b")),
    _case("base-grads", (37,), 24, 40, 8, 2, 8, grads=ALL_GRADS),
    _case("lora_a-only", (37,), 40, 24, 8, 2, 8, grads=("lora_a",)),
    _case("x-only", (37,), 40, 24, 8, 2, 8, grads=("x",)),
]


def compare_with_oracle(case, dtype, compute, dropout_p):
    tensors = make_case(case, dtype)
    seed = seed_for(dropout_p)
    want = run_op(case, tensors, "cpu", torch.float64, compute, dropout_p, seed, values_dtype=dtype)
    got = run_op(case, tensors, DEVICE, dtype, compute, dropout_p, seed,
                 layout=case.get("layout", "contiguous"))
    assert set(got) == set(want)
    lengths = reduction_lengths(case)
    for name in want:
        assert got[name].device.type == DEVICE and got[name].dtype == dtype, name
        assert_matches(name, got[name], want[name], tolerance(dtype, lengths[name]))


@pytest.mark.parametrize("dropout_p", [0.0, 0.1], ids=["p0", "p0.1"])
@pytest.mark.parametrize("compute", COMPUTES, ids=COMPUTE_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", STRESS, ids=[c["name"] for c in STRESS])
def test_stress_matches_cpu_float64(case, dtype, compute, dropout_p):
    compare_with_oracle(case, dtype, compute, dropout_p)


# The shared dropout mask (dropout_masks "shared"): the dense kernels' fused masked
# shrink and dropout pass, and the grouped kernels' stream 0; the default per-expert
# masks above run grouped with each expert's stream.
@pytest.mark.parametrize("compute", COMPUTES, ids=COMPUTE_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", STRESS, ids=[c["name"] for c in STRESS])
def test_stress_shared_masks_match_cpu_float64(case, dtype, compute):
    compare_with_oracle(dict(case, shared=True), dtype, compute, 0.1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("name", ["T37", "T1000-nobias", "k=E", "E64-r8", "E8-r64", "BxS-sliced-x"])
def test_dense_and_grouped_agree_on_cuda(name, dtype):
    case = next(c for c in STRESS if c["name"] == name)
    tensors = make_case(case, dtype, seed=1)
    seed = seed_for(0.1, DEVICE)
    layout = case.get("layout", "contiguous")
    dense = run_op(case, tensors, DEVICE, dtype, DENSE, 0.1, seed, layout=layout)
    grouped = run_op(case, tensors, DEVICE, dtype, GROUPED, 0.1, seed, layout=layout)
    lengths = reduction_lengths(case)
    for name_ in dense:
        # each is within tolerance() of the exact result, so of each other within twice that
        assert_matches(name_, grouped[name_], dense[name_], 2 * tolerance(dtype, lengths[name_]))


def test_auto_picks_a_strategy_that_matches():
    # compute=0 must route to one of the two and give the same result as that one on CUDA
    case = next(c for c in STRESS if c["name"] == "E64-r8")  # E*r = 512: the grouped side
    tensors = make_case(case, torch.float32)
    auto = run_op(case, tensors, DEVICE, torch.float32, 0, 0.0, None)
    want = run_op(case, tensors, "cpu", torch.float64, 0, 0.0, None, values_dtype=torch.float32)
    lengths = reduction_lengths(case)
    for name in auto:
        assert_matches(name, auto[name], want[name], tolerance(torch.float32, lengths[name]))


# --------------------------------------------------------------------------
# gradcheck in float64 on the GPU (the kernels are instantiated for double)

GRADCHECK_SEED = 31344  # its p = 0.1 mask over the [4, 5] input drops 4 of 20 elements (asserted)


@pytest.mark.parametrize("compute", COMPUTES, ids=COMPUTE_IDS)
@pytest.mark.parametrize(
    "lead,E,k,dropout_p,bias,seed_device",
    [((4,), 3, 2, 0.0, True, None), ((2, 2), 3, 3, 0.0, False, None), ((4,), 4, 1, 0.0, True, None),
     ((4,), 1, 1, 0.0, True, None), ((4,), 3, 2, 0.1, True, "cpu"), ((2, 2), 3, 2, 0.1, False, DEVICE)],
    ids=["top2of3", "dense3-BS-nobias", "top1of4", "E1", "dropout-cpu-seed", "dropout-cuda-seed-BS"])
def test_gradcheck_cuda_float64(lead, E, k, dropout_p, bias, seed_device, compute):
    gen = torch.Generator().manual_seed(7 + E + k)
    din, dout, r = 5, 3, 2
    f64 = dict(generator=gen, dtype=torch.float64)
    tensors = [torch.randn(*lead, din, **f64), torch.randn(dout, din, **f64),
               torch.randn(dout, **f64) if bias else None, torch.randn(E, din, **f64),
               torch.randn(E, r, din, **f64), torch.randn(E, dout, r, **f64)]
    params = [t.to(DEVICE).requires_grad_() for t in tensors if t is not None]
    training = dropout_p > 0
    seed = None
    if training:
        mask = torch.ops.mola._dropout_mask(torch.tensor([GRADCHECK_SEED]), math.prod(lead), din,
                                            dropout_p)
        assert 0 < int((mask == 0).sum()) < mask.numel(), "the seed's mask must drop something"
        seed = torch.tensor([GRADCHECK_SEED], device=seed_device)

    def fn(*p):
        x, w = p[0], p[1]
        b = p[2] if bias else None
        router, a, bb = p[-3:]
        # both outputs: gradcheck differentiates y and router_logits
        return torch.ops.mola.moe_lora(x, w, b, router, a, bb, k, 1.5, dropout_p, training,
                                       compute, seed)

    assert torch.autograd.gradcheck(fn, params, eps=1e-6, atol=1e-7, rtol=1e-5)


# --------------------------------------------------------------------------
# opcheck with CUDA tensors


def _opcheck_sample(dtype, lead, E, k, compute, dropout_p=0.0, bias=True, grads=LEAVES,
                    seed_device="cpu", layout="contiguous"):
    case = _case("opcheck", lead, 8, 6, E, k, 3)
    case["bias"] = bias
    tensors = make_case(case, dtype)
    args = []
    for name, t in zip(LEAVES, tensors):
        if t is None:
            args.append(None)
            continue
        t = t.to(DEVICE, dtype)
        if name == "x":
            t = with_layout(t, layout)
        args.append(t.detach().requires_grad_(name in grads))
    kwargs = dict(dropout_p=dropout_p, training=dropout_p > 0, compute=compute,
                  dropout_seed=seed_for(dropout_p, seed_device, 4242))
    return tuple(args) + (k, SCALING), kwargs


OPCHECK_SAMPLES = {
    "f32-dense": lambda: _opcheck_sample(torch.float32, (6,), 4, 2, DENSE),
    "f32-grouped-adapter-grads": lambda: _opcheck_sample(
        torch.float32, (6,), 4, 2, GROUPED, grads=("router", "lora_a", "lora_b")),
    "f64-auto-3d-nobias": lambda: _opcheck_sample(torch.float64, (2, 3), 4, 4, 0, bias=False),
    "bf16-grouped-no-grad": lambda: _opcheck_sample(torch.bfloat16, (7,), 4, 2, GROUPED, grads=()),
    "f32-dropout-dense-cuda-seed": lambda: _opcheck_sample(
        torch.float32, (2, 3), 4, 2, DENSE, 0.25, seed_device=DEVICE),
    "f64-dropout-grouped-cpu-seed-x-only": lambda: _opcheck_sample(
        torch.float64, (6,), 4, 2, GROUPED, 0.25, grads=("x",)),
    "f32-transposed-x-grouped": lambda: _opcheck_sample(
        torch.float32, (6,), 4, 2, GROUPED, layout="transpose"),
    "f16-E1-dense": lambda: _opcheck_sample(torch.float16, (5,), 1, 1, DENSE),
}


@pytest.mark.parametrize("sample", list(OPCHECK_SAMPLES))
def test_opcheck_moe_lora_cuda(sample):
    args, kwargs = OPCHECK_SAMPLES[sample]()
    torch.library.opcheck(torch.ops.mola.moe_lora.default, args, kwargs)


@pytest.mark.parametrize("compute", COMPUTES, ids=COMPUTE_IDS)
@pytest.mark.parametrize("seed_device", [None, DEVICE], ids=["p0", "cuda-seed"])
def test_opcheck_private_ops_cuda(compute, seed_device):
    # The forward and backward behind moe_lora's autograd (no autograd of their own)
    args, kwargs = _opcheck_sample(torch.float32, (6,), 4, 2, compute,
                                   0.2 if seed_device else 0.0, grads=(), seed_device=seed_device)
    fwd_args = args + (kwargs["dropout_p"], kwargs["training"], compute, kwargs["dropout_seed"])
    torch.library.opcheck(torch.ops.mola._moe_lora_forward.default, fwd_args)
    y, logits, hidden = torch.ops.mola._moe_lora_forward(*fwd_args)
    x, w, _, router, a, bb, k, s, p, training, compute_, seed = fwd_args
    for mask in ([True, False, False, True, True, True], [False, False, False, False, True, False],
                 [True, True, True, True, True, True]):
        bwd_args = (torch.randn_like(y), torch.randn_like(logits), x, w, router, a, bb, logits,
                    hidden, k, s, p, training, compute_, seed, mask)
        torch.library.opcheck(torch.ops.mola._moe_lora_backward.default, bwd_args)
        outs = torch.ops.mola._moe_lora_backward(*bwd_args)
        assert [o is not None for o in outs] == mask


# --------------------------------------------------------------------------
# the seed: a CUDA tensor is read on the device and means the same as a CPU one


@pytest.mark.parametrize("compute", COMPUTES, ids=COMPUTE_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_cuda_seed_equals_cpu_seed(dtype, compute):
    case = next(c for c in STRESS if c["name"] == "T133-transposed-x")
    tensors = make_case(case, dtype)
    value = 2**62 - 3  # a value that needs all 64 bits of the tensor
    cuda_seed = torch.tensor([value], device=DEVICE)
    on_cpu = run_op(case, tensors, DEVICE, dtype, compute, 0.1, torch.tensor([value]))
    on_cuda = run_op(case, tensors, DEVICE, dtype, compute, 0.1, cuda_seed)
    other = run_op(case, tensors, DEVICE, dtype, compute, 0.1, torch.tensor([value - 1], device=DEVICE))
    assert int(cuda_seed.item()) == value, "the op must not change the seed tensor"
    for name in on_cpu:
        assert torch.equal(on_cpu[name], on_cuda[name]), f"{name}: CUDA seed differs from CPU seed"
    assert not torch.equal(on_cpu["y"], other["y"]), "another seed must give another mask"
    assert torch.equal(on_cpu["logits"], other["logits"]), "no dropout on the router input"


# --------------------------------------------------------------------------
# no host synchronisation in forward + backward (what CUDA graph capture needs)


@pytest.mark.parametrize("compute", COMPUTES, ids=COMPUTE_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_forward_backward_without_host_sync(dtype, compute):
    case = next(c for c in STRESS if c["name"] == "BxS-sliced-x")
    tensors = make_case(case, dtype)
    x, w, b, router, a, bb = [t.to(DEVICE, dtype) for t in tensors]
    x = with_layout(x, "slice").detach().requires_grad_()
    leaves = [x, router.requires_grad_(), a.requires_grad_(), bb.requires_grad_()]
    seed = torch.tensor([77], device=DEVICE)
    gy, gl = [t.to(DEVICE, dtype) for t in probes([(*case["lead"], case["dout"]), (case["T"], case["E"])])]

    def step():
        y, logits = torch.ops.mola.moe_lora(x, w, b, router, a, bb, case["k"], SCALING, 0.1, True,
                                            compute, seed)
        return torch.autograd.grad([y, logits], leaves, [gy, gl])

    step()  # once outside, so one-time set-up (cuBLAS handles, lazy module loads) is not counted
    torch.cuda.synchronize()
    old = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")  # a synchronising call now raises RuntimeError
    try:
        grads = step()
    finally:
        torch.cuda.set_sync_debug_mode(old)
    torch.cuda.synchronize()
    for g in grads:
        assert torch.isfinite(g).all()


# --------------------------------------------------------------------------
# determinism: no atomics on the outputs, so two runs agree bit for bit


@pytest.mark.parametrize("compute", COMPUTES, ids=COMPUTE_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_two_runs_are_bit_identical(dtype, compute):
    case = _case("determinism", (1000,), 256, 256, 8, 2, 16, grads=ALL_GRADS)
    tensors = make_case(case, dtype)
    seed = torch.tensor([5], device=DEVICE)
    first = run_op(case, tensors, DEVICE, dtype, compute, 0.1, seed)
    second = run_op(case, tensors, DEVICE, dtype, compute, 0.1, seed)
    for name in first:
        assert torch.equal(first[name], second[name]), f"{name} differs between two runs"


def test_seed_on_another_device_is_refused():
    # x on the CPU with a CUDA seed would reach the CUDA kernels with host pointers;
    # the op names both devices and the fix instead
    gen = torch.Generator().manual_seed(3)
    x, weight, router = (torch.randn(s, generator=gen) for s in ((5, 8), (6, 8), (4, 8)))
    lora_a, lora_b = torch.randn(4, 2, 8, generator=gen), torch.randn(4, 6, 2, generator=gen)
    seed = torch.tensor([11], device=DEVICE)
    with pytest.raises((RuntimeError, ValueError), match="dropout_seed is on cuda"):
        torch.ops.mola.moe_lora(x, weight, None, router, lora_a, lora_b, 2, SCALING, 0.1, True,
                                DENSE, seed)


def test_backward_casts_gradients_to_the_dtype_of_x():
    # a direct call of the backward op with fp32 gradients for a bf16 layer: the kernels
    # read every operand as x's dtype, so the op casts (autograd does so on its own)
    gen = torch.Generator().manual_seed(4)
    T, din, dout, E, r, k = 9, 16, 12, 4, 4, 2
    vals = [torch.randn(s, generator=gen) for s in ((T, din), (dout, din), (E, din), (E, r, din),
                                                   (E, dout, r), (T, dout), (T, E))]
    x, w, router, a, b, gy, gl = (v.to(DEVICE) for v in vals)
    bf = [t.to(torch.bfloat16) for t in (x, w, router, a, b)]
    for compute in (DENSE, GROUPED):
        y, logits, hidden = torch.ops.mola._moe_lora_forward(*bf[:2], None, *bf[2:], k, SCALING,
                                                             0.0, False, compute, None)
        mask = [True, False, False, True, True, True]
        got = torch.ops.mola._moe_lora_backward(gy, gl, *bf[:2], *bf[2:], logits, hidden, k,
                                                SCALING, 0.0, False, compute, None, mask)
        want = torch.ops.mola._moe_lora_backward(gy.bfloat16(), gl.bfloat16(), *bf[:2], *bf[2:],
                                                 logits, hidden, k, SCALING, 0.0, False, compute,
                                                 None, mask)
        for g, wnt in zip(got, want):
            if wnt is not None:
                assert torch.equal(g, wnt)
