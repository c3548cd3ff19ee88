"""One adapted linear layer, side by side: fwd + bwd milliseconds of each way to compute it.

Rows (all in one process, on the same input, interleaved round-robin so that
clock and thermal drift hit every row alike):
  base          the frozen nn.Linear alone: forward and gradient to the input
  lora16        plain LoRA of rank 16 in torch: base(x) + s * B(A(dropout(x)))
  peft_lora16   the same through peft's get_peft_model (only when peft imports)
  loop          the authors' per-expert loop (tests/reference/authors_loop.py)
  mola_dense    mola.MoLALinear(compute="dense")
  mola_grouped  mola.MoLALinear(compute="grouped")
  mola_auto     mola.MoLALinear(compute="auto")
  mola_shared   mola.MoLALinear(compute="auto", dropout_masks="shared"): one dropout
                mask for all of a token's experts (the mola_* rows above draw one per
                routed expert, as the authors' loop does; with --dropout 0 they are equal)
Each row reports the median and p10/p90 over --iters timed runs after
--warmup untimed rounds, and on CUDA the peak memory of one step. The
targets these numbers are judged by are in bench/README.md.

Usage: python bench/layer.py [--device cpu|cuda] [--dtype float32] [--T 2048]
       [--in-features 1024] [--out-features 1024] [--E 8] [--k 2] [--r 8] ...
The JSON goes to stdout and to bench/results/layer-<device>-<tag>.json.
"""

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
from common import add_layer_shape_args, device_name, git_rev, layer_tag, quantile, write_json  # noqa: E402
sys.path.insert(0, str(REPO))  # for tests.reference

from tests.reference.authors_loop import ReferenceMoLALinear  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ROWS = ("base", "lora16", "peft_lora16", "loop", "mola_dense", "mola_grouped", "mola_auto", "mola_shared")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_layer_shape_args(p, DTYPES)
    p.add_argument("--E", type=int, default=8, help="experts")
    p.add_argument("--k", type=int, default=2, help="top-k")
    p.add_argument("--r", type=int, default=8, help="rank of each expert")
    p.add_argument("--alpha", type=float, default=16.0, help="MoLA alpha (scaling = alpha / r)")
    p.add_argument("--lora-rank", type=int, default=16, help="rank of the plain LoRA rows (alpha = 2 * rank)")
    p.add_argument("--dropout", type=float, default=0.0, help="dropout on the LoRA input, all rows")
    p.add_argument("--iters", type=int, default=20, help="timed runs per row")
    p.add_argument("--warmup", type=int, default=3, help="untimed rounds before timing")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument("--rows", default=",".join(ROWS), help=f"comma list from {','.join(ROWS)}")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tag", default=None, help="file name tag; default from dtype and shapes")
    p.add_argument("--out", "-o", dest="output", default=None, help="JSON path (default bench/results/...)")
    args = p.parse_args(argv)
    unknown = set(args.rows.split(",")) - set(ROWS)
    if unknown:
        p.error(f"--rows: unknown row(s) {sorted(unknown)}; valid: {', '.join(ROWS)}")
    if not 1 <= args.k <= args.E:
        p.error(f"--k must be in [1, --E={args.E}], got {args.k}")
    return args


class PlainLoRA(nn.Module):
    """LoRA as PEFT computes it: base(x) + (alpha / r) * B(A(dropout(x))), base frozen."""

    def __init__(self, base, rank, alpha, dropout):
        super().__init__()
        self.base = base
        factory = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features, **factory))
        self.lora_b = nn.Parameter(torch.empty(base.out_features, rank, **factory))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
        nn.init.normal_(self.lora_b, std=0.02)  # nonzero, so no row can skip work on zeros
        self.dropout = nn.Dropout(dropout)
        self.scaling = alpha / rank

    def forward(self, x):
        return self.base(x) + self.scaling * F.linear(F.linear(self.dropout(x), self.lora_a), self.lora_b)


class _OneProj(nn.Module):
    """The smallest model peft can wrap: one target module named proj."""

    def __init__(self, proj):
        super().__init__()
        self.proj = proj

    def forward(self, x):
        return self.proj(x)


def build_rows(args, base, device, dtype):
    """name -> module, or name -> reason string when the row cannot run here."""
    wanted = args.rows.split(",")
    rows = {}
    if "base" in wanted:
        rows["base"] = base
    if "lora16" in wanted:
        rows["lora16"] = PlainLoRA(base, args.lora_rank, 2.0 * args.lora_rank, args.dropout)
    if "peft_lora16" in wanted:
        try:
            from peft import LoraConfig, get_peft_model

            config = LoraConfig(
                r=args.lora_rank, lora_alpha=2 * args.lora_rank, target_modules=["proj"], lora_dropout=args.dropout
            )
            model = get_peft_model(_OneProj(copy.deepcopy(base)), config).to(device=device, dtype=dtype)
            with torch.no_grad():
                for name, p in model.named_parameters():
                    if "lora_B" in name:
                        p.normal_(std=0.02)
            rows["peft_lora16"] = model
        except ImportError as err:
            rows["peft_lora16"] = f"skipped: peft is not importable ({err})"
    need_moe = [n for n in ("loop", "mola_dense", "mola_grouped", "mola_auto", "mola_shared") if n in wanted]
    if need_moe:
        loop = ReferenceMoLALinear(base, args.E, args.k, args.r, alpha=args.alpha, dropout=args.dropout)
        with torch.no_grad():
            loop.lora_b.normal_(std=0.02)
        if "loop" in wanted:
            rows["loop"] = loop
        for name, compute, masks in (("mola_dense", "dense", "per_expert"), ("mola_grouped", "grouped", "per_expert"),
                                     ("mola_auto", "auto", "per_expert"), ("mola_shared", "auto", "shared")):
            if name not in wanted:
                continue
            try:
                import mola
            except ImportError as err:
                rows[name] = f"skipped: mola is not importable ({err}); build it first (make)"
                continue
            layer = mola.MoLALinear(
                base, args.E, args.k, args.r, alpha=args.alpha, dropout=args.dropout, compute=compute,
                dropout_masks=masks,
            )
            layer.to(device=device, dtype=dtype)
            # the same router and experts as the loop, so every MoE row routes identically
            missing, _ = layer.load_state_dict(loop.state_dict(), strict=False)
            if missing:
                raise RuntimeError(f"MoLALinear has parameters the loop lacks: {missing}")
            rows[name] = layer
    for module in rows.values():
        if isinstance(module, nn.Module):
            module.train()  # dropout, when asked for, is on in every row
    return rows


