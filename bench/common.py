"""What every benchmark under bench/ records beside its figures: the machine,
the revision, and quantiles of repeated timings."""
import platform
import subprocess
import sys
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
    """The random llama's shape options both model benchmarks take; --kv-heads
    is None unless given: resolve it with ``kv_heads_default(args)`` after parsing."""
    p.add_argument("--layers", type=int, default=layers)
    p.add_argument("--hidden", type=int, default=hidden)
    p.add_argument("--intermediate", type=int, default=intermediate)
    p.add_argument("--heads", type=int, default=heads)
    p.add_argument("--kv-heads", dest="kv_heads", type=int, default=None,
                   help="key/value heads (default: --heads)")
    p.add_argument("--vocab", type=int, default=vocab)
    p.add_argument("--seq", type=int, default=seq)
    p.add_argument("--batch", type=int, default=batch)


def kv_heads_default(args):
    """--kv-heads follows --heads when not given (so --heads 4 alone is valid)."""
    if args.kv_heads is None:
        args.kv_heads = args.heads
    return args


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


# Shapes named after the model they copy, for --preset: every option a preset
# sets can still be given on the command line, and the command line wins.
MODEL_PRESETS = {
    # LLaMA-2-7B (meta-llama/Llama-2-7b-hf's config.json) and issue 5's batch: seq 512 x batch 8.
    "llama2-7b": dict(layers=32, hidden=4096, intermediate=11008, heads=32, kv_heads=32, vocab=32000,
                      seq=512, batch=8),
}


def parse_with_model_preset(p, argv=None):
    """Adds --preset (a MODEL_PRESETS name) to ``p`` and parses ``argv``; the
    preset's values become the defaults, so an explicit option overrides them."""
    p.add_argument("--preset", default=None, choices=tuple(MODEL_PRESETS),
                   help="model shape preset (explicit shape options override it): "
                        + "; ".join(f"{name}: {values}" for name, values in MODEL_PRESETS.items()))
    known, _ = p.parse_known_args(argv)
    if known.preset is not None:
        p.set_defaults(**MODEL_PRESETS[known.preset])
    return p.parse_args(argv)


def cuda_timed(fn):
    """(seconds, fn's result) of one call on the current CUDA stream, by CUDA
    events around it; waits for the end event, so the GPU work is all counted
    (and any host-side stall between launches shows as idle time in between)."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    result = fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3, result


def add_layer_shape_args(p, dtypes):
    """The one-layer options bench/layer.py and bench/crossover.py share."""
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--dtype", default="float32", choices=tuple(dtypes))
    p.add_argument("--T", type=int, default=2048, help="tokens (the flattened batch)")
    p.add_argument("--in-features", dest="in_features", type=int, default=1024)
    p.add_argument("--out-features", dest="out_features", type=int, default=1024)


def write_json(text, output, default_name):
    """Writes a benchmark's JSON ``text`` to ``output`` (a path), or to
    bench/results/<default_name> when ``output`` is empty; says where on stderr."""
    path = Path(output) if output else Path(__file__).resolve().parent / "results" / default_name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n")
    print(f"wrote {path}", file=sys.stderr)
    return path


def layer_tag(args, middle):
    """The result-file tag of a one-layer benchmark: dtype, shapes, ``middle``, dropout."""
    tag = f"{args.dtype}-T{args.T}-in{args.in_features}-out{args.out_features}-{middle}"
    return tag + (f"-p{args.dropout:g}" if args.dropout else "")
