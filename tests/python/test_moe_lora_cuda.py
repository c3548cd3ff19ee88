"""moe_lora on CUDA against the CPU op (the oracle), forward and gradients.

Until the fused kernels land, CUDA runs the ATen composition with the routing
kernel; these checks hold it to the CPU results for every dtype and strategy.
They need a GPU and skip without one.
"""
import pytest
import torch

import mola

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
if torch.cuda.is_available() and not mola.built_with_cuda:
    pytestmark = pytest.mark.skip(reason="mola was built without CUDA (-DMOLA_WITH_CUDA=ON)")

TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 5e-3}


def _inputs(dtype, T=37, din=24, dout=20, E=8, r=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, din, generator=g, dtype=torch.float64)
    weight = torch.randn(dout, din, generator=g, dtype=torch.float64) / din**0.5
    bias = torch.randn(dout, generator=g, dtype=torch.float64)
    router = torch.randn(E, din, generator=g, dtype=torch.float64)
    a = torch.randn(E, r, din, generator=g, dtype=torch.float64) / din**0.5
    b = torch.randn(E, dout, r, generator=g, dtype=torch.float64) / r**0.5
    return [t.to(dtype) for t in (x, weight, bias, router, a, b)]


def _run(tensors, device, compute, dropout_p, seed):
    leaves = [t.to(device).requires_grad_(i in (0, 3, 4, 5)) for i, t in enumerate(tensors)]
    x, w, b, router, a, bb = leaves
    y, logits = torch.ops.mola.moe_lora(x, w, b, router, a, bb, 2, 2.0, dropout_p,
                                        dropout_p > 0, compute, seed)
    gy = torch.linspace(-1, 1, y.numel(), dtype=torch.float64).reshape(y.shape).to(y)
    (y * gy).sum().backward()
    return [y.detach().cpu().double()] + [leaves[i].grad.cpu().double() for i in (0, 3, 4, 5)]


@pytest.mark.parametrize("dtype", list(TOL))
@pytest.mark.parametrize("compute", [1, 2])
@pytest.mark.parametrize("dropout_p", [0.0, 0.1])
def test_cuda_matches_cpu(dtype, compute, dropout_p):
    seed = torch.tensor([11]) if dropout_p else None
    cpu = _run(_inputs(torch.float64 if dtype != torch.float32 else dtype), "cpu", compute,
               dropout_p, seed)
    gpu = _run(_inputs(dtype), "cuda", compute, dropout_p, seed)
    for name, got, want in zip(["y", "x", "router", "lora_a", "lora_b"], gpu, cpu):
        err = (got - want).norm() / want.norm().clamp_min(1e-12)
        assert err < TOL[dtype], f"{name}: relative error {err:.2e} in {dtype}"
