"""mola.CausalLM against transformers (docs/design.md, Models and loading): for a tiny random model of
each family, the C++ decoder loaded from transformers' own save_pretrained
output must give the same logits (max abs difference <= 1e-4 in fp32, with and
without right padding) and the same loss (<= 1e-5). Then the loading errors:
each must name what is wrong.

The HF models run with attn_implementation="sdpa", the same kernel mola calls.
Weights are re-drawn at unit scale (and the norm weights away from their
neutral value) so that a wrong rotary, mask or norm convention moves the
logits far past the tolerance, which transformers' 0.02 init would hide.
"""
import json
import os
import shutil

import pytest
import torch

import mola
from tiny_models import family_config, randomize

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

LOGITS_TOL = 1e-4
LOSS_TOL = 1e-5
SEQ = 12  # longer than mistral's window of 5


def _config(family):
    common = dict(vocab_size=97, hidden_size=64, intermediate_size=112, num_hidden_layers=2,
                  num_attention_heads=4, max_position_embeddings=128)
    return family_config(family, mistral={"rope_parameters": {"rope_type": "default", "rope_theta": 500.0}},
                         **common)



def _save(family, path):
    """A tiny random HF model of `family` in eval mode, saved to `path`."""
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(_config(family), attn_implementation="sdpa",
                                                       dtype=torch.float32).eval()
    randomize(hf, family)
    hf.save_pretrained(path)
    assert (path / "model.safetensors").exists()
    return hf


@pytest.fixture(scope="module", params=["llama", "mistral", "gemma"])
def checkpoint(request, tmp_path_factory):
    """(family, HF model in eval mode, checkpoint directory)."""
    path = tmp_path_factory.mktemp(request.param)
    return request.param, _save(request.param, path), path


@pytest.fixture(scope="module")
def llama_path(tmp_path_factory):
    """A llama checkpoint for the error tests, which need only one family."""
    path = tmp_path_factory.mktemp("llama-errors")
    _save("llama", path)
    return path


def _batch():
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 97, (3, SEQ), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0  # right padding
    mask[2, 11:] = 0
    labels = ids.clone()
    labels[0, :3] = -100  # prompt tokens without loss
    labels[mask == 0] = -100
    return ids, mask, labels


def test_parameter_names_are_the_checkpoint_keys(checkpoint):
    family, hf, path = checkpoint
    model = mola.CausalLM.from_pretrained(str(path))
    ours = model.state_dict()
    theirs = safetensors_torch.load_file(str(path / "model.safetensors"))
    assert sorted(ours) == sorted(theirs)
    assert ("lm_head.weight" in ours) == (family != "gemma")
    for name, t in theirs.items():
        assert torch.equal(ours[name], t), name
    assert model.config["model_type"] == family


def test_logits_match_without_padding(checkpoint):
    family, hf, path = checkpoint
    model = mola.CausalLM.from_pretrained(str(path))
    ids, _, _ = _batch()
    with torch.no_grad():
        expected = hf(input_ids=ids).logits
        logits, loss = model(ids)
    assert loss is None
    assert logits.shape == expected.shape and logits.dtype == torch.float32
    diff = (logits - expected).abs().max().item()
    print(f"{family}: max |logits diff| without padding = {diff:.3g}")
    assert diff <= LOGITS_TOL


def test_logits_and_loss_match_with_right_padding(checkpoint):
    family, hf, path = checkpoint
    model = mola.CausalLM.from_pretrained(str(path))
    ids, mask, labels = _batch()
    with torch.no_grad():
        out = hf(input_ids=ids, attention_mask=mask, labels=labels)
        logits, loss = model.forward(ids, attention_mask=mask, labels=labels)
    real = mask.bool()
    diff = (logits - out.logits).abs()[real].max().item()
    print(f"{family}: max |logits diff| with right padding = {diff:.3g}, "
          f"|loss diff| = {abs(loss.item() - out.loss.item()):.3g}")
    assert diff <= LOGITS_TOL
    assert torch.isfinite(logits).all()
    assert abs(loss.item() - out.loss.item()) <= LOSS_TOL


def test_bfloat16_logits_match(checkpoint):
    # Loaded the same way on both sides (so transformers keeps its rotary
    # inv_freq in fp32), the same kernels run and bf16 logits agree to within
    # one bf16 rounding of the largest logit (today: bit for bit).
    family, _, path = checkpoint
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16,
                                                           attn_implementation="sdpa").eval()
    model = mola.CausalLM.from_pretrained(str(path), dtype=torch.bfloat16)
    ids, mask, _ = _batch()
    with torch.no_grad():
        expected = hf(input_ids=ids, attention_mask=mask).logits.float()
        logits, _ = model(ids, attention_mask=mask)
    assert logits.dtype == torch.bfloat16
    diff = (logits.float() - expected).abs()[mask.bool()].max().item()
    print(f"{family}: max |logits diff| in bf16 = {diff:.3g}")
    assert diff <= expected.abs().max().item() * 2.0**-8


