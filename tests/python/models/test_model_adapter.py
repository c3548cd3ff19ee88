"""Adapters on mola.CausalLM from Python (docs/python.md; docs/design.md, The adapter files): a tiny llama
saved by transformers, loaded into the C++ decoder, given a MoLA adapter with
the inverted allocation, trained a few AdamW steps by torch.optim on the
tensors named_parameters() shares, saved, and loaded into a fresh model.
The C++ side has its own tests (tests/cpp/models/test_model_adapter.cpp).
"""
import json

import pytest
import torch

import mola

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

VOCAB, HIDDEN, INTER, LAYERS = 61, 32, 48, 4
EXPERTS = [2, 4, 6, 8]
RANK = 4
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def llama_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTER,
                                      num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=64)
    transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(path)
    return path


def _config(**overrides):
    settings = dict(experts="2,4,6,8", top_k=2, rank=RANK, dropout=0.0, aux_loss_coef=0.01)
    settings.update(overrides)
    return mola.MoLAConfig(**settings)


def _batch():
    g = torch.Generator().manual_seed(3)
    return torch.randint(0, VOCAB, (2, 10), generator=g)


def test_attach_keeps_logits_and_freezes_the_base(llama_path):
    model = mola.CausalLM.from_pretrained(str(llama_path))
    model.eval()
    ids = _batch()
    with torch.no_grad():
        before = model(ids).logits
        model.attach(_config())
        out = model(ids)
    assert torch.equal(out.logits, before)  # B is zero
    logits, loss = out  # still a tuple
    assert loss is None and logits is out.logits
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert len(trainable) == 3 * len(TARGETS) * LAYERS
    assert all(".mola." in name for name in trainable)
    assert model.has_adapter
    assert model.adapter_config["experts"] == EXPERTS
    assert model.adapter_config["base_model_name"]


def test_train_save_load_round_trip(llama_path, tmp_path):
    torch.manual_seed(0)
    model = mola.CausalLM.from_pretrained(str(llama_path))
    model.attach(_config())
    model.train()
    params = [p for _, p in model.named_parameters() if p.requires_grad]
    assert len(params) == len([p for p in model.parameters() if p.requires_grad])
    opt = torch.optim.AdamW(params, lr=1e-2)
    ids = _batch()
    losses = []
    for _ in range(6):
        out = model(ids, labels=ids)
        loss = out.loss + model.aux_loss()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05, losses
    # The optimizer updated the C++ model's own tensors.
    state = model.adapter_state_dict()
    assert state["model.layers.0.self_attn.q_proj.mola.lora_b"].abs().sum() > 0

    model.eval()
    with torch.no_grad():
        trained = model(ids).logits
    out_dir = tmp_path / "adapter" / "nested"
    model.save_adapter(str(out_dir))

    cfg = json.loads((out_dir / "adapter_config.json").read_text())
    assert cfg["method"] == "mola"
    assert cfg["experts"] == EXPERTS and cfg["top_k"] == [2] * LAYERS and cfg["rank"] == [RANK] * LAYERS
    assert cfg["num_layers"] == LAYERS
    tensors = safetensors_torch.load_file(str(out_dir / "adapter_model.safetensors"))
    expected = {}
    for layer, e in enumerate(EXPERTS):
        for target in TARGETS:
            block = "mlp" if target in ("gate_proj", "up_proj", "down_proj") else "self_attn"
            in_f = INTER if target == "down_proj" else HIDDEN
            out_f = {"q_proj": HIDDEN, "k_proj": 16, "v_proj": 16, "o_proj": HIDDEN,
                     "gate_proj": INTER, "up_proj": INTER, "down_proj": HIDDEN}[target]
            key = f"model.layers.{layer}.{block}.{target}.mola."
            expected[key + "router"] = (e, in_f)
            expected[key + "lora_a"] = (e, RANK, in_f)
            expected[key + "lora_b"] = (e, out_f, RANK)
    assert {k: tuple(v.shape) for k, v in tensors.items()} == expected
    assert all(v.dtype == torch.float32 for v in tensors.values())

    fresh = mola.CausalLM.from_pretrained(str(llama_path))
    fresh.load_adapter(str(out_dir))
    fresh.eval()
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, trained)
    assert fresh.adapter_config == model.adapter_config


def test_attach_accepts_dicts_json_and_files(llama_path, tmp_path):
    for cfg in (_config().to_dict(), _config().to_json()):
        model = mola.CausalLM.from_pretrained(str(llama_path))
        model.attach(cfg)
        assert model.adapter_config["experts"] == EXPERTS
    path = tmp_path / "cfg.json"
    _config(method="lora", experts=None, top_k=None).to_json(str(path))
    model = mola.CausalLM.from_pretrained(str(llama_path))
    model.attach(str(path))
    assert model.adapter_config["experts"] == [1] * LAYERS


def test_errors(llama_path, tmp_path):
    model = mola.CausalLM.from_pretrained(str(llama_path))
    with pytest.raises(ValueError, match='"gate" is not a projection'):
        model.attach(_config(targets=["q_proj", "gate"]))
    with pytest.raises(RuntimeError, match="no adapter"):
        model.save_adapter(str(tmp_path / "x"))
    with pytest.raises(FileNotFoundError, match="no such adapter directory"):
        model.load_adapter(str(tmp_path / "missing"))
    with pytest.raises(TypeError, match="MoLAConfig"):
        model.attach(42)

    model.attach(_config())
    model.save_adapter(str(tmp_path / "a"))
    other = mola.CausalLM.from_pretrained(str(llama_path))
    other.attach(_config(experts=8))
    with pytest.raises(ValueError, match=r"layer 0 \(model.layers.0\) has experts 2 in the file"):
        other.load_adapter(str(tmp_path / "a"))
