"""Dense-masked vs grouped moe_lora over a grid of (E, r): where does grouped start to win?

docs/design.md, Strategies and kernels gives the op two exact strategies, dense-masked
(compute=1: every expert on every token, k/E of it masked away) and grouped
(compute=2: tokens sorted by expert, one small GEMM per expert segment), and
an auto rule (compute=0) choosing between them by the cost of the call. This
benchmark measures both on every (E, r) point of a grid and fits that rule.

At each point, in one process and on the same inputs, three rows are timed
interleaved round-robin (bench/common.py's time_interleaved, the order
rotating every round): `base` (the frozen linear alone, F.linear forward and
gradient to x, so that the LoRA part of each step can be read off), `dense`
and `grouped` (torch.ops.mola.moe_lora forward + backward, gradients to x,
router, lora_a and lora_b). A point reports the medians, p10 / p90, the ratio
grouped/dense and the max |y_dense - y_grouped| of one forward (the two must
agree to rounding, docs/design.md, Strategies and kernels).

The fitted rule is "dense when f <= threshold, else grouped" for one feature f
of the point; two features are tried, E*r (the dense strategy's extra columns)
and (E - k)*r (the columns dense computes and then masks away, the work
grouped saves), and the one with fewer misclassified points is chosen. The
misclassified points are listed with their ratio, so a miss on a near-tie
(ratio within the noise) can be told from a real one.

Usage: python bench/crossover.py [--device cpu|cuda] [--dtype float32] [--T 2048]
       [--in-features 1024] [--out-features 1024] [--E 2,4,8,16,32] [--r 4,8,16,32,64] [--out]
The JSON goes to stdout, and with --out to bench/results/crossover-<device>-<tag>.json.
"""

import argparse
import json
import math
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
from common import (add_layer_shape_args, device_name, git_rev, layer_tag, quantile,  # noqa: E402
                    time_interleaved, write_json)
from layer import DTYPES  # noqa: E402

# The grids of issue 5: the CUDA one spans the design's E and r ranges and
# beyond (E*r from 8 to 4096); the CPU one drops E=64, so that 2 shared cores
# finish it in about three minutes at the default shapes and repeat counts.
GRIDS = {
    "cuda": {"E": (2, 4, 8, 16, 32, 64), "r": (4, 8, 16, 32, 64)},
    "cpu": {"E": (2, 4, 8, 16, 32), "r": (4, 8, 16, 32, 64)},
}
COMPUTE = {"dense": 1, "grouped": 2}
# The rule resolve_compute (src/ops/moe_lora.cpp) applies today, scored on the
# same points so the fitted rule can be compared with it.
CURRENT_RULE = {"feature": "E*r", "threshold": 256}
FEATURES = {
    "E*r": lambda E, k, r: E * r,
    "(E-k)*r": lambda E, k, r: (E - k) * r,
}


