"""mola over bases quantized the way users quantize them (docs/quantization.md):
bitsandbytes' Linear4bit / Linear8bitLt (which run on the CPU since 0.46) and
torchao's NF4 tensors. mola's own NF4 and int8 against bitsandbytes' on the
same weights; transformers + bitsandbytes NF4 against mola.CausalLM with
quantize="nf4"; MoLALinear over a quantized layer against the op on the
dequantized weight; inject, train, save, and load over an unquantized base.
"""
from pathlib import Path

import pytest
import torch
from torch import nn

import mola
from mola import quant

bnb = pytest.importorskip("bitsandbytes")
transformers = pytest.importorskip("transformers")

REPO = Path(__file__).resolve().parents[3]
TINY = REPO / "data" / "models" / "stories260K"


def _bnb4(weight, bias=None, double_quant=False):
    out, inp = weight.shape
    layer = bnb.nn.Linear4bit(inp, out, bias=bias is not None, compute_dtype=torch.float32, quant_type="nf4",
                              compress_statistics=double_quant)
    layer.weight = bnb.nn.Params4bit(weight.clone(), requires_grad=False, quant_type="nf4",
                                     compress_statistics=double_quant)
    if bias is not None:
        layer.bias = nn.Parameter(bias.clone(), requires_grad=False)
    return layer.to("cpu")


def test_mola_nf4_equals_bitsandbytes_nf4():
    torch.manual_seed(0)
    w = torch.randn(96, 128) * 0.05
    ours = quant.quantize(w, "nf4", double_quant=False)
    theirs = _bnb4(w).weight
    deq_theirs = bnb.functional.dequantize_4bit(theirs.data, theirs.quant_state)
    assert torch.allclose(theirs.quant_state.absmax, ours.tensors["scale"])
    assert torch.equal(ours.tensors["data"], theirs.data.reshape(-1))  # same indices, same nibble order
    assert torch.allclose(quant.dequantize(ours), deq_theirs, atol=1e-7, rtol=1e-6)
    assert tuple(bnb.functional.get_4bit_type("nf4", device="cpu").tolist()) == pytest.approx(quant.NF4_VALUES)


def test_mola_int8_equals_bitsandbytes_int8_weights():
    torch.manual_seed(1)
    # bitsandbytes quantizes the weight rounded to fp16; on fp16 values the two agree to the bit.
    w = (torch.randn(48, 80) * 0.05).half().float()
    ours = quant.quantize(w, "int8")
    theirs = bnb.nn.Int8Params(w.clone(), requires_grad=False, has_fp16_weights=False).to("cpu")
    assert torch.equal(ours.tensors["data"], theirs.data)  # CB: round(127 w / row absmax)
    assert torch.allclose(ours.tensors["scale"] * 127, theirs.SCB.float())


def test_causal_lm_nf4_equals_transformers_with_bitsandbytes():
    cfg = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                          bnb_4bit_compute_dtype=torch.float32, bnb_4bit_use_double_quant=False)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(TINY), quantization_config=cfg, device_map="cpu",
                                                           dtype=torch.float32).eval()
    ours = mola.CausalLM.from_pretrained(str(TINY), quantize="nf4", double_quant=False)
    ids = torch.randint(3, 512, (2, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        a, b = ours(ids).logits, hf(ids).logits
    assert torch.allclose(a, b, atol=1e-4, rtol=1e-4), (a - b).abs().max()


@pytest.mark.parametrize("make", ["bnb-nf4", "torchao-nf4"])
def test_mola_linear_over_a_quantized_layer_equals_the_op_on_its_dequantized_weight(make):
    torch.manual_seed(3)
    w, bias = torch.randn(256, 512) * 0.05, torch.randn(256) * 0.1
    if make == "bnb-nf4":
        base = _bnb4(w, bias, double_quant=True)
        deq = bnb.functional.dequantize_4bit(base.weight.data, base.weight.quant_state)
        dtype = torch.float32
    else:
        nf4 = pytest.importorskip("torchao.quantization.quantize_.workflows.nf4.nf4_tensor")
        dtype = torch.bfloat16
        base = nn.Linear(512, 256, dtype=dtype)
        base.weight = nn.Parameter(nf4.to_nf4(w.to(dtype)), requires_grad=False)
        base.bias = nn.Parameter(bias.to(dtype), requires_grad=False)
        deq = base.weight.get_original_weight()
    layer = mola.MoLALinear(base, num_experts=4, top_k=2, rank=4)
    assert layer.quantized_base and layer.router.dtype == torch.float32
    with torch.no_grad():
        layer.lora_b.normal_(0, 0.05)
    x = torch.randn(3, 7, 512, dtype=dtype, requires_grad=True)
    y = layer(x)
    ref, _ = mola.ops.moe_lora(x, deq.to(dtype), base.bias.to(dtype), layer.router.to(dtype), layer.lora_a.to(dtype),
                               layer.lora_b.to(dtype), 2, layer.scaling)
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    assert torch.allclose(y.float(), ref.float(), atol=tol, rtol=tol), (y.float() - ref.float()).abs().max()
    y.float().square().sum().backward()
    assert x.grad is not None and layer.lora_a.grad is not None and layer.router.grad is not None
    assert base.weight.grad is None
    with pytest.raises(ValueError, match="quantized"):
        mola.MoLALinear(base, num_experts=2, top_k=1, rank=2, init="pissa")


def test_inject_into_a_4bit_transformers_model_trains_and_the_adapter_moves(tmp_path):
    cfg = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                          bnb_4bit_compute_dtype=torch.float32, bnb_4bit_use_double_quant=False)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(TINY), quantization_config=cfg, device_map="cpu",
                                                              dtype=torch.float32)
    mola.inject(model, mola.MoLAConfig(experts="2,4,6,8", top_k=2, rank=4))
    wrapped = [m for m in model.modules() if isinstance(m, mola.MoLALinear)]
    assert len(wrapped) == 5 * 7 and all(m.quantized_base for m in wrapped)  # none skipped
    assert all(type(m.base).__name__ == "Linear4bit" for m in wrapped)
    torch.manual_seed(0)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    ids = torch.randint(3, 512, (4, 24), generator=torch.Generator().manual_seed(4))
    model.train()
    losses = []
    for _ in range(8):
        loss = model(input_ids=ids, labels=ids).loss
        (loss + mola.aux_loss(model)).backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.2, losses
    with pytest.raises(ValueError, match="quantized"):
        mola.merge_and_unload(model)
    mola.save_adapter(model, str(tmp_path / "a"))

    # Over the unquantized base: the same files, the same adapter tensors.
    dense = transformers.AutoModelForCausalLM.from_pretrained(str(TINY), dtype=torch.float32)
    mola.load_adapter(dense, str(tmp_path / "a"))
    trained = {n: p for n, p in model.named_parameters() if ".lora_" in n or ".router" in n}
    loaded = {n: p for n, p in dense.named_parameters() if ".lora_" in n or ".router" in n}
    assert trained.keys() == loaded.keys() and all(torch.equal(trained[n], loaded[n]) for n in trained)
    # And into mola's C++ model over its own NF4 base (bitsandbytes' form, no
    # double quantization): the same model, to rounding.
    cpp = mola.CausalLM.from_pretrained(str(TINY), quantize="nf4", double_quant=False)
    mola.load_adapter(cpp, str(tmp_path / "a"))
    model.eval()
    with torch.no_grad():
        q, c = model(input_ids=ids).logits, cpp(ids).logits
    assert torch.allclose(q, c, atol=1e-4, rtol=1e-4), (q - c).abs().max()
