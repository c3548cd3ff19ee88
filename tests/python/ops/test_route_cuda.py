"""CUDA vs CPU for mola::moe_lora_route (kernels/moe_lora_route.cu).

The CPU op (src/ops/cpu/moe_lora_route.cpp) is the oracle: fp32 softmax, torch.topk,
renormalisation. The CUDA kernel must give the same indices exactly and the same weights and
gate matrix to fp32 rounding, for every storage dtype of the logits. Logits are drawn without
ties (a permutation of a grid exactly representable in bfloat16), so the top-k set is unique
and exact index equality is a fair demand. The per-expert counts / probability sums the kernel
can also accumulate are not outputs of the op and are not compared here.
"""

import pytest
import torch

import mola  # noqa: F401  (loads the ops)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
EXPERTS = [1, 2, 8, 64, 256]
TOKENS = [1, 7, 1000]


def _has_cuda_kernel():
    return torch._C._dispatch_has_kernel_for_dispatch_key("mola::moe_lora_route", "CUDA")


@pytest.fixture(autouse=True)
def _needs_cuda_build():
    if not _has_cuda_kernel():
        pytest.skip("mola was built without CUDA kernels (rebuild with -DMOLA_WITH_CUDA=ON)")


def _tie_free_logits(tokens, experts, dtype, seed):
    """[tokens, experts] rows that are each a shuffle of (0..E-1 - E/2) / 16.

    Integers below 256 times a power of two are exact in bfloat16 and float16, and
    neighbouring values differ by 1/16, so the softmax probabilities stay distinct in fp32.
    """
    gen = torch.Generator().manual_seed(seed)
    perm = torch.argsort(torch.rand(tokens, experts, generator=gen), dim=1)
    return ((perm - experts // 2).to(torch.float32) / 16.0).to(dtype)


def _compare(logits_cpu, top_k, logits_cuda=None):
    if logits_cuda is None:
        logits_cuda = logits_cpu.cuda()
    w_ref, i_ref, g_ref = torch.ops.mola.moe_lora_route(logits_cpu, top_k)
    w, i, g = torch.ops.mola.moe_lora_route(logits_cuda, top_k)
    tokens, experts = logits_cpu.shape
    assert w.device.type == "cuda" and w.dtype == torch.float32 and w.shape == (tokens, top_k)
    assert i.dtype == torch.int64 and i.shape == (tokens, top_k)
    assert g.dtype == torch.float32 and g.shape == (tokens, experts)
    torch.testing.assert_close(i.cpu(), i_ref, rtol=0, atol=0)
    torch.testing.assert_close(w.cpu(), w_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g.cpu(), g_ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("experts", EXPERTS)
@pytest.mark.parametrize("k_kind", ["1", "2", "E"])
@pytest.mark.parametrize("tokens", TOKENS)
def test_matches_cpu(dtype, experts, k_kind, tokens):
    top_k = experts if k_kind == "E" else int(k_kind)
    if top_k > experts:
        pytest.skip(f"top_k {top_k} > experts {experts}")
    logits = _tie_free_logits(tokens, experts, dtype, seed=1000 * experts + tokens)
    _compare(logits, top_k)


@pytest.mark.parametrize("experts,top_k", [(8, 2), (64, 2), (256, 8), (256, 255)])
def test_matches_cpu_generic_fp32(experts, top_k):
    # Full-precision fp32 values, including k close to E: the grid plus uniform jitter below
    # half its step, so neighbours stay >= 3/32 apart and no exp rounding can reorder them.
    gen = torch.Generator().manual_seed(experts + top_k)
    jitter = torch.rand(1000, experts, generator=gen) / 32.0
    logits = 3.0 * (_tie_free_logits(1000, experts, torch.float32, seed=top_k) + jitter)
    _compare(logits, top_k)


def test_weights_sum_to_one_and_gate_matches_weights():
    logits = _tie_free_logits(257, 16, torch.bfloat16, seed=3).cuda()
    w, i, g = torch.ops.mola.moe_lora_route(logits, 3)
    torch.testing.assert_close(w.sum(-1), torch.ones(257, device="cuda"), rtol=0, atol=1e-6)
    torch.testing.assert_close(g.gather(1, i), w, rtol=0, atol=0)
    assert int((g != 0).sum()) == 257 * 3
    assert bool((w[:, :-1] >= w[:, 1:]).all()), "slots must be sorted by descending weight"


def test_ties_go_to_lower_index():
    # mola's contract on every device (kernels/moe_lora_route.cu); torch.topk's tie order differs.
    logits = torch.zeros(5, 12, device="cuda")
    w, i, g = torch.ops.mola.moe_lora_route(logits, 3)
    assert i.tolist() == [[0, 1, 2]] * 5
    torch.testing.assert_close(w, torch.full((5, 3), 1.0 / 3.0, device="cuda"))
    assert bool((g[:, 3:] == 0).all())


def test_strided_logits():
    # A row-strided slice is read in place; a transposed view is made contiguous first.
    wide = _tie_free_logits(300, 40, torch.float32, seed=5)
    _compare(wide[:, 4:36], 2, wide.cuda()[:, 4:36])
    tall = _tie_free_logits(24, 300, torch.float16, seed=6)
    _compare(tall.t().contiguous(), 2, tall.cuda().t())


def test_dense_routing_is_softmax():
    logits = 2.0 * torch.randn(33, 8, device="cuda")
    w, i, g = torch.ops.mola.moe_lora_route(logits, 8)
    torch.testing.assert_close(w, torch.softmax(logits, -1), rtol=1e-5, atol=1e-6)
    assert i.tolist() == [list(range(8))] * 33
    torch.testing.assert_close(g, w, rtol=0, atol=0)


def test_empty_tokens():
    w, i, g = torch.ops.mola.moe_lora_route(torch.empty(0, 8, device="cuda"), 2)
    assert w.shape == (0, 2) and i.shape == (0, 2) and g.shape == (0, 8)


def test_bad_arguments_raise():
    logits = torch.randn(4, 8, device="cuda")
    with pytest.raises(ValueError, match="top_k"):
        torch.ops.mola.moe_lora_route(logits, 9)
    with pytest.raises(ValueError, match="top_k"):
        torch.ops.mola.moe_lora_route(logits, 0)
    with pytest.raises(ValueError, match="tokens, experts"):
        torch.ops.mola.moe_lora_route(torch.randn(2, 4, 8, device="cuda"), 2)
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        torch.ops.mola.moe_lora_route(logits.to(torch.int32), 2)


@pytest.mark.parametrize("experts,dtype", [(8, torch.float64), (300, torch.float32)])
def test_fallback_outside_the_kernel_matches_cpu(experts, dtype):
    # fp64 (gradcheck on the GPU) and routers wider than the kernel's 256 experts
    # route in ATen on the GPU, with the CPU op's results.
    logits = torch.randn(50, experts, dtype=dtype)
    w, i, g = torch.ops.mola.moe_lora_route(logits.cuda(), 2)
    w_ref, i_ref, g_ref = torch.ops.mola.moe_lora_route(logits, 2)
    assert w.dtype == w_ref.dtype
    torch.testing.assert_close(w.cpu(), w_ref)
    assert torch.equal(i.cpu(), i_ref)
    torch.testing.assert_close(g.cpu(), g_ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_ties_match_the_cpu(dtype):
    # Rows with exact ties at and around the k-th place (equal logits, an all-zero row):
    # the CUDA kernel (or, for fp64, the ATen fallback) picks what the CPU picks.
    logits = torch.tensor([[1, 0, 0, 0, 0, 0, 0, 0],
                           [0, 0, 0, 0, 0, 0, 0, 0],
                           [2, 2, 1, 1, 1, 2, 0, 0],
                           [-1, 3, 3, 3, -1, 0, 3, 0]], dtype=dtype)
    for k in (1, 2, 3, 8):
        want = torch.ops.mola.moe_lora_route(logits, k)
        got = torch.ops.mola.moe_lora_route(logits.cuda(), k)
        assert torch.equal(got[1].cpu(), want[1]), f"k={k}: {got[1].tolist()} vs {want[1].tolist()}"
        torch.testing.assert_close(got[0].cpu(), want[0])
        torch.testing.assert_close(got[2].cpu(), want[2])
