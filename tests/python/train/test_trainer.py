"""mola._C.Trainer (src/train/) and the batching it uses (src/data/batch.cpp),
checked against independent oracles: transformers' DataCollatorForSeq2Seq,
get_length_grouped_indices and learning-rate schedulers, a full-batch forward
and backward done by hand in Python, and the uninterrupted run for resume.

The model is a tiny llama written by transformers and loaded into the C++
decoder, with a MoLA adapter (experts 2,4,6,8, top-2, rank 4). Runs use one
intra-op thread: on a busy 2-core machine more threads only contend.
"""
import json
import math
import shutil
import threading
import time

import pytest
import torch

import mola
from mola import _C

from tiny_models import save_tiny_llama

transformers = pytest.importorskip("transformers")

VOCAB = 61


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def llama_path(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), VOCAB)


def make_model(llama_path, seed=0, dropout=0.1, aux_loss_coef=0.001, attach=True):
    model = mola.CausalLM.from_pretrained(str(llama_path))
    if attach:
        torch.manual_seed(seed)
        model.attach(mola.MoLAConfig(experts="2,4,6,8", top_k=2, rank=4, dropout=dropout,
                                     aux_loss_coef=aux_loss_coef))
    return model


def pattern_examples(n, seed=0, min_len=6, max_len=20):
    """Sequences repeating a random 3-token pattern: learnable from context."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(min_len, max_len + 1, (1,), generator=g))
        pattern = torch.randint(1, VOCAB, (3,), generator=g).tolist()
        ids = (pattern * max_len)[:length]
        out.append((ids, list(ids)))
    return out


def options(**kw):
    settings = dict(batch_size=4, micro_batch_size=2, lr=1e-2, warmup_steps=0, max_steps=4, save_every=0,
                    eval_every=0, log_every=1, save_total_limit=0)
    settings.update(kw)
    return _C.TrainOptions(settings)


def read_metrics(out_dir):
    with open(out_dir / "metrics.jsonl") as f:
        return [json.loads(line) for line in f]


def step_lines(out_dir):
    return {m["step"]: m for m in read_metrics(out_dir) if "loss" in m}


def adapter_params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if ".mola." in n}


# ---- batching ------------------------------------------------------------------------


def test_collate_matches_data_collator_for_seq2seq():
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {f"t{i}": i for i in range(VOCAB)}
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="t1")), pad_token="t0")
    tok.padding_side = "right"
    collator = transformers.DataCollatorForSeq2Seq(tok, pad_to_multiple_of=8, label_pad_token_id=-100,
                                                   return_tensors="pt")
    for lengths in ([3, 10], [8], [1, 17, 5], [16, 16]):
        feats = []
        for i, n in enumerate(lengths):
            ids = [(7 * i + t) % (VOCAB - 1) + 1 for t in range(n)]
            labels = [-100] * (n // 2) + ids[n // 2:]  # a masked prompt
            feats.append({"input_ids": ids, "labels": labels})
        want = collator([dict(f) for f in feats])
        got = _C.collate(feats)
        for key in ("input_ids", "attention_mask", "labels"):
            assert torch.equal(got[key], want[key]), (lengths, key)
        assert got["num_tokens"] == sum(lengths)


def test_group_by_length_matches_transformers():
    from transformers.trainer_pt_utils import get_length_grouped_indices
    g = torch.Generator().manual_seed(11)
    for n, batch in ((1000, 4), (37, 8), (300, 16)):
        lengths = torch.randint(1, 40, (n,), generator=g).tolist()  # many ties: checks the stable sort
        want = get_length_grouped_indices(lengths, batch, generator=torch.Generator().manual_seed(5))
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(5)).tolist()
        assert _C.group_by_length(perm, lengths, batch) == want


def test_sampler_batches_cover_each_epoch_once():
    s = _C.BatchSampler([5] * 10, batch_size=4, micro_batch_size=2, seed=3)
    assert s.batches_per_epoch == 3
    seen = []
    for _ in range(3):
        seen.append(s.next())
    assert [len(b) for b in seen] == [2, 2, 1]  # the final partial batch is kept
    flat = [i for b in seen for m in b for i in m]
    assert sorted(flat) == list(range(10)) and flat == s.epoch_order(0)
    assert s.position == (1, 0)


# ---- options ---------------------------------------------------------------------------


def test_options_round_trip_and_errors():
    o = _C.TrainOptions(lr=1e-3, schedule="cosine", resume="some/dir", group_by_length=True)
    assert _C.TrainOptions(o.to_dict()) == o and o.lr == 1e-3 and o.resume == "some/dir"
    assert _C.TrainOptions().to_dict()["batch_size"] == 128
    with pytest.raises(ValueError, match=r'unknown key "lrr".*did you mean "lr"'):
        _C.TrainOptions(lrr=1e-3)
    with pytest.raises(ValueError, match=r"micro_batch_size \(3\) must divide batch_size \(8\)"):
        _C.TrainOptions(batch_size=8, micro_batch_size=3)
    with pytest.raises(ValueError, match=r"lr is -0.1"):
        _C.TrainOptions(lr=-0.1)
    with pytest.raises(ValueError, match=r'schedule "cosin" is unknown; use one of linear, cosine, constant'):
        _C.TrainOptions(schedule="cosin")
    with pytest.raises(ValueError, match=r'batch_size must be an integer; got "8"'):
        _C.TrainOptions({"batch_size": "8"})


def test_trainer_needs_an_adapter(llama_path, tmp_path):
    with pytest.raises(ValueError, match="no adapter"):
        _C.Trainer(make_model(llama_path, attach=False), options(), str(tmp_path))


# ---- schedules ---------------------------------------------------------------------------


@pytest.mark.parametrize("schedule", ["linear", "cosine", "constant"])
def test_lr_multiplier_matches_transformers(schedule):
    warmup, total = 7, 40
    make = {"linear": lambda o: transformers.get_linear_schedule_with_warmup(o, warmup, total),
            "cosine": lambda o: transformers.get_cosine_schedule_with_warmup(o, warmup, total),
            "constant": lambda o: transformers.get_constant_schedule_with_warmup(o, warmup)}[schedule]
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = make(opt)
    for step in range(total + 3):
        assert _C.lr_multiplier(schedule, step, warmup, total) == pytest.approx(opt.param_groups[0]["lr"], abs=1e-12)
        opt.step()
        sched.step()


def test_logged_lr_follows_the_schedule(llama_path, tmp_path):
    model = make_model(llama_path)
    lr, warmup, total = 1e-2, 2, 5
    _C.Trainer(model, options(lr=lr, warmup_steps=warmup, max_steps=total, schedule="cosine"),
               str(tmp_path)).fit(pattern_examples(8))
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    sched = transformers.get_cosine_schedule_with_warmup(opt, warmup, total)
    lines = step_lines(tmp_path)
    for step in range(1, total + 1):  # optimizer step k runs with the scheduler after k - 1 steps
        assert lines[step]["lr"] == pytest.approx(opt.param_groups[0]["lr"], rel=1e-12, abs=1e-15)
        opt.step()
        sched.step()


# ---- the loop ------------------------------------------------------------------------------


def successor_examples(n, seed=0):
    """Runs of consecutive token ids (t, t+1, t+2, ...): the next token is a fixed function of the current one."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(6, 17, (1,), generator=g))
        start = int(torch.randint(0, VOCAB - 1, (1,), generator=g))
        ids = [(start + k) % (VOCAB - 1) + 1 for k in range(length)]
        out.append((ids, list(ids)))
    return out


