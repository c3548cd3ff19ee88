"""Whole-model training steps, side by side: tokens/s and peak memory of each way to fine-tune.

A llama with random weights is fine-tuned by:
  mola_cpp         mola.CausalLM.from_pretrained + attach(MoLAConfig): the C++ model;
                   loss = out.loss + model.aux_loss()
  hf_mola_inject   transformers' LlamaForCausalLM + mola.inject(model, the same config);
                   loss = out.loss + mola.aux_loss(model)
  hf_peft_lora16   transformers + peft LoRA r=16, alpha 32, dropout 0.05 on all seven
                   projections (only when peft imports; otherwise a note says why)
  hf_authors_loop  transformers with the seven projections replaced by the MoLA
                   authors' per-expert loop (tests/reference/authors_loop.py), the
                   same config; loss = out.loss + the authors' balance loss
A step is the whole of training: forward with labels, the loss, backward, and
AdamW's step on the trainable parameters. The MoLA config defaults to the
"2468" allocation (4 layer groups: 2, 4, 6, 8 experts), top-2, rank 8, alpha
16, dropout 0.05, all seven targets. Every row starts from the same base
weights (same seed), and all adapters start with B = 0, so the rows' first
losses differ only by the balance loss.

CPU (--device cpu, the default): the llama is made by transformers from a
LlamaConfig and written with save_pretrained into a temporary directory, which
every row loads. Timing: every row in this process, interleaved round-robin
(the order rotates every round), median / p10 / p90 over --iters steps after
--warmup rounds. Memory: a CPU has no allocator counter to reset, so each row
runs again alone in a child process (`--child ROW`) that, after its imports,
resets the peak resident set (VmHWM, through /proc/self/clear_refs) and notes
the resident set; after --mem-steps steps, peak minus that is the row's peak
growth (its model, optimizer state, activations and gradients). Linux only.

CUDA (--device cuda): a 7B model per row leaves no room for a second one, so
each row runs alone in a child process: it builds its model on the GPU in
--dtype (transformers: from_config under `with torch.device("cuda")`, seeded,
so nothing is materialised on the CPU), runs --warmup + --iters steps timed by
CUDA events, and reports torch.cuda.max_memory_allocated since a
reset_peak_memory_stats at its start. Rows cannot be interleaved step by step;
instead --rounds rounds of children run the rows in an order that rotates
every round, and a row's figures pool its timed steps over the rounds.
mola.CausalLM is built only by from_pretrained(directory), so for mola_cpp a
child first writes the same seeded GPU-built model once as safetensors into a
temporary directory (or --checkpoint-dir, reused while its stamp matches).
The design's targets (bench/README.md) are for an H100 and
LLaMA-2-7B shapes: --device cuda --preset llama2-7b.

Usage: python bench/model.py [--device cpu|cuda] [--dtype float32|bfloat16|float16]
       [--preset llama2-7b] [--layers 4] [--hidden 512] [--intermediate 1376]
       [--heads 8] [--kv-heads 8] [--vocab 32000] [--seq 128] [--batch 4]
       [--iters 10] [--warmup 2] [--rounds 1] [--threads 2] [--rows ...] [--tag default]
The JSON goes to stdout and to bench/results/model-<device>-<tag>.json.
"""

import argparse
import contextlib
import gc
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
from common import (  # noqa: E402
    add_model_shape_args, cuda_timed, device_name, git_rev, kv_heads_default, parse_with_model_preset, quantile,
    time_interleaved,
)
sys.path.insert(0, str(REPO))  # for tests.reference

