"""Per-kernel device time of moe_lora forward + backward on CUDA, and each mola kernel's achieved bandwidth.

Issue 5 asks for every kernel's achieved memory bandwidth against the GPU's
peak (3.35 TB/s for an H100 SXM). Each kernel here is memory-bound by design
(docs/design.md, Strategies and kernels), so bytes it must move / its time says how far it is
from its floor. "Must move" is the minimal traffic of the kernel's job from
the shapes alone (every operand read once, every result written once; see
KERNEL_BYTES), not what the kernel actually moves, so a kernel that reads a
tile twice shows it as a lower bandwidth.

For each shape and strategy (compute=1 dense, compute=2 grouped) the script
runs --warmup untimed steps, then --steps steps of torch.ops.mola.moe_lora
forward + backward under torch.profiler, sums the device time per kernel name
and divides by the steps. Kernels are grouped by name (substring after a name
boundary): the mola kernels one by one, cuBLAS / CUTLASS GEMMs as
"cublas/gemm", everything else (ATen elementwise, reductions, memset, copies)
as "aten other", each group with its share of the step's device time.

Usage: python bench/kernels.py [--steps 20] [--peak-bw 3.35e12] [--compute dense,grouped] [--out]
       python bench/kernels.py --dry-run     # the byte table for the shapes, no GPU needed
The JSON goes to stdout, and with --out to bench/results/kernels-cuda-<tag>.json.
"""

import argparse
import json
import re
import sys
from collections import defaultdict
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
from common import device_name, git_rev, write_json  # noqa: E402
from crossover import COMPUTE, make_inputs, op_step  # noqa: E402
from layer import DTYPES  # noqa: E402

H100_PEAK_BW = 3.35e12  # B/s, H100 SXM5 HBM3 (NVIDIA's data sheet)
# (in, out, E, r) of issue 5: the attention (4096x4096) and MLP (4096x11008)
# projections of a 7B llama, each with the design's E=8 r=8 and two larger
# expert sets on either side of the dense/grouped rule.
SHAPES = [(i, o, E, r) for (i, o) in ((4096, 4096), (4096, 11008)) for (E, r) in ((8, 8), (16, 16), (64, 8))]
# Mirror of kFusedShrinkMaxCols (kernels/moe_lora_dense.h): above E*r + E
# columns the dense forward uses cuBLAS and a separate dropout pass instead of
# fused_shrink. Keep the two equal.
FUSED_SHRINK_MAX_COLS = 1024
IDX = 8  # int64 indices


class Shape:
    """One call's sizes: T tokens, in/out features, E experts, top-k, rank r, element size es
    of the model dtype and acc of its accumulation dtype (routing weights, gate: fp32, fp64
    for double)."""

    def __init__(self, T, in_features, out_features, E, k, r, dtype, dropout, compute):
        self.T, self.i, self.o, self.E, self.k, self.r = T, in_features, out_features, E, k, r
        self.es = torch.empty((), dtype=dtype).element_size()
        self.acc = 8 if dtype == torch.float64 else 4
        self.dropout = dropout > 0
        self.dense = compute == "dense"
        self.fused = self.dense and self.dropout and E * r + E <= FUSED_SHRINK_MAX_COLS


def _route(s):
    # reads logits [T, E]; writes w [T, k] acc, idx [T, k] int64, gate [T, E] acc.
    # Twice a step: forward, and the backward's recomputation from the saved logits.
    one = s.T * s.E * s.es + s.T * s.k * (s.acc + IDX) + s.T * s.E * s.acc
    return [("forward", one), ("backward recompute", one)]


def _fused_shrink(s):
    # reads x [T, in] once, A_cat [E*r, in] and Wr [E, in]; writes h [T, E*r] and logits [T, E].
    # The dropout mask comes from the Philox seed, so x~ costs no traffic. Dense with dropout only
    # (without it one cuBLAS GEMM on [A_cat; Wr] does this; above the column limit, cuBLAS + dropout).
    if not s.fused:
        return []
    return [("forward", (s.T * s.i + s.E * s.r * s.i + s.E * s.i + s.T * s.E * s.r + s.T * s.E) * s.es)]


def _gate_scale(s):
    # reads h [T, E*r] and gate [T, E] acc; writes u [T, E*r]. Dense only: forward u, and the
    # backward's recomputation of u for dB = dy^T u (u is not saved).
    if not s.dense:
        return []
    one = 2 * s.T * s.E * s.r * s.es + s.T * s.E * s.acc
    return [("forward", one), ("backward recompute", one)]


