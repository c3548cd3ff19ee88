"""A 7B model on one machine: load time and peak memory of mola against
transformers, and (--train) one MoLA training step, at a real model's shapes.

It writes, once, a checkpoint of random bf16 weights with the named model's
config.json (configs/models/; --layers, --hidden, --intermediate and --vocab
shrink it for small runs), in safetensors shards with an index, as the Hugging
Face hub has them. Then each row runs in a fresh process, so each one's peak
RSS is its own:

  mola          mola.CausalLM.from_pretrained(dir, dtype)
  mola-nf4      the same with quantize="nf4" (and mola-int8: "int8"; only when --rows names them)
  transformers  transformers.AutoModelForCausalLM.from_pretrained(dir, dtype)
  inject        transformers + mola.inject (only with --train)
  peft          transformers + PEFT LoRA r=16 on the seven projections (--train, when peft imports)
  peft-qlora    transformers with bitsandbytes' NF4 (double quantization) + PEFT LoRA r=16: QLoRA
                (--train; only when --rows names it, and bitsandbytes imports)

and reports the seconds to load, the peak resident memory after loading
(VmHWM, which counts the file pages a mapped checkpoint touched), the
resident memory before loading, and the seconds and peak memory of a first
forward (no grad), which reads every weight a lazily mapped checkpoint has
not read yet. With --train each model then gets
its adapter (MoLA 2468, top-2, rank 8, dropout 0.05 on the seven projections;
PEFT: LoRA r=16), a frozen bf16 base with the adapter and AdamW in fp32, and
runs --steps training steps on --batch x --seq random tokens (gradient
checkpointing on); the row reports the seconds of each step and the peak RSS.
With --device cuda the models load onto the GPU (the checkpoint is read on the
host), every timing waits for the GPU, and each row also reports the peak GPU
memory (torch.cuda.max_memory_allocated) and the training tokens per second.

Usage:
  python bench/scale.py --shape llama-2-7b [--train] [--rows mola,transformers]
  python bench/scale.py --shape gemma-7b --layers 2 --keep-checkpoint
  python bench/scale.py --device cuda --train --rows mola-nf4,peft-qlora --seq 512 --batch 4
The JSON goes to stdout and to bench/results/scale-<shape>[-L<layers>]-<dtype>.json.
The checkpoint lives under out/bench-checkpoints/ (git-ignored); --remove-checkpoint deletes it after.
"""
import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# bench/ holds a kernels.py, which would shadow the `kernels` package transformers
# looks for: take bench/ off the path and load common.py by its file name.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != REPO / "bench"]
_spec = importlib.util.spec_from_file_location("mola_bench_common", REPO / "bench" / "common.py")
_common = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_common)
device_name, git_rev, write_json = _common.device_name, _common.git_rev, _common.write_json

