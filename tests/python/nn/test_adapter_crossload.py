"""An adapter trained on either path loads on the other (docs/design.md, The adapter files).

The C++ model (mola.CausalLM) and a transformers model with mola.inject write
the same adapter files; for llama, mistral and gemma, an adapter saved from one
must give the other the same logits (<= 1e-5) on the same base checkpoint.
"""
import pytest
import torch

import mola

transformers = pytest.importorskip("transformers")

FAMILIES = {
    "llama": lambda: transformers.LlamaConfig(
        vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64),
    "mistral": lambda: transformers.MistralConfig(
        vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, sliding_window=5),
    "gemma": lambda: transformers.GemmaConfig(
        vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
        num_attention_heads=2, num_key_value_heads=1, head_dim=24, max_position_embeddings=64),
}


def _checkpoint(family, path):
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(FAMILIES[family](), dtype=torch.float32)
    model.save_pretrained(path)


def _hf(path):
    model = transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa")
    return model.eval()


def _perturb(params, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in params:
            if ".mola." in name or name.endswith(("lora_b", "router")):
                p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))


def _ids():
    return torch.randint(0, 61, (2, 12), generator=torch.Generator().manual_seed(5))


CFG = dict(experts="2,4,6,8", top_k=2, rank=4, alpha=8, dropout=0.0)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_cpp_adapter_loads_into_an_injected_transformers_model(family, tmp_path):
    _checkpoint(family, tmp_path / "base")
    cpp = mola.CausalLM.from_pretrained(str(tmp_path / "base"))
    cpp.eval()
    cpp.attach(mola.MoLAConfig(**CFG))
    _perturb(cpp.named_parameters(), seed=1)
    cpp.save_adapter(str(tmp_path / "adapter"))
    hf = mola.load_adapter(_hf(tmp_path / "base"), str(tmp_path / "adapter"))
    with torch.no_grad():
        want = cpp(_ids()).logits
        got = hf(input_ids=_ids()).logits
    assert (got - want).abs().max().item() <= 1e-5
    assert (want - cpp.__class__.from_pretrained(str(tmp_path / "base"))(_ids()).logits).abs().max() > 1e-3


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_injected_transformers_adapter_loads_into_the_cpp_model(family, tmp_path):
    _checkpoint(family, tmp_path / "base")
    hf = mola.inject(_hf(tmp_path / "base"), mola.MoLAConfig(**CFG))
    _perturb(hf.named_parameters(), seed=2)
    mola.save_adapter(hf, str(tmp_path / "adapter"))
    cpp = mola.CausalLM.from_pretrained(str(tmp_path / "base"))
    cpp.eval()
    cpp.load_adapter(str(tmp_path / "adapter"))
    with torch.no_grad():
        want = hf(input_ids=_ids()).logits
        got = cpp(_ids()).logits
    assert (got - want).abs().max().item() <= 1e-5