def _gate_backward(s):
    # reads du and h, writes dh (dense [T, E*r]; grouped [T*k, r]); reads logits [T, E], weights
    # [T, k] acc, indices [T, k] int64 and, dense only, gate [T, E] acc; writes dz [T, E].
    cols = s.T * s.E * s.r if s.dense else s.T * s.k * s.r
    gate = s.T * s.E * s.acc if s.dense else 0
    return [("backward", 3 * cols * s.es + 2 * s.T * s.E * s.es + s.T * s.k * (s.acc + IDX) + gate)]


def _dropout(s):
    # Dense with dropout. Backward pair, one mask generation: reads x and dx~ [T, in], reads and
    # writes grad_x, writes x~ (for dA = dh^T x~): 5 [T, in] passes. Above the fused-shrink column
    # limit the forward also writes x~ (reads x, writes x~). Grouped kernels apply the mask inline.
    if not (s.dense and s.dropout):
        return []
    uses = [("backward pair", 5 * s.T * s.i * s.es)]
    if not s.fused:
        uses.insert(0, ("forward x~", 2 * s.T * s.i * s.es))
    return uses


def _grouped_sort(s):
    # reads idx [T*k] int64; writes sorted slot ids [T*k] int32 and the expert and tile offsets
    # [E+1] int32 each. Several kernels make one sort; forward and backward each sort once.
    if s.dense:
        return []
    one = s.T * s.k * (IDX + 4) + 2 * (s.E + 1) * 4
    return [("forward", one), ("backward", one)]


def _grouped_shrink(s):
    # Forward h = x~ A_e^T: reads x [T, in] once (the k slots of a token can share one read of its
    # row) and A [E, r, in]; writes [T*k, r]. Backward du = dy B_e: reads dy [T, out] and
    # B [E, out, r]; writes [T*k, r]. Both read the sorted slots [T*k] int32.
    if s.dense:
        return []
    slots = s.T * s.k * (s.r * s.es + 4)
    return [("forward h", (s.T * s.i + s.E * s.r * s.i) * s.es + slots),
            ("backward du", (s.T * s.o + s.E * s.o * s.r) * s.es + slots)]


def _grouped_expand(s):
    # Forward y += s w h B_e^T: reads v = h [T*k, r], coef w [T*k] acc, idx [T*k] int64 and
    # B [E, out, r]; reads and writes y [T, out]. Backward dx += mask (.) dh A_e: reads dh [T*k, r],
    # idx and A [E, r, in]; reads and writes dx [T, in].
    if s.dense:
        return []
    fwd = (s.T * s.k * s.r + s.E * s.o * s.r + 2 * s.T * s.o) * s.es + s.T * s.k * (s.acc + IDX)
    bwd = (s.T * s.k * s.r + s.E * s.r * s.i + 2 * s.T * s.i) * s.es + s.T * s.k * IDX
    return [("forward y", fwd), ("backward dx", bwd)]


def _grouped_weight_grad(s):
    # dA_e = dh_e^T x~_e: reads the input rows of each expert segment (T*k rows of [in] in all:
    # each expert sums over its own tokens, so a token routed to k experts is read k times) and
    # dh [T*k, r]; writes [E, r, in]. dB_e = dy_e^T u_e: T*k rows of dy [out], h [T*k, r] and
    # coef w [T*k] acc; writes [E, out, r]. Both read the sorted slots [T*k] int32.
    if s.dense:
        return []
    da = (s.T * s.k * s.i + s.T * s.k * s.r + s.E * s.r * s.i) * s.es + s.T * s.k * 4
    db = (s.T * s.k * s.o + s.T * s.k * s.r + s.E * s.o * s.r) * s.es + s.T * s.k * (4 + s.acc)
    return [("dA", da), ("dB", db)]


# kernel name (matched after a name boundary, so ATen's fused_dropout_kernel is not
# dropout_kernel) -> the uses one forward + backward step makes of it, each (what, bytes).
KERNEL_BYTES = {
    "moe_lora_route_fwd_kernel": _route,
    "fused_shrink_kernel": _fused_shrink,
    "gate_scale_kernel": _gate_scale,
    "gate_backward_kernel": _gate_backward,
    "dropout_kernel": _dropout,
    "grouped_sort": _grouped_sort,  # a prefix: every kernel of the sort
    "grouped_shrink_kernel": _grouped_shrink,
    "grouped_expand_kernel": _grouped_expand,
    "grouped_weight_grad_kernel": _grouped_weight_grad,
}
# Names whose calls do not count sorts or uses (several kernels per use).
PREFIX_NAMES = {"grouped_sort"}
_BOUNDARY = r"(?<![A-Za-z0-9_])"
_MOLA_PATTERNS = {name: re.compile(_BOUNDARY + re.escape(name)) for name in KERNEL_BYTES}
# cuBLAS (sm90 xmma, nvjet), CUTLASS and gemv kernels as NVIDIA names them
_GEMM = re.compile(r"gemm|gemv|cublas|cutlass|xmma|nvjet|splitk", re.IGNORECASE)


