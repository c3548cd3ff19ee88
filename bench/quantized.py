"""MoLA over a quantized base against the same run over the unquantized base:
the make-run recipe (the bundled tiny llama, ScienceQA, MoLA 2468) trained and
evaluated once per base, side by side.

Each row is `python -m mola train RECIPE --set model.dtype=... --set
model.quantize=...` in its own process, into out/bench-quantized/<row>; the
row reports the test accuracy by option log-likelihood and by generation
before and after training, the first and last training losses, the run's
seconds and its peak resident memory.

Rows: fp32, bf16 (the bf16 base), nf4 and int8 (quantized from the file's
fp32 weights; bf16 compute with --dtype bfloat16, the default for them).

Usage:
  python bench/quantized.py [--rows bf16,nf4] [--recipe configs/recipes/tiny/scienceqa-2468.json] [--set KEY=VALUE ...]
The JSON goes to stdout and to bench/results/quantized-<recipe>.json.
"""
import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("mola_bench_common", REPO / "bench" / "common.py")
_common = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_common)

ROWS = {  # row -> (model.dtype, model.quantize)
    "fp32": ("float32", "none"),
    "bf16": ("bfloat16", "none"),
    "nf4": ("bfloat16", "nf4"),
    "int8": ("bfloat16", "int8"),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipe", default=str(REPO / "configs" / "recipes" / "tiny" / "scienceqa-2468.json"))
    p.add_argument("--rows", default="bf16,nf4", help=f"comma list from {','.join(ROWS)}")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="a recipe override for every row (e.g. train.epochs=2 for a quick look)")
    p.add_argument("--out", "-o", dest="output", default=None, help="JSON path (default bench/results/...)")
    return p.parse_args(argv)


def run_row(args, row):
    dtype, quantize = ROWS[row]
    out_dir = REPO / "out" / "bench-quantized" / row
    cmd = [sys.executable, "-m", "mola", "train", args.recipe, "--set", f"output_dir={out_dir}",
           "--set", f"model.dtype={dtype}", "--set", f"model.quantize={quantize}",
           "--set", "train.overwrite_output_dir=true"]
    for o in args.overrides:
        cmd += ["--set", o]
    out_dir.mkdir(parents=True, exist_ok=True)
    log = out_dir.parent / f"{row}.log"
    t0 = time.perf_counter()
    with open(log, "w") as err:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=err)
        # wait4: this child's own rusage, so ru_maxrss is its peak resident memory (KiB)
        _, status, usage = os.wait4(proc.pid, 0)
    code = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - t0
    result = {"row": row, "dtype": dtype, "quantize": quantize, "seconds": seconds,
              "peak_rss_mb": usage.ru_maxrss / 1024.0}
    if code != 0:
        result["failed"] = code
        result["stderr"] = log.read_text().strip().splitlines()[-3:]
        return result
    ev = json.loads((out_dir / "eval.json").read_text())
    for when in ("before", "after"):
        if when in ev:
            result[f"loglik_accuracy_{when}"] = ev[when]["loglik_accuracy"]
            result[f"generate_accuracy_{when}"] = ev[when]["generate_accuracy"]
    steps = [m for m in map(json.loads, (out_dir / "metrics.jsonl").read_text().splitlines())
             if "loss" in m and "eval_loss" not in m]
    result["steps"] = len(steps)
    result["first_loss"], result["last_loss"] = steps[0]["loss"], steps[-1]["loss"]
    return result


def main(argv=None):
    args = parse_args(argv)
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        raise SystemExit(f"bench/quantized.py: --rows: unknown {unknown}; valid: {', '.join(ROWS)}")
    results = {}
    for row in rows:
        results[row] = run_row(args, row)
        print(f"bench/quantized.py: {row}: {json.dumps(results[row])}", file=sys.stderr)
    summary = {}
    base = results.get("bf16", {})
    for row, r in results.items():
        if row != "bf16" and "loglik_accuracy_after" in r and "loglik_accuracy_after" in base:
            summary[f"{row}_minus_bf16_loglik_accuracy_after"] = r["loglik_accuracy_after"] - base["loglik_accuracy_after"]
    report = {"bench": "quantized", "recipe": os.path.relpath(args.recipe, REPO), "overrides": args.overrides,
              "device": _common.device_name(), "rev": _common.git_rev(), "rows": results, "summary": summary}
    text = json.dumps(report, indent=2)
    _common.write_json(text, args.output, f"quantized-{Path(args.recipe).stem}.json")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
