"""Gradient checkpointing in mola.CausalLM (docs/design.md, Models and loading): with an adapter
attached, every trainable parameter gets the same gradient with and without
recomputing the decoder layers in backward, dropout included (the recompute
replays the dropout seed), and the load-balancing loss still reaches the
routers. C++ implementation: src/models/checkpoint.cpp.
"""
import pytest
import torch

import mola

from tiny_models import save_tiny_llama

transformers = pytest.importorskip("transformers")

VOCAB = 61


@pytest.fixture(scope="module")
def llama_path(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama-ckpt"), VOCAB)


def _model(path, dropout):
    model = mola.CausalLM.from_pretrained(str(path))
    model.attach(mola.MoLAConfig(experts="2,4,6,8", top_k=2, rank=4, dropout=dropout, aux_loss_coef=0.01))
    # B starts at zero, which would leave A's gradient zero: give every
    # adapter tensor a random value so that all of them get a gradient.
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    model.train()
    return model


def _grads(model, checkpointing):
    model.gradient_checkpointing = checkpointing
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, VOCAB, (2, 10), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0  # padding: the explicit-mask path
    labels = ids.masked_fill(mask == 0, -100)
    for _, p in model.named_parameters():
        p.grad = None
    torch.manual_seed(11)  # the dropout seeds
    out = model(ids, attention_mask=mask, labels=labels)
    (out.loss + model.aux_loss(attention_mask=mask)).backward()
    return out.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_checkpointing_gives_the_same_gradients(llama_path, dropout):
    model = _model(llama_path, dropout)
    logits, plain = _grads(model, False)
    logits_ckpt, ckpt = _grads(model, True)
    assert model.gradient_checkpointing
    torch.testing.assert_close(logits_ckpt, logits, rtol=0, atol=1e-6)
    assert plain.keys() == ckpt.keys() and len(plain) > 0
    for name in plain:
        assert plain[name].abs().sum() > 0, name
        torch.testing.assert_close(ckpt[name], plain[name], rtol=0, atol=1e-6, msg=name)


def test_checkpointing_is_inactive_without_grad(llama_path):
    model = _model(llama_path, 0.0)
    model.set_gradient_checkpointing(True)
    ids = torch.randint(0, VOCAB, (1, 6))
    with torch.no_grad():
        a = model(ids).logits
    model.gradient_checkpointing = False
    with torch.no_grad():
        b = model(ids).logits
    torch.testing.assert_close(a, b, rtol=0, atol=0)