ROWS = ("mola_cpp", "hf_mola_inject", "hf_peft_lora16", "hf_authors_loop")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# A decoder-layer projection of a transformers llama: group 1 the layer index, group 2 its name.
LAYER_LINEAR = re.compile(r"(?:^|\.)layers\.(\d+)\.(?:self_attn|mlp)\.([A-Za-z0-9_]+)$")
# Stamp file of a --checkpoint-dir: what the weights there were made from.
STAMP = "bench-model-checkpoint.json"
# The design's targets (bench/README.md), checked on CUDA runs.
TARGET_RATIOS = {"mola_cpp/hf_peft_lora16 tokens_per_s": (">=", 1.2),
                 "mola_cpp/hf_peft_lora16 peak_bytes": ("<=", 0.9)}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--dtype", default=None, choices=tuple(DTYPES),
                   help="model dtype (default float32 on cpu, bfloat16 on cuda)")
    add_model_shape_args(p, hidden=512, intermediate=1376, heads=8, vocab=32000)
    p.add_argument("--experts", default="2468", help="MoLA experts: a preset name or a per-group list")
    p.add_argument("--top-k", dest="top_k", type=int, default=2)
    p.add_argument("--rank", type=int, default=8, help="MoLA rank of each expert")
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--lora-rank", dest="lora_rank", type=int, default=16, help="PEFT LoRA rank (alpha = 2 * rank)")
    p.add_argument("--dropout", type=float, default=0.05, help="adapter dropout, every row")
    p.add_argument("--peft-keep-dtype", dest="peft_keep_dtype", action="store_true",
                   help="hf_peft_lora16: keep the LoRA weights in --dtype (get_peft_model(autocast_adapter_dtype="
                        "False)); by default peft upcasts bf16/fp16 adapters to float32 and runs the LoRA path "
                        "in float32")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--iters", type=int, default=10, help="timed steps per row (per child on cuda)")
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds (steps per child on cuda) before timing")
    p.add_argument("--rounds", type=int, default=1,
                   help="cuda: rounds of one child per row, the row order rotating every round")
    p.add_argument("--mem-steps", dest="mem_steps", type=int, default=2, help="cpu: steps per memory child")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument("--rows", default=",".join(ROWS), help=f"comma list from {','.join(ROWS)}")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint-dir", dest="checkpoint_dir", default=None,
                   help="keep the random checkpoint here and reuse it while it matches the shapes, seed and "
                        "dtype (default: a temporary directory, removed at the end)")
    p.add_argument("--tag", default="default", help="file name tag")
    p.add_argument("--rev", default=None,
                   help="the revision to record when this checkout has no git metadata (a copied tree)")
    p.add_argument("--out", "-o", dest="output", default=None, help="JSON path (default bench/results/...)")
    p.add_argument("--no-memory", dest="memory", action="store_false", help="cpu: skip the per-row memory children")
    # internal: one row in a child process (cpu: its memory; cuda: its timing and memory),
    # and on cuda the child that writes the random checkpoint
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--checkpoint", default=None, help=argparse.SUPPRESS)
    p.add_argument("--write-checkpoint", dest="write_checkpoint", default=None, help=argparse.SUPPRESS)
    args = kv_heads_default(parse_with_model_preset(p, argv))
    if args.dtype is None:
        args.dtype = "bfloat16" if args.device == "cuda" else "float32"
    rows = args.rows.split(",")
    unknown = set(rows) - set(ROWS)
    if unknown:
        p.error(f"--rows: unknown row(s) {sorted(unknown)}; valid: {', '.join(ROWS)}")
    if len(set(rows)) != len(rows):
        p.error(f"--rows: a row is named twice in {args.rows!r}")
    for name in ("layers", "hidden", "intermediate", "heads", "kv_heads", "vocab", "seq", "batch", "iters",
                 "rounds", "mem_steps", "threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.hidden % args.heads or args.heads % args.kv_heads:
        p.error(f"--hidden ({args.hidden}) must divide by --heads ({args.heads}), "
                f"and --heads by --kv-heads ({args.kv_heads})")
    if args.warmup < 0:
        p.error(f"--warmup must be >= 0, got {args.warmup}")
    if args.device == "cpu" and args.rounds != 1:
        p.error("--rounds applies to --device cuda; on the cpu every row runs in one process, interleaved "
                "step by step")
    return args


def llama_config(args):
    import transformers

    return transformers.LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        max_position_embeddings=max(args.seq, 128), use_cache=False)


