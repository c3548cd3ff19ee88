"""The `mola` command through `python -m mola` (the same C++ code as the mola
program, src/train/command.cpp): exit status 2 and one line naming the
problem for user errors; and a short real run of the tiny recipe: the loss
falls, and the run writes its adapter, metrics, evaluation (both methods,
with the majority baseline), expert load and a report with plots.
"""
import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
TINY = ROOT / "configs" / "recipes" / "tiny" / "scienceqa-2468.json"


def _mola(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "mola", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=600)


@pytest.mark.parametrize("args, message", [
    (["trian", "x.json"], "unknown command 'trian'; did you mean 'train'"),
    (["train"], "expected mola train RECIPE"),
    (["train", "missing.json"], "cannot open 'missing.json'"),
    (["train", TINY, "--set", "train.lrr=1"], 'unknown key "lrr"; did you mean "lr"'),
    (["train", TINY, "--sett", "x=1"], "unknown option --sett; did you mean --set"),
    (["eval", TINY, "--split"], "--split needs a value"),
    (["generate", TINY], "needs --prompt"),
    (["convert", "gguf", "a", "b"], "supported format is llama2c"),
    (["convert", "llama2c", "missing.bin", "out"], "missing.bin"),
])
def test_user_errors_exit_2_with_one_line(args, message):
    result = _mola(*args)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0], result.stderr


def test_help():
    result = _mola("--help")
    assert result.returncode == 0 and "mola train RECIPE" in result.stdout


def test_generate_from_the_bundled_model():
    result = _mola("generate", "data/models/stories260K", "--prompt", "Once upon a time", "--raw",
                   "--max-new-tokens", "20")
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.split()) >= 3  # words of a story


def test_a_short_run_learns_and_writes_its_outputs(tmp_path):
    out = tmp_path / "run"
    result = _mola("train", TINY, "--set", f"output_dir={out}", "--set", "data.max_train_examples=16",
                   "--set", "train.epochs=6", "--set", "train.batch_size=8", "--set", "train.warmup_steps=2",
                   "--set", "eval.max_examples=8", "--set", "eval.max_new_tokens=12")
    assert result.returncode == 0, result.stderr
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in metrics if "loss" in m and "eval_loss" not in m]
    assert len(steps) == 12  # 16 examples / batch 8 x 6 epochs
    first, last = steps[:2], steps[-2:]
    assert sum(m["loss"] for m in last) < sum(m["loss"] for m in first) - 0.1
    for name in ("adapter/adapter_config.json", "adapter/adapter_model.safetensors", "recipe.json",
                 "summary.json", "expert_load.json"):
        assert (out / name).exists(), name
    ev = json.loads((out / "eval.json").read_text())
    for when in ("before", "after"):
        assert ev[when]["n"] == 8
        assert 0 <= ev[when]["loglik_accuracy"] <= 100 and 0 <= ev[when]["generate_accuracy"] <= 100
        assert 0 < ev[when]["majority_accuracy"] <= 100
    load = json.loads((out / "expert_load.json").read_text())
    experts = json.loads((out / "adapter" / "adapter_config.json").read_text())["experts"]
    assert [layer["experts"] for layer in load["layers"]] == experts
    for layer in load["layers"]:
        assert abs(sum(layer["share"]) - 1.0) < 1e-9
    # The saved adapter, loaded by `mola eval`, gives the trained model's accuracies.
    again = _mola("eval", TINY, "--adapter", out / "adapter", "--set", f"output_dir={out}",
                  "--set", "eval.max_examples=8", "--set", "eval.max_new_tokens=12")
    assert again.returncode == 0, again.stderr
    reloaded = json.loads(again.stdout)
    for key in ("n", "generate_correct", "generate_failed", "loglik_correct", "majority_accuracy"):
        assert reloaded[key] == ev["after"][key], key
    report = _mola("report", out)
    assert report.returncode == 0, report.stderr
    for name in ("loss.png", "expert_load.png", "report.html", "report.json"):
        assert (out / name).stat().st_size > 0, name


def test_a_continual_sequence_reports_op_and_pd(tmp_path):
    out = tmp_path / "continual"
    recipe = ROOT / "configs" / "recipes" / "tiny" / "scienceqa-continual-2468.json"
    result = _mola("train", recipe, "--set", f"output_dir={out}", "--set", "train.epochs=1",
                   "--set", "train.batch_size=8", "--set", "train.warmup_steps=1", "--set", "data.max_train_examples=8",
                   "--set", 'eval.methods=["loglik"]', "--set", "eval.max_examples=4")
    assert result.returncode == 0, result.stderr
    report = json.loads((out / "continual.json").read_text())
    domains = report["domains"]
    assert len(domains) == 3 and len(report["stages"]) == 3
    r = report["loglik"]["accuracy"]
    assert len(r) == 3 and all(len(row) == 3 and all(0 <= a <= 100 for a in row) for row in r)
    assert report["loglik"]["OP"] == pytest.approx(sum(r[2]) / 3)
    pd = 2 / 6 * sum(r[k][i] - r[k - 1][i] for k in (1, 2) for i in range(k))
    assert report["loglik"]["PD"] == pytest.approx(pd)
    for t, domain in enumerate(domains, 1):
        assert (out / f"stage-{t}-{domain.replace(' ', '-')}" / "metrics.jsonl").exists()
    assert "continual (loglik): OP" in result.stdout
