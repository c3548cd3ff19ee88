"""mola.CausalLM.generate and the KV cache (docs/design.md, Models and loading) against transformers:
greedy decoding of tiny random llama, mistral (sliding window shorter than
the generated length) and gemma checkpoints gives transformers'
model.generate tokens; the cached forward gives the full forward's logits;
seeded sampling repeats, and a tiny top_p is greedy. Then a sharded
checkpoint loads to the single file's logits.
C++ implementation: src/models/generate.cpp.
"""

import pytest
import torch

import mola
from tiny_models import family_config, randomize

transformers = pytest.importorskip("transformers")

VOCAB = 97
PROMPT = 8
NEW = 12  # PROMPT + NEW = 20 > mistral's window of 5


def _config(family, **extra):
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=112, num_hidden_layers=2,
                  num_attention_heads=4, max_position_embeddings=128, bos_token_id=None, eos_token_id=None,
                  pad_token_id=None, **extra)
    return family_config(family, **common)



@pytest.fixture(scope="module", params=["llama", "mistral", "gemma"])
def checkpoint(request, tmp_path_factory):
    family = request.param
    path = tmp_path_factory.mktemp(f"gen-{family}")
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(_config(family), attn_implementation="sdpa",
                                                       dtype=torch.float32).eval()
    randomize(hf, family)
    hf.save_pretrained(path)
    return family, hf, path


def _prompt(batch=2):
    return torch.randint(0, VOCAB, (batch, PROMPT), generator=torch.Generator().manual_seed(2))


def test_greedy_matches_transformers(checkpoint):
    family, hf, path = checkpoint
    model = mola.CausalLM.from_pretrained(str(path))
    ids = _prompt()
    with torch.no_grad():
        theirs = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW, do_sample=False)
    ours = model.generate(ids, max_new_tokens=NEW)
    assert ours.dtype == torch.long and ours.shape == (2, PROMPT + NEW)
    assert torch.equal(ours, theirs), f"{family}: {ours} vs {theirs}"


def test_cached_logits_equal_the_full_forward(checkpoint):
    family, hf, path = checkpoint
    model = mola.CausalLM.from_pretrained(str(path))
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        full = model(ids).logits
        cache = mola._C.KVCache()
        parts = [model(ids[:, :6], cache=cache).logits, model(ids[:, 6:9], cache=cache).logits]
        assert cache.length == 9
        parts += [model(ids[:, t:t + 1], cache=cache).logits for t in range(9, 16)]
    assert cache.length == 16
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=0, atol=1e-4)


def test_eos_stops_a_row_and_pads_it(checkpoint):
    family, hf, path = checkpoint
    model = mola.CausalLM.from_pretrained(str(path))
    ids = _prompt()
    greedy = model.generate(ids, max_new_tokens=NEW)
    eos = int(greedy[0, PROMPT + 3])  # row 0 reaches it at step 3 at the latest
    hf.generation_config.eos_token_id = eos
    hf.generation_config.pad_token_id = 0
    with torch.no_grad():
        theirs = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW, do_sample=False)
    (path / "eos").mkdir(exist_ok=True)
    hf.config.eos_token_id, hf.config.pad_token_id = eos, 0
    hf.save_pretrained(path / "eos")
    hf.config.eos_token_id, hf.config.pad_token_id = None, None
    ours = mola.CausalLM.from_pretrained(str(path / "eos")).generate(ids, max_new_tokens=NEW)
    assert torch.equal(ours, theirs), f"{family}: {ours} vs {theirs}"


def test_sampling_repeats_with_a_seed_and_tiny_top_p_is_greedy(checkpoint):
    family, hf, path = checkpoint
    model = mola.CausalLM.from_pretrained(str(path))
    ids = _prompt(3)
    # A temperature on the scale of the logits, so that sampling is far from
    # greedy (gemma's scaled, tied embeddings give logits ten times llama's).
    with torch.no_grad():
        temperature = 2.0 * float(model(ids).logits[:, -1].std())
    a = model.generate(ids, max_new_tokens=NEW, do_sample=True, temperature=temperature, seed=123)
    b = model.generate(ids, max_new_tokens=NEW, do_sample=True, temperature=temperature, seed=123)
    assert torch.equal(a, b)
    assert torch.equal(a[:, :PROMPT], ids)
    others = [model.generate(ids, max_new_tokens=NEW, do_sample=True, temperature=temperature, seed=s) for s in (1, 2)]
    assert any(not torch.equal(a, o) for o in others)
    nucleus = model.generate(ids, max_new_tokens=NEW, do_sample=True, top_p=1e-6, seed=5)
    assert torch.equal(nucleus, model.generate(ids, max_new_tokens=NEW))


def test_right_padded_batches_are_refused(checkpoint):
    family, hf, path = checkpoint
    model = mola.CausalLM.from_pretrained(str(path))
    ids = _prompt()
    mask = torch.ones_like(ids)
    mask[0, -2:] = 0  # right padding (left padding is supported: test_generate_padded.py)
    with pytest.raises(ValueError, match="pad on the left"):
        model.generate(ids, attention_mask=mask, max_new_tokens=2)
    with pytest.raises(ValueError, match="top_p"):
        model.generate(ids, max_new_tokens=2, do_sample=True, top_p=0.0)


def test_sharded_checkpoint_loads_like_the_single_file(checkpoint, tmp_path):
    family, hf, path = checkpoint
    hf.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert not (tmp_path / "model.safetensors").exists()
    ids = _prompt()
    with torch.no_grad():
        single = mola.CausalLM.from_pretrained(str(path))(ids).logits
        sharded = mola.CausalLM.from_pretrained(str(tmp_path))(ids).logits
    assert torch.equal(sharded, single)
