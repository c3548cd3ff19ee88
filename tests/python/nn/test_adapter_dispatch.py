"""mola.save_adapter / mola.load_adapter on a mola.CausalLM (docs/python.md):
the module-level functions hand the C++ model to its own save_adapter /
load_adapter, so one spelling serves both the transformers path (mola.inject)
and the C++ model. The files themselves are tested in test_model_adapter.py
and test_adapter_crossload.py.
"""
import os

import pytest
import torch

import mola

transformers = pytest.importorskip("transformers")

VOCAB, HIDDEN, INTER, LAYERS = 61, 32, 48, 4


@pytest.fixture(scope="module")
def llama_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama-dispatch")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTER,
                                      num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=64)
    transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(path)
    return str(path)


def _config():
    return mola.MoLAConfig(experts="2,4,6,8", top_k=2, rank=4, dropout=0.0)


def _ids():
    return torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(5))


def test_save_and_load_dispatch_to_the_cpp_model(llama_path, tmp_path):
    model = mola.CausalLM.from_pretrained(llama_path)
    model.attach(_config())
    adapter = [(name, p) for name, p in model.named_parameters() if ".mola." in name]
    assert adapter
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # B starts at zero: perturb so that the adapter changes the logits
        for _, p in adapter:
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    model.eval()
    ids = _ids()
    with torch.no_grad():
        want = model(ids).logits

    out = tmp_path / "adapter"
    assert mola.save_adapter(model, out) is None  # a PathLike is accepted
    assert sorted(os.listdir(out)) == ["adapter_config.json", "adapter_model.safetensors"]

    fresh = mola.CausalLM.from_pretrained(llama_path)
    assert not fresh.has_adapter
    assert mola.load_adapter(fresh, str(out)) is fresh
    assert fresh.has_adapter
    assert fresh.adapter_config["experts"] == [2, 4, 6, 8]
    fresh.eval()
    with torch.no_grad():
        got = fresh(ids).logits
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_the_files_cross_load_into_a_transformers_model(llama_path, tmp_path):
    model = mola.CausalLM.from_pretrained(llama_path)
    model.attach(_config())
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".mola.lora_b" in name:
                p.fill_(0.01)
    mola.save_adapter(model, tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(llama_path, dtype=torch.float32)
    mola.load_adapter(hf, tmp_path)  # injects with the saved config
    model.eval()
    hf.eval()
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model(ids).logits, rtol=1e-4, atol=1e-4)


def test_cpp_model_errors_pass_through(llama_path, tmp_path):
    model = mola.CausalLM.from_pretrained(llama_path)
    with pytest.raises(RuntimeError, match="no adapter"):
        mola.save_adapter(model, tmp_path / "none")
    with pytest.raises(FileNotFoundError, match="missing"):
        mola.load_adapter(model, tmp_path / "missing")
