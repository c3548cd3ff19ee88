"""mola.authors.import_authors_adapter (docs/design.md, Fidelity to the papers and the authors' code): a checkpoint written with the
MoLA authors' key names (per-expert lora_A_{e} / lora_B_{e}, router.router,
under base_model.model.model.layers.{j}), as adapter_model.bin or
.safetensors, imports into mola's format; loaded into a transformers llama it
gives the logits of the authors' per-expert loop run on those same tensors.
"""
import json
import math
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))  # the repo root, for tests.reference

import mola  # noqa: E402
from tests.reference.authors_loop import reference_route  # noqa: E402

transformers = pytest.importorskip("transformers")

LAYERS, HIDDEN, INTER, VOCAB, RANK, ALPHA = 2, 32, 48, 61, 4, 16
EXPERTS = [2, 3]
PROJECTIONS = {"self_attn": ["q_proj", "k_proj", "v_proj", "o_proj"], "mlp": ["gate_proj", "up_proj", "down_proj"]}


def _model():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTER,
                                      num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=2)
    return transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def _authors_checkpoint(model):
    """Per-expert tensors under the authors' key names."""
    g = torch.Generator().manual_seed(3)
    weights = {}
    for j in range(LAYERS):
        layer = model.model.layers[j]
        for block, projs in PROJECTIONS.items():
            for proj in projs:
                base = getattr(getattr(layer, block), proj)
                prefix = f"base_model.model.model.layers.{j}.{block}.{proj}"
                weights[f"{prefix}.router.router.weight"] = torch.randn(EXPERTS[j], base.in_features, generator=g)
                for e in range(EXPERTS[j]):
                    weights[f"{prefix}.lora_A_{e}.weight"] = torch.randn(RANK, base.in_features, generator=g) * 0.2
                    weights[f"{prefix}.lora_B_{e}.weight"] = torch.randn(base.out_features, RANK, generator=g) * 0.2
    config = {"r": [RANK] * LAYERS, "lora_alpha": ALPHA, "lora_dropout": 0.05, "bias": "none",
              "task_type": "CAUSAL_LM", "peft_type": "LORA", "base_model_name_or_path": "tiny-llama",
              "target_modules": [p for projs in PROJECTIONS.values() for p in projs]}
    return weights, config


class _AuthorsLayer(nn.Module):
    """The authors' layer on their own per-expert tensors: base + sum over the
    top-k experts of w_e * (alpha / r) * B_e A_e x."""

    def __init__(self, base, router, a, b, top_k):
        super().__init__()
        self.base, self.router, self.a, self.b, self.top_k = base, router, a, b, top_k

    def forward(self, x):
        flat = x.reshape(-1, x.shape[-1])
        weights, indices, _ = reference_route(flat @ self.router.T, self.top_k)  # [T, k] each
        out = self.base(flat)
        for e in range(len(self.a)):
            rows, slot = torch.nonzero(indices == e, as_tuple=True)
            update = (flat[rows] @ self.a[e].T) @ self.b[e].T * (ALPHA / RANK)
            out = out.index_add(0, rows, update * weights[rows, slot].unsqueeze(-1))
        return out.reshape(*x.shape[:-1], -1)


def _reference_logits(weights, ids, top_k=(2, 2)):
    model = _model()
    for j in range(LAYERS):
        layer = model.model.layers[j]
        for block, projs in PROJECTIONS.items():
            for proj in projs:
                prefix = f"base_model.model.model.layers.{j}.{block}.{proj}"
                a = [weights[f"{prefix}.lora_A_{e}.weight"] for e in range(EXPERTS[j])]
                b = [weights[f"{prefix}.lora_B_{e}.weight"] for e in range(EXPERTS[j])]
                parent = getattr(layer, block)
                setattr(parent, proj, _AuthorsLayer(getattr(parent, proj), weights[f"{prefix}.router.router.weight"],
                                                    a, b, min(top_k[j], EXPERTS[j])))
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("fmt", ["bin", "safetensors"])
def test_imported_adapter_gives_the_authors_outputs(tmp_path, fmt):
    weights, config = _authors_checkpoint(_model())
    src = tmp_path / "authors"
    src.mkdir()
    (src / "adapter_config.json").write_text(json.dumps(config))
    if fmt == "bin":
        torch.save(weights, src / "adapter_model.bin")
    else:
        from safetensors.torch import save_file
        save_file(weights, str(src / "adapter_model.safetensors"))
    resolved = mola.authors.import_authors_adapter(src, tmp_path / "mola")
    assert resolved["experts"] == EXPERTS and resolved["rank"] == [RANK] * LAYERS
    assert resolved["top_k"] == [2, 2] and resolved["base_model_name"] == "tiny-llama"
    assert resolved["scaling"] == [ALPHA / RANK] * LAYERS

    ids = torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(5))
    model = mola.load_adapter(_model(), tmp_path / "mola")
    model.eval()
    with torch.no_grad():
        ours = model(ids).logits
    theirs = _reference_logits(weights, ids)
    assert not torch.allclose(theirs, _model()(ids).logits.detach(), atol=1e-3)  # the adapter matters
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)