ROWS = ("mola", "transformers", "inject", "peft", "mola-nf4", "mola-int8", "peft-qlora")
QUANTIZED = {"mola-nf4": "nf4", "mola-int8": "int8"}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SHARD_BYTES = 4 << 30  # about 4 GiB per shard, as a 7B checkpoint on the hub is split


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="llama-2-7b",
                   help="a config under configs/models (llama-2-7b, mistral-7b-v0.1, gemma-7b, gemma-2b) or a path")
    p.add_argument("--layers", type=int, default=None, help="num_hidden_layers override (default: the config's)")
    p.add_argument("--hidden", type=int, default=None, help="hidden_size override (shrinks heads' count to match)")
    p.add_argument("--intermediate", type=int, default=None, help="intermediate_size override")
    p.add_argument("--vocab", type=int, default=None, help="vocab_size override")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--rows", default=None, help=f"comma list from {','.join(ROWS)} (default: all that apply)")
    p.add_argument("--train", action="store_true", help="also one MoLA (or PEFT) training step per row")
    p.add_argument("--steps", type=int, default=2, help="training steps per row (the first includes warm-up)")
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where the models run")
    p.add_argument("--checkpoint-dir", default=None, help="where the random checkpoint is written and reused")
    p.add_argument("--remove-checkpoint", action="store_true", help="delete the checkpoint when done")
    p.add_argument("--no-prewarm", dest="prewarm", action="store_false",
                   help="do not read the checkpoint once before each row (default: every row starts with the "
                        "files in the page cache, so no row pays the disk for another)")
    p.add_argument("--out", "-o", dest="output", default=None, help="JSON path (default bench/results/...)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)  # one row, in its own process
    return p.parse_args(argv)


# ---------------------------------------------------------------- the checkpoint

def model_config(args):
    path = Path(args.shape)
    if not path.exists():
        path = REPO / "configs" / "models" / f"{args.shape}.json"
    if not path.exists():
        names = sorted(p.stem for p in (REPO / "configs" / "models").glob("*.json"))
        raise SystemExit(f"bench/scale.py: no model config {args.shape!r}; use one of {names} or a path")
    cfg = json.loads(path.read_text())
    if args.layers is not None:
        cfg["num_hidden_layers"] = args.layers
    if args.hidden is not None:
        head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
        heads = max(1, args.hidden // head_dim)
        kv = cfg.get("num_key_value_heads", cfg["num_attention_heads"])
        cfg["num_key_value_heads"] = max(1, min(kv, heads)) if heads % max(1, min(kv, heads)) == 0 else 1
        cfg["hidden_size"], cfg["num_attention_heads"] = args.hidden, heads
        if "head_dim" in cfg:
            cfg["head_dim"] = head_dim
    if args.intermediate is not None:
        cfg["intermediate_size"] = args.intermediate
    if args.vocab is not None:
        cfg["vocab_size"] = args.vocab
    cfg["torch_dtype"] = args.dtype
    return cfg


def tag(args):
    # "mistral-7b-v0.1" is a name, not a file with the suffix ".1"
    name = Path(args.shape).stem if args.shape.endswith(".json") else Path(args.shape).name
    parts = [name]
    for flag, value in (("L", args.layers), ("h", args.hidden), ("i", args.intermediate), ("v", args.vocab)):
        if value is not None:
            parts.append(f"{flag}{value}")
    return "-".join(parts)


def tensor_shapes(cfg):
    """Hugging Face names and shapes of a llama / mistral / gemma checkpoint."""
    h, i, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    heads = cfg["num_attention_heads"]
    kv = cfg.get("num_key_value_heads", heads)
    d = cfg.get("head_dim") or h // heads
    out = [("model.embed_tokens.weight", (v, h))]
    for layer in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        out += [(p + "self_attn.q_proj.weight", (heads * d, h)), (p + "self_attn.k_proj.weight", (kv * d, h)),
                (p + "self_attn.v_proj.weight", (kv * d, h)), (p + "self_attn.o_proj.weight", (h, heads * d)),
                (p + "mlp.gate_proj.weight", (i, h)), (p + "mlp.up_proj.weight", (i, h)),
                (p + "mlp.down_proj.weight", (h, i)),
                (p + "input_layernorm.weight", (h,)), (p + "post_attention_layernorm.weight", (h,))]
    out.append(("model.norm.weight", (h,)))
    if not cfg.get("tie_word_embeddings", cfg.get("model_type") == "gemma"):
        out.append(("lm_head.weight", (v, h)))
    return out


def write_checkpoint(args, cfg, directory: Path):
    """Random weights (N(0, 0.02), norms near 1) in shards of about SHARD_BYTES, written once."""
    import torch
    from safetensors.torch import save_file
    done = directory / ".complete"
    if done.exists():
        return
    if directory.exists():
        shutil.rmtree(directory)
    directory.mkdir(parents=True)
    dtype = getattr(torch, args.dtype)
    gen = torch.Generator().manual_seed(0)
    shapes = tensor_shapes(cfg)
    total = sum(torch.Size(s).numel() for _, s in shapes) * torch.empty((), dtype=dtype).element_size()
    shards = max(1, -(-total // SHARD_BYTES))
    weight_map, current, size, index = {}, {}, 0, 1
    t0 = time.perf_counter()

    def flush():
        nonlocal current, size, index
        name = f"model-{index:05d}-of-{shards:05d}.safetensors"
        save_file(current, str(directory / name), metadata={"format": "pt"})
        for key in current:
            weight_map[key] = name
        current, size, index = {}, 0, index + 1

    for name, shape in shapes:
        if name.endswith("norm.weight"):
            t = (torch.zeros(shape) if cfg.get("model_type") == "gemma" else torch.ones(shape)).to(dtype)
        else:
            t = torch.empty(shape, dtype=dtype)
            rows = max(1, (64 << 20) // (4 * (shape[1] if len(shape) > 1 else 1)))  # fp32 chunks of 64 MiB
            for start in range(0, shape[0], rows):
                n = min(rows, shape[0] - start)
                t[start:start + n] = (torch.randn((n,) + tuple(shape[1:]), generator=gen) * 0.02).to(dtype)
        nbytes = t.numel() * t.element_size()
        if current and size + nbytes > SHARD_BYTES and index < shards:
            flush()
        current[name] = t
        size += nbytes
    if current:
        flush()
    # the actual shard count may differ from the estimate by one: rename to the real total
    files = sorted(set(weight_map.values()))
    rename = {old: f"model-{k + 1:05d}-of-{len(files):05d}.safetensors" for k, old in enumerate(files)}
    for old, new in rename.items():
        if old != new:
            (directory / old).rename(directory / new)
    weight_map = {key: rename[f] for key, f in weight_map.items()}
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    (directory / "config.json").write_text(json.dumps(cfg, indent=2))
    done.write_text(f"{time.perf_counter() - t0:.1f} s\n")


def weights_bytes(directory: Path):
    return sum(f.stat().st_size for f in directory.glob("*.safetensors"))


# ---------------------------------------------------------------- one row, in a child process

def _status_mb(field):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024.0
    return float("nan")


def rss_mb():
    """Peak resident memory of this process so far, MiB: VmHWM, which starts
    afresh at exec (ru_maxrss would carry the parent's peak over)."""
    return _status_mb("VmHWM")


def current_rss_mb():
    return _status_mb("VmRSS")


def run_row(args, directory: Path):
    import torch
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    import mola  # noqa: F401  (imported by every row alike, so the baseline is the same)
    import transformers
    row = args.child
    is_mola = row == "mola" or row in QUANTIZED
    cuda = args.device == "cuda"
    if cuda:
        torch.zeros(1, device="cuda")  # the CUDA context before the baseline

    def sync():
        if cuda:
            torch.cuda.synchronize()

    out = {"row": row, "rss_before_load_mb": rss_mb()}
    t0 = time.perf_counter()
    if is_mola:
        model = mola.CausalLM.from_pretrained(str(directory), dtype=dtype, device=args.device,
                                              quantize=QUANTIZED.get(row))
    elif row == "peft-qlora":
        bnb = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                              bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype)
        model = transformers.AutoModelForCausalLM.from_pretrained(str(directory), dtype=dtype, quantization_config=bnb,
                                                                  device_map=args.device)
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(str(directory), dtype=dtype,
                                                                  device_map=args.device if cuda else None)
    sync()
    out["load_s"] = time.perf_counter() - t0
    out["peak_rss_after_load_mb"] = rss_mb()
    out["rss_after_load_mb"] = current_rss_mb()
    if cuda:
        out["gpu_mb_after_load"] = torch.cuda.memory_allocated() / 2**20
    # A mapped checkpoint is read when first used: one forward (no grad) touches
    # every weight, so load + first forward is the time to a usable model.
    vocab = json.loads((directory / "config.json").read_text())["vocab_size"]
    ids = torch.randint(0, vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(0)).to(args.device)
    t0 = time.perf_counter()
    with torch.no_grad():
        model(ids) if is_mola else model(input_ids=ids)
    sync()
    out["first_forward_s"] = time.perf_counter() - t0
    out["peak_rss_after_forward_mb"] = rss_mb()
    if not args.train:
        return out

    cfg = mola.MoLAConfig(experts="2468", top_k=2, rank=8, alpha=16, dropout=0.05, targets=tuple(TARGETS))
    if is_mola:
        model.attach(cfg)
        model.gradient_checkpointing = True
        params = [p for p in model.parameters() if p.requires_grad]
    elif row == "inject":
        mola.inject(model, cfg)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        params = [p for p in model.parameters() if p.requires_grad]
    elif row in ("peft", "peft-qlora"):
        import peft
        lora = peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=TARGETS)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
        model = peft.get_peft_model(model, lora)  # autocast_adapter_dtype: fp32 adapter over the bf16 base
        params = [p for p in model.parameters() if p.requires_grad]
    else:
        return out
    out["adapter_params"] = sum(p.numel() for p in params)
    out["adapter_dtypes"] = sorted({str(p.dtype) for p in params})
    model.train()
    opt = torch.optim.AdamW(params, lr=1e-4)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    steps = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        if is_mola:
            o = model(ids, labels=ids)
            loss = o.loss + model.aux_loss()
        else:
            o = model(input_ids=ids, labels=ids)
            loss = o.loss + (mola.aux_loss(model) if row == "inject" else 0.0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sync()
        steps.append(time.perf_counter() - t0)
        out["loss"] = float(loss)
    out["step_s"] = steps
    out["peak_rss_train_mb"] = rss_mb()
    if cuda:
        out["peak_gpu_train_mb"] = torch.cuda.max_memory_allocated() / 2**20
        later = steps[1:] or steps  # the first step includes warm-up
        out["train_tokens_per_s"] = args.batch * args.seq * len(later) / sum(later)
    return out


# ---------------------------------------------------------------- the parent

def main(argv=None):
    args = parse_args(argv)
    cfg = model_config(args)
    directory = Path(args.checkpoint_dir) if args.checkpoint_dir else REPO / "out" / "bench-checkpoints" / \
        f"{tag(args)}-{args.dtype}"
    if args.child:
        print(json.dumps(run_row(args, directory)))
        return 0

    t0 = time.perf_counter()
    fresh = not (directory / ".complete").exists()
    write_checkpoint(args, cfg, directory)
    written_s = time.perf_counter() - t0 if fresh else None
    rows = args.rows.split(",") if args.rows else [r for r in ROWS if r in ("mola", "transformers") or
                                                   (args.train and r in ("inject", "peft"))]
    unknown = set(rows) - set(ROWS)
    if unknown:
        raise SystemExit(f"bench/scale.py: --rows: unknown {sorted(unknown)}; valid: {', '.join(ROWS)}")
    for row, needs in (("peft", ("peft",)), ("peft-qlora", ("peft", "bitsandbytes"))):
        missing = [m for m in needs if importlib.util.find_spec(m) is None]
        if row in rows and missing:
            print(f"bench/scale.py: {', '.join(missing)} not installed; the {row} row is skipped", file=sys.stderr)
            rows.remove(row)
    results = {}
    child_argv = [a for a in (argv if argv is not None else sys.argv[1:])]
    for row in rows:
        if args.prewarm:
            for f in sorted(directory.glob("*.safetensors")):
                with open(f, "rb") as fh:
                    while fh.read(64 << 20):
                        pass
        cmd = [sys.executable, __file__, *child_argv, "--child", row, "--checkpoint-dir", str(directory)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            tail = done.stderr.strip().splitlines()[-3:]
            # -9: the kernel's out-of-memory killer; anything else: the error's last lines
            results[row] = {"row": row, "failed": done.returncode, "stderr": tail}
            print(f"bench/scale.py: row {row} exited with {done.returncode}: {' | '.join(tail)}", file=sys.stderr)
            continue
        results[row] = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"bench/scale.py: {row}: {json.dumps(results[row])}", file=sys.stderr)

    wbytes = weights_bytes(directory)
    summary = {"weights_gb": wbytes / 1e9}
    for row, r in results.items():
        if "peak_rss_after_load_mb" in r:
            summary[f"{row}_peak_rss_over_weights"] = r["peak_rss_after_load_mb"] * (1 << 20) / wbytes
    nf4, qlora = results.get("mola-nf4", {}), results.get("peft-qlora", {})
    if "train_tokens_per_s" in nf4 and "train_tokens_per_s" in qlora:
        summary["mola_nf4_tokens_per_s_over_peft_qlora"] = nf4["train_tokens_per_s"] / qlora["train_tokens_per_s"]
        summary["mola_nf4_peak_gpu_over_peft_qlora"] = nf4["peak_gpu_train_mb"] / qlora["peak_gpu_train_mb"]
    if "load_s" in results.get("mola", {}) and "load_s" in results.get("transformers", {}):
        summary["mola_load_s_over_transformers"] = results["mola"]["load_s"] / results["transformers"]["load_s"]
    report = {
        "bench": "scale", "shape": tag(args), "dtype": args.dtype, "device": device_name(args.device), "rev": git_rev(),
        "threads": args.threads, "run_on": args.device, "train": args.train, "seq": args.seq, "batch": args.batch,
        "prewarm": args.prewarm, "steps": args.steps,
        "config": {k: cfg[k] for k in ("model_type", "num_hidden_layers", "hidden_size", "intermediate_size",
                                         "vocab_size", "num_attention_heads") if k in cfg},
        "checkpoint": {"dir": str(directory), "bytes": wbytes, "written_s": written_s},
        "rows": results, "summary": summary,
    }
    text = json.dumps(report, indent=2)
    where = "-cuda" if args.device == "cuda" else ""
    write_json(text, args.output, f"scale-{tag(args)}-{args.dtype}{where}{'-train' if args.train else ''}.json")
    print(text)
    if args.remove_checkpoint:
        shutil.rmtree(directory, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