def random_llama(args, device, dtype):
    """transformers' LlamaForCausalLM with seeded random weights, made where it will run:
    under `with torch.device(device)` every parameter is created and initialised on that
    device in ``dtype``, so a 7B model never passes through host memory. The same seed
    on the same device gives the same weights in every process."""
    import transformers

    torch.manual_seed(args.seed)
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(llama_config(args), dtype=dtype)
    model.config.use_cache = False
    return model


def checkpoint_stamp(args, device, dtype):
    import transformers

    keys = ("layers", "hidden", "intermediate", "heads", "kv_heads", "vocab", "seq", "seed")
    return dict({key: getattr(args, key) for key in keys}, device=device.type, dtype=str(dtype),
                transformers=transformers.__version__)


def write_checkpoint(args, directory, device, dtype):
    """The random llama as a Hugging Face safetensors checkpoint in ``directory``, stamped
    with what it was made from. On the cpu it is written in float32 (each row loads it in
    --dtype); on cuda in --dtype from the GPU-built model the transformers rows rebuild, so
    mola_cpp starts from the same weights bit for bit."""
    Path(directory, STAMP).unlink(missing_ok=True)  # a write cut short must not look current
    model = random_llama(args, device, torch.float32 if device.type == "cpu" else dtype)
    model.save_pretrained(directory)
    del model
    Path(directory, STAMP).write_text(json.dumps(checkpoint_stamp(args, device, dtype), indent=2) + "\n")


def checkpoint_is_current(args, directory, device, dtype):
    path = Path(directory, STAMP)
    try:
        return json.loads(path.read_text()) == checkpoint_stamp(args, device, dtype)
    except (OSError, ValueError):
        return False


def mola_config(args):
    import mola

    return mola.MoLAConfig(experts=args.experts, top_k=args.top_k, rank=args.rank, alpha=args.alpha,
                           dropout=args.dropout, targets=tuple(TARGETS))


def inject_authors_loop(model, args):
    """Replaces the seven projections of every decoder layer of a transformers llama by
    ReferenceMoLALinear (the authors' per-expert loop) with the layer's E, k and r from
    the same resolved config mola uses; freezes the rest. Returns the loss function:
    out.loss plus the authors' balance loss over each layer's stacked router logits
    (module order within a layer, as mola.aux_loss stacks them)."""
    from tests.reference.authors_loop import ReferenceMoLALinear, reference_load_balancing_loss

    resolved = mola_config(args).resolve(args.layers)
    model.requires_grad_(False)
    found = []
    for path, module in model.named_modules():
        match = LAYER_LINEAR.search(path)
        if match is None or match.group(2) not in TARGETS:
            continue
        if not isinstance(module, nn.Linear):
            raise TypeError(f"hf_authors_loop: {path} is a {type(module).__name__}, not an nn.Linear")
        found.append((path, int(match.group(1)), match.group(2), module))
    missing = set(TARGETS) - {name for _, _, name, _ in found}
    if missing:
        raise ValueError(f"hf_authors_loop: no decoder-layer module named {sorted(missing)} in the model")
    layers = {}
    for path, index, _, linear in found:
        module = ReferenceMoLALinear(linear, resolved["experts"][index], resolved["top_k"][index],
                                     resolved["rank"][index], alpha=resolved["alpha"], dropout=resolved["dropout"])
        parent, _, child = path.rpartition(".")
        setattr(model.get_submodule(parent), child, module)
        layers.setdefault(index, []).append(module)
    order = sorted(layers)
    top_k = [resolved["top_k"][index] for index in order]
    coef = resolved["aux_loss_coef"]

    def loss_fn(m, ids):
        out = m(input_ids=ids, labels=ids)
        logits = [torch.cat([module.router_logits for module in layers[index]], dim=0) for index in order]
        return out.loss + reference_load_balancing_loss(logits, top_k, coef)

    return loss_fn


