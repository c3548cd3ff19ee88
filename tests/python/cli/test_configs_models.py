"""configs/models/*.json: each loads through mola's ModelConfig and describes the
published model: the parameter count it implies (embeddings + layers + final
norm + head unless tied) equals the published total, counted twice: by hand
from the config's numbers, and by transformers building the model on the meta
device (no memory) from the same file.
"""
import json
import shutil
from pathlib import Path

import pytest
import torch

import mola

CONFIGS = Path(__file__).resolve().parents[3] / "configs" / "models"
FILES = sorted(CONFIGS.glob("*.json"))

# Published totals: Hugging Face model cards / safetensors index metadata.
PUBLISHED = {
    "llama-2-7b.json": 6_738_415_616,
    "mistral-7b-v0.1.json": 7_241_732_096,
    "gemma-2b.json": 2_506_172_416,
    "gemma-7b.json": 8_537_680_896,
    "tiny.json": 260_032,  # stories260K: llama2.c's header implies 260,032 weights (tied head)
}


def count_by_hand(c):
    """Weights of a llama/mistral/gemma decoder as mola's config reads it (no biases in these files)."""
    hidden, inter, layers = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"]
    heads, kv = c["num_attention_heads"], c["num_key_value_heads"]
    head_dim = c["head_dim"]
    attn = hidden * heads * head_dim * 2 + hidden * kv * head_dim * 2  # q, o; k, v
    mlp = 3 * hidden * inter  # gate, up, down
    norms = 2 * hidden
    embed = c["vocab_size"] * hidden
    head = 0 if c["tie_word_embeddings"] else embed
    return embed + layers * (attn + mlp + norms) + hidden + head


def test_every_file_is_listed():
    assert {f.name for f in FILES} == set(PUBLISHED), "a config file without a published total, or one missing"
    readme = (CONFIGS / "README.md").read_text()
    for f in FILES:
        assert f.name in readme, f"{f.name} is not described in configs/models/README.md"


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_loads_through_mola_model_config(path, tmp_path):
    """CausalLM.from_pretrained parses config.json with the C++ ModelConfig before it looks for weights: a
    directory holding only the config gets past the parser and stops at the missing weights, while the same
    file made inconsistent stops at the parser (ValueError). tests/cpp/io/test_llama2c.cpp checks the parsed
    fields of every file through ModelConfig::from_json_file."""
    good = tmp_path / "good"
    good.mkdir()
    shutil.copy(path, good / "config.json")
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        mola.CausalLM.from_pretrained(str(good))

    bad = tmp_path / "bad"
    bad.mkdir()
    raw = json.loads(path.read_text())
    raw["num_key_value_heads"] = raw["num_attention_heads"] + 1
    (bad / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match="num_key_value_heads"):
        mola.CausalLM.from_pretrained(str(bad))


def test_tiny_is_the_bundled_model():
    bundle = CONFIGS.parents[1] / "data" / "models" / "stories260K"
    assert json.loads((CONFIGS / "tiny.json").read_text()) == json.loads((bundle / "config.json").read_text())
    parsed = mola.CausalLM.from_pretrained(str(bundle)).config
    assert (parsed["hidden_size"], parsed["num_hidden_layers"], parsed["num_key_value_heads"], parsed["head_dim"],
            parsed["vocab_size"], parsed["tie_word_embeddings"]) == (64, 5, 4, 8, 512, True)


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_parameter_count_matches_published(path):
    raw = json.loads(path.read_text())
    family = raw["model_type"]
    c = dict(raw)
    c.setdefault("num_key_value_heads", c["num_attention_heads"])
    c.setdefault("head_dim", c["hidden_size"] // c["num_attention_heads"])
    c.setdefault("tie_word_embeddings", family == "gemma")  # transformers' defaults per family
    assert count_by_hand(c) == PUBLISHED[path.name]

    transformers = pytest.importorskip("transformers")
    cfg = transformers.AutoConfig.for_model(**raw)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(cfg)
    # parameters() yields a tied weight once.
    assert sum(p.numel() for p in model.parameters()) == PUBLISHED[path.name]
    assert model.config.tie_word_embeddings == c["tie_word_embeddings"]
