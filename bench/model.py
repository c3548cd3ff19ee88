"""Whole-model training steps, side by side: tokens/s and peak memory of each way to fine-tune.

A small llama with random weights (made by transformers from a LlamaConfig and
written with save_pretrained into a temporary directory) is fine-tuned by:
  mola_cpp         mola.CausalLM.from_pretrained + attach(MoLAConfig): the C++ model;
                   loss = out.loss + model.aux_loss()
  hf_mola_inject   transformers' LlamaForCausalLM + mola.inject(model, the same config);
                   loss = out.loss + mola.aux_loss(model)
  hf_peft_lora16   transformers + peft LoRA r=16, alpha 32, dropout 0.05 on all seven
                   projections (only when peft imports; otherwise a note says why)
A step is the whole of training: forward with labels, the loss, backward, and
AdamW's step on the trainable parameters. The MoLA config defaults to the
"2468" allocation (one layer group per layer on 4 layers: 2, 4, 6, 8 experts),
top-2, rank 8, alpha 16, dropout 0.05, all seven targets.

Timing: every row in this process, interleaved round-robin (the order rotates
every round), median / p10 / p90 over --iters steps after --warmup rounds.
Memory: a CPU has no allocator counter to reset, so each row runs again alone
in a child process (`--child ROW`) that, after its imports, resets the peak
resident set (VmHWM, through /proc/self/clear_refs) and notes the resident set;
after --mem-steps steps, peak minus that is the row's peak growth (its model,
optimizer state, activations and gradients). Linux only. The
design's targets (shared/design.md section 9) are for an H100 and LLaMA-2-7B
shapes; these are CPU figures at a small size.

Usage: python bench/model.py [--layers 4] [--hidden 512] [--intermediate 1376]
       [--heads 8] [--kv-heads 8] [--vocab 32000] [--seq 128] [--batch 4]
       [--iters 10] [--warmup 2] [--threads 2] [--rows ...] [--tag default]
The JSON goes to stdout and to bench/results/model-cpu-<tag>.json.
"""

import argparse
import json
import os
import gc
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
from common import add_model_shape_args, device_name, git_rev, quantile, time_interleaved  # noqa: E402
ROWS = ("mola_cpp", "hf_mola_inject", "hf_peft_lora16")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_shape_args(p, hidden=512, intermediate=1376, heads=8, vocab=32000)
    p.add_argument("--experts", default="2468", help="MoLA experts: a preset name or a per-group list")
    p.add_argument("--top-k", dest="top_k", type=int, default=2)
    p.add_argument("--rank", type=int, default=8, help="MoLA rank of each expert")
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--lora-rank", dest="lora_rank", type=int, default=16, help="PEFT LoRA rank (alpha = 2 * rank)")
    p.add_argument("--dropout", type=float, default=0.05, help="adapter dropout, every row")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--iters", type=int, default=10, help="timed steps per row")
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds before timing")
    p.add_argument("--mem-steps", dest="mem_steps", type=int, default=2, help="steps per memory child")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument("--rows", default=",".join(ROWS), help=f"comma list from {','.join(ROWS)}")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tag", default="default", help="file name tag")
    p.add_argument("--out", "-o", dest="output", default=None, help="JSON path (default bench/results/...)")
    p.add_argument("--no-memory", dest="memory", action="store_false", help="skip the per-row memory children")
    # internal: one row's memory measurement in a child process
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--checkpoint", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    unknown = set(args.rows.split(",")) - set(ROWS)
    if unknown:
        p.error(f"--rows: unknown row(s) {sorted(unknown)}; valid: {', '.join(ROWS)}")
    if args.hidden % args.heads or args.heads % args.kv_heads:
        p.error(f"--hidden ({args.hidden}) must divide by --heads ({args.heads}), "
                f"and --heads by --kv-heads ({args.kv_heads})")
    return args