def build_row(name, args, checkpoint, device, dtype):
    """(model, loss_fn(model, ids)) for one row, or a reason string when it cannot run here.
    On the cpu every row loads ``checkpoint``; on cuda only mola_cpp does and the
    transformers rows build the same seeded model on the GPU."""
    if name == "mola_cpp":
        import mola

        model = mola.CausalLM.from_pretrained(checkpoint, dtype=dtype, device=str(device))
        model.attach(mola_config(args))
        return model, lambda m, ids: (lambda out: out.loss + m.aux_loss())(m(ids, labels=ids))

    if name == "hf_peft_lora16":
        try:
            from peft import LoraConfig, get_peft_model
        except ImportError as err:
            return f"skipped: peft is not importable ({err}); e.g. PYTHONPATH=<dir with peft>"
    if device.type == "cuda":
        model = random_llama(args, device, dtype)
    else:
        import transformers

        model = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, dtype=dtype)
        model.config.use_cache = False
    if name == "hf_mola_inject":
        import mola

        mola.inject(model, mola_config(args))
        return model, lambda m, ids: m(input_ids=ids, labels=ids).loss + mola.aux_loss(m)
    if name == "hf_peft_lora16":
        config = LoraConfig(r=args.lora_rank, lora_alpha=2 * args.lora_rank, lora_dropout=args.dropout,
                            target_modules=TARGETS, task_type="CAUSAL_LM")
        # peft's default (autocast_adapter_dtype=True) keeps a bf16/fp16 model's LoRA weights in float32
        model = get_peft_model(model, config, autocast_adapter_dtype=not args.peft_keep_dtype)
        return model, lambda m, ids: m(input_ids=ids, labels=ids).loss
    if name == "hf_authors_loop":
        return model, inject_authors_loop(model, args)
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


def adapter_dtypes(model):
    """The dtypes of the trainable parameters (peft upcasts its LoRA weights by default)."""
    return sorted({str(p.dtype).replace("torch.", "") for p in model.parameters() if p.requires_grad})


def attn_implementation(model):
    """The attention kernel transformers picked (sdpa, eager, ...), None for the C++ model."""
    config = getattr(model, "config", None)
    return getattr(config, "_attn_implementation", None) if not isinstance(config, dict) else None


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


def import_everything():
    """Every import a row may need, before a child's baseline, so no row pays for them."""
    import transformers  # noqa: F401
    import mola  # noqa: F401
    import tests.reference.authors_loop  # noqa: F401

    try:
        import peft  # noqa: F401
    except ImportError:
        pass


def child_memory(args):
    """cpu: the peak resident set this row adds to a process that has only done its imports."""
    import_everything()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    ids = make_ids(args)
    gc.collect()
    reset_peak()
    before, _ = memory_status()
    row = build_row(args.child, args, args.checkpoint, torch.device("cpu"), DTYPES[args.dtype])
    if isinstance(row, str):
        print(json.dumps({"skipped": row}))
        return
    step, _ = make_step(*row, ids, args.lr)
    for _ in range(args.mem_steps):
        step()
    _, peak = memory_status()
    print(json.dumps({"rss_after_imports_bytes": before, "peak_rss_bytes": peak,
                      "peak_growth_bytes": peak - before}))


def child_cuda(args):
    """cuda: one row alone: build, --warmup + --iters steps each timed by CUDA events, and
    the allocator's peak over all of it (weights, adapter, optimizer state, activations,
    gradients; the CUDA context and cached free blocks are not allocations)."""
    import_everything()
    torch.set_num_threads(args.threads)
    device = torch.device("cuda", torch.cuda.current_device())
    ids = make_ids(args).to(device)
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    baseline = torch.cuda.memory_allocated(device)  # the ids only
    t0 = time.perf_counter()
    torch.manual_seed(args.seed)
    row = build_row(args.child, args, args.checkpoint, device, DTYPES[args.dtype])
    if isinstance(row, str):
        print(json.dumps({"skipped": row}))
        return
    model, loss_fn = row
    step, trainable = make_step(model, loss_fn, ids, args.lr)
    torch.cuda.synchronize(device)
    build_s = time.perf_counter() - t0
    built_bytes = torch.cuda.memory_allocated(device) - baseline
    times, losses = [], []
    for index in range(args.warmup + args.iters):
        seconds, loss = cuda_timed(step)
        losses.append(loss.item())  # after the end event: outside the timed span
        if index >= args.warmup:
            times.append(seconds)
    peak = torch.cuda.max_memory_allocated(device)
    print(json.dumps({
        "times_s": times, "first_loss": losses[0], "last_loss": losses[-1], "trainable_params": trainable,
        "peak_bytes": peak - baseline, "model_bytes": built_bytes,
        "peak_reserved_bytes": torch.cuda.max_memory_reserved(device), "build_s": build_s,
        "adapter_dtypes": adapter_dtypes(model), "attn_implementation": attn_implementation(model),
        "device_name": device_name(device)}))


