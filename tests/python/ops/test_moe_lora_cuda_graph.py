"""moe_lora captured in CUDA graphs, and under torch.compile(mode="reduce-overhead").

The op's CUDA path makes no host synchronisation and reads a CUDA dropout seed on the
device (docs/design.md, Strategies and kernels), so a training step (forward + backward) can be captured once and
replayed: a replay must compute what eager computes on the values the static tensors hold
at replay time, the seed included. The oracle here is the eager op on the same device and
dtype (the eager op itself is checked against the CPU op in test_moe_lora_cuda.py), so the
graph and eager run the same kernels on the same shapes and agree to the last bit, or within
1e-6 (fp32) should a library pick another algorithm under capture. Needs a GPU; skips
without one.
"""
import copy

import pytest
import torch
from torch import nn

import mola

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
if torch.cuda.is_available() and not mola.built_with_cuda:
    pytestmark = pytest.mark.skip(reason="mola was built without CUDA (-DMOLA_WITH_CUDA=ON)")

DEVICE = "cuda"
DENSE, GROUPED = 1, 2
COMPUTES = [DENSE, GROUPED]
COMPUTE_IDS = ["dense", "grouped"]
SCALING = 2.0
TOP_K = 2
# graph vs eager: the same kernels, so equal; the slack is for a library algorithm chosen
# differently under capture (one rounding of the dtype at most)
GRAPH_TOL = {torch.float32: 1e-6, torch.bfloat16: torch.finfo(torch.bfloat16).eps}


def assert_same(got, want, dtype, what):
    tol = GRAPH_TOL[dtype]
    scale = max(1.0, float(want.detach().abs().max())) if want.numel() else 1.0
    torch.testing.assert_close(got, want, rtol=tol, atol=tol * scale, msg=lambda m: f"{what}: {m}")


def random_values(dtype, seed, T=133, din=40, dout=72, E=8, r=8):
    """x [T, in], weight, bias, router, lora_a, lora_b, and probes gy [T, out], gl [T, E]
    on the device (T, in, out not multiples of a tile)."""
    gen = torch.Generator().manual_seed(seed)
    shapes = [(T, din), (dout, din), (dout,), (E, din), (E, r, din), (E, dout, r), (T, dout), (T, E)]
    scales = [1.0, din**-0.5, 1.0, 1.0, din**-0.5, r**-0.5, 1.0, 1.0]
    return [(torch.randn(s, generator=gen, dtype=torch.float64) * c).to(DEVICE, dtype)
            for s, c in zip(shapes, scales)]


def op_step(x, weight, bias, router, lora_a, lora_b, gy, gl, compute, dropout_p, seed):
    """One forward + backward of the raw op: (y, logits, dx, drouter, dA, dB)."""
    y, logits = torch.ops.mola.moe_lora(x, weight, bias, router, lora_a, lora_b, TOP_K, SCALING,
                                        dropout_p, dropout_p > 0, compute, seed)
    grads = torch.autograd.grad([y, logits], [x, router, lora_a, lora_b], [gy, gl])
    return (y.detach(), logits.detach(), *grads)


def eager_step(values, compute, dropout_p, seed):
    x, w, b, router, a, bb, gy, gl = values
    leaves = [t.detach().clone().requires_grad_() for t in (x, router, a, bb)]
    return op_step(leaves[0], w, b, leaves[1], leaves[2], leaves[3], gy, gl, compute, dropout_p,
                   seed)