def test_loss_falls_on_a_learnable_task(llama_path, tmp_path):
    model = make_model(llama_path)
    held_out = successor_examples(8, seed=1)
    trainer = _C.Trainer(model, options(batch_size=8, micro_batch_size=8, lr=1e-2, max_steps=30, warmup_steps=3,
                                 eval_every=30),
                         str(tmp_path))
    before = trainer.evaluate(held_out)
    result = trainer.fit(successor_examples(32), held_out)
    losses = [m["loss"] for m in sorted(step_lines(tmp_path).values(), key=lambda m: m["step"])]
    assert len(losses) == 30 and result["steps"] == 30
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < first - 0.3, losses
    assert result["train_loss"] == pytest.approx(losses[-1])
    assert result["eval_loss"] < before - 0.3  # it learnt the rule, not the examples


def test_gradient_accumulation_equals_the_full_batch(llama_path, tmp_path):
    # Equal lengths, so the mean of the micro-batch means is the token mean of
    # the batch; aux off, as the balance loss of 4 micro-batches is not that of one.
    data = [(ids, ids) for ids, _ in pattern_examples(8, min_len=12, max_len=12)]
    grad_norms, params = [], []
    for micro in (2, 8):
        model = make_model(llama_path, dropout=0.0, aux_loss_coef=0.0)
        out = tmp_path / f"micro{micro}"
        _C.Trainer(model, options(batch_size=8, micro_batch_size=micro, max_steps=1, max_grad_norm=0.0),
                   str(out)).fit(data)
        grad_norms.append(step_lines(out)[1]["grad_norm"])
        params.append(adapter_params(model))
    # The oracle: one forward and backward over the whole batch, in Python.
    model = make_model(llama_path, dropout=0.0, aux_loss_coef=0.0)
    model.train()
    ids = torch.tensor([d[0] for d in data])
    model(ids, torch.ones_like(ids), ids).loss.backward()
    norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters() if p.grad is not None]))
    assert grad_norms[0] == pytest.approx(norm.item(), rel=1e-5)
    assert grad_norms[1] == pytest.approx(norm.item(), rel=1e-5)
    for name, p in params[0].items():
        torch.testing.assert_close(p, params[1][name], atol=1e-5, rtol=0)