def child_argv(args, checkpoint):
    argv = [sys.executable, str(Path(__file__).resolve())]
    if checkpoint is not None:
        argv += ["--checkpoint", checkpoint]
    for key in ("device", "dtype", "layers", "hidden", "intermediate", "heads", "kv_heads", "vocab", "seq", "batch",
                "experts", "top_k", "rank", "alpha", "lora_rank", "dropout", "lr", "iters", "warmup", "mem_steps",
                "threads", "seed"):
        argv += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    if args.peft_keep_dtype:
        argv.append("--peft-keep-dtype")
    return argv


def run_child(name, args, checkpoint):
    out = subprocess.run(child_argv(args, checkpoint) + ["--child", name], capture_output=True, text=True)
    if out.returncode != 0:
        return {"error": f"child exited with {out.returncode}: {out.stderr.strip()[-2000:]}"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def ratio(stats, a, b, key):
    if a in stats and b in stats and stats[a].get(key) and stats[b].get(key):
        return stats[a][key] / stats[b][key]
    return None


def ratios(stats, memory_key, memory_label):
    pairs = (("mola_cpp", "hf_peft_lora16"), ("hf_mola_inject", "hf_peft_lora16"), ("mola_cpp", "hf_mola_inject"),
             ("mola_cpp", "hf_authors_loop"), ("hf_mola_inject", "hf_authors_loop"))
    out = {}
    for a, b in pairs:
        out[f"{a}/{b} tokens_per_s"] = ratio(stats, a, b, "tokens_per_s")
        out[f"{a}/{b} {memory_label}"] = ratio(stats, a, b, memory_key)
    return out


def run_config(args):
    return {
        "device": args.device, "dtype": args.dtype, "preset": args.preset, "layers": args.layers,
        "hidden": args.hidden, "intermediate": args.intermediate, "heads": args.heads, "kv_heads": args.kv_heads,
        "vocab": args.vocab, "seq": args.seq, "batch": args.batch, "experts": args.experts, "top_k": args.top_k,
        "rank": args.rank, "alpha": args.alpha, "lora_rank": args.lora_rank, "dropout": args.dropout,
        "lr": args.lr, "iters": args.iters, "warmup": args.warmup, "rounds": args.rounds,
        "mem_steps": args.mem_steps, "seed": args.seed, "peft_keep_dtype": args.peft_keep_dtype,
        "what": "one training step (forward with labels + aux loss, backward, AdamW step), "
                "tokens/s = batch * seq / median step time",
    }


@contextlib.contextmanager
def checkpoint_directory(args):
    """--checkpoint-dir when given (kept), else a temporary directory (removed)."""
    if args.checkpoint_dir is not None:
        Path(args.checkpoint_dir).mkdir(parents=True, exist_ok=True)
        yield str(Path(args.checkpoint_dir).resolve())
        return
    with tempfile.TemporaryDirectory(prefix="mola-bench-model-") as directory:
        yield directory


def write_result(result, args):
    text = json.dumps(result, indent=2)
    path = Path(args.output) if args.output else REPO / "bench" / "results" / f"model-{args.device}-{args.tag}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n")
    return text, path


