"""mola.inject, mola.save_adapter and mola.load_adapter on tiny random
transformers models of each family (docs/python.md; docs/design.md, The adapter files).

Injection must leave the logits unchanged (B starts at zero), follow the
per-layer preset, train only the adapter, and round-trip through the adapter
directory: a fresh model loading it reproduces the trained model's logits.
Then the errors: each names what is wrong.
"""
import json
import os

import pytest
import torch

import mola
from mola.injection import adapter_key
from tiny_models import family_config

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
TOL = 1e-6
NUM_LAYERS = 4


def _config(family):
    common = dict(vocab_size=97, hidden_size=64, intermediate_size=112, num_hidden_layers=NUM_LAYERS,
                  num_attention_heads=4, max_position_embeddings=64)
    return family_config(family, **common)


def _model(family, seed=0):
    """The same tiny random model for the same (family, seed), in eval mode."""
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(
        _config(family), attn_implementation="sdpa", dtype=torch.float32).eval()


def _cfg(**kw):
    return mola.MoLAConfig(**{**dict(experts="2,4,6,8", top_k=2, rank=4, alpha=8, dropout=0.0), **kw})


def _batch(seed=1, batch=2, seq=10):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 97, (batch, seq), generator=g)
    return {"input_ids": ids, "labels": ids.clone()}


def _logits(model, batch):
    with torch.no_grad():
        return model(input_ids=batch["input_ids"]).logits


def _perturb(model, seed=3):
    """Give every lora_b non-zero values so that the adapter changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, m in _mola_modules(model):
            m.lora_b.copy_(torch.randn(m.lora_b.shape, generator=g) * 0.1)


def _mola_modules(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, mola.MoLALinear)]


# ----------------------------------------------------------------- inject

@pytest.mark.parametrize("family", ["llama", "mistral", "gemma"])
def test_inject_keeps_logits_and_follows_preset(family):
    model, batch = _model(family), _batch()
    before = _logits(model, batch)
    assert mola.inject(model, _cfg()) is model
    after = _logits(model, batch)
    assert (after - before).abs().max().item() <= TOL

    modules = _mola_modules(model)
    assert len(modules) == NUM_LAYERS * len(TARGETS)
    for name, m in modules:
        layer = int(name.split(".")[2])
        assert m.layer_index == layer
        assert m.router.shape == (2 * (layer + 1), m.in_features)  # "2,4,6,8" over 4 layers
        assert m.lora_a.shape == (m.num_experts, 4, m.in_features)
        assert m.lora_b.shape == (m.num_experts, m.out_features, 4)
        assert m.top_k == 2 and m.scaling == 2.0
    assert model.mola_config["experts"] == [2, 4, 6, 8]
    assert model.mola_config["num_layers"] == NUM_LAYERS

    # Only the adapter trains; the rest of the model is frozen.
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    expected = {f"{n}.{p}" for n, _ in modules for p in ("router", "lora_a", "lora_b")}
    assert trainable == expected


def test_gradients_reach_only_the_adapter_and_training_lowers_the_loss():
    model, batch = _model("llama"), _batch()
    mola.inject(model, _cfg(dropout=0.05))
    model.train()
    out = model(**batch)
    (out.loss + mola.aux_loss(model)).backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
            # B starts at zero, so A's first gradient is zero, as in LoRA; the
            # router learns from the balance loss and B from the LM loss.
            assert (p.grad.abs().sum() == 0) == name.endswith("lora_a"), name
        else:
            assert p.grad is None, name

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(6):
        opt.zero_grad()
        out = model(**batch)
        (out.loss + mola.aux_loss(model)).backward()
        opt.step()
        losses.append(out.loss.item())
    assert losses[-1] < losses[0] - 0.05, losses
    assert all(m.lora_a.grad.abs().sum() > 0 for _, m in _mola_modules(model))  # B moved, A learns


def test_partial_targets_and_a_bare_decoder():
    # A LlamaModel (no causal-LM head, paths "layers.{i}...") with two targets.
    torch.manual_seed(0)
    model = transformers.LlamaModel(_config("llama"))
    mola.inject(model, _cfg(targets=["q_proj", "down_proj"], experts=3, top_k=1))
    names = [n for n, _ in _mola_modules(model)]
    assert len(names) == 2 * NUM_LAYERS
    assert {n.split(".")[-1] for n in names} == {"q_proj", "down_proj"}
    assert adapter_key(names[0]) == "model." + names[0]
    # Any wrapper prefix is dropped: keys start at "model.layers" as in HF checkpoints.
    assert adapter_key("base_model.model.model.layers.3.mlp.up_proj") == "model.layers.3.mlp.up_proj"


# ------------------------------------------------------- save and load

@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(trained llama model, its logits on _batch(), the adapter directory)."""
    model = _model("llama")
    mola.inject(model, _cfg())
    _perturb(model)
    directory = tmp_path_factory.mktemp("adapter")
    mola.save_adapter(model, directory)
    return model, _logits(model, _batch()), directory


