"""Data parallelism (docs/distributed.md): examples/python/train_distributed.py under
torchrun with two Gloo processes on the CPU, against one process on the same
global batch.

Two ranks with one micro-batch each must take exactly the step one process takes
with gradient accumulation over the same two micro-batches: the same loss and,
after the all-reduce (DDP), the reduce-scatter (FSDP2) or the script's own
all-reduce (the C++ model), the same adapter gradients, at each of two steps
(the second after an AdamW step, when lora_b is no longer zero). fp64 and
dropout 0.05: the per-micro-batch seeds give both sides the same masks. The
adapters rank 0 saves (FSDP2: from the gathered full state dict) must equal the
single process's.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import mola

pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")
if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
    pytest.skip("torch was built without torch.distributed / Gloo", allow_module_level=True)

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from distributed_runs import load_example  # noqa: E402

STEPS = 2
COMMON = ["--steps", str(STEPS), "--batch-size", "4", "--cutoff", "40", "--dtype", "float64",
          "--dropout", "0.05", "--experts", "2,4,6,8", "--rank", "4", "--lr", "1e-2"]
TOL = 1e-6


def _records(directory, rank, step):
    return safetensors_torch.load_file(os.path.join(directory, f"rank{rank}-step{step}.safetensors"))


def _adapter(directory):
    return safetensors_torch.load_file(os.path.join(directory, "adapter", "adapter_model.safetensors"))


def _max_diff(a, b):
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Records of the three two-process runs and of the two single-process references."""
    base = tmp_path_factory.mktemp("distributed")
    plan = {name: COMMON + extra + ["--record", str(base / name), "--output", str(base / name)]
            for name, extra in [("ddp", ["--model", "hf", "--strategy", "ddp"]),
                                ("fsdp2", ["--model", "hf", "--strategy", "fsdp2"]),
                                ("cpp", ["--model", "cpp"])]}
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or "torchrun"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    # Its own session, so that a hang is ended with every rank, not just torchrun.
    proc = subprocess.Popen([torchrun, "--standalone", "--nproc_per_node=2",
                             str(ROOT / "tests/python/train/distributed_runs.py"), json.dumps(list(plan.values()))],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail("torchrun did not finish in 180 s:\n" + stdout[-2000:] + stderr[-4000:])
    assert proc.returncode == 0, stdout[-3000:] + stderr[-6000:]
    example = load_example()
    for name, model in [("ref-hf", "hf"), ("ref-cpp", "cpp")]:  # one process, 2 micro-batches
        example.main(COMMON + ["--model", model, "--micro-batches", "2", "--record", str(base / name),
                               "--output", str(base / name)])
    return base, stdout


@pytest.mark.parametrize("name, reference", [("ddp", "ref-hf"), ("fsdp2", "ref-hf"), ("cpp", "ref-cpp")])
def test_two_ranks_equal_one_process_on_the_global_batch(runs, name, reference):
    base, _ = runs
    for step in range(1, STEPS + 1):
        want = _records(base / reference, 0, step)
        assert want["loss"][0] > 0 and want["loss"][2] > 0  # [loss, lm, aux]: the aux loss is in it
        grads = [k for k in want if k.startswith("grad.")]
        assert grads and any(want[k].abs().max() > 0 for k in grads if k.endswith("lora_b"))
        for rank in (0, 1):
            got = _records(base / name, rank, step)
            loss_diff = (got["loss"] - want["loss"]).abs().max().item()
            grad_diff = _max_diff({k: got[k] for k in grads}, {k: want[k] for k in grads})
            print(f"{name} rank {rank} step {step}: max |loss diff| {loss_diff:.3g}, "
                  f"max |grad diff| {grad_diff:.3g}")
            assert got.keys() == want.keys()
            assert loss_diff <= TOL and grad_diff <= TOL, (name, rank, step, loss_diff, grad_diff)
    # the adapter rank 0 saved after the last step is the single process's
    assert _max_diff(_adapter(base / name), _adapter(base / reference)) <= TOL


def test_saved_adapters_load_and_the_models_agree(runs):
    """The FSDP2 adapter (gathered full state dict) loads into a fresh C++ model
    and a fresh transformers model, and the two give the same logits."""
    base, stdout = runs
    assert stdout.count("adapter saved to") == 3, stdout
    import transformers

    ckpt = str(ROOT / "data/models/stories260K")
    hf = mola.load_adapter(transformers.AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float64),
                           base / "fsdp2" / "adapter").eval()
    cpp = mola.load_adapter(mola.CausalLM.from_pretrained(ckpt, dtype=torch.float64), str(base / "fsdp2" / "adapter"))
    cpp.eval()
    ids = torch.randint(1, 512, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (hf(input_ids=ids).logits - cpp(ids).logits).abs().max().item()
    assert diff <= 1e-9, diff


def test_cpp_model_rejects_fsdp2():
    example = load_example()
    with pytest.raises(SystemExit):
        example.parse_args(["--model", "cpp", "--strategy", "fsdp2"])