def _write_authors_checkpoint(tmp_path):
    weights, config = _authors_checkpoint(_model())
    src = tmp_path / "authors"
    src.mkdir()
    (src / "adapter_config.json").write_text(json.dumps(config))
    torch.save(weights, src / "adapter_model.bin")
    return src, weights


def test_top_k_per_layer(tmp_path):
    # The authors' runs set top-k per layer and their files do not store it.
    src, weights = _write_authors_checkpoint(tmp_path)
    resolved = mola.authors.import_authors_adapter(src, tmp_path / "mola", top_k=[1, 3])
    assert resolved["top_k"] == [1, 3]
    ids = torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(6))
    model = mola.load_adapter(_model(), tmp_path / "mola")
    with torch.no_grad():
        ours = model(ids).logits
    torch.testing.assert_close(ours, _reference_logits(weights, ids, top_k=(1, 3)), rtol=0, atol=1e-5)
    assert not torch.allclose(ours, _reference_logits(weights, ids), atol=1e-4)  # k mattered
    with pytest.raises(ValueError, match=r"top_k.*2 layers"):
        mola.authors.import_authors_adapter(src, tmp_path / "bad", top_k=[1, 2, 2])
    with pytest.raises(ValueError, match=r"top_k"):
        mola.authors.import_authors_adapter(src, tmp_path / "bad", top_k=[1, 4])  # layer 1 has 3 experts

    import subprocess
    result = subprocess.run([sys.executable, "-m", "mola", "convert", "mola-authors", str(src), str(tmp_path / "cli"),
                             "--top-k", "1,3"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert mola.adapter.read_adapter_config(tmp_path / "cli")["top_k"] == [1, 3]
    bad = subprocess.run([sys.executable, "-m", "mola", "convert", "mola-authors", str(src), str(tmp_path / "cli2"),
                          "--top-k", "1,x"], capture_output=True, text=True)
    assert bad.returncode == 2 and "--top-k '1,x'" in bad.stderr


def test_bad_checkpoints(tmp_path):
    weights, config = _authors_checkpoint(_model())
    src = tmp_path / "authors"
    src.mkdir()
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        mola.authors.import_authors_adapter(src, tmp_path / "out")
    (src / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(FileNotFoundError, match="adapter_model"):
        mola.authors.import_authors_adapter(src, tmp_path / "out")
    broken = dict(weights)
    del broken["base_model.model.model.layers.1.mlp.up_proj.lora_B_2.weight"]
    torch.save(broken, src / "adapter_model.bin")
    with pytest.raises(ValueError, match=r"lora_B_\{e\} for experts \[0, 1\], but its router has 3 rows"):
        mola.authors.import_authors_adapter(src, tmp_path / "out")
    (src / "adapter_config.json").write_text(json.dumps(dict(config, r=[8, 8])))
    torch.save(weights, src / "adapter_model.bin")
    with pytest.raises(ValueError, match=r"r = \[8, 8\] but the tensors have ranks \[4, 4\]"):
        mola.authors.import_authors_adapter(src, tmp_path / "out")
    # A pickle that would run code is refused by torch.load(weights_only=True).
    torch.save({"x": math.floor}, src / "adapter_model.bin")
    with pytest.raises(ValueError, match="weights_only"):
        mola.authors.import_authors_adapter(src, tmp_path / "out")


def test_the_command_converts(tmp_path):
    import subprocess
    weights, config = _authors_checkpoint(_model())
    src = tmp_path / "authors"
    src.mkdir()
    (src / "adapter_config.json").write_text(json.dumps(config))
    torch.save(weights, src / "adapter_model.bin")
    result = subprocess.run([sys.executable, "-m", "mola", "convert", "mola-authors", str(src), str(tmp_path / "out")],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "experts per layer [2, 3]" in result.stdout
    assert mola.adapter.read_adapter_config(tmp_path / "out")["experts"] == EXPERTS
    bad = subprocess.run([sys.executable, "-m", "mola", "convert", "mola-authors", str(tmp_path / "nowhere"),
                          str(tmp_path / "out2")], capture_output=True, text=True)
    assert bad.returncode == 2 and "adapter_config.json not found" in bad.stderr