def main_cpu(args):
    torch.set_num_threads(args.threads)
    device, dtype = torch.device("cpu"), DTYPES[args.dtype]
    tokens = args.batch * args.seq
    with checkpoint_directory(args) as checkpoint:
        if not checkpoint_is_current(args, checkpoint, device, dtype):
            write_checkpoint(args, checkpoint, device, dtype)
        ids = make_ids(args)
        steps, notes, trainable, first_loss, dtypes = {}, {}, {}, {}, {}
        for name in args.rows.split(","):
            torch.manual_seed(args.seed)
            row = build_row(name, args, checkpoint, device, dtype)
            if isinstance(row, str):
                notes[name] = row
                continue
            dtypes[name] = adapter_dtypes(row[0])
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
                           "first_loss": first_loss[name], "adapter_dtypes": dtypes[name]}
        if args.memory:
            for name in order:
                stats[name].update(run_child(name, args, checkpoint))
    result = {
        "bench": "model",
        "config": run_config(args),
        "torch": torch.__version__,
        "device_name": device_name(),
        "threads": torch.get_num_threads(),
        "git_rev": args.rev or git_rev(),
        "rows": stats,
        "notes": dict(notes, method=(
            "timing: all rows in one process, interleaved round-robin; memory: each row alone in a child "
            "process, peak_growth_bytes = peak RSS (VmHWM, reset after the imports) over --mem-steps steps "
            "minus the RSS after the imports (model load, optimizer state, activations, gradients); "
            "memory is measured after the timing, one row at a time, not interleaved")),
        "ratios": ratios(stats, "peak_growth_bytes", "peak_growth"),
    }
    text, path = write_result(result, args)
    print(text)
    print(f"wrote {path}", file=sys.stderr)


def cuda_stats(children, tokens):
    """One row's figures from its children (one per round): timed steps pooled over the rounds."""
    ok = [c for c in children if "times_s" in c]
    stats = {}
    if ok:
        times = [t for c in ok for t in c["times_s"]]
        median = quantile(times, 0.5)
        stats = {
            "median_ms": median * 1e3, "p10_ms": quantile(times, 0.1) * 1e3, "p90_ms": quantile(times, 0.9) * 1e3,
            "runs": len(times), "tokens_per_s": tokens / median,
            "round_median_ms": [quantile(c["times_s"], 0.5) * 1e3 for c in ok],
            # the allocator's peak is the same every round up to allocation order; keep the worst
            "peak_bytes": max(c["peak_bytes"] for c in ok), "model_bytes": ok[0]["model_bytes"],
            "peak_reserved_bytes": max(c["peak_reserved_bytes"] for c in ok),
            "trainable_params": ok[0]["trainable_params"], "first_loss": ok[0]["first_loss"],
            "last_loss": ok[-1]["last_loss"], "adapter_dtypes": ok[0]["adapter_dtypes"],
            "attn_implementation": ok[0]["attn_implementation"],
            "build_s": [round(c["build_s"], 1) for c in ok], "child_wall_s": [round(c["wall_s"], 1) for c in ok],
        }
        bad = [c["first_loss"] for c in ok if not math.isfinite(c["first_loss"])]
        if bad:
            stats["warning"] = f"non-finite first loss {bad}"
    errors = [c["error"] for c in children if "error" in c]
    if errors:
        stats["errors"] = errors
    return stats


