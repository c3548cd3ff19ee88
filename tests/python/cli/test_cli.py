"""The `mola` command through `python -m mola` (the same C++ code as the mola
program, src/cli/command.cpp): exit status 2 and one line naming the
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

ROOT = pathlib.Path(__file__).resolve().parents[3]
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
    (["convert", "gguf", "a", "b"], "supported formats are llama2c"),
    (["convert", "llama2c", "missing.bin", "out"], "missing.bin"),
])
def test_user_errors_exit_2_with_one_line(args, message):
    result = _mola(*args)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0], result.stderr


def test_help():
    result = _mola("--help")
    assert result.returncode == 0 and "train" in result.stdout and "mola COMMAND --help" in result.stdout


def test_generate_from_the_bundled_model():
    result = _mola("generate", "data/models/stories260K", "--prompt", "Once upon a time", "--raw",
                   "--max-new-tokens", "20")
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.split()) >= 3  # words of a story


def test_a_run_over_an_nf4_base_learns(tmp_path):
    out = tmp_path / "nf4"
    result = _mola("train", TINY, "--set", f"output_dir={out}", "--set", "model.quantize=nf4",
                   "--set", "data.max_train_examples=16", "--set", "train.epochs=4", "--set", "train.batch_size=8",
                   "--set", "train.warmup_steps=2", "--set", "eval.max_examples=4", "--set", "eval.max_new_tokens=4")
    assert result.returncode == 0, result.stderr
    steps = [m for m in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
             if "loss" in m and "eval_loss" not in m]
    assert len(steps) == 8 and steps[-1]["loss"] < steps[0]["loss"] - 0.1, steps
    assert json.loads((out / "recipe.json").read_text())["model"]["quantize"] == "nf4"
    assert (out / "adapter" / "adapter_model.safetensors").exists()


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


# ---------------------------------------------------------------- as a user would

def _verbs():
    from mola import _C
    lines = _C.command_help().split("commands:\n")[1].split("\n\n")[0].splitlines()
    return [line.strip().split("  ")[0] for line in lines]


def test_every_verb_answers_help_with_its_options_and_an_example():
    verbs = _verbs()
    assert {"train", "eval", "generate", "convert", "convert mola-authors", "report", "analyze"} <= set(verbs)
    for verb in verbs:
        result = _mola(*verb.split(), "--help")
        assert result.returncode == 0, (verb, result.stderr)
        assert result.stdout.startswith("usage: ") and verb in result.stdout.splitlines()[0]
        assert "\nexample:\n  " in result.stdout, verb
    assert "--tokenizer FILE" in _mola("generate", "--help").stdout
    assert "overwrite_output_dir" in _mola("train", "-h").stdout


def test_version_names_mola_torch_and_the_cuda_kernels():
    import torch
    result = _mola("--version")
    assert result.returncode == 0
    lines = result.stdout.splitlines()
    assert lines[0].startswith("mola 0.") and lines[1].startswith(f"torch {torch.__version__.split('+')[0]}")
    assert lines[2].startswith("CUDA kernels: ")


def _small_run(out, *extra):
    return _mola("train", TINY, "--set", f"output_dir={out}", "--set", "data.max_train_examples=8",
                 "--set", "train.max_steps=2", "--set", "train.batch_size=4", "--set", "train.micro_batch_size=4",
                 "--set", "train.save_every=1", "--set", "eval.before_training=false",
                 "--set", "eval.max_examples=4", "--set", "eval.max_new_tokens=4", *extra)


def test_a_second_run_into_one_folder_is_refused_resumed_or_overwritten(tmp_path):
    out = tmp_path / "run"
    first = _small_run(out)
    assert first.returncode == 0, first.stderr
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2

    again = _small_run(out)  # the same command twice
    assert again.returncode == 2
    err = [line for line in again.stderr.splitlines() if line.strip()]
    assert len(err) == 1 and "holds a run already" in err[0]
    assert "--set train.resume=true" in err[0] and "--set train.overwrite_output_dir=true" in err[0]
    assert (out / "metrics.jsonl").read_text().splitlines() == lines  # untouched

    resumed = _small_run(out, "--set", "train.resume=true")
    assert resumed.returncode == 0, resumed.stderr
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2  # nothing appended: the run was complete

    (out / "notes.txt").write_text("mine")
    replaced = _small_run(out, "--set", "train.overwrite_output_dir=true", "--set", "train.max_steps=1")
    assert replaced.returncode == 0, replaced.stderr
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1  # one run's lines, the new one's
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-1"]
    assert (out / "notes.txt").read_text() == "mine"  # not mola's: left alone


def test_counts_are_honest_and_the_expert_load_pass_has_a_limit(tmp_path):
    out = tmp_path / "run"
    result = _small_run(out, "--set", "eval.expert_load_examples=3")
    assert result.returncode == 0, result.stderr
    assert "evaluating 4 of 200 test rows (eval.max_examples 4)" in result.stderr
    assert "expert load on 3 training rows (eval.expert_load_examples 3)" in result.stderr
    assert json.loads((out / "expert_load.json").read_text())["examples"] == 3


def test_generate_takes_a_tokenizer(tmp_path):
    model = tmp_path / "model"
    import shutil
    shutil.copytree(ROOT / "data" / "models" / "stories260K", model)
    (model / "tokenizer.model").rename(tmp_path / "tok.model")
    missing = _mola("generate", model, "--prompt", "Once", "--raw", "--max-new-tokens", "4")
    assert missing.returncode == 2 and "--tokenizer FILE" in missing.stderr and "'tokenizer'" in missing.stderr
    given = _mola("generate", model, "--prompt", "Once", "--raw", "--max-new-tokens", "4",
                  "--tokenizer", tmp_path / "tok.model")
    assert given.returncode == 0, given.stderr


def test_python_m_mola_is_argparse_over_the_verb_table():
    """python -m mola builds one argparse subcommand per verb of the command's
    table (the C++ program's), each Python verb with its handler."""
    from mola import _C
    from mola.__main__ import PYTHON_VERBS, build_parser
    verbs = _C.command_verbs()
    parser = build_parser(verbs)
    subparsers = parser.get_default("verb_parsers")
    assert list(subparsers) == [v["name"] for v in verbs]
    assert {v["name"] for v in verbs if v["python_only"]} == set(PYTHON_VERBS)
    ns = parser.parse_args(["convert mola-authors", "in_dir", "out_dir", "--top-k", "2,1"])
    assert (ns.src, ns.out, ns.top_k) == ("in_dir", "out_dir", "2,1")
    assert _C.command_verb_of(["convert", "mola-authors", "a", "b"]) == "convert mola-authors"
    assert _C.command_verb_of(["convert", "llama2c", "a", "b"]) == "convert"
    assert _C.command_verb_of(["trian"]) is None
    # A verb the table names but Python cannot run is caught when the parser is built.
    with pytest.raises(RuntimeError, match="'export' has no Python handler"):
        build_parser(verbs + [{**verbs[0], "name": "export", "python_only": True}])
