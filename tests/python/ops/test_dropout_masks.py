"""Dropout masks as the MoLA authors draw them (mola's default, "per_expert"):
each expert a token is routed to sees its own mask over the token's features,
a function of (seed, expert, token, feature) through the Philox contract of
kernels/philox.h, regenerated in backward and never stored. The "shared" mode
(one mask per token for all of its experts) is the faster deviation.

- exact: the op equals a per-expert loop that applies the masks the mask
  function gives, in float64, forward and every gradient, for the dense and
  grouped strategies, k = 1, k = E and E = 1; gradcheck and opcheck with
  dropout on;
- statistical: two experts of one token disagree on a share 2p(1-p) of the
  elements (p = 0.05, 0.5), each keeps 1 - p; under "shared" they agree;
- files: a saved adapter records the mode, and a file without it loads as
  per_expert.
"""
import json
import math
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT))

import mola  # noqa: E402
from tests.reference.authors_loop import reference_moe_lora  # noqa: E402

IN, OUT = 12, 10


def _inputs(E, r, T, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, IN, generator=g, dtype=dtype)
    w = torch.randn(OUT, IN, generator=g, dtype=dtype) / 3
    b = torch.randn(OUT, generator=g, dtype=dtype)
    router = torch.randn(E, IN, generator=g, dtype=dtype)
    a = torch.randn(E, r, IN, generator=g, dtype=dtype) / 3
    bb = torch.randn(E, OUT, r, generator=g, dtype=dtype) / 3
    return [t.requires_grad_() for t in (x, w, b, router, a, bb)]


def _grads(y, logits, leaves, seed=5):
    g = torch.Generator().manual_seed(seed)
    gy = torch.randn(y.shape, generator=g, dtype=y.dtype)
    gz = torch.randn(logits.shape, generator=g, dtype=logits.dtype)
    return torch.autograd.grad((y * gy).sum() + (logits * gz).sum(), leaves, allow_unused=True)


SHAPES = [(4, 1, 3), (4, 4, 3), (1, 1, 5), (5, 2, 4)]  # (E, k, r): k = 1, k = E, E = 1, general


