"""The bad-input matrix (docs/design.md, Reliability): one table of broken inputs, each fed
to one entry point, the `mola` command (`python -m mola`, the same C++ code as
the mola program), the Python API or the C++ API (its classes through the
bindings), and the error each must give:

- it names the value, the rule and the fix: every case lists substrings for
  the three that must all appear in the message;
- the command: exit status 2 and exactly one line on stderr, no traceback,
  no "terminate called", no C++ backtrace; Python: the case's exception type;
- nothing half-written: no output directory for a run that never started, no
  temporary files anywhere under the test's directory.

The inputs are made from the bundled tiny model (data/models/stories260K) and
ScienceQA rows in a per-test temporary directory.
"""
from __future__ import annotations

import json
import os
import pathlib
import shutil
import struct
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Type

import pytest
import torch

import mola

ROOT = pathlib.Path(__file__).resolve().parents[3]
MODEL = ROOT / "data" / "models" / "stories260K"
TRAIN = ROOT / "data" / "tasks" / "scienceqa" / "train.jsonl"
CRASH_MARKERS = ("Traceback", "terminate called", "Exception raised from", "frame #", "Aborted", "core dumped")


# ---------------------------------------------------------------- builders

def model_dir(tmp: pathlib.Path) -> pathlib.Path:
    """A copy of the tiny model the case may break."""
    d = tmp / "model"
    if not d.exists():
        shutil.copytree(MODEL, d)
    return d


def st_bytes(header: dict, data: bytes = b"") -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data


def broken_weights(tmp, edit: Callable[[bytes], bytes]) -> pathlib.Path:
    d = model_dir(tmp)
    f = d / "model.safetensors"
    f.write_bytes(edit(f.read_bytes()))
    return d


def header_of(raw: bytes) -> dict:
    n = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8:8 + n])


def with_header(raw: bytes, header: dict) -> bytes:
    n = struct.unpack("<Q", raw[:8])[0]
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * max(0, n - len(text))  # same length: the data stays where it was
    assert len(text) == n
    return raw[:8] + text + raw[8 + n:]


def edit_entry(name: str, **changes) -> Callable[[bytes], bytes]:
    def edit(raw: bytes) -> bytes:
        h = header_of(raw)
        h[name].update(changes)
        return with_header(raw, h)
    return edit


def drop_entry(name: str) -> Callable[[bytes], bytes]:
    def edit(raw: bytes) -> bytes:
        h = header_of(raw)
        del h[name]
        return with_header(raw, h)
    return edit


def broken_config(tmp, edit: Callable[[dict], Optional[str]]) -> pathlib.Path:
    d = model_dir(tmp)
    cfg = json.loads((d / "config.json").read_text())
    text = edit(cfg)
    (d / "config.json").write_text(text if text is not None else json.dumps(cfg))
    return d


def adapter_dir(tmp) -> pathlib.Path:
    """A real adapter for the tiny model (2468 over its 5 layers)."""
    d = tmp / "adapter"
    if not d.exists():
        m = mola.CausalLM.from_pretrained(str(MODEL))
        m.attach(mola.MoLAConfig(experts="2468", top_k=2, rank=4, targets=("q_proj", "v_proj")))
        mola.save_adapter(m, str(d))
    return d


def broken_adapter(tmp, edit_config=None, edit_tensors=None) -> pathlib.Path:
    d = adapter_dir(tmp)
    if edit_config:
        cfg = json.loads((d / "adapter_config.json").read_text())
        edit_config(cfg)
        (d / "adapter_config.json").write_text(json.dumps(cfg))
    if edit_tensors:
        from safetensors.torch import load_file, save_file
        tensors = load_file(str(d / "adapter_model.safetensors"))
        edit_tensors(tensors)
        save_file(tensors, str(d / "adapter_model.safetensors"))
    return d


def recipe(tmp, edit: Callable[[dict], None] = lambda r: None) -> pathlib.Path:
    """A small valid recipe for the tiny model (absolute paths, outputs in
    tmp/out), then `edit`."""
    r = json.loads((ROOT / "configs/recipes/tiny/scienceqa-2468.json").read_text())
    r["model"]["path"] = str(MODEL)
    r["data"] = {"train": str(TRAIN), "task": "scienceqa", "template": str(ROOT / "data/templates/alpaca.json"),
                 "cutoff_len": 256, "max_train_examples": 4}
    r["train"].update(epochs=1, batch_size=4, micro_batch_size=4, save_every=0, eval_every=0)
    r["eval"] = {"max_new_tokens": 4}
    r["output_dir"] = str(tmp / "out")
    edit(r)
    p = tmp / "recipe.json"
    p.write_text(json.dumps(r))
    return p