def classify(kernel_name):
    """The table key a kernel belongs to: a KERNEL_BYTES name, "cublas/gemm" or "aten other"."""
    for name, pattern in _MOLA_PATTERNS.items():
        if pattern.search(kernel_name):
            return name
    return "cublas/gemm" if _GEMM.search(kernel_name) else "aten other"


def byte_table(shape):
    """name -> the uses and the bytes per step of each mola kernel the step should run."""
    table = {}
    for name, uses_of in KERNEL_BYTES.items():
        uses = uses_of(shape)
        if uses:
            table[name] = {"uses": dict(uses), "bytes_per_step": sum(b for _, b in uses)}
    return table


def summarise(events, steps, shape, peak_bw):
    """events: (kernel name, device microseconds summed, calls) over ``steps`` steps ->
    per mola kernel its time, calls, bytes and bandwidth; the GEMM and other groups' shares."""
    totals = defaultdict(lambda: {"us": 0.0, "calls": 0, "names": defaultdict(float)})
    for name, us, calls in events:
        entry = totals[classify(name)]
        entry["us"] += us
        entry["calls"] += calls
        entry["names"][name] += us
    step_us = sum(e["us"] for e in totals.values())
    expected = byte_table(shape)
    kernels, notes = {}, []
    for name in KERNEL_BYTES:
        if name not in totals and name not in expected:
            continue
        got = totals.get(name)
        if got is None:
            notes.append(f"{name}: the table expects it, the profile has no such kernel")
            continue
        ms = got["us"] / steps / 1e3
        calls = got["calls"] / steps
        row = {"ms_per_step": ms, "calls_per_step": calls, "share": got["us"] / step_us}
        want = expected.get(name)
        if want is None:
            notes.append(f"{name}: ran, but the table has no use of it for this strategy; update KERNEL_BYTES")
        else:
            row["expected_uses"] = list(want["uses"])
            nbytes = want["bytes_per_step"]
            if name not in PREFIX_NAMES and calls != len(want["uses"]):
                # Same-size uses scale with the calls; mixed ones cannot be apportioned.
                sizes = set(want["uses"].values())
                if len(sizes) == 1:
                    nbytes = sizes.pop() * calls
                else:
                    nbytes = None
                notes.append(f"{name}: {calls:g} calls per step, the table lists {len(want['uses'])} uses")
            if nbytes is not None:
                bandwidth = nbytes / (ms * 1e-3)
                row.update(bytes_per_step=nbytes, bandwidth_Bps=bandwidth, fraction_of_peak=bandwidth / peak_bw)
        kernels[name] = row
    groups = {}
    for group in ("cublas/gemm", "aten other"):
        got = totals.get(group)
        if got is None:
            continue
        top = sorted(got["names"].items(), key=lambda kv: -kv[1])[:5]
        groups[group] = {"ms_per_step": got["us"] / steps / 1e3, "share": got["us"] / step_us,
                         "calls_per_step": got["calls"] / steps,
                         "top": [{"name": n[:160], "ms_per_step": us / steps / 1e3} for n, us in top]}
    return {"device_ms_per_step": step_us / steps / 1e3, "kernels": kernels, "groups": groups, "notes": notes}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dtype", default="bfloat16", choices=tuple(DTYPES))
    p.add_argument("--T", type=int, default=8192, help="tokens (the flattened batch)")
    p.add_argument("--k", type=int, default=2, help="top-k")
    p.add_argument("--dropout", type=float, default=0.05, help="dropout on the LoRA input (training mode)")
    p.add_argument("--alpha", type=float, default=16.0, help="MoLA alpha (scaling = alpha / r)")
    p.add_argument("--shapes", default=None,
                   help="semicolon list of in,out,E,r (default: issue 5's six, "
                        + "; ".join(",".join(map(str, s)) for s in SHAPES) + ")")
    p.add_argument("--compute", default="dense,grouped", help="comma list from dense,grouped")
    p.add_argument("--steps", type=int, default=20, help="profiled steps per shape and strategy")
    p.add_argument("--warmup", type=int, default=5, help="unprofiled steps before them")
    p.add_argument("--peak-bw", dest="peak_bw", type=float, default=H100_PEAK_BW, help="peak bytes/s (H100 SXM)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dry-run", dest="dry_run", action="store_true",
                   help="print the byte table for the shapes and exit (no GPU, nothing timed)")
    p.add_argument("--tag", default=None, help="file name tag; default from dtype, T, k and dropout")
    p.add_argument("--out", "-o", dest="output", nargs="?", const="", default=None,
                   help="write the JSON; bare --out: bench/results/kernels-cuda-<tag>.json")
    args = p.parse_args(argv)
    try:
        args.shapes = ([tuple(int(v) for v in item.split(",")) for item in args.shapes.split(";") if item.strip()]
                       if args.shapes else list(SHAPES))
    except ValueError:
        p.error(f"--shapes: expected in,out,E,r[;in,out,E,r...], got {args.shapes!r}")
    for shape in args.shapes:
        if len(shape) != 4 or min(shape) < 1:
            p.error(f"--shapes: each item must be four positive integers in,out,E,r; got {shape}")
        if shape[2] < args.k:
            p.error(f"--shapes: E={shape[2]} is below --k {args.k}")
    args.compute = args.compute.split(",")
    unknown = set(args.compute) - set(COMPUTE)
    if unknown:
        p.error(f"--compute: unknown strategy {sorted(unknown)}; valid: {', '.join(COMPUTE)}")
    if args.steps < 1 or args.warmup < 0 or args.T < 1 or args.k < 1 or args.peak_bw <= 0:
        p.error("--steps, --T, --k and --peak-bw must be positive and --warmup >= 0")
    if not 0.0 <= args.dropout < 1.0:
        p.error(f"--dropout must be in [0, 1), got {args.dropout}")
    return args


