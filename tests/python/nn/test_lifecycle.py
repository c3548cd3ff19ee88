"""The adapter's life in a user's hands, with a PEFT user's habits: loading for
inference (eval, frozen) or to train, saving a whole injected model and
reading it back, copies and pickles after a training forward, the balance
loss over several forwards, switching the adapter off, taking it out, and the
C++ model following nn.Module's conventions.

Each test is a user's step that went wrong before: dropout left on after a
load, a whole-model save that reloaded with random projections, a deepcopy
that failed, a second forward that the balance loss never saw.
"""
import copy
import os
import pickle

import pytest
import torch

import mola
from tiny_models import save_tiny_llama

transformers = pytest.importorskip("transformers")

CFG = dict(experts="2,4,6,8", top_k=2, rank=4, alpha=8, dropout=0.3)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    return str(save_tiny_llama(tmp_path_factory.mktemp("tiny") / "base"))


def _hf(base_dir):
    return transformers.AutoModelForCausalLM.from_pretrained(base_dir)  # eval mode, as transformers loads


def _ids(seed=1, batch=2, seq=9):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 61, (batch, seq), generator=g)


def _perturb(params, seed=3):
    """Non-zero B (and a different router) so the adapter changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in params:
            if name.endswith(("lora_b", "router")):
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def _trained_adapter(base_dir, tmp_path):
    model = _hf(base_dir)
    mola.inject(model, mola.MoLAConfig(**CFG))
    _perturb(model.named_parameters())
    mola.save_adapter(model, tmp_path / "adapter")
    return model, tmp_path / "adapter"


def _logits(model, ids):
    with torch.no_grad():
        out = model(input_ids=ids) if isinstance(model, torch.nn.Module) else model(ids)
    return out.logits


# ------------------------------------------------------------- inference load

def test_load_adapter_is_for_inference_by_default(base_dir, tmp_path):
    _, adapter = _trained_adapter(base_dir, tmp_path)
    model = _hf(base_dir).train()  # even from a model left in training mode
    mola.load_adapter(model, adapter)
    assert not model.training
    assert not any(m.training for m in model.modules())
    assert not any(p.requires_grad for p in model.parameters())
    ids = _ids()
    assert torch.equal(_logits(model, ids), _logits(model, ids))  # no dropout: two passes agree


def test_load_adapter_is_trainable_keeps_the_mode_and_trains(base_dir, tmp_path):
    _, adapter = _trained_adapter(base_dir, tmp_path)
    model = _hf(base_dir)
    mola.load_adapter(model, adapter, is_trainable=True)
    assert not model.training  # the model's mode is left as it was
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(("router", "lora_a", "lora_b")) for n in trainable)


def test_inject_follows_the_host_models_mode(base_dir):
    model = _hf(base_dir)
    mola.inject(model, mola.MoLAConfig(**CFG))
    assert not any(m.training for m in model.modules())  # from_pretrained gave an eval model
    _perturb(model.named_parameters())
    ids = _ids()
    assert torch.equal(_logits(model, ids), _logits(model, ids))
    model.train()
    assert all(m.training for m in model.modules())


def test_cpp_model_loads_in_eval_and_adapters_for_inference(base_dir, tmp_path):
    _, adapter = _trained_adapter(base_dir, tmp_path)
    cpp = mola.CausalLM.from_pretrained(base_dir)
    assert not cpp.training  # transformers' convention
    cpp.train()
    mola.load_adapter(cpp, adapter)
    assert not cpp.training and not any(p.requires_grad for p in cpp.parameters())
    ids = _ids()
    assert torch.equal(_logits(cpp, ids), _logits(cpp, ids))
    again = mola.CausalLM.from_pretrained(base_dir)
    again.load_adapter(str(adapter), is_trainable=True)
    assert {n for n, p in again.named_parameters() if p.requires_grad} == set(again.adapter_state_dict())


# ------------------------------------------------------------- whole-model save

def test_save_pretrained_round_trips_through_from_pretrained(base_dir, tmp_path):
    model, _ = _trained_adapter(base_dir, tmp_path)
    ids = _ids()
    want = _logits(model, ids)
    model.save_pretrained(tmp_path / "whole")
    assert os.path.isfile(tmp_path / "whole" / "mola_adapter" / "adapter_config.json")
    assert not os.path.exists(tmp_path / "whole" / "adapter_config.json")  # not taken for a PEFT adapter

    base, info = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "whole", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]  # the base under its own names
    assert torch.equal(_logits(base, ids), _logits(_hf(base_dir), ids))  # it is the base model
    mola.load_adapter(base, tmp_path / "whole")
    assert (_logits(base, ids) - want).abs().max().item() == 0.0


def test_save_pretrained_of_a_pissa_model_is_refused(base_dir, tmp_path):
    model = _hf(base_dir)
    mola.inject(model, mola.MoLAConfig(**CFG, init="pissa"))
    with pytest.raises(ValueError, match="mola.save_adapter"):
        model.save_pretrained(tmp_path / "whole")


def test_trainer_checkpoints_hold_the_adapter_and_resume(base_dir, tmp_path):
    from mola.integrations import ExampleCollator, MoLATrainer
    model = _hf(base_dir)
    mola.inject(model, mola.MoLAConfig(**{**CFG, "dropout": 0.0}))
    rows = [{"input_ids": _ids(seed=s, batch=1)[0].tolist()} for s in range(8)]
    args = transformers.TrainingArguments(output_dir=str(tmp_path / "hf"), per_device_train_batch_size=4,
                                          max_steps=2, save_steps=1, learning_rate=1e-2, report_to=[],
                                          use_cpu=True)
    MoLATrainer(model=model, args=args, train_dataset=rows, data_collator=ExampleCollator()).train()
    ckpt = tmp_path / "hf" / "checkpoint-1"
    names = set(os.listdir(ckpt))
    assert "mola_adapter" in names and "optimizer.pt" in names
    # No copy of the frozen base: no model weights file, and the adapter file holds adapter tensors only.
    assert not any(n.startswith(("model", "pytorch_model")) for n in names), names
    from safetensors import safe_open
    with safe_open(str(ckpt / "mola_adapter" / "adapter_model.safetensors"), "pt") as f:
        assert all(k.endswith((".mola.router", ".mola.lora_a", ".mola.lora_b")) for k in f.keys())

    fresh = _hf(base_dir)
    mola.inject(fresh, mola.MoLAConfig(**{**CFG, "dropout": 0.0}))
    args.max_steps = 2
    trainer = MoLATrainer(model=fresh, args=args, train_dataset=rows, data_collator=ExampleCollator())
    trainer.train(resume_from_checkpoint=str(ckpt))
    resumed = {k: v for k, v in fresh.state_dict().items() if k.endswith(("router", "lora_a", "lora_b"))}
    first = {k: v for k, v in model.state_dict().items() if k.endswith(("router", "lora_a", "lora_b"))}
    assert max((resumed[k] - first[k]).abs().max().item() for k in first) < 1e-5


# ------------------------------------------------------------- copies and the balance loss

def test_deepcopy_and_pickle_after_a_training_forward(base_dir):
    model = _hf(base_dir)
    mola.inject(model, mola.MoLAConfig(**CFG))
    _perturb(model.named_parameters())
    model.train()
    ids = _ids()
    model(input_ids=ids, labels=ids)  # keeps router logits with a graph
    twin = copy.deepcopy(model)       # an EMA or best-model snapshot
    pickled = pickle.loads(pickle.dumps(model))
    for other in (twin, pickled):
        assert all(m.router_logits is None for m in other.modules() if isinstance(m, mola.MoLALinear))
        other.eval()
    model.eval()
    assert torch.equal(_logits(twin, ids), _logits(model, ids))
    assert torch.equal(_logits(pickled, ids), _logits(model, ids))


def test_deepcopy_of_a_molex_model_runs_its_own_layers(base_dir):
    model = _hf(base_dir)
    mola.inject(model, mola.MoLExConfig(base_method="lora", rank=4))
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in twin.named_parameters():
            if ".layers." in name:
                p.add_(0.05)  # the copy's decoder layers differ from the original's, nothing else does
    ids = _ids()
    # A copy whose layers still ran the original's forward would give the original's logits.
    assert (_logits(twin, ids) - _logits(model, ids)).abs().max().item() > 1e-3


def test_aux_loss_counts_every_forward_since_it_was_last_taken(base_dir):
    model = _hf(base_dir)
    mola.inject(model, mola.MoLAConfig(**{**CFG, "dropout": 0.0}))
    _perturb(model.named_parameters())
    model.train()
    a, b = _ids(seed=1), _ids(seed=2)
    model(input_ids=a)
    model(input_ids=b)
    two = mola.aux_loss(model)
    model(input_ids=torch.cat([a, b]))  # the same tokens in one forward
    one = mola.aux_loss(model)
    torch.testing.assert_close(two, one, rtol=1e-6, atol=1e-9)
    model(input_ids=a)
    model(input_ids=b)
    mask_a, mask_b = torch.ones_like(a), torch.ones_like(b)
    mask_b[:, -3:] = 0
    two_masks = mola.aux_loss(model, mask=[mask_a, mask_b])
    model(input_ids=torch.cat([a, b]))
    torch.testing.assert_close(two_masks, mola.aux_loss(model, mask=torch.cat([mask_a, mask_b])),
                               rtol=1e-6, atol=1e-9)
    # Both forwards' routers get the balance loss's gradient.
    model(input_ids=a)
    model(input_ids=b)
    mola.aux_loss(model, coef=1.0).backward()
    assert all(m.router.grad is not None and m.router.grad.abs().sum() > 0
               for m in model.modules() if isinstance(m, mola.MoLALinear))


def test_a_spent_forward_no_longer_counts(base_dir):
    model = _hf(base_dir)
    mola.inject(model, mola.MoLAConfig(**{**CFG, "dropout": 0.0}))
    model.train()
    ids = _ids()
    params = [p for p in model.parameters() if p.requires_grad]
    torch.autograd.grad(model(input_ids=ids, labels=ids).loss, params)  # spends that forward's graph
    out = model(input_ids=ids, labels=ids)
    (out.loss + mola.aux_loss(model)).backward()  # would fail through the spent graph
    model(input_ids=ids, labels=ids).loss.backward()  # a loop that never takes the loss keeps nothing
    assert all(m._pending_logits == [] for m in model.modules() if isinstance(m, mola.MoLALinear))


def test_cpp_aux_loss_counts_every_forward(base_dir):
    cpp = mola.CausalLM.from_pretrained(base_dir)
    cpp.attach(mola.MoLAConfig(**{**CFG, "dropout": 0.0}))
    _perturb(cpp.named_parameters())
    cpp.train()
    a, b = _ids(seed=1), _ids(seed=2)
    cpp(a)
    cpp(b)
    two = cpp.aux_loss()
    cpp(torch.cat([a, b]))
    torch.testing.assert_close(two, cpp.aux_loss(), rtol=1e-6, atol=1e-9)
    cpp(b)
    only_b = cpp.aux_loss()
    # A forward whose graph autograd.grad spent no longer counts (mola.aux_loss is the same call).
    params = [p for p in cpp.parameters() if p.requires_grad]
    torch.autograd.grad(cpp(a, labels=a).loss, params)
    out = cpp(b, labels=b)
    aux = mola.aux_loss(cpp)
    torch.testing.assert_close(aux, only_b, rtol=1e-6, atol=1e-9)
    (out.loss + aux).backward()


# ------------------------------------------------------------- the C++ model as an nn.Module

def test_cpp_model_follows_module_conventions(base_dir):
    cpp = mola.CausalLM.from_pretrained(base_dir)
    assert cpp.eval() is cpp and cpp.train() is cpp and cpp.train(False) is cpp
    assert cpp.to(torch.bfloat16) is cpp
    assert {p.dtype for p in cpp.parameters()} == {torch.bfloat16}
    cpp.to("cpu", torch.float32)
    cpp.to(dtype=torch.float64)
    assert {p.dtype for p in cpp.parameters()} == {torch.float64}
    if not torch.cuda.is_available():  # where there is a GPU, moving there is no error
        with pytest.raises(ValueError, match="no usable CUDA GPU|no CUDA kernels"):
            cpp.to("cuda")
    ids = _ids()
    assert mola.CausalLM.from_pretrained(base_dir).eval()(ids).logits.shape == (2, 9, 61)


def test_cpp_model_copies_and_pickles(base_dir):
    cpp = mola.CausalLM.from_pretrained(base_dir)
    cpp.attach(mola.MoLAConfig(**CFG, init="pissa"))
    _perturb(cpp.named_parameters())
    cpp.train()
    ids = _ids()
    cpp(ids, labels=ids)  # router logits with a graph
    state = torch.random.get_rng_state()
    twin = copy.deepcopy(cpp)
    assert torch.equal(state, torch.random.get_rng_state())  # a copy draws nothing
    pickled = pickle.loads(pickle.dumps(cpp))
    assert twin.training and pickled.training and twin.adapter_config == cpp.adapter_config
    for other in (twin, pickled):
        assert {n for n, p in other.named_parameters() if p.requires_grad} == \
            {n for n, p in cpp.named_parameters() if p.requires_grad}
        other.eval()
    cpp.eval()
    want = _logits(cpp, ids)
    assert torch.equal(_logits(twin, ids), want) and torch.equal(_logits(pickled, ids), want)
    with torch.no_grad():
        next(p for n, p in twin.named_parameters() if n.endswith("lora_b")).add_(1.0)
    assert torch.equal(_logits(cpp, ids), want)  # the copy owns its tensors
    with mola.disable_adapter(twin), mola.disable_adapter(cpp):  # PiSSA's start carried along
        assert torch.equal(_logits(twin, ids), _logits(cpp, ids))


def test_from_pretrained_on_a_machine_without_a_gpu(base_dir):
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible; the message is for machines without one")
    with pytest.raises(ValueError, match=r"device 'cuda'.*device=\"cpu\""):
        mola.CausalLM.from_pretrained(base_dir, device="cuda")


# ------------------------------------------------------------- what a PEFT user looks for

def test_print_trainable_parameters(base_dir, capsys):
    model = _hf(base_dir)
    total = sum(p.numel() for p in model.parameters())
    mola.inject(model, mola.MoLAConfig(**CFG))
    adapter = sum(p.numel() for n, p in model.named_parameters() if n.endswith(("router", "lora_a", "lora_b")))
    assert mola.print_trainable_parameters(model) == (adapter, total + adapter)
    line = capsys.readouterr().out.strip()
    assert line == (f"trainable params: {adapter:,d} || all params: {total + adapter:,d} || "
                    f"trainable%: {100 * adapter / (total + adapter):.4f}")
    cpp = mola.CausalLM.from_pretrained(base_dir)
    cpp.attach(mola.MoLAConfig(**CFG))
    assert mola.print_trainable_parameters(cpp) == (adapter, total + adapter)


@pytest.mark.parametrize("init", ["kaiming", "pissa"])
def test_disable_adapter_runs_the_base_model(base_dir, init):
    model = _hf(base_dir)
    ids = _ids()
    base = _logits(model, ids)
    mola.inject(model, mola.MoLAConfig(**CFG, init=init))
    _perturb(model.named_parameters())
    adapted = _logits(model, ids)
    assert (adapted - base).abs().max().item() > 1e-3
    with mola.disable_adapter(model):
        torch.testing.assert_close(_logits(model, ids), base, rtol=0, atol=1e-5)
    assert torch.equal(_logits(model, ids), adapted)  # on again after the block
    model.disable_adapters()  # transformers' own spelling, without PEFT
    torch.testing.assert_close(_logits(model, ids), base, rtol=0, atol=1e-5)
    model.enable_adapters()
    assert torch.equal(_logits(model, ids), adapted)

    cpp = mola.CausalLM.from_pretrained(base_dir)
    cpp.attach(mola.MoLAConfig(**CFG, init=init))
    _perturb(cpp.named_parameters())
    with mola.disable_adapter(cpp):
        torch.testing.assert_close(_logits(cpp, ids), base, rtol=0, atol=1e-4)
    assert cpp.adapter_enabled


@pytest.mark.parametrize("init", ["kaiming", "pissa"])
def test_unload_gives_the_base_model_back(base_dir, init):
    model = _hf(base_dir)
    ids = _ids()
    base = _logits(model, ids)
    trains = {n for n, p in model.named_parameters() if p.requires_grad}
    mola.inject(model, mola.MoLAConfig(**CFG, init=init))
    _perturb(model.named_parameters())
    assert mola.unload(model) is model
    assert not any(isinstance(m, mola.MoLALinear) for m in model.modules())
    assert not hasattr(model, "mola_config") and "save_pretrained" not in model.__dict__
    assert {n for n, p in model.named_parameters() if p.requires_grad} == trains
    torch.testing.assert_close(_logits(model, ids), base, rtol=0, atol=1e-5)

    cpp = mola.CausalLM.from_pretrained(base_dir)
    cpp.attach(mola.MoLAConfig(**CFG, init=init))
    mola.unload(cpp)
    assert not cpp.has_adapter
    torch.testing.assert_close(_logits(cpp, ids), base, rtol=0, atol=1e-4)


def test_unload_a_molex_model(base_dir):
    model = _hf(base_dir)
    ids = _ids()
    base = _logits(model, ids)
    mola.inject(model, mola.MoLExConfig(base_method="lora", rank=4))
    assert not model.config.use_cache
    mola.unload(model)
    assert model.config.use_cache and not any(isinstance(m, mola.molex.MoLExGate) for m in model.modules())
    torch.testing.assert_close(_logits(model, ids), base, rtol=0, atol=1e-6)


def test_merge_is_refused_for_a_routed_mixture_and_exact_for_lora(base_dir):
    model = _hf(base_dir)
    mola.inject(model, mola.MoLAConfig(**CFG))
    with pytest.raises(ValueError, match="differs from token to token"):
        mola.merge_and_unload(model)
    lora = _hf(base_dir)
    mola.inject(lora, mola.MoLAConfig(method="lora", rank=4, dropout=0.0))
    _perturb(lora.named_parameters())
    ids = _ids()
    want = _logits(lora, ids)
    merged = mola.merge_and_unload(lora)
    assert not any(isinstance(m, mola.MoLALinear) for m in merged.modules())
    torch.testing.assert_close(_logits(merged, ids), want, rtol=1e-5, atol=1e-5)
