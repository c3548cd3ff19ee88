"""mola._C.convert_llama2c (src/io/llama2c.cpp) against independent oracles.

The oracle reads the llama2.c .bin with struct/numpy (its own reading of
run.c's memory_map_weights layout) and runs llama2.c's forward in plain torch
the way llama2.c's model.py does: interleaved pairs rotated as complex numbers,
grouped-query attention, RMSNorm eps 1e-5, SwiGLU. transformers'
LlamaForCausalLM and mola.CausalLM, both loaded from the converted directory,
must give the oracle's logits and greedy continuations. The bundled
data/models/stories260K must be exactly what the converter makes, and every
malformed input must fail with a message naming the file and the fault.
"""
import json
import re
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

import mola

REPO = Path(__file__).resolve().parents[3]
CKPT_DIR = REPO / "data" / "checkpoints" / "stories260K"
CKPT = CKPT_DIR / "stories260K.bin"
TOK = CKPT_DIR / "tok512.model"
BUNDLE = REPO / "data" / "models" / "stories260K"
HEADER = struct.Struct("<7i")

transformers = pytest.importorskip("transformers")
spm = pytest.importorskip("sentencepiece")


# ----------------------------------------------------------------------------
# The oracle: llama2.c's checkpoint layout and forward pass in plain torch.

