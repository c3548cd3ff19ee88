"""mola.integrations.MoLATrainer (the Hugging Face Trainer) and
examples/python/hf_trainer.py: the balance loss is in the loss and the
gradients (checked against a hand-written Switch loss), the logs carry it and
the expert load, the adapter is written at each checkpoint and at the end and
loads back to the trained model's outputs, and the example lowers the loss.
"""
import importlib.util
import os
from pathlib import Path

import pytest
import torch
from torch import nn

import mola

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate (requirements.txt)")
from mola.integrations import ADAPTER_DIRNAME, ExampleCollator, MoLATrainer, expert_load_counts  # noqa: E402

ROOT = Path(__file__).resolve().parents[3]
TINY = str(ROOT / "data/models/stories260K")


def _example():
    spec = importlib.util.spec_from_file_location("hf_trainer", ROOT / "examples/python/hf_trainer.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _switch_loss(model, mask, coef=1e-3):
    """The authors' balance loss by hand (docs/design.md, Fidelity to the papers and the authors' code): per layer, the router
    logits of its modules stacked, padding rows dropped, E * sum_e f_e * Pbar_e."""
    layers = {}
    for m in model.modules():
        if isinstance(m, mola.MoLALinear):
            layers.setdefault(m.layer_index, []).append(m)
    keep = mask.reshape(-1).bool()
    total = 0.0
    for modules in layers.values():
        logits = torch.cat([m.router_logits[keep] for m in modules])
        p = logits.float().softmax(-1)
        e, k = p.shape[1], modules[0].top_k
        sel = p.topk(k, -1).indices.reshape(-1)
        f = torch.bincount(sel, minlength=e).double() / sel.numel()
        total = total + e * (f * p.mean(0).double()).sum()
    return coef * total


def _args(tmp_path, **kw):
    return transformers.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=4, learning_rate=1e-2, report_to=[], use_cpu=True,
        logging_steps=1, save_strategy="no", disable_tqdm=True, remove_unused_columns=False, **kw)


@pytest.fixture()
def injected():
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_pretrained(TINY, dtype=torch.float32)
    mola.inject(model, mola.MoLAConfig(experts="2,4,6,8", top_k=2, rank=4, alpha=8, dropout=0.0))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, mola.MoLALinear):
                m.lora_b.copy_(torch.randn(m.lora_b.shape, generator=g) * 0.1)
    return model.train()


def _batch():
    ids = torch.randint(1, 512, (3, 13), generator=torch.Generator().manual_seed(2))
    examples = [{"input_ids": ids[0].tolist()}, {"input_ids": ids[1, :9].tolist()},
                {"input_ids": ids[2, :5].tolist(), "labels": [-100] * 2 + ids[2, 2:5].tolist()}]
    return ExampleCollator()(examples)


def test_loss_and_gradients_include_the_balance_loss(injected, tmp_path):
    batch = _batch()
    trainer = MoLATrainer(model=injected, args=_args(tmp_path), train_dataset=[batch], data_collator=lambda x: x)
    loss = trainer.compute_loss(injected, dict(batch))
    lm = injected(**batch).loss
    aux = _switch_loss(injected, batch["attention_mask"])
    assert aux.item() > 0.0019  # >= 0.001 per layer with padding removed: the loss is really there
    assert abs(loss.item() - (lm.item() + aux.item())) <= 1e-6

    params = [p for p in injected.parameters() if p.requires_grad]
    want = torch.autograd.grad(lm + aux.float(), params)
    injected.zero_grad(set_to_none=True)
    trainer.current_gradient_accumulation_steps = 1  # set by the train loop
    trainer.training_step(injected, dict(batch))  # the Trainer's own backward
    got = [p.grad for p in params]
    diff = max((a - b).abs().max().item() for a, b in zip(got, want))
    assert diff <= 1e-6, diff
    # the router gradient comes from the aux loss as well: without it the grads differ
    no_aux = torch.autograd.grad(injected(**batch).loss, params)
    assert max((a - b).abs().max().item() for a, b in zip(got, no_aux)) > 1e-5  # 10x the tolerance above


