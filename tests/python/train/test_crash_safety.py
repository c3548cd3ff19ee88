"""Crash safety (docs/design.md, Reliability): a training run killed with SIGKILL in the
middle of a step, resumed, killed again in the middle of a checkpoint write,
resumed again, ends with the same loss curve as a run that was never
interrupted (CPU, to 1e-6) and the same adapter; after every kill each
checkpoint on disk is complete (all five files present and loadable).

The kills come from the trainer's testing hook MOLA_FAULT_INJECT
(src/train/checkpoint.h): "kill:step:step=N" sends SIGKILL after the first
micro-batch's backward of step N, "kill:checkpoint-write:step=N" halfway
through writing checkpoint N.
"""
import json
import os
import pathlib
import signal
import subprocess
import sys

import pytest
from safetensors.torch import load_file

import mola

ROOT = pathlib.Path(__file__).resolve().parents[3]
CHECKPOINT_FILES = {"adapter_config.json", "adapter_model.safetensors", "optimizer.safetensors",
                    "rng_state.safetensors", "trainer_state.json"}


def _recipe(tmp: pathlib.Path) -> pathlib.Path:
    r = json.loads((ROOT / "configs/recipes/tiny/scienceqa-2468.json").read_text())
    r["model"]["path"] = str(ROOT / "data/models/stories260K")
    r["data"] = {"train": str(ROOT / "data/tasks/scienceqa/train.jsonl"), "task": "scienceqa",
                 "template": str(ROOT / "data/templates/alpaca.json"), "cutoff_len": 256, "max_train_examples": 16}
    # 8 steps of 2 micro-batches; a checkpoint every 2 steps; dropout on, so
    # the restored random state matters.
    r["train"].update(epochs=2, batch_size=4, micro_batch_size=2, warmup_steps=2, save_every=2, eval_every=0,
                      save_total_limit=0)
    r["eval"] = {}
    p = tmp / "recipe.json"
    p.write_text(json.dumps(r))
    return p


def _train(recipe: pathlib.Path, out: pathlib.Path, fault: str = "", resume: bool = False):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path), OMP_NUM_THREADS="1")
    env.pop("MOLA_FAULT_INJECT", None)
    if fault:
        env["MOLA_FAULT_INJECT"] = fault
    args = [sys.executable, "-m", "mola", "train", str(recipe), "--set", f"output_dir={out}"]
    if resume:
        args += ["--set", "train.resume=true"]
    return subprocess.run(args, capture_output=True, text=True, env=env, timeout=300)


def _losses(out: pathlib.Path):
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [(m["step"], m["loss"], m["aux_loss"], m["grad_norm"]) for m in lines if "loss" in m]


def _assert_checkpoints_complete(out: pathlib.Path, expected_steps):
    """Every step-<N> directory is complete and loadable; only a temporary
    (step-<N>.tmp-<pid>) may be unfinished, and it is no checkpoint."""
    root = out / "checkpoints"
    steps = []
    for d in sorted(root.iterdir()):
        if ".tmp-" in d.name:
            continue
        assert d.name.startswith("step-") and d.is_dir(), d
        assert {f.name for f in d.iterdir()} == CHECKPOINT_FILES, (d, sorted(f.name for f in d.iterdir()))
        for f in d.glob("*.safetensors"):
            assert load_file(str(f)), f
        state = json.loads((d / "trainer_state.json").read_text())
        assert state["step"] == int(d.name[5:])
        json.loads((d / "adapter_config.json").read_text())
        steps.append(state["step"])
    assert sorted(steps) == expected_steps
    assert [s for s, _ in mola._C.list_checkpoints(str(out))] == expected_steps


def test_killed_during_a_step_and_a_checkpoint_write_resumes_to_the_same_run(tmp_path):
    recipe = _recipe(tmp_path)
    ref = tmp_path / "uninterrupted"
    done = _train(recipe, ref)
    assert done.returncode == 0, done.stderr[-3000:]
    reference = _losses(ref)
    assert [s for s, *_ in reference] == list(range(1, 9))

    out = tmp_path / "crashed"
    killed = _train(recipe, out, fault="kill:step:step=3")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    _assert_checkpoints_complete(out, [2])
    assert [s for s, *_ in _losses(out)] == [1, 2]  # step 3 never finished

    killed = _train(recipe, out, fault="kill:checkpoint-write:step=6", resume=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert "resuming from" in killed.stderr
    _assert_checkpoints_complete(out, [2, 4])
    partial = [d.name for d in (out / "checkpoints").iterdir() if ".tmp-" in d.name]
    assert len(partial) == 1 and partial[0].startswith("step-6.tmp-"), partial  # the write that was cut short
    assert [s for s, *_ in _losses(out)] == list(range(1, 7))  # steps 5, 6 logged before the kill

    resumed = _train(recipe, out, resume=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _assert_checkpoints_complete(out, [2, 4, 6, 8])
    assert not [d.name for d in (out / "checkpoints").iterdir() if ".tmp-" in d.name or ".old-" in d.name]

    # The metrics read as one run (each step once) and equal the uninterrupted run's.
    curve = _losses(out)
    assert [s for s, *_ in curve] == list(range(1, 9))
    for (step, *got), (_, *want) in zip(curve, reference):
        assert got == pytest.approx(want, rel=1e-6, abs=1e-6), step
    a = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(ref / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert (a[k] - b[k]).abs().max().item() <= 1e-6, k