def test_logits_match_with_left_padding(checkpoint):
    # Positions stay 0..seq-1 on both sides (transformers' forward without
    # position_ids); the fully masked query rows of the padding must not turn
    # into NaNs that reach the real tokens.
    family, hf, path = checkpoint
    model = mola.CausalLM.from_pretrained(str(path))
    ids, mask, _ = _batch()
    mask[0, :4] = 0
    with torch.no_grad():
        expected = hf(input_ids=ids, attention_mask=mask).logits
        logits, _ = model(ids, attention_mask=mask)
    assert torch.isfinite(logits).all()
    assert (logits - expected).abs()[mask.bool()].max().item() <= LOGITS_TOL


def test_sliding_window_changes_the_logits(checkpoint):
    # Guards the mistral test against a window that is silently not applied:
    # positions past the window must differ from a model without it.
    family, hf, path = checkpoint
    if family != "mistral":
        pytest.skip("only mistral has a sliding window")
    ids, _, _ = _batch()
    cfg = json.loads((path / "config.json").read_text())
    cfg["sliding_window"] = None
    (path / "config.json").write_text(json.dumps(cfg))
    try:
        unwindowed = mola.CausalLM.from_pretrained(str(path))
    finally:
        cfg["sliding_window"] = 5
        (path / "config.json").write_text(json.dumps(cfg))
    windowed = mola.CausalLM.from_pretrained(str(path))
    with torch.no_grad():
        a, _ = windowed(ids)
        b, _ = unwindowed(ids)
    assert torch.allclose(a[:, :5], b[:, :5], atol=1e-6)
    assert (a[:, 5:] - b[:, 5:]).abs().max() > 1e-3


# ---- errors ----------------------------------------------------------------------------

@pytest.fixture()
def broken(llama_path, tmp_path):
    """A writable copy of the llama checkpoint to damage."""
    copy = tmp_path / "ckpt"
    shutil.copytree(llama_path, copy)
    return copy


def _edit_weights(path, edit):
    tensors = safetensors_torch.load_file(str(path / "model.safetensors"))
    edit(tensors)
    safetensors_torch.save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})


def test_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such checkpoint directory"):
        mola.CausalLM.from_pretrained(str(tmp_path / "nowhere"))


def test_missing_config(broken):
    os.remove(broken / "config.json")
    with pytest.raises(FileNotFoundError, match="config.json"):
        mola.CausalLM.from_pretrained(str(broken))


def test_missing_weights(broken):
    os.remove(broken / "model.safetensors")
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        mola.CausalLM.from_pretrained(str(broken))


def test_unknown_model_type(broken):
    cfg = json.loads((broken / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    (broken / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r'model_type "gpt2".*llama, mistral, gemma'):
        mola.CausalLM.from_pretrained(str(broken))


def test_tensor_of_the_wrong_shape(broken):
    def edit(t):
        t["model.layers.1.mlp.up_proj.weight"] = torch.zeros(111, 64)
    _edit_weights(broken, edit)
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.up_proj\.weight.*\[111, 64\].*\[112, 64\]"):
        mola.CausalLM.from_pretrained(str(broken))


def test_missing_tensor(broken):
    _edit_weights(broken, lambda t: t.pop("model.norm.weight"))
    with pytest.raises(ValueError, match=r'lacks 1 tensor.*"model\.norm\.weight"'):
        mola.CausalLM.from_pretrained(str(broken))


def test_unexpected_tensor(broken):
    def edit(t):
        t["model.layers.2.self_attn.q_proj.weight"] = torch.zeros(64, 64)
    _edit_weights(broken, edit)
    with pytest.raises(ValueError, match=r'does not use.*"model\.layers\.2\.self_attn\.q_proj\.weight"'):
        mola.CausalLM.from_pretrained(str(broken))


def test_forward_checks_shapes(llama_path):
    model = mola.CausalLM.from_pretrained(str(llama_path))
    ids = torch.zeros(2, 5, dtype=torch.long)
    with pytest.raises(ValueError, match=r"labels has shape \[2, 4\]"):
        model(ids, labels=ids[:, :4])
    with pytest.raises(ValueError, match="input_ids must be integer"):
        model(ids.float())