def test_save_adapter_writes_the_documented_files(saved):
    model, _, directory = saved
    assert sorted(os.listdir(directory)) == ["adapter_config.json", "adapter_model.safetensors"]
    with open(directory / "adapter_config.json") as f:
        config = json.load(f)
    assert config["experts"] == [2, 4, 6, 8] and config["top_k"] == [2] * 4 and config["rank"] == [4] * 4
    assert config["scaling"] == [2.0] * 4 and config["num_layers"] == 4
    assert config["method"] == "mola" and config["targets"] == list(TARGETS)
    assert config["base_model_name"] == "llama"  # from_config: no path, so the model type

    tensors = safetensors_torch.load_file(directory / "adapter_model.safetensors")
    assert len(tensors) == 3 * len(TARGETS) * NUM_LAYERS
    hidden, ffn = 64, 112
    io = {"q_proj": (64, 64), "k_proj": (64, 32), "v_proj": (64, 32), "o_proj": (64, 64),
          "gate_proj": (64, ffn), "up_proj": (64, ffn), "down_proj": (ffn, hidden)}
    for layer in range(NUM_LAYERS):
        e = 2 * (layer + 1)
        for t, (d_in, d_out) in io.items():
            group = "mlp" if t in ("gate_proj", "up_proj", "down_proj") else "self_attn"
            key = f"model.layers.{layer}.{group}.{t}.mola"
            assert tensors[f"{key}.router"].shape == (e, d_in)
            assert tensors[f"{key}.lora_a"].shape == (e, 4, d_in)
            assert tensors[f"{key}.lora_b"].shape == (e, d_out, 4)
    module = model.get_submodule("model.layers.2.mlp.down_proj")
    assert torch.equal(tensors["model.layers.2.mlp.down_proj.mola.lora_b"], module.lora_b.detach())


def test_load_adapter_reproduces_the_logits(saved):
    model, logits, directory = saved
    fresh = _model("llama")
    base = _logits(fresh, _batch())
    assert (base - logits).abs().max().item() > 1e-3  # the perturbed adapter matters
    mola.inject(fresh, _cfg())
    mola.load_adapter(fresh, directory)
    assert (_logits(fresh, _batch()) - logits).abs().max().item() <= TOL


def test_inject_from_path_reproduces_the_logits(saved):
    _, logits, directory = saved
    fresh = _model("llama")
    mola.inject(fresh, path=directory)
    assert fresh.mola_config["experts"] == [2, 4, 6, 8]
    assert (_logits(fresh, _batch()) - logits).abs().max().item() <= TOL
    # load_adapter on a plain model injects too.
    plain = _model("llama")
    mola.load_adapter(plain, directory)
    assert (_logits(plain, _batch()) - logits).abs().max().item() <= TOL


# ------------------------------------------------------------- errors