def capture(fn, warmup=3):
    """fn() captured in a CUDAGraph after `warmup` eager calls on a side stream, as the
    PyTorch CUDA graphs notes prescribe (warm-up lazily initialises libraries and the
    autograd engine outside the capture). Returns the graph and fn's static outputs."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = fn()
    return graph, static_out


@pytest.mark.parametrize("dropout_p", [0.0, 0.1], ids=["p0", "p0.1"])
@pytest.mark.parametrize("compute", COMPUTES, ids=COMPUTE_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_raw_op_graph_replays_like_eager(dtype, compute, dropout_p):
    names = ["y", "logits", "x.grad", "router.grad", "lora_a.grad", "lora_b.grad"]
    static = random_values(dtype, seed=0)
    x, w, b, router, a, bb, gy, gl = static
    for t in (x, router, a, bb):
        t.requires_grad_()
    seed = torch.tensor([1234], device=DEVICE)  # read on the device at replay time
    graph, static_out = capture(lambda: op_step(x, w, b, router, a, bb, gy, gl, compute,
                                                dropout_p, seed))

    for round_ in (1, 2):
        # new values in every input, as a data loader and an optimiser step would leave them
        new = random_values(dtype, seed=round_)
        with torch.no_grad():
            for dst, src in zip(static, new):
                dst.copy_(src)
        graph.replay()
        want = eager_step(new, compute, dropout_p, seed)
        for name, got_t, want_t in zip(names, static_out, want):
            assert_same(got_t, want_t, dtype, f"round {round_}, {name}")

    if dropout_p:
        # the seed is a device tensor: filling it changes the mask of the next replay
        before = eager_step(new, compute, dropout_p, seed)
        seed.fill_(98765)
        graph.replay()
        after = eager_step(new, compute, dropout_p, torch.tensor([98765]))
        for name, got_t, want_t in zip(names, static_out, after):
            assert_same(got_t, want_t, dtype, f"after the seed changed, {name}")
        assert not torch.equal(static_out[0], before[0]), "the replay still used the old seed"
        assert torch.equal(static_out[1], before[1]), "no dropout on the router input"


def _layer(compute, dtype, seed=0):
    torch.manual_seed(seed)
    layer = mola.MoLALinear(nn.Linear(40, 72), num_experts=8, top_k=TOP_K, rank=8, alpha=16,
                            dropout=0.0, compute=compute, layer_index=0)
    with torch.no_grad():
        layer.lora_b.normal_(0.0, 0.3)  # B = 0 at init would hide the router's gradient
    return layer.to(DEVICE, dtype).train()


def module_step(layer, x, gy):
    """A training step's gradients: y, then d(<y, gy> + aux loss) for x and the adapter."""
    y = layer(x)
    loss = (y * gy).sum() + mola.aux_loss(layer, coef=0.1)
    grads = torch.autograd.grad(loss, [x, layer.router, layer.lora_a, layer.lora_b])
    return (y.detach(), *grads)


@pytest.mark.parametrize("compute", ["dense", "grouped"])
def test_molalinear_training_step_graph(compute):
    # dropout 0, so that eager can redo the step exactly (under capture MoLALinear draws
    # its seed on the device, out of the test's reach); dropout under capture with known
    # seeds is the raw op's test above, with MoLALinear's own seeds the test below.
    dtype = torch.float32
    layer = _layer(compute, dtype)
    twin = copy.deepcopy(layer)
    gen = torch.Generator().manual_seed(3)
    static_x = torch.randn(3, 45, 40, generator=gen).to(DEVICE).requires_grad_()
    static_gy = torch.randn(3, 45, 72, generator=gen).to(DEVICE)
    graph, static_out = capture(lambda: module_step(layer, static_x, static_gy))

    for round_ in (1, 2):
        x_new = torch.randn(3, 45, 40, generator=gen).to(DEVICE)
        gy_new = torch.randn(3, 45, 72, generator=gen).to(DEVICE)
        step = torch.randn(layer.lora_b.shape, generator=gen).to(DEVICE) * 0.1
        with torch.no_grad():
            static_x.copy_(x_new)
            static_gy.copy_(gy_new)
            layer.lora_b.add_(step)  # an optimiser step between replays
            twin.lora_b.add_(step)
        graph.replay()
        want = module_step(twin, x_new.clone().requires_grad_(), gy_new)
        for name, got_t, want_t in zip(["y", "x.grad", "router.grad", "lora_a.grad", "lora_b.grad"],
                                       static_out, want):
            assert_same(got_t, want_t, dtype, f"round {round_}, {name}")


