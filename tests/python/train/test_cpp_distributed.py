"""The C++ trainer in a torch.distributed process group (docs/distributed.md): two
Gloo ranks on the CPU under torchrun (``torchrun -m mola train``, the route a
user takes) against one process on the same global batches. The oracle is the
one-process run: per step the logged loss, aux loss and gradient norm, and the
final adapter, must agree to 1e-6 (the two runs differ only in how the
micro-batch gradients are summed). Only rank 0 may write: one metrics line
per step, one summary.

Plus the refusals: a command other than train under torchrun, and the C++
command asked to train under a launcher without a group.
"""
import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import mola

ROOT = pathlib.Path(__file__).resolve().parents[3]
TINY = ROOT / "configs" / "recipes" / "tiny" / "scienceqa-2468.json"

# 16 rows, batches of 8 in 2 micro-batches of 4 (one per rank, so the two
# runs add the same two partial gradients and agree to the last bit: with
# several micro-batches per rank the sums are ordered differently, and AdamW
# amplifies that rounding in near-cancelling components to ~1e-4 after a few
# steps, although every step's loss and gradient norm still agree to 1e-6),
# 4 steps, a checkpoint every 2 (the barrier after a save), no dropout (its
# draws are per micro-batch in a group, per process without one), no test
# evaluation.
OVERRIDES = ["data.max_train_examples=16", "data.cutoff_len=128", "data.test=", "eval.before_training=false",
             "adapter.dropout=0", "train.epochs=2", "train.batch_size=8", "train.micro_batch_size=4",
             "train.warmup_steps=1", "train.save_every=2", "train.eval_every=0", "train.seed=3"]


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    env["PYTHONPATH"] = os.pathsep.join([str(pathlib.Path(mola.__file__).parents[1]), env.get("PYTHONPATH", "")])
    return env


def _train(out, launcher):
    sets = [a for kv in OVERRIDES + [f"output_dir={out}"] for a in ("--set", kv)]
    result = subprocess.run([sys.executable, *launcher, "mola", "train", str(TINY), *sets], capture_output=True,
                            text=True, cwd=ROOT, env=_env(), timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def _metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("cpp-distributed")
    single, ranks = base / "single", base / "ranks"
    _train(single, ["-m"])
    launched = _train(ranks, ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m"])
    return single, ranks, launched


def test_two_gloo_ranks_equal_one_process(runs):
    single, ranks, _ = runs
    one, two = _metrics(single), _metrics(ranks)
    assert [m["step"] for m in one] == [1, 2, 3, 4]
    assert [m["step"] for m in two] == [1, 2, 3, 4]  # rank 0 alone writes: no line twice
    for a, b in zip(one, two):
        for key in ("loss", "aux_loss", "grad_norm"):
            assert abs(a[key] - b[key]) <= 1e-6, (a["step"], key, a[key], b[key])
        assert a["tokens"] == b["tokens"] and a["lr"] == b["lr"]
    assert one[-1]["loss"] < one[0]["loss"]  # it trained

    w1 = load_file(str(single / "adapter" / "adapter_model.safetensors"))
    w2 = load_file(str(ranks / "adapter" / "adapter_model.safetensors"))
    assert w1.keys() == w2.keys() and len(w1) > 0
    diff = max((w1[k] - w2[k]).abs().max().item() for k in w1)
    print(f"max |adapter difference| = {diff:.3g}; per step |loss| {max(abs(a['loss'] - b['loss']) for a, b in zip(one, two)):.3g}, "
          f"|grad_norm| {max(abs(a['grad_norm'] - b['grad_norm']) for a, b in zip(one, two)):.3g}")
    assert diff <= 1e-6, diff
    assert max(w1[k].abs().max().item() for k in w1 if k.endswith("lora_b")) > 1e-3  # B left its zero init


def test_rank_0_writes_the_outputs(runs):
    single, ranks, launched = runs
    assert [p.name for p in sorted((ranks / "checkpoints").iterdir())] == ["step-2", "step-4"]
    summary = json.loads((ranks / "summary.json").read_text())
    assert summary["train"]["steps"] == 4
    assert launched.stdout.count("adapter: ") == 1  # rank 0 reports, rank 1 is silent
    # The checkpoint's optimizer state is the one-process run's too.
    o1 = load_file(str(single / "checkpoints" / "step-4" / "optimizer.safetensors"))
    o2 = load_file(str(ranks / "checkpoints" / "step-4" / "optimizer.safetensors"))
    assert o1.keys() == o2.keys()
    assert max((o1[k].double() - o2[k].double()).abs().max().item() for k in o1) <= 1e-6


def test_other_commands_refuse_torchrun(tmp_path):
    env = _env()
    env.update(WORLD_SIZE="2", RANK="0")
    result = subprocess.run([sys.executable, "-m", "mola", "eval", str(TINY)], capture_output=True, text=True,
                            cwd=ROOT, env=env, timeout=120)
    assert result.returncode == 2
    assert "only `mola train` runs under torchrun" in result.stderr


def test_the_cpp_command_without_a_group_names_python_m_mola():
    env = _env()
    env.update(WORLD_SIZE="2", RANK="0")
    code = f"import sys, mola._C as C; sys.exit(C.run_command(['train', {str(TINY)!r}]))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env,
                            timeout=120)
    assert result.returncode == 2
    assert "WORLD_SIZE is 2" in result.stderr and "torchrun --nproc_per_node=N -m mola train" in result.stderr


def test_process_group_must_be_a_group(tmp_path):
    model = mola.CausalLM.from_pretrained(str(ROOT / "data" / "models" / "stories260K"))
    model.attach(mola.MoLAConfig(experts="2,4,6,8", top_k=1, rank=2))
    with pytest.raises(TypeError, match="process_group must be a torch.distributed ProcessGroup.*got 'WORLD'"):
        mola.Trainer(model, {"epochs": 1}, str(tmp_path), process_group="WORLD")