def test_evaluation_and_callback_lines(llama_path, tmp_path):
    model = make_model(llama_path)
    valid = pattern_examples(5, seed=9)
    trainer = _C.Trainer(model, options(max_steps=4, eval_every=2), str(tmp_path))
    calls = []
    result = trainer.fit(pattern_examples(8), valid, on_eval=lambda step: calls.append(step) or {"acc": step / 10})
    assert calls == [2, 4]
    evals = [m for m in read_metrics(tmp_path) if "eval_loss" in m]
    assert [(m["step"], m["acc"]) for m in evals] == [(2, 0.2), (4, 0.4)]
    # The oracle: the mean token loss (labels shifted, -100 excluded) computed here.
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for ids, labels in valid:
            t = torch.tensor([ids])
            logits = model(t).logits[0, :-1]
            total += torch.nn.functional.cross_entropy(logits, torch.tensor(labels[1:]), reduction="sum").item()
            count += len(ids) - 1
    assert evals[-1]["eval_loss"] == pytest.approx(total / count, rel=1e-5)
    assert result["eval_loss"] == pytest.approx(total / count, rel=1e-5)


def test_fit_releases_the_gil(llama_path, tmp_path):
    model = make_model(llama_path)
    ticks = []
    done = threading.Event()

    def tick():
        while not done.is_set():
            ticks.append(1)
            time.sleep(0.002)

    t = threading.Thread(target=tick)
    t.start()
    start = len(ticks)
    _C.Trainer(model, options(max_steps=6), str(tmp_path)).fit(pattern_examples(8))
    during = len(ticks) - start
    done.set()
    t.join()
    assert during >= 10  # the thread ran while fit trained


# ---- checkpoints and resume ------------------------------------------------------------------


def test_resume_continues_the_same_run(llama_path, tmp_path):
    # 24 examples, batch 4: 6 steps an epoch, so steps 4..8 cross into a new
    # epoch's permutation; dropout 0.1 draws from torch's generator every step.
    data = pattern_examples(24, seed=2)
    opts = dict(max_steps=8, save_every=3)
    full_dir = tmp_path / "full"
    model = make_model(llama_path, seed=0)
    _C.Trainer(model, options(**opts), str(full_dir)).fit(data)
    full = step_lines(full_dir)
    final = adapter_params(model)
    assert [s for s, _ in _C.list_checkpoints(str(full_dir))] == [3, 6, 8]

    # A crashed run's directory: the complete step-3, a temporary step-7 and a
    # step-6 cut off before trainer_state.json; only step-3 may be used.
    run_dir = tmp_path / "resumed"
    (run_dir / "checkpoints").mkdir(parents=True)
    shutil.copytree(full_dir / "checkpoints" / "step-3", run_dir / "checkpoints" / "step-3")
    shutil.copytree(full_dir / "checkpoints" / "step-8", run_dir / "checkpoints" / "step-7.tmp-1234")
    shutil.copytree(full_dir / "checkpoints" / "step-6", run_dir / "checkpoints" / "step-6")
    (run_dir / "checkpoints" / "step-6" / "trainer_state.json").unlink()
    assert [s for s, _ in _C.list_checkpoints(str(run_dir))] == [3]

    torch.manual_seed(123)  # a different generator state and adapter init: the checkpoint must restore both
    model2 = make_model(llama_path, seed=77)
    result = _C.Trainer(model2, options(**opts, resume=True, save_total_limit=2), str(run_dir)).fit(data)
    resumed = step_lines(run_dir)
    assert sorted(resumed) == [4, 5, 6, 7, 8]
    for step in range(4, 9):
        for key in ("loss", "aux_loss", "grad_norm", "lr"):
            assert resumed[step][key] == pytest.approx(full[step][key], abs=1e-6), (step, key)
        assert resumed[step]["tokens"] == full[step]["tokens"]
    for name, p in final.items():
        torch.testing.assert_close(adapter_params(model2)[name], p, atol=1e-6, rtol=0)
    # save_total_limit=2: step-3 (and the replaced partial step-6) are gone; the temporary is left alone.
    assert [s for s, _ in _C.list_checkpoints(str(run_dir))] == [6, 8]
    assert result["checkpoint"].endswith("step-8") and result["steps"] == 8

    # resume="path" continues from that checkpoint too; metrics.jsonl first drops
    # the lines after its step, so the file reads as one run.
    model3 = make_model(llama_path, seed=5)
    _C.Trainer(model3, options(**opts, resume=str(full_dir / "checkpoints" / "step-6")), str(run_dir)).fit(data)
    lines = [m for m in read_metrics(run_dir) if "loss" in m]
    assert [m["step"] for m in lines] == [4, 5, 6, 7, 8]
    assert lines[-1]["loss"] == pytest.approx(full[8]["loss"], abs=1e-6)


