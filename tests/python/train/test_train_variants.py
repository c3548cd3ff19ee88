"""The training variants of docs/recipes.md, Training variants: what trains (experts only, routers only)
and how the experts start (Gaussian, PiSSA).

- trainable: a few C++ Trainer steps (train.trainable) and a few hand-written
  steps on an injected transformers model (mola.trainable.set_trainable) leave the frozen
  half of the adapter and the base bit for bit unchanged and move the rest.
- PiSSA: attaching or injecting leaves the logits unchanged (to rounding); s B A
  of every expert is the rank-r truncated SVD of the original weight, B spans its
  top-r left and A its top-r right singular vectors (checked in float64 against
  torch.linalg.svd of the original weight); a trained PiSSA adapter saved and
  loaded into a fresh base model (C++ or transformers, both ways) reproduces the
  trained model's logits.
- Gaussian: A's sample std is 1/r (PEFT's init_lora_weights="gaussian").
"""
import pytest
import torch

import mola
from mola import _C
from mola.injection import mola_modules

from tiny_models import save_tiny_llama

transformers = pytest.importorskip("transformers")

VOCAB = 61
CFG = dict(experts="2,4,6,8", top_k=2, rank=4, alpha=8, dropout=0.0, targets=("q_proj", "v_proj", "down_proj"))


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def llama_path(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), VOCAB)


def hf_model(path):
    return transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa").eval()


def ids(seed=5):
    return torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(seed))


