"""Train a stack of MoLALinear layers on a synthetic regression (the `make run` job).

The data come from a teacher whose layers apply a different low-rank correction
to each of several input clusters, which is the kind of structure a mixture of
LoRA experts is for. The student wraps frozen copies of the teacher's base
layers in MoLALinear with a layer-wise expert allocation (a MoLA preset), and
trains only the routers and experts. It prints the loss falling and, at the
end, how the router spreads tokens over the experts of each layer.

    python examples/python/train_synthetic.py [--preset triangle] [--steps 300]
"""
import argparse
import time

import torch
from torch import nn

import mola


def make_teacher(dim, layers, clusters, rank, gen):
    """Per layer: a frozen base map and one rank-`rank` correction per cluster."""
    bases = [torch.eye(dim) + 0.1 * torch.randn(dim, dim, generator=gen) / dim**0.5
             for _ in range(layers)]
    deltas = [[(torch.randn(dim, rank, generator=gen) @ torch.randn(rank, dim, generator=gen))
               * (0.5 / dim) for _ in range(clusters)] for _ in range(layers)]
    centres = 3.0 * torch.randn(clusters, dim, generator=gen)
    return bases, deltas, centres


def teacher_batch(bases, deltas, centres, batch, gen):
    c = torch.randint(len(centres), (batch,), generator=gen)
    x = centres[c] + torch.randn(batch, centres.shape[1], generator=gen)
    h = x
    for base, layer_deltas in zip(bases, deltas):
        delta = torch.stack(layer_deltas)[c]                     # [batch, dim, dim]
        h = torch.tanh(h @ base.T + torch.einsum("bij,bj->bi", delta, h))
    return x, h


class Student(nn.Module):
    def __init__(self, bases, experts, top_k, rank, alpha):
        super().__init__()
        layers = []
        for i, (base, e) in enumerate(zip(bases, experts)):
            linear = nn.Linear(base.shape[1], base.shape[0], bias=False)
            with torch.no_grad():
                linear.weight.copy_(base)
            layers.append(mola.MoLALinear(linear, num_experts=e, top_k=min(top_k, e), rank=rank,
                                          alpha=alpha, layer_index=i))
        self.layers = nn.ModuleList(layers)

    def forward(self, x):
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return x


def expert_usage(model):
    """Share of routed slots each expert received in the last forward, per layer."""
    rows = []
    for layer in model.layers:
        _, idx, _ = mola.ops.moe_lora_route(layer.router_logits.detach(), layer.top_k)
        counts = torch.bincount(idx.flatten(), minlength=layer.num_experts).float()
        rows.append((counts / counts.sum()).tolist())
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="triangle", help="MoLA expert allocation (docs/design.md, The MoLA layer)")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--clusters", type=int, default=6)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    cfg = mola.MoLAConfig(experts=args.preset, top_k=2, rank=4, alpha=8, dropout=0.0)
    plan = cfg.resolve(args.layers)
    bases, deltas, centres = make_teacher(args.dim, args.layers, args.clusters, 2, gen)
    model = Student(bases, plan["experts"], cfg.top_k, cfg.rank, cfg.alpha)
    params = [p for p in model.parameters() if p.requires_grad]
    n_params = sum(p.numel() for p in params)
    print(f"mola {mola.__version__}: {args.layers} MoLALinear layers, preset {args.preset!r} -> "
          f"experts per layer {plan['experts']}, top-2, rank {cfg.rank}; "
          f"{n_params} trainable parameters")
    opt = torch.optim.AdamW(params, lr=args.lr)

    eval_x, eval_y = teacher_batch(bases, deltas, centres, 2048, torch.Generator().manual_seed(1))
    with torch.no_grad():
        start = nn.functional.mse_loss(model(eval_x), eval_y).item()
    print(f"step {0:4d}  eval mse {start:.5f}  (the frozen base alone)")
    t0 = time.time()
    for step in range(1, args.steps + 1):
        x, y = teacher_batch(bases, deltas, centres, args.batch, gen)
        loss = nn.functional.mse_loss(model(x), y)
        aux = mola.aux_loss(model, coef=cfg.aux_loss_coef)
        opt.zero_grad()
        (loss + aux).backward()
        opt.step()
        if step % 50 == 0 or step == args.steps:
            with torch.no_grad():
                ev = nn.functional.mse_loss(model(eval_x), eval_y).item()
            print(f"step {step:4d}  train mse {loss.item():.5f}  balance {aux.item() / cfg.aux_loss_coef:.3f}"
                  f"  eval mse {ev:.5f}  ({time.time() - t0:.1f}s)")
    with torch.no_grad():
        model(eval_x)
    print("expert usage per layer (share of routed slots on the eval set):")
    for i, shares in enumerate(expert_usage(model)):
        bar = " ".join(f"{s:5.2f}" for s in shares)
        print(f"  layer {i} ({len(shares)} experts): {bar}")
    final = nn.functional.mse_loss(model(eval_x), eval_y).item()
    print(f"eval mse {start:.5f} -> {final:.5f} ({start / final:.1f}x lower)")


if __name__ == "__main__":
    main()