@pytest.mark.parametrize("E,k,r", SHAPES, ids=["k1", "k=E", "E1", "E5k2"])
@pytest.mark.parametrize("compute", ["dense", "grouped"])
@pytest.mark.parametrize("masks", ["per_expert", "shared"])
def test_the_op_equals_a_loop_over_the_masks_it_defines(E, k, r, compute, masks):
    T, p, scaling = 17, 0.3, 1.7
    inputs = _inputs(E, r, T)
    seed = torch.tensor([987654321], dtype=torch.int64)
    y, z = mola.ops.moe_lora(*inputs, k, scaling, p, True, compute, seed, dropout_masks=masks)
    if masks == "per_expert":
        per = [mola.ops.dropout_mask(seed, T, IN, p, expert=e) for e in range(E)]
        y_ref, z_ref = reference_moe_lora(*inputs, k, scaling, expert_masks=per)
    else:
        y_ref, z_ref = reference_moe_lora(*inputs, k, scaling, dropout_mask=mola.ops.dropout_mask(seed, T, IN, p))
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(z, z_ref, rtol=1e-12, atol=1e-12)
    leaves = [inputs[0], inputs[3], inputs[4], inputs[5]]
    for got, want in zip(_grads(y, z, leaves), _grads(y_ref, z_ref, leaves)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_per_expert_masks_change_the_result_and_shared_does_not_depend_on_the_expert():
    E, k, r, T, p = 4, 4, 3, 9, 0.5
    inputs = _inputs(E, r, T)
    seed = torch.tensor([3], dtype=torch.int64)
    per, _ = mola.ops.moe_lora(*inputs, k, 1.0, p, True, "grouped", seed, dropout_masks="per_expert")
    shared, _ = mola.ops.moe_lora(*inputs, k, 1.0, p, True, "grouped", seed, dropout_masks="shared")
    assert (per - shared).abs().max().item() > 1e-3
    masks = [mola.ops.dropout_mask(seed, T, IN, p, expert=e) for e in range(E)]
    assert all(not torch.equal(masks[0], m) for m in masks[1:])
    assert not torch.equal(masks[0], mola.ops.dropout_mask(seed, T, IN, p))  # stream e + 1, not the shared 0


@pytest.mark.parametrize("p", [0.05, 0.5])
def test_two_experts_of_a_token_disagree_on_2p_1_minus_p_of_the_elements(p):
    rows, cols = 1000, 500  # 500,000 elements: standard errors near 7e-4
    seed = torch.tensor([20240601], dtype=torch.int64)
    a = mola.ops.dropout_mask(seed, rows, cols, p, expert=0) > 0
    b = mola.ops.dropout_mask(seed, rows, cols, p, expert=1) > 0
    n = a.numel()
    for kept in (a, b):
        share = kept.double().mean().item()
        assert abs(share - (1 - p)) < 5 * math.sqrt(p * (1 - p) / n), share
    disagree = (a != b).double().mean().item()
    want = 2 * p * (1 - p)
    assert abs(disagree - want) < 5 * math.sqrt(want * (1 - want) / n), (disagree, want)
    # The shared mask keeps 1 - p too; the op gives it to every expert of a token
    # (test_the_ops_per_expert_masks_are_independent_per_token_and_expert).
    shared = mola.ops.dropout_mask(seed, rows, cols, p) > 0
    assert abs(shared.double().mean().item() - (1 - p)) < 5 * math.sqrt(p * (1 - p) / n)


def test_the_ops_per_expert_masks_are_independent_per_token_and_expert():
    """Through the op itself: with A = identity-like rows, each expert's hidden
    activations show which features its mask kept, for the routed tokens."""
    E, k, r, T, p = 2, 2, IN, 400, 0.5
    x = torch.ones(T, IN, dtype=torch.float64)
    w = torch.zeros(OUT, IN, dtype=torch.float64)
    router = torch.zeros(E, IN, dtype=torch.float64)
    a = torch.eye(IN, dtype=torch.float64).expand(E, IN, IN).contiguous()
    bb = torch.zeros(E, OUT, IN, dtype=torch.float64)
    seed = torch.tensor([11], dtype=torch.int64)
    for masks, want in (("per_expert", 2 * p * (1 - p)), ("shared", 0.0)):
        _, _, hidden = torch.ops.mola._moe_lora_forward(x, w, None, router, a, bb, k, 1.0, p, True, 2, seed,
                                                         masks == "shared")
        kept = hidden.view(T, k, r) > 0  # slot j of token t: its expert's kept features
        disagree = (kept[:, 0] != kept[:, 1]).double().mean().item()
        n = T * IN
        assert abs(disagree - want) <= 5 * math.sqrt(max(want * (1 - want), 1e-12) / n) + 1e-12, (masks, disagree)


def test_per_expert_dropout_runs_grouped_whatever_compute_says():
    E, k, r, T = 4, 2, 3, 6
    inputs = [t.detach() for t in _inputs(E, r, T)]
    seed = torch.tensor([1], dtype=torch.int64)
    _, _, hidden = torch.ops.mola._moe_lora_forward(*inputs, k, 1.0, 0.1, True, 1, seed, False)
    assert hidden.shape == (T, k, r)  # grouped layout, though compute said dense
    _, _, hidden = torch.ops.mola._moe_lora_forward(*inputs, k, 1.0, 0.1, True, 1, seed, True)
    assert hidden.shape == (T, E * r)  # shared masks keep the dense strategy
    _, _, hidden = torch.ops.mola._moe_lora_forward(*inputs, k, 1.0, 0.1, False, 1, seed, False)
    assert hidden.shape == (T, E * r)  # no dropout outside training
    assert mola.ops.resolve_compute("dense", E, r, per_expert_dropout=True) == "grouped"
    assert mola.ops.resolve_compute("auto", E, r) == "dense"


@pytest.mark.parametrize("masks", ["per_expert", "shared"])
def test_gradcheck_with_dropout(masks):
    E, k, r, T = 3, 2, 2, 5
    x, w, b, router, a, bb = _inputs(E, r, T)
    seed = torch.tensor([77], dtype=torch.int64)

    def f(x, router, a, bb):
        return mola.ops.moe_lora(x, w.detach(), b.detach(), router, a, bb, k, 1.3, 0.4, True, "auto", seed,
                                 dropout_masks=masks)

    assert torch.autograd.gradcheck(f, (x, router, a, bb), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("masks", ["per_expert", "shared"])
def test_opcheck_with_dropout(masks):
    E, k, r, T = 3, 2, 2, 5
    args = [t.detach().requires_grad_() for t in _inputs(E, r, T, dtype=torch.float32)]
    seed = torch.tensor([77], dtype=torch.int64)
    torch.library.opcheck(torch.ops.mola.moe_lora.default,
                          (*args, k, 1.3, 0.4, True, 0, seed, masks == "shared"))


def test_module_and_config_carry_the_mode(tmp_path):
    cfg = mola.MoLAConfig(experts=4, top_k=2, rank=2, dropout=0.2)
    assert cfg.dropout_masks == "per_expert"
    assert mola.MoLAConfig(dropout_masks="shared").resolve(2)["dropout_masks"] == "shared"
    with pytest.raises(ValueError, match="dropout_masks"):
        mola.MoLAConfig(dropout_masks="per_token")
    layer = mola.MoLALinear(torch.nn.Linear(IN, OUT), 4, 2, 2, dropout=0.2, dropout_masks="shared")
    assert "dropout_masks='shared'" in repr(layer)


def test_a_saved_adapter_records_the_mode_and_a_file_without_it_is_per_expert(tmp_path):
    from tiny_models import save_tiny_llama
    base = save_tiny_llama(tmp_path / "base")
    cpp = mola.CausalLM.from_pretrained(str(base))
    cpp.attach(mola.MoLAConfig(experts=2, top_k=1, rank=2, dropout_masks="shared"))
    cpp.save_adapter(str(tmp_path / "shared"))
    saved = json.loads((tmp_path / "shared" / "adapter_config.json").read_text())
    assert saved["dropout_masks"] == "shared"
    again = mola.load_adapter(mola.CausalLM.from_pretrained(str(base)), str(tmp_path / "shared"))
    assert again.adapter_config["dropout_masks"] == "shared"

    del saved["dropout_masks"]  # an adapter written before the key existed
    (tmp_path / "shared" / "adapter_config.json").write_text(json.dumps(saved))
    old = mola.load_adapter(mola.CausalLM.from_pretrained(str(base)), str(tmp_path / "shared"))
    assert old.adapter_config["dropout_masks"] == "per_expert"
    import transformers
    hf = transformers.AutoModelForCausalLM.from_pretrained(base)
    mola.load_adapter(hf, str(tmp_path / "shared"))
    assert hf.mola_config["dropout_masks"] == "per_expert"
    assert all(m.dropout_masks == "per_expert" for m in hf.modules() if isinstance(m, mola.MoLALinear))