def read_llama2c(path):
    """The header and weights of a legacy llama2.c .bin, as llama2.c's run.c maps them."""
    raw = Path(path).read_bytes()
    dim, hidden, n_layers, n_heads, n_kv, vocab, seq_len = HEADER.unpack_from(raw)
    shared = vocab > 0
    vocab = abs(vocab)
    hs = dim // n_heads
    floats = torch.from_numpy(np.frombuffer(raw, dtype="<f4", offset=HEADER.size).copy())
    pos = 0

    def take(*shape):
        nonlocal pos
        n = int(np.prod(shape))
        t = floats[pos:pos + n].view(*shape)
        pos += n
        return t

    w = {"emb": take(vocab, dim), "rms_att": take(n_layers, dim), "wq": take(n_layers, dim, dim),
         "wk": take(n_layers, n_kv * hs, dim), "wv": take(n_layers, n_kv * hs, dim), "wo": take(n_layers, dim, dim),
         "rms_ffn": take(n_layers, dim), "w1": take(n_layers, hidden, dim), "w2": take(n_layers, dim, hidden),
         "w3": take(n_layers, hidden, dim), "rms_final": take(dim)}
    take(seq_len * hs // 2)  # freq_cis_real, unused
    take(seq_len * hs // 2)  # freq_cis_imag, unused
    w["wcls"] = w["emb"] if shared else take(vocab, dim)
    assert pos == floats.numel(), "oracle layout does not cover the file"
    cfg = dict(dim=dim, hidden=hidden, n_layers=n_layers, n_heads=n_heads, n_kv=n_kv, vocab=vocab,
               seq_len=seq_len, shared=shared)
    return cfg, w


def rmsnorm(x, weight, eps=1e-5):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def rotate_interleaved(x, pos):
    """llama2.c model.py's apply_rotary_emb: pairs (x0,x1),(x2,x3),... as complex numbers times e^{i pos theta_j}."""
    hs = x.shape[-1]
    theta = 1.0 / (10000.0 ** (torch.arange(0, hs, 2, dtype=torch.float64) / hs))
    angles = torch.outer(pos.to(torch.float64), theta)  # [seq, hs/2]
    rot = torch.polar(torch.ones_like(angles), angles).to(torch.complex128 if x.dtype == torch.float64
                                                           else torch.complex64)
    xc = torch.view_as_complex(x.reshape(*x.shape[:-1], hs // 2, 2).contiguous())  # [b, seq, h, hs/2]
    return torch.view_as_real(xc * rot[None, :, None, :]).flatten(-2)


def oracle_logits(cfg, w, ids, dtype=torch.float64):
    """Logits [batch, seq, vocab] of llama2.c's Transformer.forward on every position, computed in `dtype`
    (float64 by default, so that the reference's own rounding is far below the tolerances)."""
    w = {k: v.to(dtype) for k, v in w.items()}
    b, t = ids.shape
    dim, nh, nkv = cfg["dim"], cfg["n_heads"], cfg["n_kv"]
    hs = dim // nh
    pos = torch.arange(t)
    x = w["emb"][ids]
    causal = torch.full((t, t), float("-inf"), dtype=dtype).triu(1)
    for i in range(cfg["n_layers"]):
        h = rmsnorm(x, w["rms_att"][i])
        q = (h @ w["wq"][i].T).view(b, t, nh, hs)
        k = (h @ w["wk"][i].T).view(b, t, nkv, hs)
        v = (h @ w["wv"][i].T).view(b, t, nkv, hs)
        q, k = rotate_interleaved(q, pos), rotate_interleaved(k, pos)
        # llama2.c's repeat_kv: kv head j serves query heads j*n_rep .. (j+1)*n_rep-1.
        k = k.repeat_interleave(nh // nkv, dim=2)
        v = v.repeat_interleave(nh // nkv, dim=2)
        q, k, v = (z.transpose(1, 2) for z in (q, k, v))  # [b, heads, seq, hs]
        att = torch.softmax(q @ k.transpose(-1, -2) / hs ** 0.5 + causal, dim=-1)
        o = (att @ v).transpose(1, 2).reshape(b, t, dim)
        x = x + o @ w["wo"][i].T
        h = rmsnorm(x, w["rms_ffn"][i])
        x = x + (torch.nn.functional.silu(h @ w["w1"][i].T) * (h @ w["w3"][i].T)) @ w["w2"][i].T
    return rmsnorm(x, w["rms_final"]) @ w["wcls"].T


def oracle_greedy(cfg, w, prompt, new_tokens, eos=2):
    ids = list(prompt)
    for _ in range(new_tokens):
        nxt = int(oracle_logits(cfg, w, torch.tensor([ids]))[0, -1].argmax())
        ids.append(nxt)
        if nxt == eos:
            break
    return ids


def cut_at_eos(ids, prompt_len, eos=2):
    ids = list(ids)
    for i in range(prompt_len, len(ids)):
        if ids[i] == eos:
            return ids[:i + 1]
    return ids


# ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    out = tmp_path_factory.mktemp("stories260K")
    header = mola._C.convert_llama2c(CKPT, TOK, out)
    assert header == {"dim": 64, "hidden_dim": 172, "n_layers": 5, "n_heads": 8, "n_kv_heads": 4,
                      "vocab_size": 512, "seq_len": 512, "shared_classifier": True, "num_parameters": 260032}
    return out


@pytest.fixture(scope="module")
def oracle():
    return read_llama2c(CKPT)


@pytest.fixture(scope="module")
def prompt_ids():
    sp = spm.SentencePieceProcessor(model_file=str(TOK))
    ids = [sp.bos_id()] + sp.encode("Once upon a time")
    assert sp.bos_id() == 1 and len(ids) > 3
    return ids


def test_config_json(converted):
    cfg = json.loads((converted / "config.json").read_text())
    assert cfg == {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64, "intermediate_size": 172,
        "num_hidden_layers": 5, "num_attention_heads": 8, "num_key_value_heads": 4, "vocab_size": 512,
        "max_position_embeddings": 512, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "hidden_act": "silu",
        "attention_bias": False, "mlp_bias": False, "tie_word_embeddings": True, "bos_token_id": 1,
        "eos_token_id": 2, "torch_dtype": "float32"}
    assert (converted / "tokenizer.model").read_bytes() == TOK.read_bytes()
    assert not list(converted.glob("*.tmp.*")), "temporary files left behind"


def test_transformers_logits_match_oracle(converted, oracle, prompt_ids):
    """In float64 both sides compute the same function of the same float32 weights, so <= 1e-5 checks the
    conversion itself; in float32 the difference is rounding (logits are about 10 in size)."""
    cfg, w = oracle
    ids = torch.tensor([prompt_ids])
    ref = oracle_logits(cfg, w, ids)
    for dtype, tol in ((torch.float64, dict(atol=1e-5, rtol=0)), (torch.float32, dict(atol=1e-4, rtol=1e-5))):
        hf = transformers.LlamaForCausalLM.from_pretrained(converted, dtype=dtype).eval()
        with torch.no_grad():
            got = hf(ids).logits
        assert got.shape == (1, len(prompt_ids), 512) and got.dtype == dtype
        torch.testing.assert_close(got, ref.to(dtype), **tol)
        # The C++ decoder reads the same directory.
        model = mola.CausalLM.from_pretrained(str(converted), dtype=dtype)
        with torch.no_grad():
            torch.testing.assert_close(model(ids).logits, ref.to(dtype), **tol)


def test_without_the_permutation_logits_differ(converted, oracle, prompt_ids):
    """The q/k row permutation is what makes the rotations agree: undoing it must break the match."""
    cfg, w = oracle
    hf = transformers.LlamaForCausalLM.from_pretrained(converted, dtype=torch.float32).eval()
    with torch.no_grad():
        for i, layer in enumerate(hf.model.layers):
            layer.self_attn.q_proj.weight.copy_(w["wq"][i])
            layer.self_attn.k_proj.weight.copy_(w["wk"][i])
        got = hf(torch.tensor([prompt_ids])).logits
    assert (got.double() - oracle_logits(cfg, w, torch.tensor([prompt_ids]))).abs().max() > 1e-2


def test_greedy_story_matches_everywhere(converted, oracle, prompt_ids):
    cfg, w = oracle
    new = 60
    ref = oracle_greedy(cfg, w, prompt_ids, new)
    assert len(ref) - len(prompt_ids) >= 40, f"oracle stopped after {len(ref) - len(prompt_ids)} tokens"
    ids = torch.tensor([prompt_ids])
    hf = transformers.LlamaForCausalLM.from_pretrained(converted, dtype=torch.float32).eval()
    with torch.no_grad():
        hf_out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, do_sample=False,
                             eos_token_id=2, pad_token_id=0)[0].tolist()
    model = mola.CausalLM.from_pretrained(str(converted))
    ours = model.generate(ids, max_new_tokens=new)[0].tolist()
    assert cut_at_eos(hf_out, len(prompt_ids)) == ref
    assert cut_at_eos(ours, len(prompt_ids)) == ref

    text = spm.SentencePieceProcessor(model_file=str(TOK)).decode(ref)
    print("\nstories260K greedy:", text)
    assert text.startswith("Once upon a time")
    words = re.findall(r"[A-Za-z]+", text)
    assert len(words) >= 20 and text.count(" ") >= 20
    common = {"the", "a", "was", "and", "to", "he", "she", "her", "his", "they", "it", "in", "day", "play"}
    assert len(common & {x.lower() for x in words}) >= 4, text


def test_bundled_model_is_what_the_converter_makes(converted):
    from safetensors.torch import load_file
    ours, bundled = load_file(converted / "model.safetensors"), load_file(BUNDLE / "model.safetensors")
    assert sorted(ours) == sorted(bundled)
    for name in ours:
        assert torch.equal(ours[name], bundled[name]), name
    for f in ("model.safetensors", "config.json", "generation_config.json", "tokenizer.model"):
        assert (converted / f).read_bytes() == (BUNDLE / f).read_bytes(), f
    assert json.loads((REPO / "configs" / "models" / "tiny.json").read_text()) == \
        json.loads((BUNDLE / "config.json").read_text())


def write_checkpoint(path, header, floats):
    path.write_bytes(HEADER.pack(*header) + np.asarray(floats, dtype="<f4").tobytes())


def n_floats(dim, hidden, layers, heads, kv, vocab, seq):
    hs = dim // heads
    return (abs(vocab) * dim * (1 if vocab > 0 else 2) + layers * (2 * dim + 2 * dim * dim + 2 * kv * hs * dim
            + 3 * dim * hidden) + dim + seq * hs)


def test_unshared_classifier_and_other_shapes(tmp_path):
    """A synthetic checkpoint with its own classifier (negative vocab_size) and 2 kv heads of 4."""
    header = (32, 48, 2, 4, 2, -512, 64)
    g = torch.Generator().manual_seed(0)
    floats = torch.randn(n_floats(*header), generator=g) * 0.5
    write_checkpoint(tmp_path / "m.bin", header, floats.numpy())
    info = mola._C.convert_llama2c(tmp_path / "m.bin", TOK, tmp_path / "out" / "nested")
    assert info["shared_classifier"] is False and info["vocab_size"] == 512
    out = tmp_path / "out" / "nested"
    cfg_json = json.loads((out / "config.json").read_text())
    assert cfg_json["tie_word_embeddings"] is False and cfg_json["num_key_value_heads"] == 2
    cfg, w = read_llama2c(tmp_path / "m.bin")
    assert not torch.equal(w["wcls"], w["emb"])
    ids = torch.tensor([[1, 5, 77, 300, 9, 511, 42]])
    ref = oracle_logits(cfg, w, ids)
    hf = transformers.LlamaForCausalLM.from_pretrained(out, dtype=torch.float64).eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ref, atol=1e-5, rtol=0)
        ours = mola.CausalLM.from_pretrained(str(out), dtype=torch.float64)(ids).logits
        torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------
# Malformed inputs: each error names the file and what is wrong; nothing is written.

def expect_error(tmp_path, exc, pattern, ckpt, tok=TOK):
    out = tmp_path / "never"
    with pytest.raises(exc, match=pattern) as info:
        mola._C.convert_llama2c(ckpt, tok, out)
    assert not out.exists(), "a failed conversion must not create the output directory"
    return str(info.value)


def test_missing_checkpoint(tmp_path):
    msg = expect_error(tmp_path, FileNotFoundError, "no such file", tmp_path / "nope.bin")
    assert str(tmp_path / "nope.bin") in msg


def test_missing_tokenizer(tmp_path):
    msg = expect_error(tmp_path, FileNotFoundError, "no such file.*tokenizer", CKPT, tmp_path / "tokenizer.model")
    assert str(tmp_path / "tokenizer.model") in msg


def test_shorter_than_header(tmp_path):
    p = tmp_path / "short.bin"
    p.write_bytes(b"\x01\x00\x00\x00" * 3)
    msg = expect_error(tmp_path, ValueError, "12 bytes, shorter than the 28-byte llama2.c header", p)
    assert msg.startswith(str(p))


@pytest.mark.parametrize("header,pattern", [
    ((0, 172, 5, 8, 4, 512, 512), r"header field dim is 0; every size must be positive"),
    ((64, 172, -5, 8, 4, 512, 512), r"header field n_layers is -5"),
    ((64, 172, 5, 8, 4, 0, 512), r"header field vocab_size is 0.*negative for vocab_size"),
    ((64, 172, 5, 7, 7, 512, 512), r"n_heads \(7\) must divide dim \(64\)"),
    ((64, 172, 5, 8, 3, 512, 512), r"n_kv_heads \(3\) must divide n_heads \(8\)"),
    ((0x616b3432, 1, 5, 8, 4, 512, 512), r"magic \"ak42\".*version 1.*--version 0"),
])
def test_bad_header(tmp_path, header, pattern):
    p = tmp_path / "bad.bin"
    p.write_bytes(HEADER.pack(*header) + b"\x00" * 4096)
    assert expect_error(tmp_path, ValueError, pattern, p).startswith(str(p))


@pytest.mark.parametrize("delta", [-100, -1, 4, 5000])
def test_size_not_what_header_implies(tmp_path, delta):
    raw = CKPT.read_bytes()
    p = tmp_path / "resized.bin"
    p.write_bytes(raw[:len(raw) + delta] if delta < 0 else raw + b"\x00" * delta)
    msg = expect_error(tmp_path, ValueError, "implies", p)
    assert f"has {len(raw) + delta} bytes" in msg and f"implies {len(raw)} bytes" in msg, msg


def test_huge_header_does_not_overflow(tmp_path):
    p = tmp_path / "huge.bin"
    p.write_bytes(HEADER.pack(2 ** 30, 2 ** 30, 2 ** 30, 2, 2, 2 ** 30, 2 ** 30))
    expect_error(tmp_path, ValueError, r"implies more than 2\^63 bytes", p)


def test_tokenizer_of_another_vocabulary(tmp_path):
    llama_tok = REPO / "data" / "tokenizers" / "llama2" / "tokenizer.model"
    if not llama_tok.exists():
        pytest.skip("no 32000-piece tokenizer bundled to test with")
    expect_error(tmp_path, ValueError, r"has 32000 pieces but .*stories260K.bin has vocab_size 512", CKPT, llama_tok)


def test_tokenizer_not_sentencepiece(tmp_path):
    # tok512.bin is llama2.c's own tokenizer export, a common mix-up with tok512.model.
    expect_error(tmp_path, ValueError, r"tok512.bin: not a SentencePiece model", CKPT, CKPT_DIR / "tok512.bin")


def test_output_path_is_a_file(tmp_path):
    target = tmp_path / "file"
    target.write_text("x")
    with pytest.raises(RuntimeError, match="not a directory"):
        mola._C.convert_llama2c(CKPT, TOK, target)


def test_reconvert_in_place(tmp_path):
    """Converting over an existing conversion (tokenizer read from the output itself) gives the same files."""
    out = tmp_path / "m"
    mola._C.convert_llama2c(CKPT, TOK, out)
    first = {f.name: f.read_bytes() for f in out.iterdir()}
    mola._C.convert_llama2c(str(CKPT), str(out / "tokenizer.model"), str(out))
    assert {f.name: f.read_bytes() for f in out.iterdir()} == first


def test_default_tokenizer_beside_the_checkpoint(tmp_path):
    (tmp_path / "c").mkdir()
    ckpt = tmp_path / "c" / "model.bin"
    ckpt.write_bytes(CKPT.read_bytes())
    with pytest.raises(FileNotFoundError, match="neither .*tokenizer.model nor .*tok512.model exists"):
        mola._C.convert_llama2c(ckpt, None, tmp_path / "out")
    (tmp_path / "c" / "tok512.model").write_bytes(TOK.read_bytes())
    mola._C.convert_llama2c(ckpt, None, tmp_path / "out")
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == (BUNDLE / "model.safetensors").read_bytes()
