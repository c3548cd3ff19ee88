"""mola.CausalLM over a quantized base (docs/quantization.md): from_pretrained(...,
quantize="nf4" | "int8") against transformers running the same checkpoint with
each projection weight replaced by its dequantized value; MoLA training over
the bundled tiny llama with an NF4 base against the same run over the bf16
base; adapters moving between the two; and the errors.
"""
import copy
from pathlib import Path

import pytest
import torch

import mola
from mola import quant

transformers = pytest.importorskip("transformers")

REPO = Path(__file__).resolve().parents[3]
TINY = REPO / "data" / "models" / "stories260K"
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _ids(batch=2, seq=12, vocab=512, seed=3):
    return torch.randint(3, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _hf_with_dequantized_projections(kind):
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(TINY), dtype=torch.float32).eval()
    with torch.no_grad():
        for name, module in hf.named_modules():
            if name.split(".")[-1] in TARGETS:
                module.weight.copy_(quant.dequantize(quant.quantize(module.weight, kind)))
    return hf


@pytest.mark.parametrize("kind", quant.KINDS)
def test_logits_equal_transformers_on_the_dequantized_weights(kind):
    model = mola.CausalLM.from_pretrained(str(TINY), quantize=kind)
    assert model.quantization == kind
    ids = _ids()
    with torch.no_grad():
        got = model(ids).logits
        want = _hf_with_dequantized_projections(kind)(ids).logits
        dense = mola.CausalLM.from_pretrained(str(TINY))(ids).logits
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-4), (got - want).abs().max()
    # Quantizing changed the logits, NF4 more than int8 (16 levels against 255).
    gap = (got - dense).abs().mean().item()
    assert gap > 0
    if kind == "nf4":
        int8 = mola.CausalLM.from_pretrained(str(TINY), quantize="int8")
        with torch.no_grad():
            assert (int8(ids).logits - dense).abs().mean().item() < gap / 4
    # The projection weights are held quantized: "weight" is empty.
    weights = dict(model.named_parameters())
    assert weights["model.layers.0.self_attn.q_proj.weight"].numel() == 0
    assert weights["model.embed_tokens.weight"].shape == (512, 64)


def test_bf16_base_quantizes_from_the_16bit_weights():
    model = mola.CausalLM.from_pretrained(str(TINY), dtype=torch.bfloat16, quantize="nf4")
    ids = _ids()
    with torch.no_grad():
        got = model(ids).logits
        # The checkpoint is fp32, and from_pretrained quantizes the file's values.
        want = _hf_with_dequantized_projections("nf4")(ids).logits  # fp32 activations
        # What bf16 activations cost without quantization, as the yardstick.
        dense_bf16 = mola.CausalLM.from_pretrained(str(TINY), dtype=torch.bfloat16)(ids).logits
        hf_bf16 = transformers.AutoModelForCausalLM.from_pretrained(str(TINY), dtype=torch.bfloat16)
        dense_fp32 = hf_bf16.float()(ids).logits
    assert got.dtype == torch.bfloat16
    yardstick = (dense_bf16.float() - dense_fp32).abs().mean()
    assert (got.float() - want).abs().mean() < 1.5 * yardstick, ((got.float() - want).abs().mean(), yardstick)


def _train(model, steps=12, seed=0):
    torch.manual_seed(seed)
    model.attach(mola.MoLAConfig(experts="2,4,6,8", top_k=2, rank=4, dropout=0.05, aux_loss_coef=0.01))
    model.train()
    opt = torch.optim.AdamW([p for _, p in model.named_parameters() if p.requires_grad], lr=5e-3)
    ids = _ids(batch=4, seq=24, seed=7)
    losses = []
    for _ in range(steps):
        out = model(ids, labels=ids)
        loss = out.loss + model.aux_loss()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(out.loss.item())
    model.eval()
    return losses