def int_list(text):
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a comma list of integers, got {text!r}")
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_layer_shape_args(p, DTYPES)
    p.add_argument("--E", type=int_list, default=None, help="comma list of expert counts (default per device)")
    p.add_argument("--r", type=int_list, default=None, help="comma list of ranks (default per device)")
    p.add_argument("--k", type=int, default=2, help="top-k (points with E < k are skipped)")
    p.add_argument("--alpha", type=float, default=16.0, help="MoLA alpha (scaling = alpha / r)")
    p.add_argument("--dropout", type=float, default=0.0, help="dropout on the LoRA input (training mode)")
    p.add_argument("--iters", type=int, default=15, help="timed rounds per point")
    p.add_argument("--warmup", type=int, default=3, help="untimed rounds per point")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tag", default=None, help="file name tag; default from dtype and shapes")
    p.add_argument("--out", "-o", dest="output", nargs="?", const="", default=None,
                   help="write the JSON; bare --out: bench/results/crossover-<device>-<tag>.json")
    args = p.parse_args(argv)
    grid = GRIDS[args.device]
    args.E = args.E or list(grid["E"])
    args.r = args.r or list(grid["r"])
    if args.k < 1:
        p.error(f"--k must be at least 1, got {args.k}")
    if not 0.0 <= args.dropout < 1.0:
        p.error(f"--dropout must be in [0, 1), got {args.dropout}")
    if args.iters < 1 or args.warmup < 0:
        p.error(f"--iters must be >= 1 and --warmup >= 0, got {args.iters} and {args.warmup}")
    for name in ("T", "in_features", "out_features"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if not any(E >= args.k for E in args.E):
        p.error(f"--E {args.E}: no expert count is at least --k {args.k}")
    return args


def make_inputs(T, in_features, out_features, E, r, device, dtype, seed=0):
    """The op's tensors for one point: x and the adapter need gradients, the base is frozen.

    Scales follow mola.MoLALinear's init (router and lora_a uniform in
    +-1/sqrt(in)) except lora_b, which is nonzero so no strategy can skip work
    on zeros; the random router spreads tokens evenly over the experts on
    average, the case both strategies are designed for."""
    g = torch.Generator().manual_seed(seed)
    bound = 1.0 / math.sqrt(in_features)

    def uniform(*shape, grad):
        t = (torch.rand(*shape, generator=g) * 2 - 1) * bound
        return t.to(device=device, dtype=dtype).requires_grad_(grad)

    return {
        "x": torch.randn(T, in_features, generator=g).to(device=device, dtype=dtype).requires_grad_(True),
        "weight": uniform(out_features, in_features, grad=False),
        "bias": uniform(out_features, grad=False),
        "router": uniform(E, in_features, grad=True),
        "lora_a": uniform(E, r, in_features, grad=True),
        "lora_b": (torch.randn(E, out_features, r, generator=g) * 0.02).to(device=device, dtype=dtype)
        .requires_grad_(True),
        "grad_y": torch.randn(T, out_features, generator=g).to(device=device, dtype=dtype),
    }


def op_step(inputs, top_k, scaling, dropout, compute):
    """One moe_lora forward + backward with a fixed upstream gradient; returns y[0, 0]
    (time_interleaved reads one number back from the first round). On CUDA the
    step ends in a synchronize, so host timing covers the kernels it launched."""
    trainable = [inputs[n] for n in ("x", "router", "lora_a", "lora_b")]
    # one seed for every call and both strategies: the same mask, so their outputs compare
    seed = torch.tensor([12345], dtype=torch.int64) if dropout > 0 else None
    cuda = inputs["x"].device.type == "cuda"

    def step():
        for t in trainable:
            t.grad = None
        y, _ = torch.ops.mola.moe_lora(inputs["x"], inputs["weight"], inputs["bias"], inputs["router"],
                                       inputs["lora_a"], inputs["lora_b"], top_k, scaling, dropout,
                                       dropout > 0, compute, seed)
        y.backward(inputs["grad_y"])
        if cuda:
            torch.cuda.synchronize()
        return y.detach()[0, 0]

    return step


def base_step(inputs):
    """The frozen base alone (F.linear forward + gradient to x): what every row also pays."""
    x, cuda = inputs["x"], inputs["x"].device.type == "cuda"

    def step():
        x.grad = None
        y = F.linear(x, inputs["weight"], inputs["bias"])
        y.backward(inputs["grad_y"])
        if cuda:
            torch.cuda.synchronize()
        return y.detach()[0, 0]

    return step


def max_diff(inputs, top_k, scaling, dropout):
    """max |y_dense - y_grouped| of one forward with the same inputs (and dropout seed)."""
    seed = torch.tensor([12345], dtype=torch.int64) if dropout > 0 else None
    with torch.no_grad():
        ys = [torch.ops.mola.moe_lora(inputs["x"], inputs["weight"], inputs["bias"], inputs["router"],
                                      inputs["lora_a"], inputs["lora_b"], top_k, scaling, dropout,
                                      dropout > 0, code, seed)[0].float()
              for code in (COMPUTE["dense"], COMPUTE["grouped"])]
    return (ys[0] - ys[1]).abs().max().item()


def summary(seconds):
    ms = [s * 1e3 for s in seconds]
    return {"median_ms": quantile(ms, 0.5), "p10_ms": quantile(ms, 0.1), "p90_ms": quantile(ms, 0.9)}


def measure_point(args, E, r, device, dtype):
    inputs = make_inputs(args.T, args.in_features, args.out_features, E, r, device, dtype, args.seed)
    scaling = args.alpha / r
    steps = {"base": base_step(inputs)}
    for name, code in COMPUTE.items():
        steps[name] = op_step(inputs, args.k, scaling, args.dropout, code)
    times, _ = time_interleaved(steps, args.warmup, args.iters)
    rows = {name: summary(times[name]) for name in steps}
    dense, grouped, base = (rows[n]["median_ms"] for n in ("dense", "grouped", "base"))
    winner, loser = ("grouped", "dense") if grouped < dense else ("dense", "grouped")
    return {
        "E": E,
        "r": r,
        "E*r": E * r,
        "(E-k)*r": (E - args.k) * r,
        "rows": rows,
        "grouped/dense": grouped / dense,
        # of the fastest decile: on a shared machine the least disturbed estimate, a check on the medians
        "grouped/dense_p10": rows["grouped"]["p10_ms"] / rows["dense"]["p10_ms"],
        # the adapter's share of each step, base subtracted: the ratio the strategies are chosen by,
        # undiluted by the frozen GEMM both pay alike (noisier, as a difference of medians)
        "lora_ms": {"dense": dense - base, "grouped": grouped - base},
        "winner": winner,
        # the winner's p90 below the loser's p10; False marks a near-tie within the noise
        "clear": rows[winner]["p90_ms"] < rows[loser]["p10_ms"],
        "max_abs_diff": max_diff(inputs, args.k, scaling, args.dropout),
    }


def score(points, feature, threshold):
    """The points "dense when feature <= threshold" gets wrong."""
    return [p for p in points if ("dense" if p[feature] <= threshold else "grouped") != p["winner"]]


def fit_rule(points):
    """Per feature, the threshold with the fewest misclassified points (ties: the smaller
    sum of |log ratio| over the misses, so near-ties cost little; then the smaller
    threshold). Thresholds are the observed feature values plus one below them all (always grouped);
    the true crossover lies between a threshold and the next observed value."""
    fits = {}
    for feature in FEATURES:
        values = sorted({p[feature] for p in points})
        best = None
        for threshold in [values[0] - 1] + values:
            missed = score(points, feature, threshold)
            cost = sum(abs(math.log(p["grouped/dense"])) for p in missed)
            key = (len(missed), cost, threshold)
            if best is None or key < best[0]:
                best = (key, threshold, missed)
        (_, cost, _), threshold, missed = best
        above = [v for v in values if v > threshold]
        fits[feature] = {
            "rule": f"dense when {feature} <= {threshold}, else grouped",
            "threshold": threshold,
            "next_observed": above[0] if above else None,
            "misclassified": [
                {"E": p["E"], "r": p["r"], feature: p[feature], "winner": p["winner"],
                 "grouped/dense": p["grouped/dense"], "clear": p["clear"]}
                for p in missed
            ],
            "misclassified_log_ratio_sum": cost,
        }
    # fewer misses first, then cheaper ones; on a full tie the first feature (E*r, the design's)
    chosen = min(fits, key=lambda f: (len(fits[f]["misclassified"]), fits[f]["misclassified_log_ratio_sum"]))
    current = score(points, CURRENT_RULE["feature"], CURRENT_RULE["threshold"])
    return {
        "features": fits,
        "chosen": chosen,
        "current_rule": {
            "rule": f"dense when {CURRENT_RULE['feature']} <= {CURRENT_RULE['threshold']}, else grouped",
            "misclassified": [{"E": p["E"], "r": p["r"], "winner": p["winner"], "grouped/dense": p["grouped/dense"],
                               "clear": p["clear"]} for p in current],
        },
    }


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("bench/crossover.py: --device cuda but torch.cuda.is_available() is False")
    try:
        import mola  # noqa: F401  (registers torch.ops.mola)
    except ImportError as err:
        sys.exit(f"bench/crossover.py: mola is not importable ({err}); build it first (make)")
    torch.set_num_threads(args.threads)
    dtype = DTYPES[args.dtype]

    load_before = os.getloadavg()
    points, skipped = [], []
    for E in args.E:
        for r in args.r:
            if E < args.k:
                skipped.append({"E": E, "r": r, "why": f"E < k={args.k}"})
                continue
            point = measure_point(args, E, r, device, dtype)
            print(f"E={E:3d} r={r:3d} E*r={E * r:5d}  dense {point['rows']['dense']['median_ms']:8.2f} ms  "
                  f"grouped {point['rows']['grouped']['median_ms']:8.2f} ms  "
                  f"grouped/dense {point['grouped/dense']:.3f} (p10 {point['grouped/dense_p10']:.3f})",
                  file=sys.stderr, flush=True)
            points.append(point)

    result = {
        "bench": "crossover",
        "config": {
            "device": args.device,
            "dtype": args.dtype,
            "T": args.T,
            "in": args.in_features,
            "out": args.out_features,
            "E": args.E,
            "r": args.r,
            "k": args.k,
            "alpha": args.alpha,
            "dropout": args.dropout,
            "iters": args.iters,
            "warmup": args.warmup,
            "seed": args.seed,
            "what": "torch.ops.mola.moe_lora forward + backward (grads to x, router, lora_a, lora_b), "
                    "compute=1 (dense) vs compute=2 (grouped), milliseconds per call; base = F.linear alone",
        },
        "torch": torch.__version__,
        "device_name": device_name(device),
        "threads": torch.get_num_threads(),
        "git_rev": git_rev(),
        # 1-minute load average before and after the grid: above the thread count, other work
        # shared the cores and the figures are worth less (compare p10 with the median)
        "loadavg_1min": {"before": load_before[0], "after": os.getloadavg()[0]},
        "points": points,
        "skipped": skipped,
        "fit": fit_rule(points) if points else None,
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.output is not None:
        tag = args.tag or layer_tag(args, f"k{args.k}")
        write_json(text, args.output, f"crossover-{args.device}-{tag}.json")


if __name__ == "__main__":
    main()