def test_resume_path_must_be_a_checkpoint(llama_path, tmp_path):
    with pytest.raises(ValueError, match="not a complete training checkpoint"):
        _C.Trainer(make_model(llama_path), options(resume=str(tmp_path / "nowhere")), str(tmp_path)).fit(
            pattern_examples(4))


def test_non_finite_loss_stops_with_step_and_checkpoint(llama_path, tmp_path):
    model = make_model(llama_path)
    with pytest.raises(FloatingPointError) as err:
        _C.Trainer(model, options(lr=1e30, schedule="constant", max_steps=6, save_every=1), str(tmp_path)).fit(pattern_examples(8))
    msg = str(err.value)
    lines = step_lines(tmp_path)
    bad = max(lines)
    assert bad >= 2 and f"training stopped at step {bad} " in msg
    assert f"step-{bad - 1}" in msg and "learning rate is too high (lr 1e+30" in msg
    assert lines[bad]["loss"] is None or lines[bad]["grad_norm"] is None or not math.isfinite(lines[bad]["loss"])
    assert "non_finite" in lines[bad]
    assert isinstance(err.value, _C.NonFiniteLossError)


def test_non_finite_before_any_checkpoint(llama_path, tmp_path):
    model = make_model(llama_path)
    with torch.no_grad():
        dict(model.named_parameters())["model.layers.0.self_attn.q_proj.mola.lora_b"].fill_(float("inf"))
    with pytest.raises(FloatingPointError, match=r"step 1 .*none saved yet"):
        _C.Trainer(model, options(save_every=1), str(tmp_path)).fit(pattern_examples(8))
    assert step_lines(tmp_path)[1]["loss"] is None


# ---- init_adapter --------------------------------------------------------------------------------


def test_init_adapter_starts_from_that_adapter(llama_path, tmp_path):
    source = make_model(llama_path, seed=4, dropout=0.0, aux_loss_coef=0.0)
    with torch.no_grad():  # B is zero after attach: give the adapter an effect to see
        for name, p in source.named_parameters():
            if name.endswith("lora_b"):
                p.normal_(0, 0.2)
    source.save_adapter(str(tmp_path / "adapter"))
    data = [(ids, ids) for ids, _ in pattern_examples(4, min_len=10, max_len=10)]

    model = make_model(llama_path, attach=False)  # no adapter: init_adapter attaches one
    _C.Trainer(model, options(batch_size=4, micro_batch_size=4, max_steps=1, warmup_steps=1,
                              init_adapter=str(tmp_path / "adapter")), str(tmp_path / "run")).fit(data)
    ids = torch.tensor([d[0] for d in data])
    source.train()
    with torch.no_grad():
        want = source(ids, torch.ones_like(ids), ids).loss.item()
    # The first step ran on the loaded adapter (same loss); with warmup its lr
    # was 0, so the adapter is still exactly the loaded one.
    assert step_lines(tmp_path / "run")[1]["loss"] == pytest.approx(want, rel=1e-6)
    model.eval()
    source.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, source(ids).logits, atol=0, rtol=0)


def test_callback_errors_propagate(llama_path, tmp_path):
    def boom(step):
        raise KeyError(f"boom at {step}")

    with pytest.raises(KeyError, match="boom at 2"):
        _C.Trainer(make_model(llama_path), options(max_steps=4, eval_every=2), str(tmp_path)).fit(
            pattern_examples(8), on_eval=boom)
    assert sorted(step_lines(tmp_path)) == [1, 2]  # stopped at the evaluation of step 2