def test_training_over_nf4_lowers_the_loss_as_over_bf16_and_the_adapter_moves(tmp_path):
    dense = mola.CausalLM.from_pretrained(str(TINY), dtype=torch.bfloat16)
    nf4 = mola.CausalLM.from_pretrained(str(TINY), dtype=torch.bfloat16, quantize="nf4")
    l_dense, l_nf4 = _train(dense), _train(nf4)
    drop_dense, drop_nf4 = l_dense[0] - l_dense[-1], l_nf4[0] - l_nf4[-1]
    assert drop_dense > 0.3, l_dense
    # The stated margin: the NF4 run lowers the loss by at least 75% of what the bf16 run does.
    assert drop_nf4 >= 0.75 * drop_dense, (l_dense, l_nf4)
    assert abs(l_nf4[-1] - l_dense[-1]) < 0.25 * l_dense[0]

    # Its adapter loads over the bf16 base (the files do not change) and gives
    # that base's model with the same experts.
    nf4.save_adapter(str(tmp_path / "nf4"))
    over_dense = mola.CausalLM.from_pretrained(str(TINY), dtype=torch.bfloat16)
    over_dense.load_adapter(str(tmp_path / "nf4"))
    saved = nf4.adapter_state_dict()
    loaded = over_dense.adapter_state_dict()
    assert saved.keys() == loaded.keys() and all(torch.equal(saved[k], loaded[k]) for k in saved)
    ids = _ids()
    with torch.no_grad():
        a, b = nf4(ids).logits.float(), over_dense(ids).logits.float()
        nf4.adapter_enabled = over_dense.adapter_enabled = False
        base_gap = (nf4(ids).logits.float() - over_dense(ids).logits.float()).abs().mean()
    assert (a - b).abs().mean() < 2 * base_gap  # only the base's quantization differs

    # And the other way: a bf16-trained adapter over an NF4 base.
    dense.save_adapter(str(tmp_path / "dense"))
    over_nf4 = mola.CausalLM.from_pretrained(str(TINY), dtype=torch.bfloat16, quantize="nf4")
    over_nf4.load_adapter(str(tmp_path / "dense"))
    assert over_nf4.adapter_config == dense.adapter_config


def test_adapter_over_a_quantized_base_is_exactly_base_plus_experts():
    model = mola.CausalLM.from_pretrained(str(TINY), quantize="int8")
    ids = _ids()
    with torch.no_grad():
        base = model(ids).logits
        model.attach(mola.MoLAConfig(experts="2,4,6,8", top_k=2, rank=4))
        assert torch.equal(model(ids).logits, base)  # B starts at zero
        model.adapter_enabled = False
        assert torch.equal(model(ids).logits, base)


def test_errors_name_the_value_and_the_fix(tmp_path):
    with pytest.raises(ValueError, match=r'quantize: got "nf5".*did you mean "nf4"'):
        mola.CausalLM.from_pretrained(str(TINY), quantize="nf5")
    model = mola.CausalLM.from_pretrained(str(TINY), quantize="nf4")
    with pytest.raises(ValueError, match=r'pissa.*quantized \(nf4\).*"kaiming"'):
        model.attach(mola.MoLAConfig(experts="2,4,6,8", top_k=2, rank=4, init="pissa"))
    assert not model.has_adapter  # nothing half-attached
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"device 'cuda'.*load on the CPU"):
            mola.CausalLM.from_pretrained(str(TINY), device="cuda", quantize="nf4")


@pytest.mark.parametrize("kind,double_quant", [("nf4", True), ("nf4", False), ("int8", True)])
def test_a_quantized_model_copies_and_pickles(kind, double_quant):
    import pickle

    model = mola.CausalLM.from_pretrained(str(TINY), quantize=kind, double_quant=double_quant)
    model.attach(mola.MoLAConfig(experts="2,4,6,8", top_k=2, rank=4))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_b" in name:
                p.normal_(0, 0.05)
    model.train()
    ids = _ids()
    model(ids, labels=ids)  # a training forward before the copy, as users do
    model.eval()
    with torch.no_grad():
        want = model(ids).logits
    for other in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert other.quantization == kind
        assert not other.training
        with torch.no_grad():
            assert torch.equal(other(ids).logits, want)
        assert dict(other.named_parameters())["model.layers.1.mlp.up_proj.weight"].numel() == 0
    # The copy owns its tensors: training it leaves the original as it was.
    twin = copy.deepcopy(model)
    twin.train()
    opt = torch.optim.SGD([p for _, p in twin.named_parameters() if p.requires_grad], lr=1.0)
    twin(ids, labels=ids).loss.backward()
    opt.step()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, want)
        assert not torch.equal(twin.eval()(ids).logits, want)