def shapes_of(args):
    dtype = DTYPES[args.dtype]
    for (i, o, E, r) in args.shapes:
        for compute in args.compute:
            yield (i, o, E, r), compute, Shape(args.T, i, o, E, args.k, r, dtype, args.dropout, compute)


def profile(step, steps):
    """(kernel name, summed device microseconds, calls) of every GPU kernel over ``steps`` calls."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()  # op_step synchronises after each step
    events = []
    for evt in prof.key_averages():
        if evt.device_type != DeviceType.CUDA:
            continue  # host-side ops; their kernels are listed as CUDA events of their own
        events.append((evt.key, float(evt.self_device_time_total), int(evt.count)))
    return events


def main(argv=None):
    args = parse_args(argv)
    config = {
        "dtype": args.dtype, "T": args.T, "k": args.k, "dropout": args.dropout, "alpha": args.alpha,
        "steps": args.steps, "warmup": args.warmup, "peak_bw": args.peak_bw, "seed": args.seed,
        "what": "torch.ops.mola.moe_lora forward + backward (grads to x, router, lora_a, lora_b) under "
                "torch.profiler: device time per kernel per step; bandwidth = minimal bytes / time",
    }
    if args.dry_run:
        table = [{"in": i, "out": o, "E": E, "r": r, "compute": c, "kernels": byte_table(s)}
                 for (i, o, E, r), c, s in shapes_of(args)]
        print(json.dumps({"bench": "kernels", "dry_run": True, "config": config, "byte_table": table}, indent=2))
        return
    if not torch.cuda.is_available():
        sys.exit("bench/kernels.py: needs a CUDA GPU (torch.cuda.is_available() is False); "
                 "--dry-run prints the byte table without one")
    try:
        import mola  # noqa: F401  (registers torch.ops.mola)
    except ImportError as err:
        sys.exit(f"bench/kernels.py: mola is not importable ({err}); build it first (make)")
    device, dtype = torch.device("cuda"), DTYPES[args.dtype]

    results = []
    for (i, o, E, r), compute, shape in shapes_of(args):
        inputs = make_inputs(args.T, i, o, E, r, device, dtype, args.seed)
        step = op_step(inputs, args.k, args.alpha / r, args.dropout, COMPUTE[compute])
        for _ in range(args.warmup):
            step()
        summary = summarise(profile(step, args.steps), args.steps, shape, args.peak_bw)
        results.append({"in": i, "out": o, "E": E, "r": r, "compute": compute, **summary})
        print(f"in={i} out={o} E={E} r={r} {compute}: {summary['device_ms_per_step']:.3f} ms device per step",
              file=sys.stderr, flush=True)
        del inputs, step
        torch.cuda.empty_cache()

    result = {
        "bench": "kernels",
        "config": config,
        "torch": torch.__version__,
        "device_name": device_name(device),
        "git_rev": git_rev(),
        "results": results,
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.output is not None:
        tag = args.tag or f"{args.dtype}-T{args.T}-k{args.k}" + (f"-p{args.dropout:g}" if args.dropout else "")
        write_json(text, args.output, f"kernels-cuda-{tag}.json")


if __name__ == "__main__":
    main()