def make_checkpoint(args, directory):
    import transformers

    torch.manual_seed(args.seed)
    config = transformers.LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        max_position_embeddings=max(args.seq, 128))
    transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(directory)


def mola_config(args):
    import mola

    return mola.MoLAConfig(experts=args.experts, top_k=args.top_k, rank=args.rank, alpha=args.alpha,
                           dropout=args.dropout, targets=tuple(TARGETS))


def build_row(name, args, checkpoint):
    """(model, loss_fn(model, ids)) for one row, or a reason string when it cannot run here."""
    if name == "mola_cpp":
        import mola

        model = mola.CausalLM.from_pretrained(checkpoint)
        model.attach(mola_config(args))
        return model, lambda m, ids: (lambda out: out.loss + m.aux_loss())(m(ids, labels=ids))

    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    model.config.use_cache = False
    if name == "hf_mola_inject":
        import mola

        mola.inject(model, mola_config(args))
        return model, lambda m, ids: m(input_ids=ids, labels=ids).loss + mola.aux_loss(m)
    if name == "hf_peft_lora16":
        try:
            from peft import LoraConfig, get_peft_model
        except ImportError as err:
            return f"skipped: peft is not importable ({err}); e.g. PYTHONPATH=<dir with peft>"
        config = LoraConfig(r=args.lora_rank, lora_alpha=2 * args.lora_rank, lora_dropout=args.dropout,
                            target_modules=TARGETS, task_type="CAUSAL_LM")
        model = get_peft_model(model, config)
        return model, lambda m, ids: m(input_ids=ids, labels=ids).loss
    raise ValueError(f"unknown row {name!r}")


def make_step(model, loss_fn, ids, lr):
    """One training step: forward with labels, loss, backward, AdamW step. Returns the loss."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    model.train()

    def step():
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model, ids)
        loss.backward()
        opt.step()
        return loss.detach()

    return step, sum(p.numel() for p in params)


def make_ids(args):
    g = torch.Generator().manual_seed(args.seed + 1)
    return torch.randint(0, args.vocab, (args.batch, args.seq), generator=g)


def memory_status():
    """(VmRSS, VmHWM) in bytes: the resident set now and its peak (Linux /proc/self/status)."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) * 1024  # kB
    return fields["VmRSS"], fields["VmHWM"]


def reset_peak():
    """Set VmHWM back to VmRSS (Linux >= 4.0). ru_maxrss cannot be reset and, after
    fork + exec, starts at the parent's peak, so it would hide a small row."""
    Path("/proc/self/clear_refs").write_text("5")


def child_memory(args):
    """The peak resident set this row adds to a process that has only done its imports."""
    import transformers  # noqa: F401  (every import before the baseline)
    import mola  # noqa: F401

    try:
        import peft  # noqa: F401
    except ImportError:
        pass
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    ids = make_ids(args)
    gc.collect()
    reset_peak()
    before, _ = memory_status()
    row = build_row(args.child, args, args.checkpoint)
    if isinstance(row, str):
        print(json.dumps({"skipped": row}))
        return
    step, _ = make_step(*row, ids, args.lr)
    for _ in range(args.mem_steps):
        step()
    _, peak = memory_status()
    print(json.dumps({"rss_after_imports_bytes": before, "peak_rss_bytes": peak,
                      "peak_growth_bytes": peak - before}))


def run_child(name, args, checkpoint):
    argv = [sys.executable, str(Path(__file__).resolve()), "--child", name, "--checkpoint", checkpoint]
    for key in ("layers", "hidden", "intermediate", "heads", "kv_heads", "vocab", "seq", "batch", "experts",
                "top_k", "rank", "alpha", "lora_rank", "dropout", "lr", "mem_steps", "threads", "seed"):
        argv += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    out = subprocess.run(argv, capture_output=True, text=True)
    if out.returncode != 0:
        return {"error": f"child exited with {out.returncode}: {out.stderr.strip()[-500:]}"}
    return json.loads(out.stdout.strip().splitlines()[-1])