def test_inject_errors():
    model = _model("llama")
    with pytest.raises(ValueError, match="'qq_proj' matches no module"):
        mola.inject(model, _cfg(targets=["q_proj", "qq_proj"]))
    assert not _mola_modules(model)  # nothing half-done
    with pytest.raises(ValueError, match="no decoder layers"):
        mola.inject(torch.nn.Sequential(torch.nn.Linear(4, 4)), _cfg())
    mola.inject(model, _cfg())
    with pytest.raises(ValueError, match="already has 28 MoLALinear"):
        mola.inject(model, _cfg())
    with pytest.raises(ValueError, match="not both"):
        mola.inject(_model("llama"), _cfg(), path="somewhere")


def test_load_adapter_errors(saved, tmp_path):
    _, _, directory = saved
    # Per-layer settings that differ from the adapter's, named with both values.
    other = _model("llama")
    mola.inject(other, _cfg(experts=4))
    with pytest.raises(ValueError, match=r"layer 0 .*experts=2 .*experts=4"):
        mola.load_adapter(other, directory)
    scaled = _model("llama")
    mola.inject(scaled, _cfg(alpha=16))
    with pytest.raises(ValueError, match=r"layer 0 .*scaling=2.0 .*scaling=4.0"):
        mola.load_adapter(scaled, directory)
    # Another model depth.
    deep = transformers.AutoModelForCausalLM.from_config(
        transformers.LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=112,
                                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
    with pytest.raises(ValueError, match="made for 4 layers but the model has 2"):
        mola.load_adapter(deep, directory)
    # Another target set: the adapter's extra keys are unexpected.
    fewer = _model("llama")
    mola.inject(fewer, _cfg(targets=["q_proj"]))
    with pytest.raises(ValueError, match=r"holds 'model\.layers\.0\.mlp\..*unexpected"):
        mola.load_adapter(fewer, directory)

    # Tampered files.
    bad = tmp_path / "bad"
    bad.mkdir()
    config = json.loads((directory / "adapter_config.json").read_text())
    (bad / "adapter_config.json").write_text(json.dumps(config))
    tensors = safetensors_torch.load_file(directory / "adapter_model.safetensors")
    key = "model.layers.1.self_attn.v_proj.mola.lora_a"
    shaped = dict(tensors, **{key: torch.zeros(4, 5, 64)})
    safetensors_torch.save_file(shaped, bad / "adapter_model.safetensors")
    with pytest.raises(ValueError, match=r"lora_a' has shape \[4, 5, 64\] .* model's is \[4, 4, 64\]"):
        mola.load_adapter(_model("llama"), bad)
    del tensors[key]
    safetensors_torch.save_file(tensors, bad / "adapter_model.safetensors")
    with pytest.raises(ValueError, match=f"no tensor '{key}'"):
        mola.load_adapter(_model("llama"), bad)
    (bad / "adapter_config.json").write_text(json.dumps(dict(config, expert=3)))
    with pytest.raises(ValueError, match="unknown key 'expert'; did you mean 'experts'"):
        mola.load_adapter(_model("llama"), bad)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        mola.load_adapter(_model("llama"), tmp_path / "missing")
    with pytest.raises(ValueError, match="no mola_config|no MoLALinear"):
        mola.save_adapter(_model("llama"), tmp_path / "out")


def test_lora_method_round_trips(tmp_path):
    # Plain LoRA is MoLA with one expert per layer (method "lora").
    try:
        cfg = mola.MoLAConfig(method="lora", experts=1, top_k=1, rank=4, dropout=0.0)
    except ValueError as e:
        pytest.skip(f"this build's MoLAConfig has no method 'lora' ({e})")
    model = _model("llama")
    mola.inject(model, cfg)
    _perturb(model)
    assert all(m.num_experts == 1 and m.top_k == 1 for _, m in _mola_modules(model))
    mola.save_adapter(model, tmp_path)
    fresh = _model("llama")
    mola.inject(fresh, path=tmp_path)
    assert fresh.mola_config["method"] == "lora"
    assert (_logits(fresh, _batch()) - _logits(model, _batch())).abs().max().item() <= TOL