@pytest.mark.parametrize("compute", ["dense", "grouped"])
def test_molalinear_dropout_graph_draws_a_new_mask_per_replay(compute):
    # Under capture MoLALinear draws its seed with torch.randint on the device, which CUDA
    # graphs make replay-safe (the generator's offset advances per replay): every replay of
    # the same inputs gets another mask, unlike a seed baked in at capture.
    layer = _layer(compute, torch.float32)
    layer.dropout = 0.3
    gen = torch.Generator().manual_seed(4)
    static_x = torch.randn(133, 40, generator=gen).to(DEVICE).requires_grad_()
    static_gy = torch.randn(133, 72, generator=gen).to(DEVICE)
    graph, static_out = capture(lambda: module_step(layer, static_x, static_gy))
    replays = []
    for _ in range(2):
        graph.replay()
        replays.append([t.clone() for t in static_out])
    layer.eval()  # no dropout: the plain layer
    plain = layer(static_x.detach())
    assert all(torch.isfinite(t).all() for r in replays for t in r)
    assert not torch.equal(replays[0][0], replays[1][0]), "two replays used the same mask"
    assert not torch.equal(replays[0][0], plain), "the replay applied no dropout"
    assert not torch.equal(replays[0][3], replays[1][3]), "dA must follow each replay's mask"


def test_compile_reduce_overhead_matches_eager():
    torch._dynamo.reset()
    from torch._dynamo.utils import counters
    counters.clear()
    torch.manual_seed(0)
    eager = nn.Sequential(
        mola.MoLALinear(nn.Linear(40, 48), 4, 2, 8, compute="dense", layer_index=0),
        mola.MoLALinear(nn.Linear(48, 24), 8, 2, 8, compute="grouped", layer_index=1),
    )
    with torch.no_grad():
        for layer in eager:
            layer.lora_b.normal_(0.0, 0.3)
    eager = eager.to(DEVICE).train()
    twin = copy.deepcopy(eager)
    compiled = torch.compile(twin, mode="reduce-overhead", fullgraph=True)

    def step(model, call, x):
        y = call(x)
        loss = y.square().sum() + mola.aux_loss(model, coef=0.1)
        params = [x] + [p for p in model.parameters() if p.requires_grad]
        # clone: cudagraph outputs are overwritten by the next replay
        return [t.detach().clone() for t in (y, *torch.autograd.grad(loss, params))]

    gen = torch.Generator().manual_seed(1)
    for i in range(4):  # warm-up, recording, then replays of the cudagraph tree
        x = torch.randn(2, 37, 40, generator=gen).to(DEVICE).requires_grad_()
        torch.compiler.cudagraph_mark_step_begin()
        got = step(twin, compiled, x)
        want = step(eager, eager, x.detach().clone().requires_grad_())
        for j, (g, w) in enumerate(zip(got, want)):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5,
                                       msg=lambda m: f"call {i}, output {j}: {m}")
    skips = counters["inductor"]["cudagraph_skips"]
    assert skips == 0, f"inductor skipped CUDA graphs {skips} time(s); its log says why"


def test_compile_fullgraph_with_dropout_draws_the_seed_on_the_device():
    # MoLALinear draws its dropout seed with torch.randint on x's device: traceable (one
    # graph, no break) and the same draw as eager from the same torch.manual_seed
    torch._dynamo.reset()
    torch.manual_seed(0)
    layer = mola.MoLALinear(nn.Linear(40, 48), 4, 2, 8, dropout=0.1, compute="dense").to(DEVICE)
    with torch.no_grad():
        layer.lora_b.normal_(0.0, 0.3)
    layer.train()
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    x = torch.randn(37, 40, device=DEVICE)
    torch.manual_seed(5)
    got = compiled(x)
    torch.manual_seed(5)
    want = layer(x)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    layer.eval()
    assert not torch.equal(want, layer(x)), "training applied no dropout"