def randomize_b(named_params, seed=3):
    """Experts with B != 0, so the routers' choice changes the output and gets a gradient."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in named_params:
            if name.endswith("lora_b"):
                p.copy_(0.3 * torch.randn(p.shape, generator=g))


def snapshot(named_params):
    return {name: p.detach().clone() for name, p in named_params}


def examples(n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        pattern = torch.randint(1, VOCAB, (3,), generator=g).tolist()
        seq = (pattern * 6)[:14]
        out.append((seq, list(seq)))
    return out


def changed(before, after, suffixes):
    names = [n for n in before if n.endswith(suffixes)]
    assert names
    return {n: not torch.equal(before[n], after[n]) for n in names}


@pytest.mark.parametrize("trainable,frozen,moving", [("experts", ("router",), ("lora_a", "lora_b")),
                                                     ("routers", ("lora_a", "lora_b"), ("router",))])
def test_cpp_trainer_trains_only_the_chosen_half(llama_path, tmp_path, trainable, frozen, moving):
    model = mola.CausalLM.from_pretrained(str(llama_path))
    torch.manual_seed(0)
    model.attach(mola.MoLAConfig(**{**CFG, "aux_loss_coef": 0.0}))
    randomize_b(model.named_parameters())
    before = snapshot(model.named_parameters())
    opts = _C.TrainOptions(dict(batch_size=4, micro_batch_size=2, lr=1e-2, warmup_steps=0, max_steps=3, save_every=0,
                                eval_every=0, weight_decay=0.1, trainable=trainable))
    _C.Trainer(model, opts, str(tmp_path / "run")).fit(examples())
    after = snapshot(model.named_parameters())
    assert not any(changed(before, after, frozen).values())
    assert all(changed(before, after, moving).values())
    base = [n for n in before if ".mola." not in n]
    assert all(torch.equal(before[n], after[n]) for n in base)
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    assert all(grads[n] is False for n in base)
    assert all(grads[n] is False for n in before if n.endswith(frozen))
    assert all(grads[n] is True for n in before if n.endswith(moving))


def test_trainable_option_errors_name_the_value_and_the_choices():
    with pytest.raises(ValueError, match=r'trainable "expert" is unknown; use one of all, experts, routers'):
        _C.TrainOptions({"trainable": "expert"})
    assert _C.TrainOptions().trainable == "all"
    with pytest.raises(ValueError, match=r"trainable='router' is not one of all, experts, routers"):
        mola.trainable.set_trainable(torch.nn.Linear(2, 2), "router")
    with pytest.raises(ValueError, match="the model has no adapter"):
        mola.trainable.set_trainable(torch.nn.Linear(2, 2), "experts")


@pytest.mark.parametrize("trainable,frozen,moving", [("experts", ("router",), ("lora_a", "lora_b")),
                                                     ("routers", ("lora_a", "lora_b"), ("router",))])
def test_set_trainable_on_an_injected_model(llama_path, trainable, frozen, moving):
    model = mola.inject(hf_model(llama_path), mola.MoLAConfig(**CFG))
    randomize_b(model.named_parameters())
    counts = mola.trainable.set_trainable(model, trainable)
    adapter = {n: p for n, p in model.named_parameters() if n.endswith(("router", "lora_a", "lora_b"))}
    assert counts["trainable"] == sum(p.numel() for n, p in adapter.items() if n.endswith(moving))
    assert counts["frozen"] == sum(p.numel() for n, p in adapter.items() if n.endswith(frozen))
    before = snapshot(model.named_parameters())
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    model.train()
    for step in range(3):
        batch = ids(seed=step)
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = snapshot(model.named_parameters())
    assert not any(changed(before, after, frozen).values())
    assert all(changed(before, after, moving).values())
    assert all(torch.equal(before[n], after[n]) for n in before if n not in adapter)


def test_set_trainable_on_the_cpp_model_shares_the_tensors(llama_path):
    model = mola.CausalLM.from_pretrained(str(llama_path))
    model.attach(mola.MoLAConfig(**CFG))
    mola.trainable.set_trainable(model, "routers")
    flags = {n: p.requires_grad for n, p in model.named_parameters() if ".mola." in n}
    assert flags and all(flags[n] == n.endswith("router") for n in flags)
    mola.trainable.set_trainable(model, "all")
    assert all(p.requires_grad for n, p in model.named_parameters() if ".mola." in n)


def _truncated(w, r):
    u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
    return u[:, :r], s[:r], vh[:r]


def _check_pissa_module(weight0, weight, lora_a, lora_b, scaling):
    """s B_e A_e is the rank-r truncated SVD of weight0 in every expert; B spans U_r, A spans V_r; the base
    weight is what is left."""
    r = lora_a.shape[1]
    u, s, vh = _truncated(weight0, r)
    truncated = (u * s) @ vh
    for e in range(lora_a.shape[0]):
        a, b = lora_a[e].double(), lora_b[e].double()
        assert (scaling * b @ a - truncated).abs().max() < 1e-5
        assert (u @ (u.T @ b) - b).abs().max() < 1e-5  # columns of B in span(U_r)
        assert (a @ vh.T @ vh - a).abs().max() < 1e-5  # rows of A in span(V_r)
        assert torch.linalg.matrix_rank(b).item() == r
    assert (weight.double() - (weight0.double() - truncated)).abs().max() < 1e-5


def test_pissa_keeps_the_output_and_spans_the_top_singular_directions(llama_path):
    ref = hf_model(llama_path)
    with torch.no_grad():
        want = ref(input_ids=ids()).logits
    originals = {n: p.detach().clone() for n, p in ref.named_parameters()}
    # Injected transformers model.
    hf = mola.inject(ref, mola.MoLAConfig(**CFG, init="pissa"))
    with torch.no_grad():
        assert (hf(input_ids=ids()).logits - want).abs().max() < 1e-5
    modules = mola_modules(hf)
    assert len(modules) == 12
    for path, m in modules:
        _check_pissa_module(originals[path + ".weight"], m.base.weight, m.lora_a, m.lora_b, m.scaling)
    # The C++ model: the same numbers.
    cpp = mola.CausalLM.from_pretrained(str(llama_path))
    cpp.eval()
    cpp.attach(mola.MoLAConfig(**CFG, init="pissa"))
    with torch.no_grad():
        assert (cpp(ids()).logits - want).abs().max() < 1e-5
    state = cpp.state_dict()
    for key, t in cpp.adapter_state_dict().items():
        if key.endswith("lora_a"):
            path = key[:-len(".mola.lora_a")]
            _check_pissa_module(originals[path + ".weight"], state[path + ".weight"], t,
                                state[path + ".mola.lora_b"], 2.0)
    assert cpp.adapter_config["init"] == "pissa"


def test_pissa_adapter_reproduces_the_trained_model_after_save_and_load(llama_path, tmp_path):
    cfg = mola.MoLAConfig(**CFG, init="pissa")
    cpp = mola.CausalLM.from_pretrained(str(llama_path))
    cpp.eval()
    cpp.attach(cfg)
    _C.Trainer(cpp, _C.TrainOptions(dict(batch_size=4, micro_batch_size=2, lr=1e-2, warmup_steps=0, max_steps=2,
                                         save_every=0, eval_every=0)), str(tmp_path / "run")).fit(examples())
    cpp.eval()
    with torch.no_grad():
        trained = cpp(ids()).logits
    cpp.save_adapter(str(tmp_path / "cpp"))
    loaded = mola.CausalLM.from_pretrained(str(llama_path))
    loaded.eval()
    loaded.load_adapter(str(tmp_path / "cpp"))
    hf = mola.load_adapter(hf_model(llama_path), str(tmp_path / "cpp"))
    with torch.no_grad():
        assert (loaded(ids()).logits - trained).abs().max() < 1e-5
        assert (hf(input_ids=ids()).logits - trained).abs().max() < 1e-5
    # And the other way: an injected PiSSA model, trained a little, into a fresh C++ model.
    hf = mola.inject(hf_model(llama_path), cfg)
    randomize_b(hf.named_parameters(), seed=7)
    mola.save_adapter(hf, tmp_path / "hf")
    cpp2 = mola.CausalLM.from_pretrained(str(llama_path))
    cpp2.eval()
    cpp2.load_adapter(str(tmp_path / "hf"))
    with torch.no_grad():
        assert (cpp2(ids()).logits - hf(input_ids=ids()).logits).abs().max() < 1e-5
    # Loading a PiSSA adapter into a Kaiming-injected model would skip the base adjustment: refused.
    plain = mola.inject(hf_model(llama_path), mola.MoLAConfig(**CFG))
    with pytest.raises(ValueError, match="only PiSSA adjusts the base weights"):
        mola.load_adapter(plain, tmp_path / "hf")


def test_gaussian_init_draws_a_with_std_one_over_rank():
    torch.manual_seed(0)
    layer = mola.MoLALinear(torch.nn.Linear(256, 64), num_experts=8, top_k=2, rank=4, init="gaussian")
    assert abs(layer.lora_a.std().item() - 0.25) < 0.25 * 0.03  # 8192 draws
    assert layer.lora_b.abs().max().item() == 0.0
    assert layer.router.abs().max().item() <= 1 / 16  # Kaiming-uniform bound 1/sqrt(in)
    with pytest.raises(ValueError, match="init='xavier' is not one of kaiming, gaussian, pissa"):
        mola.MoLALinear(torch.nn.Linear(4, 4), num_experts=2, top_k=1, rank=2, init="xavier")
    with pytest.raises(ValueError, match='init "xavier" is not one of kaiming, gaussian, pissa'):
        mola.MoLAConfig(init="xavier")
    assert mola.MoLAConfig().init == "kaiming"
