"""A quantized base on a GPU (docs/quantization.md, On a GPU): the dequantize
kernel against the CPU's dequantization bit for bit, quant.linear's forward and
input gradient against float64 references, and CausalLM with quantize on CUDA
(loaded there or moved there) against the same model on the CPU, forward and
the adapter's gradients. Skipped without a GPU; the CPU half of each contract
is tested in tests/python/ops/test_quant.py and
tests/python/models/test_quantized_base.py.
"""
import copy
from pathlib import Path

import pytest
import torch

import mola
from mola import quant

pytestmark = pytest.mark.skipif(not (torch.cuda.is_available() and mola.built_with_cuda),
                                reason="needs a CUDA GPU and a build with the CUDA kernels")

REPO = Path(__file__).resolve().parents[3]
TINY = REPO / "data" / "models" / "stories260K"
FORMS = [("int8", True), ("nf4", True), ("nf4", False)]
# Odd sizes: a row that ends inside an NF4 block, an odd element count, one element.
SHAPES = [(64, 128), (33, 70), (3, 5), (1, 1), (300, 256)]


def _weight(shape, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * 0.05).to(dtype)


@pytest.mark.parametrize("kind,double_quant", FORMS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_the_kernel_equals_the_cpu_bit_for_bit(kind, double_quant, shape, dtype):
    q = quant.quantize(_weight(shape), kind, double_quant=double_quant)
    wide = torch.float64 if dtype == torch.float64 else torch.float32
    want = quant.dequantize(q, wide).to(dtype)  # the CPU's values, rounded once to dtype
    got = quant.dequantize(q.to("cuda"), dtype)
    assert got.device.type == "cuda" and got.dtype == dtype and got.shape == shape
    assert torch.equal(got.cpu(), want)


@pytest.mark.parametrize("kind,double_quant", FORMS)
def test_a_gpu_weight_quantizes_as_on_the_cpu(kind, double_quant):
    w = _weight((96, 192), dtype=torch.bfloat16)
    on_cpu = quant.quantize(w, kind, double_quant=double_quant)
    on_gpu = quant.quantize(w.cuda(), kind, double_quant=double_quant)
    assert on_gpu.device.type == "cuda"
    assert on_gpu.tensors.keys() == on_cpu.tensors.keys()
    for name, t in on_cpu.tensors.items():
        assert torch.equal(on_gpu.tensors[name].cpu(), t), name


@pytest.mark.parametrize("kind,double_quant", FORMS)
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 3e-2), (torch.float16, 5e-3)])
def test_linear_and_its_input_gradient(kind, double_quant, dtype, tol):
    torch.backends.cuda.matmul.allow_tf32 = False
    q = quant.quantize(_weight((48, 160), seed=1), kind, double_quant=double_quant)
    qc = q.to("cuda")
    w = quant.dequantize(q, torch.float64)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 5, 160, generator=g, dtype=torch.float64)
    bias = torch.randn(48, generator=g, dtype=torch.float64) * 0.1
    dy = torch.randn(3, 5, 48, generator=g, dtype=torch.float64)
    xc = x.to("cuda", dtype).requires_grad_()
    y = quant.linear(xc, qc, bias.to("cuda", dtype))
    assert y.dtype == dtype and y.device.type == "cuda"
    y.backward(dy.to("cuda", dtype))
    want_y = x @ w.T + bias
    want_dx = dy @ w
    scale_y, scale_dx = want_y.abs().max(), want_dx.abs().max()
    assert (y.detach().double().cpu() - want_y).abs().max() <= tol * scale_y
    assert (xc.grad.double().cpu() - want_dx).abs().max() <= tol * scale_dx


def test_gradcheck_in_float64():
    qc = quant.quantize(_weight((12, 40), seed=3), "nf4").to("cuda")
    x = torch.randn(4, 40, dtype=torch.float64, device="cuda", requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: quant.linear(t, qc), (x,))


def test_a_weight_and_an_input_on_different_devices_are_named():
    q = quant.quantize(_weight((8, 64)), "nf4")
    with pytest.raises(ValueError, match=r"x is on cuda.*quantized weight on cpu.*model.to"):
        quant.linear(torch.randn(2, 64, device="cuda"), q)


@pytest.mark.parametrize("kind", quant.KINDS)
def test_a_model_loaded_onto_the_gpu_equals_it_on_the_cpu_and_moves(kind):
    torch.backends.cuda.matmul.allow_tf32 = False
    ids = torch.randint(3, 512, (2, 12), generator=torch.Generator().manual_seed(3))
    cpu = mola.CausalLM.from_pretrained(str(TINY), quantize=kind)
    gpu = mola.CausalLM.from_pretrained(str(TINY), device="cuda", quantize=kind)
    assert gpu.quantization == kind
    with torch.no_grad():
        want = cpu(ids).logits
        got = gpu(ids.cuda()).logits
        assert got.device.type == "cuda"
        assert torch.allclose(got.cpu(), want, atol=2e-4, rtol=1e-4), (got.cpu() - want).abs().max()
        # A CPU model moved to the GPU and back: the quantized weights follow.
        moved = copy.deepcopy(cpu).to("cuda")
        assert torch.equal(moved(ids.cuda()).logits, got)
        assert torch.equal(moved.to("cpu")(ids).logits, want)


def test_training_over_an_nf4_base_on_the_gpu_matches_the_cpu():
    torch.backends.cuda.matmul.allow_tf32 = False
    ids = torch.randint(3, 512, (2, 16), generator=torch.Generator().manual_seed(4))
    cpu = mola.CausalLM.from_pretrained(str(TINY), quantize="nf4")
    cpu.attach(mola.MoLAConfig(experts="2,4,6,8", top_k=2, rank=4, dropout=0.0))
    with torch.no_grad():
        for name, p in cpu.named_parameters():
            if ".lora_b" in name:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(5))
    gpu = copy.deepcopy(cpu).to("cuda")
    grads = {}
    for model, device in ((cpu, "cpu"), (gpu, "cuda")):
        model.train()
        out = model(ids.to(device), labels=ids.to(device))
        (out.loss + model.aux_loss()).backward()
        grads[device] = {n: p.grad.cpu() for n, p in model.named_parameters() if p.requires_grad}
    assert grads["cpu"].keys() == grads["cuda"].keys() and grads["cpu"]
    for name, want in grads["cpu"].items():
        got = grads["cuda"][name]
        assert torch.allclose(got, want, atol=1e-5, rtol=1e-3), (name, (got - want).abs().max())


def test_a_bf16_model_over_nf4_on_the_gpu_trains_and_its_adapter_loads_on_the_cpu(tmp_path):
    model = mola.CausalLM.from_pretrained(str(TINY), dtype=torch.bfloat16, device="cuda", quantize="nf4")
    model.attach(mola.MoLAConfig(experts="2,4,6,8", top_k=2, rank=4))
    model.train()
    opt = torch.optim.AdamW([p for _, p in model.named_parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(3, 512, (4, 32), generator=torch.Generator().manual_seed(6)).cuda()
    losses = []
    for _ in range(20):
        out = model(ids, labels=ids)
        (out.loss + model.aux_loss()).backward()
        opt.step()
        opt.zero_grad()
        losses.append(out.loss.item())
    assert losses[-1] < losses[0] - 0.1, losses
    model.save_adapter(str(tmp_path / "a"))
    dense = mola.CausalLM.from_pretrained(str(TINY), dtype=torch.bfloat16)
    dense.load_adapter(str(tmp_path / "a"))
    assert dense.adapter_config == model.adapter_config