def test_gradient_accumulation_keeps_the_aux_loss_a_mean(injected, tmp_path):
    """Under accumulation the Trainer normalises the LM loss over the whole
    accumulated batch; the aux loss must then count once per micro-batch / steps."""
    batch = _batch()
    trainer = MoLATrainer(model=injected, args=_args(tmp_path, gradient_accumulation_steps=2),
                          train_dataset=[batch], data_collator=lambda x: x)
    trainer.current_gradient_accumulation_steps = 2
    items = (batch["labels"][:, 1:] != -100).sum()
    loss = trainer.compute_loss(injected, dict(batch), num_items_in_batch=2 * items)
    lm = injected(**batch).loss
    aux = _switch_loss(injected, batch["attention_mask"])
    assert abs(loss.item() - (lm.item() / 2 + aux.item() / 2)) <= 1e-6


def test_expert_load_counts_by_hand():
    layer = mola.MoLALinear(nn.Linear(4, 4), num_experts=4, top_k=1, rank=2, layer_index=0)
    with torch.no_grad():
        layer.router.copy_(torch.eye(4) * 10)  # token = one-hot i picks expert i
    model = nn.Sequential(layer)
    model(torch.eye(4)[[0, 0, 1, 3]].reshape(2, 2, 4))
    assert expert_load_counts(model)[0].tolist() == [2, 1, 0, 1]
    assert expert_load_counts(model, torch.tensor([[1, 1], [1, 0]]))[0].tolist() == [2, 1, 0, 0]
    with pytest.raises(ValueError, match="attention_mask has 3"):
        expert_load_counts(model, torch.ones(1, 3))


def test_collator_pads_and_checks():
    out = ExampleCollator(pad_to_multiple_of=8)([{"input_ids": [5, 6, 7]}, {"input_ids": [8], "labels": [-100]}])
    assert out["input_ids"].tolist() == [[5, 6, 7, 0, 0, 0, 0, 0], [8, 0, 0, 0, 0, 0, 0, 0]]
    assert out["labels"][0].tolist() == [5, 6, 7] + [-100] * 5 and out["labels"][1].tolist() == [-100] * 8
    assert out["attention_mask"].sum(1).tolist() == [3, 1]
    with pytest.raises(ValueError, match="2 input_ids but 1 labels"):
        ExampleCollator()([{"input_ids": [1, 2], "labels": [1]}])


def test_trainer_needs_an_injected_model(tmp_path):
    model = transformers.AutoModelForCausalLM.from_pretrained(TINY)
    with pytest.raises(ValueError, match="mola.inject"):
        MoLATrainer(model=model, args=_args(tmp_path))


def test_example_trains_logs_and_saves(tmp_path):
    out = tmp_path / "run"
    result = _example().main(["--output", str(out), "--steps", "6", "--save-steps", "3", "--examples", "24",
                              "--cutoff", "64", "--batch-size", "4", "--lr", "1e-2"])
    print(f"hf_trainer example: eval loss {result['loss_before']:.4f} -> {result['loss_after']:.4f}")
    assert result["loss_after"] < 0.8 * result["loss_before"]
    trainer = result["trainer"]
    logs = [e for e in trainer.state.log_history if "loss" in e]
    assert len(logs) == 6
    cfg = trainer.model.mola_config
    for entry in logs:
        assert 0.001 <= entry["aux_loss"] / cfg["num_layers"] <= 0.01  # per layer ~ 0.001 x [1, E]
        for layer, experts in enumerate(cfg["experts"]):
            shares = [entry[f"expert_load/layer_{layer}/expert_{e}"] for e in range(experts)]
            assert abs(sum(shares) - 1.0) < 1e-9
            assert entry[f"expert_load/layer_{layer}/imbalance"] == pytest.approx(max(shares) * experts)
    for where in (out / "checkpoint-3", out / "checkpoint-6", out):
        assert (where / ADAPTER_DIRNAME / "adapter_model.safetensors").is_file(), where
    # the final adapter loads into a fresh model and reproduces the trained model
    trained = trainer.model.eval()
    fresh = mola.load_adapter(transformers.AutoModelForCausalLM.from_pretrained(TINY), out / ADAPTER_DIRNAME).eval()
    probe = result["probe"]
    with torch.no_grad():
        diff = (fresh(**probe).logits - trained(**probe).logits).abs().max().item()
    assert diff <= 1e-6, diff
    # the adapter of the last checkpoint is the final one (checkpoint 6 = the last step)
    ckpt = mola.load_adapter(transformers.AutoModelForCausalLM.from_pretrained(TINY),
                             out / "checkpoint-6" / ADAPTER_DIRNAME).eval()
    with torch.no_grad():
        assert (ckpt(**probe).logits - trained(**probe).logits).abs().max().item() <= 1e-6