def jsonl(tmp, name: str, text: str) -> pathlib.Path:
    p = tmp / name
    p.write_text(text)
    return p


def set_data(key, value):
    def edit(r):
        r["data"][key] = value
    return edit


# ---------------------------------------------------------------- the table

@dataclass
class Case:
    id: str
    entry: str  # "cmd": args for python -m mola; "py" / "cpp": a call that must raise
    make: Callable[[pathlib.Path], object]  # tmp -> args (cmd) or a zero-argument callable
    error: Optional[Type[BaseException]]  # the Python exception (None for cmd)
    must: List[str] = field(default_factory=list)  # the value, the rule, the fix


def gen(d) -> list:
    return ["generate", d, "--prompt", "Once", "--raw", "--max-new-tokens", "2"]


def train_cmd(tmp, edit=lambda r: None, *extra) -> list:
    return ["train", recipe(tmp, edit), *extra]


CASES = [
    # ---- safetensors: truncated, oversized header, inconsistent
    Case("st-truncated", "cmd",
         lambda t: gen(broken_weights(t, lambda raw: raw[:len(raw) // 2])),
         None, ["past the end of the data buffer", "truncated", "re-download"]),
    Case("st-header-over-limit", "cpp",
         lambda t: (lambda d=broken_weights(t, lambda raw: struct.pack("<Q", 1 << 40) + raw[8:]):
                    mola.CausalLM.from_pretrained(str(d))),
         ValueError, ["header length 1099511627776", "over the 100 MB limit", "not a safetensors file"]),
    Case("st-header-past-end", "cmd",
         lambda t: gen(broken_weights(t, lambda raw: struct.pack("<Q", len(raw)) + raw[8:])),
         None, ["header length", "larger than the file's remaining", "re-download"]),
    Case("st-header-not-json", "cpp",
         lambda t: (lambda d=broken_weights(t, lambda raw: raw[:8] + b"[" + raw[9:]):
                    mola.CausalLM.from_pretrained(str(d))),
         ValueError, ["not valid JSON", "at byte", "re-download or re-save"]),
    Case("st-overlapping-offsets", "cpp",
         lambda t: (lambda d=broken_weights(t, edit_entry("model.norm.weight", data_offsets=[0, 256])):
                    mola.CausalLM.from_pretrained(str(d))),
         ValueError, ["'model.norm.weight' [0, 256)", "overlap", "re-download or re-save"]),
    Case("st-unknown-dtype", "cmd",
         lambda t: gen(broken_weights(t, edit_entry("model.norm.weight", dtype="Q4"))),
         None, ["unsupported dtype 'Q4'", "mola reads F64, F32", "convert the tensor"]),
    Case("st-size-vs-shape", "cpp",
         lambda t: (lambda d=broken_weights(t, edit_entry("model.norm.weight", shape=[65])):
                    mola.CausalLM.from_pretrained(str(d))),
         ValueError, ["'model.norm.weight'", "needs 65 x 4 bytes", "re-download or re-save"]),
    Case("st-missing-tensor", "cmd",
         lambda t: gen(broken_weights(t, drop_entry("model.layers.2.mlp.up_proj.weight"))),
         None, ['lacks 1 tensor(s)', '"model.layers.2.mlp.up_proj.weight"', "incomplete or was saved for another model"]),
    # ---- config.json: missing, wrong-typed, contradictory fields
    Case("config-missing-field", "cmd",
         lambda t: gen(broken_config(t, lambda c: c.pop("hidden_size") and None)),
         None, ["hidden_size", "missing", "config.json"]),
    Case("config-wrong-type", "cpp",
         lambda t: (lambda d=broken_config(t, lambda c: c.update(num_hidden_layers="5")):
                    mola.CausalLM.from_pretrained(str(d))),
         ValueError, ["num_hidden_layers", '"5"', "integer"]),
    Case("config-heads-do-not-divide", "cpp",
         lambda t: (lambda d=broken_config(t, lambda c: c.update(num_attention_heads=6)):
                    mola.CausalLM.from_pretrained(str(d))),
         ValueError, ["num_attention_heads", "6", "hidden_size"]),
    Case("config-kv-heads-contradict", "cmd",
         lambda t: gen(broken_config(t, lambda c: c.update(num_key_value_heads=3))),
         None, ["num_key_value_heads", "3", "num_attention_heads"]),
    Case("config-not-json", "cmd",
         lambda t: gen(broken_config(t, lambda c: '{"model_type": "llama",')),
         None, ["config.json", "not valid JSON", "line"]),
    Case("config-weights-other-shape", "cpp",
         lambda t: (lambda d=broken_config(t, lambda c: c.update(intermediate_size=160)):
                    mola.CausalLM.from_pretrained(str(d))),
         ValueError, ["mlp", "[172, 64]", "160"]),
    # ---- adapters that do not fit the model
    Case("adapter-layer-count", "cpp",
         lambda t: (lambda d=broken_adapter(t, edit_config=lambda c: c.update(
             num_layers=8, experts=[2] * 8, top_k=[2] * 8, rank=[4] * 8, scaling=[c["alpha"] / 4] * 8)):
                    mola.load_adapter(mola.CausalLM.from_pretrained(str(MODEL)), str(d))),
         ValueError, ["adapter_config.json", "for 8 layers but the model has 5", "another base model"]),
    Case("adapter-unknown-target", "cpp",
         lambda t: (lambda d=broken_adapter(t, edit_config=lambda c: c.update(targets=["q_proj", "qkv_proj"])):
                    mola.load_adapter(mola.CausalLM.from_pretrained(str(MODEL)), str(d))),
         ValueError, ['"qkv_proj" is not a projection', "q_proj, k_proj", "load it into that one"]),
    Case("adapter-tensor-shape", "py",
         lambda t: (lambda d=broken_adapter(t, edit_tensors=lambda ts: ts.update(
             {"model.layers.0.self_attn.q_proj.mola.lora_a": torch.zeros(2, 4, 32)})):
                    mola.load_adapter(mola.CausalLM.from_pretrained(str(MODEL)), str(d))),
         ValueError, ['"model.layers.0.self_attn.q_proj.mola.lora_a" has shape [2, 4, 32]', "need [2, 4, 64]",
                      "do not belong together"]),
    Case("adapter-for-another-model", "cmd",
         lambda t: ["eval", recipe(t), "--adapter", broken_adapter(t, edit_config=lambda c: c.update(
             num_layers=8, experts=[2] * 8, top_k=[2] * 8, rank=[4] * 8, scaling=[c["alpha"] / 4] * 8))],
         None, ["adapter_config.json", "for 8 layers but the model has 5", "another base model"]),
    # ---- presets and top-k that make no sense
    Case("preset-three-digits", "cmd",
         lambda t: train_cmd(t, lambda r: None, "--set", "adapter.experts=246"),
         None, ['"246"', "exactly 4", "10-2-2-2"]),
    Case("preset-unknown-name", "py",
         lambda t: (lambda: mola.MoLAConfig(experts="triangel")),
         ValueError, ['"triangel"', "unknown preset", "triangle"]),
    Case("top-k-over-experts", "cmd",
         lambda t: train_cmd(t, lambda r: r["adapter"].update(experts=2, top_k=4)),
         None, ["top_k", "4", "experts"]),
    Case("top-k-over-preset-layer", "cmd",
         lambda t: train_cmd(t, lambda r: r["adapter"].update(experts="2468", top_k=3)),
         None, ["top_k", "3", "layer"]),
    Case("zero-experts", "py",
         lambda t: (lambda: mola.MoLAConfig(experts=0)),
         ValueError, ["experts", "0", ">= 1"]),
    Case("per-layer-list-length", "py",
         lambda t: (lambda: mola.MoLAConfig(experts=[2, 4, 6]).resolve(5)),
         ValueError, ["a list of 3 entries", "fits neither 4 groups nor the model's 5 layers",
                      "give 4 group counts or one count per layer"]),
    # ---- data: empty, malformed, over-long, missing
    Case("data-empty", "cmd",
         lambda t: train_cmd(t, set_data("train", str(jsonl(t, "empty.jsonl", "")))),
         None, ["empty.jsonl", "no rows", "JSON"]),
    Case("data-malformed-line", "cmd",
         lambda t: train_cmd(t, set_data("train", str(jsonl(t, "bad.jsonl", TRAIN.read_text().splitlines()[0]
                                                             + "\n{\"question\": \"Which\n")))),
         None, ["bad.jsonl:2", "malformed JSON", "must be one complete JSON object"]),
    Case("data-row-missing-field", "py",
         lambda t: (lambda p=jsonl(t, "rows.jsonl", json.dumps(
             {k: v for k, v in json.loads(TRAIN.read_text().splitlines()[0]).items() if k != "answer"}) + "\n"):
                    mola.data.load_rows(str(p), "scienceqa")),
         ValueError, ["rows.jsonl:1", '"answer"', "schema"]),
    Case("data-missing-file", "cmd",
         lambda t: train_cmd(t, set_data("train", str(t / "nothere.jsonl"))),
         None, ["nothere.jsonl' not found", "a JSON Lines file", "relative to the working directory"]),
    Case("prompt-over-long", "cmd",
         lambda t: ["generate", str(MODEL), "--prompt", "Once upon a time " * 200, "--raw", "--max-new-tokens", "4"],
         None, ["--max-new-tokens 4", "max_position_embeddings (512)", "shorten the prompt"]),
    Case("cutoff-len-over-positions", "cmd",
         lambda t: train_cmd(t, set_data("cutoff_len", 4096)),
         None, ["'data.cutoff_len' 4096", "512 positions", "at most 512"]),
    Case("integer-field-given-a-float", "py",
         lambda t: (lambda p=recipe(t, set_data("cutoff_len", 1e30)): mola.recipes.load_recipe(str(p))),
         ValueError, ["'data.cutoff_len'", "whole number", "1e+30"]),
    Case("cutoff-len-too-small", "py",
         lambda t: (lambda p=recipe(t, set_data("cutoff_len", 1)): mola.recipes.load_recipe(str(p))),
         ValueError, ["cutoff_len", "1", ">= 2"]),
    # ---- tokenizer
    Case("tokenizer-missing", "cmd",
         lambda t: train_cmd(t, lambda r: r.update(tokenizer=str(t / "missing.model"))),
         None, ["missing.model'", "no SentencePiece model", "give the path of a tokenizer.model"]),
    Case("tokenizer-not-sentencepiece", "py",
         lambda t: (lambda p=jsonl(t, "tok.model", "not a model"): mola.data.Tokenizer.from_file(str(p))),
         ValueError, ["tok.model", "SentencePiece", "tokenizer.model"]),
    # ---- unwritable output directory (root ignores modes: a path under a file)
    Case("output-dir-under-a-file", "cmd",
         lambda t: train_cmd(t, lambda r: r.update(output_dir=str(jsonl(t, "afile", "x")) + "/run")),
         None, ["afile/run", "is a file, not a directory", "choose another output_dir"]),
    Case("output-dir-under-a-file-python", "py",
         lambda t: (lambda p=recipe(t, lambda r: r.update(output_dir=str(jsonl(t, "afile", "x")) + "/run")):
                    mola.recipes.train(str(p))),
         ValueError, ["afile/run", "is a file, not a directory", "choose another output_dir"]),
    # ---- recipes
    Case("recipe-unknown-key", "cmd",
         lambda t: train_cmd(t, lambda r: r.update(epochs=3)),
         None, ["'epochs'", "unknown key", "did you mean"]),
    Case("recipe-unknown-train-key", "py",
         lambda t: (lambda p=recipe(t, lambda r: r["train"].update(learning_rate=1e-4)): mola.recipes.load_recipe(str(p))),
         ValueError, ['"learning_rate"', "unknown key", "valid keys: epochs, max_steps, batch_size, micro_batch_size, lr,"]),
    Case("recipe-wrong-type", "cmd",
         lambda t: train_cmd(t, lambda r: None, "--set", "train.epochs=three"),
         None, ["epochs", '"three"', "integer"]),
    Case("recipe-not-json", "py",
         lambda t: (lambda p=jsonl(t, "r.json", '{"model": {"path": "x"},\n  "train": }'): mola.recipes.load_recipe(str(p))),
         ValueError, ["r.json", "not valid JSON", "line 2"]),
    Case("recipe-two-models", "cmd",
         lambda t: train_cmd(t, lambda r: r["model"].update(config=str(ROOT / "configs/models/tiny.json"))),
         None, ["model.path", "model.config", "exactly one"]),
    Case("recipe-micro-batch", "py",
         lambda t: (lambda p=recipe(t, lambda r: r["train"].update(batch_size=8, micro_batch_size=3)):
                    mola.recipes.load_recipe(str(p))),
         ValueError, ["micro_batch_size", "3", "divide"]),
    Case("recipe-negative-lr", "cmd",
         lambda t: train_cmd(t, lambda r: None, "--set", "train.lr=-0.1"),
         None, ["lr is -0.1", "finite number >= 0", "3e-4"]),
    Case("recipe-unknown-eval-method", "py",
         lambda t: (lambda p=recipe(t, lambda r: r["eval"].update(methods=["generate", "logprob"])):
                    mola.recipes.load_recipe(str(p))),
         ValueError, ['"logprob"', "unknown", "loglik"]),
    Case("set-unknown-section", "cmd",
         lambda t: train_cmd(t, lambda r: None, "--set", "trian.lr=1"),
         None, ["'trian'", "unknown section", "'train'"]),
    Case("set-python-false", "cmd",
         lambda t: train_cmd(t, lambda r: None, "--set", "train.group_by_length=False"),
         None, ["'False'", "not a JSON value", "write false"]),
    Case("recipe-is-a-directory", "cmd",
         lambda t: (lambda d=t / "recipes": (d.mkdir(), (d / "a.json").write_text("{}"), ["train", d])[-1])(),
         None, ["/recipes' is a directory", "one recipe JSON file in it: a.json"]),
    Case("task-typo", "py",
         lambda t: (lambda p=recipe(t, set_data("task", "sciqa")): mola.recipes.load_recipe(str(p))),
         ValueError, ["'sciqa'", "unknown 'data.task'", "did you mean 'scienceqa'"]),
    # ---- the machine: a GPU recipe where there is none
    Case("device-cuda-without-gpu", "cmd",
         lambda t: train_cmd(t, lambda r: None, "--set", "model.device=cuda"),
         None, ["device 'cuda'", "no usable CUDA GPU", "--set model.device=cpu"]),
    Case("from-pretrained-cuda-without-gpu", "cpp",
         lambda t: (lambda: mola.CausalLM.from_pretrained(str(MODEL), device="cuda")),
         ValueError, ["device 'cuda'", "no usable CUDA GPU", 'device="cpu"']),
    # ---- a tokenizer of another model: refused before anything is written
    Case("tokenizer-other-vocabulary", "cmd",
         lambda t: train_cmd(t, lambda r: r.update(tokenizer=str(ROOT / "data/tokenizers/llama2/tokenizer.model"))),
         None, ["32000 pieces", "vocabulary has 512", "--set tokenizer=PATH"]),
    Case("generate-tokenizer-missing", "cmd",
         lambda t: ["generate", str(MODEL), "--prompt", "Once", "--raw", "--tokenizer", str(t / "none.model")],
         None, ["none.model", "no tokenizer", "--tokenizer FILE, or set the recipe key 'tokenizer'"]),
]


def _leftovers(tmp: pathlib.Path) -> List[str]:
    """Temporary or partial files anywhere under tmp."""
    bad = []
    for p in tmp.rglob("*"):
        if ".tmp" in p.name or p.name.endswith(".part"):
            bad.append(str(p.relative_to(tmp)))
    return bad


def test_the_matrix_is_large_and_covers_every_entry_point():
    assert len(CASES) >= 30 and len({c.id for c in CASES}) == len(CASES)
    assert {c.entry for c in CASES} == {"cmd", "py", "cpp"}


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, tmp_path: pathlib.Path):
    if case.id.endswith("cuda-without-gpu") and torch.cuda.is_available():
        pytest.skip("a GPU is present: asking for cuda is no error here")
    made = case.make(tmp_path)
    if case.entry == "cmd":
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
        result = subprocess.run([sys.executable, "-m", "mola", *map(str, made)], capture_output=True, text=True,
                                cwd=tmp_path, timeout=300, env=env)
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert result.returncode == 2, result.stderr[-3000:]
        assert len(lines) == 1, result.stderr[-3000:]
        message = lines[0]
        assert message.startswith("mola: error: "), message
    else:
        with pytest.raises(case.error) as info:
            made()
        message = str(info.value)
        assert "\n" not in message.strip(), message
    for marker in CRASH_MARKERS:
        assert marker not in message, message
    for part in case.must:
        assert part in message, f"{part!r} missing from: {message}"
    assert not (tmp_path / "out").exists(), "a run that failed on its inputs created its output directory"
    assert not (tmp_path / "afile" ).is_dir()
    assert _leftovers(tmp_path) == []