def main_cuda(args):
    if not torch.cuda.is_available():
        sys.exit("bench/model.py: --device cuda, but torch.cuda.is_available() is False: no usable GPU here "
                 f"(torch {torch.__version__}, CUDA build {torch.version.cuda}); run it on a machine with a GPU, "
                 "or use --device cpu")
    # The parent never touches the GPU: a CUDA context here would sit beside every child's model.
    rows = args.rows.split(",")
    # A missing package would only show after minutes of GPU time, in a child: look first.
    import importlib.util
    needed = {"transformers": True, "mola": True, "peft": "hf_peft_lora16" in rows}
    missing = [name for name, wanted in needed.items() if wanted and importlib.util.find_spec(name) is None]
    if missing:
        sys.exit(f"bench/model.py: cannot import {', '.join(missing)} (peft: PYTHONPATH=<dir with peft>, or leave "
                 "hf_peft_lora16 out of --rows; mola: build and install it first)")
    tokens = args.batch * args.seq
    children = {name: [] for name in rows}
    notes = {}
    checkpoint_note = None
    result, rev = {}, args.rev or git_rev()

    def update():
        stats = {name: cuda_stats(children[name], tokens) for name in rows if children[name]}
        reported = [c for name in rows for c in children[name] if "device_name" in c]
        values = ratios(stats, "peak_bytes", "peak_bytes")
        result.clear()
        result.update({
            "bench": "model",
            "config": run_config(args),
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "device_name": reported[0]["device_name"] if reported else None,
            "git_rev": rev,
            "rows": stats,
            "notes": dict(notes, method=(
                "each row alone in its own child process (one model per process: a 7B model per row leaves no "
                "room to hold the rows side by side, so steps of different rows cannot be interleaved); "
                f"--rounds {args.rounds} round(s) of one child per row, the row order rotating every round; "
                "per step CUDA events around forward + loss + backward + AdamW step; median / p10 / p90 over "
                "the timed steps of all rounds; peak_bytes = torch.cuda.max_memory_allocated since "
                "reset_peak_memory_stats at the child's start, over its warmup and timed steps (weights, "
                "adapter, optimizer state, activations, gradients; not the CUDA context or cached free blocks, "
                "see peak_reserved_bytes); no gradient checkpointing in any row"),
                checkpoint=checkpoint_note,
                alloc_conf=os.environ.get("PYTORCH_CUDA_ALLOC_CONF")),
            "ratios": values,
            "targets": {key: {"target": f"{op} {bound}", "value": values.get(key),
                              "met": None if values.get(key) is None
                              else (values[key] >= bound if op == ">=" else values[key] <= bound)}
                        for key, (op, bound) in TARGET_RATIOS.items()},
        })
        return write_result(result, args)

    with checkpoint_directory(args) as checkpoint:
        device, dtype = torch.device("cuda"), DTYPES[args.dtype]
        if "mola_cpp" in rows:
            if checkpoint_is_current(args, checkpoint, device, dtype):
                checkpoint_note = f"mola_cpp: reused the checkpoint in {checkpoint} (its stamp matches)"
            else:
                t0 = time.perf_counter()
                print(f"writing the random {args.dtype} checkpoint for mola_cpp into {checkpoint}", file=sys.stderr)
                out = subprocess.run(child_argv(args, None) + ["--write-checkpoint", checkpoint],
                                     capture_output=True, text=True)
                if out.returncode != 0:
                    sys.exit(f"bench/model.py: writing the checkpoint failed ({out.returncode}): "
                             f"{out.stderr.strip()[-2000:]}")
                checkpoint_note = (
                    f"mola_cpp: mola.CausalLM is built only by from_pretrained(directory), so the same seeded "
                    f"GPU-built transformers model was written once as {args.dtype} safetensors "
                    f"({time.perf_counter() - t0:.0f} s) and loaded with dtype/device; from_pretrained builds "
                    "the C++ model on the host and then moves it, so its build time is not comparable")
        for round_index in range(args.rounds):
            shift = round_index % len(rows)
            for name in rows[shift:] + rows[:shift]:
                t0 = time.perf_counter()
                child = run_child(name, args, checkpoint)
                child["wall_s"] = time.perf_counter() - t0
                if "skipped" in child:
                    notes[name] = child["skipped"]
                else:
                    children[name].append(child)
                # written after every child, so a run cut short keeps what it measured
                update()
                line = (f"round {round_index + 1}/{args.rounds} {name}: "
                        + (child.get("skipped") or child.get("error", "")[-300:] or
                           f"{tokens / quantile(child['times_s'], 0.5):.0f} tokens/s, "
                           f"peak {child['peak_bytes'] / 2**30:.2f} GiB, {child['wall_s']:.0f} s"))
                print(line, file=sys.stderr, flush=True)
    text, path = update()
    print(text)
    print(f"wrote {path}", file=sys.stderr)


def main(argv=None):
    args = parse_args(argv)
    if args.write_checkpoint:
        write_checkpoint(args, args.write_checkpoint, torch.device(args.device), DTYPES[args.dtype])
        return
    if args.child:
        (child_cuda if args.device == "cuda" else child_memory)(args)
        return
    (main_cuda if args.device == "cuda" else main_cpu)(args)


if __name__ == "__main__":
    main()
