"""Data-parallel MoLA fine-tuning under torchrun: DDP or FSDP2 on a transformers
model, or the C++ model (mola.CausalLM) with its gradients all-reduced here.

    torchrun --nproc_per_node=2 examples/python/train_distributed.py --strategy ddp   --model hf
    torchrun --nproc_per_node=2 examples/python/train_distributed.py --strategy fsdp2 --model hf
    torchrun --nproc_per_node=2 examples/python/train_distributed.py --model cpp
    python examples/python/train_distributed.py --micro-batches 2   # one process, the same steps

Every rank builds the same global batch of --batch-size examples per step (the
bundled ScienceQA rows through mola.data, in a seeded order) and trains on its
own contiguous slice of it, a micro-batch of batch-size / world-size examples.
Averaging the gradients over the ranks then gives exactly the step a single
process takes on the global batch with gradient accumulation over those
micro-batches (the mean of each micro-batch's LM loss + balance loss), which is
how mola.Trainer and transformers' Trainer define a step: one process with
--micro-batches 2 takes the same steps as two ranks (dropout included: each
micro-batch of the global batch draws its masks from a seed of its own). Gloo on CPUs, NCCL on
GPUs (one per rank). The adapter is saved by rank 0 only; with FSDP2 the full
state dict is gathered first (every rank takes part in that collective).

--record DIR writes, per rank and step, the step's loss and the full adapter
gradients (after the all-reduce) to DIR/rank<R>-step<S>.safetensors; the test
compares them with one process on the same global batch.
"""
import argparse
import contextlib
import math
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist

import mola

ROOT = Path(__file__).resolve().parents[2]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=["hf", "cpp"], default="hf",
                   help="hf: transformers LlamaForCausalLM + mola.inject; cpp: mola.CausalLM (the C++ decoder)")
    p.add_argument("--strategy", choices=["ddp", "fsdp2"], default="ddp",
                   help="ddp: replicate, all-reduce gradients; fsdp2: fully_shard each decoder layer, then the root "
                        "(hf only)")
    p.add_argument("--checkpoint", default=str(ROOT / "data/models/stories260K"))
    p.add_argument("--data", default=str(ROOT / "data/tasks/scienceqa/train.jsonl"))
    p.add_argument("--template", default=str(ROOT / "data/templates/alpaca.json"))
    p.add_argument("--experts", default="inverted", help="a MoLA preset or per-layer counts, e.g. 2,4,6,8")
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--dropout", type=float, default=0.05)
    p.add_argument("--batch-size", type=int, default=8, help="global batch (examples per optimizer step)")
    p.add_argument("--cutoff", type=int, default=128, help="tokens per example at most")
    p.add_argument("--micro-batches", type=int, default=1,
                   help="gradient accumulation: micro-batches per rank and step")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default="out/distributed", help="the adapter is written to OUTPUT/adapter")
    p.add_argument("--record", default=None, help="directory for per-rank loss and gradient files")
    args = p.parse_args(argv)
    if args.model == "cpp" and args.strategy != "ddp":
        p.error(f"--strategy {args.strategy} shards nn.Module parameters; mola.CausalLM is a C++ model, "
                "whose gradients this script all-reduces itself: use --strategy ddp with --model cpp")
    return args


def setup():
    """(rank, world size, device, whether we made the process group): the group
    of torchrun's environment, or the caller's when it has made one already."""
    if "WORLD_SIZE" not in os.environ and not dist.is_initialized():
        return 0, 1, torch.device("cpu"), False
    use_cuda = torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    made = not dist.is_initialized()
    if made:
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return dist.get_rank(), dist.get_world_size(), device, made


def load_examples(args):
    """Tokenised training examples: (input_ids, labels) lists, as mola's trainer makes them."""
    tok = mola.data.Tokenizer.from_file(args.checkpoint)
    template = mola.data.PromptTemplate.from_json_file(args.template)
    rows = mola.data.load_rows(args.data)
    examples = mola.data.tokenize_rows(rows, template, tok, mola.data.DataOptions(cutoff_len=args.cutoff))
    return [(list(e.input_ids), list(e.labels)) for e in examples]