def ratio(stats, a, b, key):
    if a in stats and b in stats and stats[a].get(key) and stats[b].get(key):
        return stats[a][key] / stats[b][key]
    return None


def main(argv=None):
    args = parse_args(argv)
    if args.child:
        child_memory(args)
        return
    torch.set_num_threads(args.threads)
    tokens = args.batch * args.seq
    with tempfile.TemporaryDirectory(prefix="mola-bench-model-") as checkpoint:
        make_checkpoint(args, checkpoint)
        ids = make_ids(args)
        steps, notes, trainable, first_loss = {}, {}, {}, {}
        for name in args.rows.split(","):
            torch.manual_seed(args.seed)
            row = build_row(name, args, checkpoint)
            if isinstance(row, str):
                notes[name] = row
                continue
            steps[name], trainable[name] = make_step(*row, ids, args.lr)
        order = list(steps)
        times, first = time_interleaved(steps, args.warmup, args.iters)
        first_loss.update(first)
        del steps
        stats = {}
        for name in order:
            median = quantile(times[name], 0.5)
            stats[name] = {"median_ms": median * 1e3, "p10_ms": quantile(times[name], 0.1) * 1e3,
                           "p90_ms": quantile(times[name], 0.9) * 1e3, "runs": len(times[name]),
                           "tokens_per_s": tokens / median, "trainable_params": trainable[name],
                           "first_loss": first_loss[name]}
        if args.memory:
            for name in order:
                stats[name].update(run_child(name, args, checkpoint))
    result = {
        "bench": "model",
        "config": {
            "device": "cpu", "dtype": "float32", "layers": args.layers, "hidden": args.hidden,
            "intermediate": args.intermediate, "heads": args.heads, "kv_heads": args.kv_heads,
            "vocab": args.vocab, "seq": args.seq, "batch": args.batch, "experts": args.experts,
            "top_k": args.top_k, "rank": args.rank, "alpha": args.alpha, "lora_rank": args.lora_rank,
            "dropout": args.dropout, "lr": args.lr, "iters": args.iters, "warmup": args.warmup,
            "mem_steps": args.mem_steps, "seed": args.seed,
            "what": "one training step (forward with labels + aux loss, backward, AdamW step), "
                    "tokens/s = batch * seq / median step time",
        },
        "torch": torch.__version__,
        "device_name": device_name(),
        "threads": torch.get_num_threads(),
        "git_rev": git_rev(),
        "rows": stats,
        "notes": dict(notes, method=(
            "timing: all rows in one process, interleaved round-robin; memory: each row alone in a child "
            "process, peak_growth_bytes = peak RSS (VmHWM, reset after the imports) over --mem-steps steps "
            "minus the RSS after the imports (model load, optimizer state, activations, gradients); "
            "memory is measured after the timing, one row at a time, not interleaved")),
        "ratios": {
            "mola_cpp/hf_peft_lora16 tokens_per_s": ratio(stats, "mola_cpp", "hf_peft_lora16", "tokens_per_s"),
            "mola_cpp/hf_peft_lora16 peak_growth": ratio(stats, "mola_cpp", "hf_peft_lora16", "peak_growth_bytes"),
            "hf_mola_inject/hf_peft_lora16 tokens_per_s": ratio(stats, "hf_mola_inject", "hf_peft_lora16",
                                                                "tokens_per_s"),
            "hf_mola_inject/hf_peft_lora16 peak_growth": ratio(stats, "hf_mola_inject", "hf_peft_lora16",
                                                               "peak_growth_bytes"),
            "mola_cpp/hf_mola_inject tokens_per_s": ratio(stats, "mola_cpp", "hf_mola_inject", "tokens_per_s"),
        },
    }
    text = json.dumps(result, indent=2)
    print(text)
    path = Path(args.output) if args.output else REPO / "bench" / "results" / f"model-cpu-{args.tag}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n")
    print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
