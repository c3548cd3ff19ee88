"""What every benchmark under bench/ records beside its figures: the machine,
the revision, and quantiles of repeated timings."""
import platform
import subprocess
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def quantile(values, q):
    return torch.tensor(values, dtype=torch.float64).quantile(q).item()


def device_name(device=None):
    """The GPU's name for a CUDA device, else the CPU model."""
    if device is not None and torch.device(device).type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_rev():
    """The short revision of the checkout, None outside git or before the first commit."""
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                             timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() or None


def add_model_shape_args(p, *, hidden, intermediate, heads, vocab, layers=4, seq=128, batch=4):
    """The random llama's shape options both model benchmarks take (kv heads default to heads)."""
    p.add_argument("--layers", type=int, default=layers)
    p.add_argument("--hidden", type=int, default=hidden)
    p.add_argument("--intermediate", type=int, default=intermediate)
    p.add_argument("--heads", type=int, default=heads)
    p.add_argument("--kv-heads", dest="kv_heads", type=int, default=heads)
    p.add_argument("--vocab", type=int, default=vocab)
    p.add_argument("--seq", type=int, default=seq)
    p.add_argument("--batch", type=int, default=batch)


def time_interleaved(steps, warmup, iters):
    """Runs every step function of ``steps`` (name -> callable returning the
    loss) once per round, rotating the order each round so no row is always
    first; returns the seconds of the timed rounds (after ``warmup``) per name
    and each row's loss in the first round."""
    order = list(steps)
    times, first_loss = {name: [] for name in order}, {}
    for round_index in range(warmup + iters):
        shift = round_index % len(order)
        for name in order[shift:] + order[:shift]:
            t0 = time.perf_counter()
            loss = steps[name]()
            elapsed = time.perf_counter() - t0
            if round_index == 0:
                first_loss[name] = loss.item()
            if round_index >= warmup:
                times[name].append(elapsed)
    return times, first_loss