def global_batches(examples, batch_size, steps, seed):
    """The same list of global batches on every rank: a seeded order, cycled over epochs."""
    g = torch.Generator().manual_seed(seed)
    order = []
    while len(order) < batch_size * steps:
        order += torch.randperm(len(examples), generator=g).tolist()
    return [[examples[i] for i in order[s * batch_size:(s + 1) * batch_size]] for s in range(steps)]


def collate(batch, pad_to_multiple_of=8):
    """Right padding with id 0 to the longest row (a multiple of 8); labels -100 on padding."""
    longest = max(len(ids) for ids, _ in batch)
    width = int(math.ceil(longest / pad_to_multiple_of) * pad_to_multiple_of)
    ids = torch.zeros(len(batch), width, dtype=torch.int64)
    labels = torch.full((len(batch), width), -100, dtype=torch.int64)
    mask = torch.zeros(len(batch), width, dtype=torch.int64)
    for row, (i, l) in enumerate(batch):
        ids[row, :len(i)] = torch.tensor(i)
        labels[row, :len(l)] = torch.tensor(l)
        mask[row, :len(i)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def micro_batch(batch, rank, world):
    """This rank's contiguous slice of the global batch."""
    if len(batch) % world:
        raise ValueError(f"--batch-size {len(batch)} must be a multiple of the world size {world}")
    m = len(batch) // world
    return batch[rank * m:(rank + 1) * m]


def adapter_config(args):
    return mola.MoLAConfig(experts=args.experts, top_k=args.top_k, rank=args.rank, alpha=2 * args.rank,
                           dropout=args.dropout)


def build_hf(args, device, dtype):
    """transformers model + mola.inject; wrapped in DDP or sharded with FSDP2 when distributed."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(args.checkpoint, dtype=dtype)
    mola.inject(model, adapter_config(args))  # same seed on every rank: the same adapter init
    model.to(device).train()
    if not dist.is_initialized():
        return model, model
    if args.strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return model, DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    from torch.distributed.fsdp import fully_shard

    for layer in model.model.layers:  # one all-gather / reduce-scatter group per decoder layer
        fully_shard(layer)
    fully_shard(model)  # the root: embeddings, final norm, lm_head
    return model, model


def build_cpp(args, device, dtype):
    model = mola.CausalLM.from_pretrained(args.checkpoint, dtype=dtype, device=str(device))
    model.attach(adapter_config(args))
    model.train()
    if dist.is_initialized():  # DDP's start: every rank begins from rank 0's adapter
        for p in trainable(model):
            dist.broadcast(p.data, src=0)
    return model, model


def trainable(model):
    return [p for p in model.parameters() if p.requires_grad]


def named_trainable(model):
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def all_reduce_mean(grads, world):
    """One all-reduce over the flattened gradients of the C++ model, then / world (what DDP does)."""
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def step_loss(args, model, call, mb, device):
    """The micro-batch's LM loss and balance loss (padding left out of both)."""
    batch = {k: v.to(device) for k, v in mb.items()}
    if args.model == "cpp":
        out = call(batch["input_ids"], batch["attention_mask"], batch["labels"])
        return out.loss, model.aux_loss(attention_mask=batch["attention_mask"])
    out = call(**batch)
    return out.loss, mola.aux_loss(model, mask=batch["attention_mask"])


def full_grad(p):
    g = p.grad
    return g.full_tensor() if hasattr(g, "full_tensor") else g  # FSDP2: a sharded DTensor


def record(args, rank, step, values, model):
    """DIR/rank<R>-step<S>.safetensors: the global batch's losses and the full adapter gradients."""
    from safetensors.torch import save_file

    tensors = {"loss": values.clone()}  # [loss, lm_loss, aux_loss]
    for name, p in named_trainable(model):
        tensors["grad." + name] = full_grad(p).detach().cpu().contiguous()  # a collective under FSDP2
    os.makedirs(args.record, exist_ok=True)
    save_file(tensors, os.path.join(args.record, f"rank{rank}-step{step}.safetensors"))


def save(args, model, rank):
    directory = os.path.join(args.output, "adapter")
    if args.model == "hf" and args.strategy == "fsdp2" and dist.is_initialized():
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        # Collective: the shards are gathered into full tensors, kept on rank 0 only.
        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if rank == 0:
            mola.save_adapter(model, directory, state_dict=state)
    elif rank == 0:
        mola.save_adapter(model, directory)
    return directory


def no_sync(args, call, last):
    """Skip the gradient all-reduce on all but the last micro-batch of a step (accumulate locally)."""
    if last or not dist.is_initialized() or args.model == "cpp":
        return contextlib.nullcontext()
    if args.strategy == "ddp":
        return call.no_sync()
    call.set_requires_gradient_sync(False)  # FSDP2: turned back on before the last micro-batch
    return contextlib.nullcontext()


def train_step(args, model, call, params, batch, step, rank, world, device):
    """One optimizer step's gradients on the global ``batch``; returns [loss, lm, aux] of the global batch."""
    mine = micro_batch(batch, rank, world)
    n = args.micro_batches
    if len(mine) % n:
        raise ValueError(f"--micro-batches {n} must divide this rank's {len(mine)} examples")
    size = len(mine) // n
    values = torch.zeros(3, dtype=torch.float64)
    for j in range(n):
        # Dropout masks: one seed per micro-batch of the global batch, so any split
        # of it over ranks and accumulation steps draws the same masks.
        torch.manual_seed(args.seed * 1000 + step * 100 + rank * n + j)
        last = j == n - 1
        if last and args.strategy == "fsdp2" and dist.is_initialized() and n > 1:
            call.set_requires_gradient_sync(True)
        with no_sync(args, call, last):
            lm, aux = step_loss(args, model, call, collate(mine[j * size:(j + 1) * size]), device)
            ((lm + aux) / n).backward()
        values += torch.stack([lm + aux, lm, aux]).detach().to("cpu", torch.float64) / n
    if args.model == "cpp" and world > 1:
        all_reduce_mean([p.grad for p in params], world)
    if world > 1:  # the global batch's loss: the mean over the ranks' micro-batches
        dist.all_reduce(values)
        values /= world
    return values


def main(argv=None):
    args = parse_args(argv)
    rank, world, device, made_group = setup()
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(args.seed)
    model, call = (build_cpp if args.model == "cpp" else build_hf)(args, device, dtype)
    params = trainable(model)
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    batches = global_batches(load_examples(args), args.batch_size, args.steps, args.seed)
    if rank == 0:
        print(f"{args.model} model, {args.strategy if world > 1 else 'single process'}, world {world}, "
              f"{args.micro_batches} micro-batch(es) per rank, {sum(p.numel() for p in params)} adapter "
              f"parameters, global batch {args.batch_size}", flush=True)
    start = time.time()
    for step, batch in enumerate(batches, 1):
        opt.zero_grad(set_to_none=True)
        values = train_step(args, model, call, params, batch, step, rank, world, device)
        if args.record:
            record(args, rank, step, values, model)
        opt.step()
        if rank == 0:
            print(f"step {step}: loss {values[0].item():.4f} (lm {values[1].item():.4f}, "
                  f"aux {values[2].item():.5f})", flush=True)
    directory = save(args, model, rank)
    if rank == 0:
        print(f"{args.steps} steps in {time.time() - start:.1f} s; adapter saved to {directory}", flush=True)
    if made_group:
        dist.destroy_process_group()
    return directory


if __name__ == "__main__":
    main()