class Timer:
    """Milliseconds of one call: CUDA events on the GPU, perf_counter on the CPU."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"

    def __call__(self, fn):
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end)
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3


def make_step(module, x, grad_y):
    params = [p for p in module.parameters() if p.requires_grad]

    def step():
        x.grad = None
        for p in params:
            p.grad = None
        module(x).backward(grad_y)

    return step




def peak_memory(step, device):
    """Peak bytes allocated during one step, total and above what was allocated before it."""
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    step()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    return {"peak_bytes": peak, "peak_extra_bytes": peak - before}


def check_outputs(rows, x):
    """Max |y - y_loop| of each MoE row on one forward (meaningful with dropout 0 only)."""
    if "loop" not in rows or not isinstance(rows["loop"], nn.Module):
        return {}
    with torch.no_grad():
        want = rows["loop"](x).float()
        return {
            name: (module(x).float() - want).abs().max().item()
            for name, module in rows.items()
            if name.startswith("mola_") and isinstance(module, nn.Module)
        }






def ratio(stats, a, b):
    if a in stats and b in stats:
        return stats[a]["median_ms"] / stats[b]["median_ms"]
    return None


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("bench/layer.py: --device cuda but torch.cuda.is_available() is False")
    dtype = DTYPES[args.dtype]

    base = nn.Linear(args.in_features, args.out_features, device=device, dtype=dtype)
    base.requires_grad_(False)
    x = torch.randn(args.T, args.in_features, device=device, dtype=dtype, requires_grad=True)
    grad_y = torch.randn(args.T, args.out_features, device=device, dtype=dtype)

    rows = build_rows(args, base, device, dtype)
    runnable = {name: m for name, m in rows.items() if isinstance(m, nn.Module)}
    notes = {name: m for name, m in rows.items() if isinstance(m, str)}
    steps = {name: make_step(m, x, grad_y) for name, m in runnable.items()}
    max_diff = check_outputs(rows, x) if args.dropout == 0 else {}

    timer = Timer(device)
    times = {name: [] for name in steps}
    order = list(steps)
    for round_index in range(args.warmup + args.iters):
        shift = round_index % len(order)  # rotate the order so no row is always first
        for name in order[shift:] + order[:shift]:
            elapsed = timer(steps[name])
            if round_index >= args.warmup:
                times[name].append(elapsed)

    stats = {}
    for name in order:
        stats[name] = {
            "median_ms": quantile(times[name], 0.5),
            "p10_ms": quantile(times[name], 0.1),
            "p90_ms": quantile(times[name], 0.9),
            "runs": len(times[name]),
        }
        if device.type == "cuda":
            stats[name].update(peak_memory(steps[name], device))

    result = {
        "bench": "layer",
        "config": {
            "device": args.device,
            "dtype": args.dtype,
            "T": args.T,
            "in": args.in_features,
            "out": args.out_features,
            "E": args.E,
            "k": args.k,
            "r": args.r,
            "alpha": args.alpha,
            "lora_rank": args.lora_rank,
            "dropout": args.dropout,
            "iters": args.iters,
            "warmup": args.warmup,
            "seed": args.seed,
            "what": "forward + backward (grad to x and to trainable parameters), milliseconds per call",
        },
        "torch": torch.__version__,
        "device_name": device_name(device),
        "threads": torch.get_num_threads(),
        "git_rev": git_rev(),
        "rows": stats,
        "notes": notes,
        "ratios": {
            "mola_auto/base": ratio(stats, "mola_auto", "base"),
            "mola_auto/lora16": ratio(stats, "mola_auto", "lora16"),
            "mola_auto/peft_lora16": ratio(stats, "mola_auto", "peft_lora16"),
            "loop/mola_auto": ratio(stats, "loop", "mola_auto"),
            "dense/grouped": ratio(stats, "mola_dense", "mola_grouped"),
        },
        "max_abs_diff_vs_loop": max_diff,
    }
    text = json.dumps(result, indent=2)
    print(text)
    tag = args.tag or layer_tag(args, f"E{args.E}k{args.k}r{args.r}")
    write_json(text, args.output, f"layer-{args.device}-{tag}.json")


if __name__ == "__main__":
    main()
