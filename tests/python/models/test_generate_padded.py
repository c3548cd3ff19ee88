"""Left-padded batched generation (mola.CausalLM.generate with an
attention_mask; docs/design.md, Fidelity to the papers and the authors' code: the authors evaluate in left-padded batches
of 8) against transformers: for tiny random llama (GQA), mistral (sliding
window 5, shorter than prompt + generated) and gemma checkpoints, a batch of
prompts of different lengths, padded on the left, gives per row exactly
transformers' greedy `generate` output for the same batch, and the tokens of
generating each prompt alone with mola. Rows stop at EOS as in transformers;
right padding is refused with a message asking for left padding.
C++ implementation: src/models/generate.cpp, src/models/decoder.cpp.
"""
import pytest
import torch

import mola

transformers = pytest.importorskip("transformers")

from test_generate import VOCAB, checkpoint  # noqa: E402,F401  (the same tiny checkpoints, as a fixture)

LENGTHS = [9, 4, 1, 6]  # the longest row has no padding, one row is a single token
NEW = 10                # 9 + 10 > mistral's window of 5
PAD = 0


def _prompts():
    g = torch.Generator().manual_seed(7)
    # Token ids from 1, so that no prompt token equals the pad id.
    return [torch.randint(1, VOCAB, (n,), generator=g) for n in LENGTHS]


def _left_pad(prompts):
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), PAD, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = p
        mask[i, width - len(p):] = 1
    return ids, mask


def _hf_generate(hf, ids, mask, **kw):
    with torch.no_grad():
        return hf.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, pad_token_id=PAD, **kw)


def test_left_padded_batch_matches_transformers(checkpoint):
    family, hf, path = checkpoint
    model = mola.CausalLM.from_pretrained(str(path))
    ids, mask = _left_pad(_prompts())
    theirs = _hf_generate(hf, ids, mask)
    ours = model.generate(ids, attention_mask=mask, max_new_tokens=NEW)
    assert ours.shape == (len(LENGTHS), max(LENGTHS) + NEW)
    assert torch.equal(ours, theirs), f"{family}:\n{ours}\nvs transformers\n{theirs}"


def test_each_row_equals_its_prompt_generated_alone(checkpoint):
    family, hf, path = checkpoint
    model = mola.CausalLM.from_pretrained(str(path))
    prompts = _prompts()
    ids, mask = _left_pad(prompts)
    batched = model.generate(ids, attention_mask=mask, max_new_tokens=NEW)
    width = ids.shape[1]
    for i, p in enumerate(prompts):
        alone = model.generate(p.unsqueeze(0), max_new_tokens=NEW)[0]
        assert torch.equal(alone[:len(p)], p)
        assert torch.equal(batched[i, width:], alone[len(p):]), f"{family} row {i}"
        # The prompt comes back as given, padding included.
        assert torch.equal(batched[i, :width], ids[i])


def test_eos_in_a_padded_batch_matches_transformers(checkpoint, tmp_path):
    family, hf, path = checkpoint
    ids, mask = _left_pad(_prompts())
    greedy = mola.CausalLM.from_pretrained(str(path)).generate(ids, attention_mask=mask, max_new_tokens=NEW)
    eos = int(greedy[2, ids.shape[1] + 2])  # the single-token row reaches it at step 2 at the latest
    hf.config.eos_token_id, hf.config.pad_token_id = eos, PAD
    hf.save_pretrained(tmp_path)
    hf.config.eos_token_id, hf.config.pad_token_id = None, None
    theirs = _hf_generate(hf, ids, mask, eos_token_id=eos)
    ours = mola.CausalLM.from_pretrained(str(tmp_path)).generate(ids, attention_mask=mask, max_new_tokens=NEW)
    assert torch.equal(ours, theirs), f"{family}:\n{ours}\nvs transformers\n{theirs}"
    assert (ours[2, ids.shape[1]:] == eos).any()


def test_all_ones_mask_is_the_unpadded_path(checkpoint):
    family, hf, path = checkpoint
    model = mola.CausalLM.from_pretrained(str(path))
    ids = torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(3))
    assert torch.equal(model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW),
                       model.generate(ids, max_new_tokens=NEW))


def test_right_padding_and_bad_masks_are_refused(checkpoint):
    family, hf, path = checkpoint
    model = mola.CausalLM.from_pretrained(str(path))
    ids, mask = _left_pad(_prompts())
    right = mask.flip(1)
    with pytest.raises(ValueError, match="pad on the left"):
        model.generate(ids, attention_mask=right, max_new_tokens=2)
    holes = torch.ones_like(ids)
    holes[0, 3] = 0
    with pytest.raises(ValueError, match="pad on the left"):
        model.generate(ids, attention_mask=holes, max_new_tokens=2)
    empty = mask.clone()
    empty[1] = 0
    with pytest.raises(ValueError, match="all padding"):
        model.generate(ids, attention_mask=empty, max_new_tokens=2)
    with pytest.raises(ValueError, match="only 0"):
        model.generate(ids, attention_mask=mask * 2, max_new_tokens=2)


def test_cached_padded_forward_equals_the_unpadded_rows(checkpoint):
    # The forward with a cache and a mask over cached + new tokens: each row's
    # logits equal that row's own forward without padding.
    family, hf, path = checkpoint
    model = mola.CausalLM.from_pretrained(str(path))
    prompts = _prompts()
    ids, mask = _left_pad(prompts)
    width = ids.shape[1]
    extra = torch.randint(1, VOCAB, (len(prompts), 3), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        cache = mola._C.KVCache()
        first = model(ids, attention_mask=mask, cache=cache).logits
        full_mask = torch.cat([mask, torch.ones_like(extra)], 1)
        second = model(extra, attention_mask=full_mask, cache=cache).logits
        assert cache.length == width + 3
        for i, p in enumerate(prompts):
            alone = model(torch.cat([p, extra[i]]).unsqueeze(0)).logits[0]
            torch.testing.assert_close(first[i, width - len(p):], alone[:len(p)], rtol=0, atol=1e-4)
            torch.testing.assert_close(second[i], alone[len(p):], rtol=0, atol=1e-4)
