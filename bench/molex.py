"""MoLEx against its base method, side by side: training-step time and peak memory on the CPU.

Rows (a small random llama written by transformers, as bench/model.py):
  cpp_lora         mola.CausalLM + LoRA r=8 (alpha 16, dropout 0.05, all seven projections)
  cpp_molex_lora   the same + MoLEx (mean-pooled gate, alpha 0.5, straight-through)
  cpp_mola         mola.CausalLM + MoLA 2468, top-2, r=8
  cpp_molex_mola   the same + MoLEx
  hf_lora, hf_molex_lora   transformers + mola.inject of the first two configs
A step: forward with labels, loss + aux_loss, backward, AdamW step. MoLEx runs
two decoder blocks per layer (the rows that chose the same j in one batched
call, j == t reusing u_t), so about twice the base forward is expected; the
"groups" field says how many distinct j the gates used per layer in the last step.

Timing: all rows in one process, interleaved round-robin, median over --iters
steps after --warmup rounds. Memory: each row alone in a child process, peak
RSS growth after the imports (bench/model.py's method). Ratios are MoLEx over
its base method.

Usage: python bench/molex.py [--layers 4] [--hidden 256] [--seq 128] [--batch 4] [--iters 6] [--tag default]
The JSON goes to stdout and to bench/results/molex-cpu-<tag>.json.
"""
import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
from common import (add_model_shape_args, device_name, git_rev, kv_heads_default, quantile,  # noqa: E402
                    time_interleaved)
from model import make_ids, make_step, memory_status, reset_peak, write_checkpoint  # noqa: E402

ROWS = ("cpp_lora", "cpp_molex_lora", "cpp_mola", "cpp_molex_mola", "hf_lora", "hf_molex_lora")
PAIRS = (("cpp_molex_lora", "cpp_lora"), ("cpp_molex_mola", "cpp_mola"), ("hf_molex_lora", "hf_lora"))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_shape_args(p, hidden=256, intermediate=688, heads=4, vocab=8000)
    p.add_argument("--dropout", type=float, default=0.05)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--iters", type=int, default=6)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--mem-steps", dest="mem_steps", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rows", default=",".join(ROWS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tag", default="default")
    p.add_argument("--no-memory", dest="memory", action="store_false")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--checkpoint", default=None, help=argparse.SUPPRESS)
    args = kv_heads_default(p.parse_args(argv))
    unknown = set(args.rows.split(",")) - set(ROWS)
    if unknown:
        p.error(f"--rows: unknown row(s) {sorted(unknown)}; valid: {', '.join(ROWS)}")
    return args


def config(name, args):
    import mola

    common = dict(rank=8, alpha=16.0, dropout=args.dropout)
    mola_extra = dict(experts="2468", top_k=2)
    base = "mola" if name.endswith("mola") else "lora"
    if "molex" in name:
        return mola.MoLExConfig(base_method=base, **common, **(mola_extra if base == "mola" else {}))
    return mola.MoLAConfig(method=base, **common, **(mola_extra if base == "mola" else {}))


def build_row(name, args, checkpoint):
    import mola

    if name.startswith("cpp_"):
        model = mola.CausalLM.from_pretrained(checkpoint)
        model.attach(config(name, args))
        return model, lambda m, ids: (lambda out: out.loss + m.aux_loss())(m(ids, labels=ids))
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    model.config.use_cache = False
    mola.inject(model, config(name, args))
    return model, lambda m, ids: m(input_ids=ids, labels=ids).loss + mola.aux_loss(m)


def groups(model):
    """Distinct j per layer in the last forward (C++ gates are not reachable from Python: None)."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None or not hasattr(layers[0], "molex"):
        return None
    return [len(set(l.molex.last["choice"].reshape(-1).tolist())) for l in layers]


def child_memory(args):
    import transformers  # noqa: F401
    import mola  # noqa: F401

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    ids = make_ids(args)
    reset_peak()
    before, _ = memory_status()
    step, _ = make_step(*build_row(args.child, args, args.checkpoint), ids, args.lr)
    for _ in range(args.mem_steps):
        step()
    _, peak = memory_status()
    print(json.dumps({"peak_growth_bytes": peak - before}))


def run_child(name, args, checkpoint):
    argv = [sys.executable, str(Path(__file__).resolve()), "--child", name, "--checkpoint", checkpoint]
    for key in ("layers", "hidden", "intermediate", "heads", "kv_heads", "vocab", "seq", "batch", "dropout",
                "lr", "mem_steps", "threads", "seed"):
        argv += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    out = subprocess.run(argv, capture_output=True, text=True)
    if out.returncode != 0:
        return {"error": f"child exited with {out.returncode}: {out.stderr.strip()[-500:]}"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None):
    args = parse_args(argv)
    if args.child:
        child_memory(args)
        return
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="mola-bench-molex-") as checkpoint:
        write_checkpoint(args, checkpoint, torch.device("cpu"), torch.float32)
        ids = make_ids(args)
        steps, models = {}, {}
        for name in args.rows.split(","):
            torch.manual_seed(args.seed)
            models[name] = build_row(name, args, checkpoint)
            steps[name], _ = make_step(*models[name], ids, args.lr)
        order = list(steps)
        times, first = time_interleaved(steps, args.warmup, args.iters)
        stats = {n: {"median_ms": quantile(times[n], 0.5) * 1e3, "p10_ms": quantile(times[n], 0.1) * 1e3,
                     "p90_ms": quantile(times[n], 0.9) * 1e3, "runs": len(times[n]), "first_loss": first[n],
                     "groups_per_layer": groups(models[n][0])} for n in order}
        del steps, models
        if args.memory:
            for name in order:
                stats[name].update(run_child(name, args, checkpoint))

    def ratio(a, b, key):
        if a in stats and b in stats and stats[a].get(key) and stats[b].get(key):
            return stats[a][key] / stats[b][key]
        return None

    result = {
        "bench": "molex",
        "config": {k: getattr(args, k) for k in ("layers", "hidden", "intermediate", "heads", "kv_heads", "vocab",
                                                 "seq", "batch", "dropout", "lr", "iters", "warmup", "mem_steps",
                                                 "seed")},
        "what": "one training step (forward with labels + aux loss, backward, AdamW), fp32 CPU",
        "torch": torch.__version__, "device_name": device_name(), "threads": torch.get_num_threads(),
        "git_rev": git_rev(), "rows": stats,
        "ratios": {f"{a}/{b} {key}": ratio(a, b, key) for a, b in PAIRS for key in ("median_ms", "peak_growth_bytes")},
    }
    text = json.dumps(result, indent=2)
    print(text)
    path = REPO / "bench" / "results" / f"molex-cpu-{args.tag}.json"
    path.write_text(text + "\n")
    print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
