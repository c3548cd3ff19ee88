"""MoLEx (docs/molex.md) on transformers models through mola.inject, and on the C++ model.

The oracle runs every sequence alone, without padding, through the model's own
layer stack with each decoder layer replaced by a plain loop: u_t(z), the gate's
argmax over W mean(z) + b (or the last token, or per token), u_j(z) by the
block's class forward, alpha * u_t + (1 - alpha) * u_j. The injected model runs
the padded batch (rows grouped by j); both must agree on every real token, for
tiny random llama, mistral and gemma models. Then alpha = 1 against the base
method, the gate's gradients, exclude_self, the balance loss by hand, and save,
load and cross-loading with the C++ model both ways.
"""
import math

import pytest
import torch

import mola
from tiny_models import family_config, randomize

transformers = pytest.importorskip("transformers")

TOL = 1e-5
# Padded batch against unpadded single rows: different attention kernels and
# reduction orders (test_models_parity.py allows the same); a wrong j moves
# logits by O(1).
ORACLE_TOL = 1e-4
L = 4


def _config(family):
    common = dict(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=L,
                  num_attention_heads=4, max_position_embeddings=64)
    return family_config(family, head_dim=16, **common)


@pytest.fixture(scope="module", params=["llama", "mistral", "gemma"])
def checkpoint(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(f"molex-{request.param}")
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(_config(request.param), dtype=torch.float32)
    randomize(hf, request.param)
    hf.save_pretrained(path)
    return request.param, path


def _hf(path):
    return transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa").eval()


def _perturb(params, seed):
    """Non-zero LoRA B, and gate weights large enough that sequences pick different layers."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in params:
            if name.endswith(("lora_b", "router")):
                p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
            elif name.endswith("molex.gate.weight"):
                p.copy_(2.0 * torch.randn(p.shape, generator=g, dtype=p.dtype))


def _batch():
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, 61, (4, 11), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0  # right padding
    mask[3, 9:] = 0
    return ids, mask


def _oracle_logits(model, ids, pool):
    """Per sequence, unpadded: the MoLEx formula with the blocks called one by one."""
    layers = list(model.model.layers)
    saved = [l.__dict__.pop("forward") for l in layers]  # back to the class forward

    def make(t):
        layer = layers[t]
        gate = layer.molex

        def forward(z, **kw):
            own = type(layer).forward(layer, z, **kw)
            own = own[0] if isinstance(own, tuple) else own
            x = z[0].float()  # [seq, hidden]: one sequence, no padding
            if pool == "mean":
                units = x.mean(0, keepdim=True)
            elif pool == "last":
                units = x[-1:]
            else:
                units = x
            logits = units @ gate.gate.weight.float().T + gate.gate.bias.float()
            if gate.exclude_self:
                logits[:, t] = -math.inf
            js = logits.argmax(-1).tolist()
            out = torch.empty_like(own)
            for i, j in enumerate(js):
                other = type(layers[j]).forward(layers[j], z, **kw)
                other = other[0] if isinstance(other, tuple) else other
                a = gate.alpha_value().item()
                rows = slice(None) if pool != "token" else slice(i, i + 1)
                out[:, rows] = a * own[:, rows] + (1 - a) * other[:, rows]
            return out
        return forward

    try:
        for t, l in enumerate(layers):
            l.forward = make(t)
        with torch.no_grad():
            return [model(input_ids=row[None], use_cache=False).logits[0] for row in ids]
    finally:
        for l, f in zip(layers, saved):
            l.forward = f


@pytest.mark.parametrize("pool,base", [("mean", "lora"), ("last", "mola"), ("token", "lora")])
def test_forward_equals_the_block_by_block_oracle(checkpoint, pool, base):
    family, path = checkpoint
    extra = dict(experts=3, top_k=2) if base == "mola" else {}
    model = mola.inject(_hf(path), mola.MoLExConfig(base_method=base, rank=4, dropout=0.0, molex_pool=pool,
                                                   molex_alpha=0.3, **extra))
    _perturb(model.named_parameters(), seed=1)
    ids, mask = _batch()
    with torch.no_grad():
        got = model(input_ids=ids, attention_mask=mask).logits
    choices = [l.molex.last["choice"] for l in model.model.layers]
    if pool != "token":
        assert all(c.shape == (ids.shape[0],) for c in choices)  # one j per sequence
        assert any(len(set(c.tolist())) > 1 for c in choices), "the rows never split: the grouping is untested"
    assert any((c != t).any() for t, c in enumerate(choices)), "no layer chose another layer"
    # Unpadded rows against padded rows: the gate input must ignore padding.
    want = _oracle_logits(model, [ids[b, :int(mask[b].sum())] for b in range(ids.shape[0])], pool)
    for b in range(ids.shape[0]):
        n = int(mask[b].sum())
        assert (got[b, :n] - want[b]).abs().max().item() <= ORACLE_TOL, f"row {b}"


def _same_adapter(src, dst):
    with torch.no_grad():
        want = dict(src.named_parameters())
        for name, p in dst.named_parameters():
            if p.requires_grad:
                p.copy_(want[name])


def test_alpha_one_is_the_base_method_exactly(checkpoint):
    _, path = checkpoint
    for base, extra in (("lora", {}), ("mola", dict(experts=3, top_k=2))):
        plain = mola.inject(_hf(path), mola.MoLAConfig(method=base, rank=4, dropout=0.0, **extra))
        mixed = mola.inject(_hf(path), mola.MoLExConfig(base_method=base, rank=4, dropout=0.0,
                                                        molex_alpha=1.0, **extra))
        _perturb(mixed.named_parameters(), seed=2)
        _same_adapter(mixed, plain)
        ids, mask = _batch()
        with torch.no_grad():
            assert torch.equal(plain(input_ids=ids, attention_mask=mask).logits,
                               mixed(input_ids=ids, attention_mask=mask).logits)


def _gate_grads(path, gate_grad):
    model = mola.inject(_hf(path), mola.MoLExConfig(rank=4, dropout=0.0, molex_gate_grad=gate_grad))
    _perturb(model.named_parameters(), seed=3)
    model.train()
    ids, mask = _batch()
    model(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
    return [l.molex.gate.weight.grad for l in model.model.layers]


def test_gate_gradients(checkpoint):
    _, path = checkpoint
    for mode in ("straight_through", "prob"):
        assert all(g is not None and g.abs().sum() > 0 for g in _gate_grads(path, mode)), mode
    assert all(g is None or g.abs().sum() == 0 for g in _gate_grads(path, "none"))


def test_exclude_self():
    torch.manual_seed(0)
    for exclude in (False, True):
        model = mola.inject(transformers.LlamaForCausalLM(_config("llama")).eval(),
                            mola.MoLExConfig(rank=4, molex_exclude_self=exclude))
        with torch.no_grad():
            for t, layer in enumerate(model.model.layers):
                layer.molex.gate.bias.zero_()
                layer.molex.gate.bias[t] = 100.0  # every gate would pick its own layer
            model(input_ids=_batch()[0])
        for t, layer in enumerate(model.model.layers):
            chose_self = layer.molex.last["choice"].eq(t)
            assert (not chose_self.any()) if exclude else chose_self.all()


def test_balance_loss_by_hand():
    # probs (0.9, 0.1), (0.2, 0.8), (0.7, 0.3) choose 0, 1, 0: f = (2/3, 1/3), P = (0.6, 0.4).
    gate = mola.molex.MoLExGate(2, 2, 0)
    with torch.no_grad():
        gate.gate.weight.copy_(torch.eye(2))
    z = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.7, 0.3]]).log().view(3, 1, 2)
    assert gate.route(z, None)["choice"].tolist() == [0, 1, 0]
    assert gate.balance_loss().item() == pytest.approx(2 * (2 / 3 * 0.6 + 1 / 3 * 0.4), abs=1e-6)


def test_config_rules():
    assert "molex_pool" not in mola.MoLAConfig().to_dict()  # lora / mola JSON unchanged
    cfg = mola.MoLExConfig(base_method="mola", experts="2468", molex_alpha_learned=True)
    assert cfg.to_dict()["method"] == "molex" and cfg.top_k == 2 and cfg.molex_pool == "mean"
    assert mola.MoLAConfig.from_dict(cfg.to_dict()) == cfg  # method "molex" gives a MoLExConfig
    with pytest.raises(ValueError, match="molex_pool is a MoLEx setting"):
        mola.MoLAConfig.from_dict({"method": "mola", "molex_pool": "last"})
    with pytest.raises(ValueError, match="molex_pool is a MoLEx setting"):
        mola._C.config_normalize('{"method": "lora", "molex_pool": "last"}')
    with pytest.raises(ValueError, match="molex_gate_grad"):
        mola.MoLExConfig(molex_gate_grad="gumbel")
    with pytest.raises(ValueError, match="base_method \"mola\""):
        mola.MoLExConfig(experts=4)
    with pytest.raises(ValueError, match="method is always 'molex'"):
        mola.MoLExConfig(method="mola")


def test_use_cache_is_refused(checkpoint):
    _, path = checkpoint
    model = mola.inject(_hf(path), mola.MoLExConfig(rank=4))
    assert model.config.use_cache is False
    with pytest.raises(ValueError, match="use_cache=False"):
        model(input_ids=_batch()[0], use_cache=True)
    out = model.generate(_batch()[0][:1], max_new_tokens=3, do_sample=False, use_cache=False)
    assert out.shape == (1, 14)


CFGS = [dict(rank=4, dropout=0.0, molex_pool="mean", molex_alpha=0.4),
        dict(base_method="mola", experts="2,3,2,3", top_k=2, rank=4, dropout=0.0, molex_pool="last",
             molex_alpha=0.3, molex_alpha_learned=True, molex_exclude_self=True)]


@pytest.mark.parametrize("cfg", CFGS, ids=["lora-mean", "mola-last-learned"])
def test_cpp_and_transformers_load_each_others_adapters(checkpoint, cfg, tmp_path):
    _, path = checkpoint
    ids, mask = _batch()
    # transformers -> C++
    hf = mola.inject(_hf(path), mola.MoLExConfig(**cfg))
    _perturb(hf.named_parameters(), seed=4)
    mola.save_adapter(hf, tmp_path / "from_hf")
    cpp = mola.CausalLM.from_pretrained(str(path))
    cpp.eval()
    cpp.load_adapter(str(tmp_path / "from_hf"))
    with torch.no_grad():
        want = hf(input_ids=ids, attention_mask=mask).logits
        got = cpp(ids, mask).logits
    real = mask.bool()
    assert (got - want)[real].abs().max().item() <= TOL
    # C++ -> transformers, after changing the C++ adapter
    _perturb(cpp.named_parameters(), seed=5)
    cpp.save_adapter(str(tmp_path / "from_cpp"))
    hf2 = mola.inject(_hf(path), path=tmp_path / "from_cpp")
    with torch.no_grad():
        want = cpp(ids, mask).logits
        got = hf2(input_ids=ids, attention_mask=mask).logits
        assert (got - want)[real].abs().max().item() <= TOL
        # and back into the transformers model saved first (same config): save/load round trip
        mola.load_adapter(hf, tmp_path / "from_cpp")
        assert torch.equal(hf(input_ids=ids, attention_mask=mask).logits, got)
    # a MoLEx adapter with other settings does not load into an injected model
    other = mola.inject(_hf(path), mola.MoLExConfig(**{**cfg, "molex_alpha": 0.2}))
    with pytest.raises(ValueError):
        mola.load_adapter(other, tmp_path / "from_cpp")


def test_cpp_gradient_checkpointing_gives_the_same_gradients(checkpoint):
    _, path = checkpoint
    ids, mask = _batch()
    grads = []
    for on in (False, True):
        cpp = mola.CausalLM.from_pretrained(str(path))
        torch.manual_seed(7)  # the same A and gate init in both models
        cpp.attach(mola.MoLExConfig(base_method="mola", experts=2, top_k=2, rank=4, dropout=0.0,
                                    molex_aux_loss_coef=0.01))
        _perturb(cpp.named_parameters(), seed=6)
        cpp.set_gradient_checkpointing(on)
        cpp.train()
        out = cpp(ids, mask, labels=ids)
        (out.loss + cpp.aux_loss(attention_mask=mask)).backward()
        grads.append({n: p.grad.clone() for n, p in cpp.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and any(".molex.gate." in n for n in grads[0])
    for n in grads[0]:
        assert torch.allclose(grads[0][n], grads[1][n], atol=1e-5, rtol=1e-4), n  # recompute: reduction order
