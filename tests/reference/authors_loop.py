"""The MoLA authors' per-expert loop, re-implemented in plain PyTorch.

This is the oracle the mola op is tested against (tests/python) and the
"reference loop" row of the layer benchmark (bench/layer.py). It follows
docs/design.md, Fidelity to the papers and the authors' code, which records what the authors' code
(GCYZSL/MoLA, src/mola_*_hacked.py) does:

* router logits z = x Wr^T, no bias, no dropout on the router input;
* p = softmax(z) in fp32, (w, idx) = topk(p, k), w renormalised over the
  selected experts and cast back to x's dtype; when k >= E the weights are
  the plain softmax over all experts (docs/design.md, Fidelity to the papers and the authors' code);
* for each expert e: gather the tokens routed to e, run
  scaling * B_e(A_e(dropout(x))), multiply by the routing weight and
  index_add into the output; the frozen base x W^T + b is added;
* the load-balancing loss per layer is E * sum_e f_e * Pbar_e and the layers
  are summed, not averaged (docs/design.md, Fidelity to the papers and the authors' code).

The loop is deliberately the slow, host-syncing shape of the original: a
nonzero() per expert and a `numel() == 0` check before each expert's matmuls.
Nothing here imports mola.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "ReferenceMoLALinear",
    "reference_load_balancing_loss",
    "reference_moe_lora",
    "reference_route",
]


def _router_dtype(dtype):
    # The authors compute the router softmax in fp32 (docs/design.md, Fidelity to the papers and the authors' code); a
    # float64 input stays in float64 so that float64 tests can ask for 1e-10.
    return torch.promote_types(dtype, torch.float32)


def reference_route(router_logits, top_k):
    """Routing of docs/design.md, Fidelity to the papers and the authors' code on logits [T, E].

    Returns (weights [T, k], indices [T, k], gate [T, E]) in the router dtype
    (fp32, or fp64 for fp64 logits). gate holds the weight of each chosen
    expert and 0 elsewhere. When top_k >= E every expert is chosen, in expert
    order, with the softmax as its weight.
    """
    num_tokens, num_experts = router_logits.shape
    if top_k < 1:
        raise ValueError(f"reference_route: top_k must be >= 1, got {top_k}")
    probs = torch.softmax(router_logits.to(_router_dtype(router_logits.dtype)), dim=-1)
    if top_k >= num_experts:
        indices = torch.arange(num_experts, device=probs.device).expand(num_tokens, num_experts)
        weights = probs
    else:
        values, indices = torch.topk(probs, top_k, dim=-1)  # [T, k]
        weights = values / values.sum(dim=-1, keepdim=True)
    gate = torch.zeros_like(probs).scatter(1, indices, weights)  # [T, E]
    return weights, indices, gate


def _expert_loop(x_flat, weights, indices, lora_a, lora_b, scaling, expert_input):
    """sum_j w_j * scaling * B[idx_j] A[idx_j] expert_input(x), one expert at a time.

    x_flat [T, in]; weights, indices [T, k]; lora_a [E, r, in]; lora_b [E, out, r].
    expert_input(expert, token, rows) is applied to each expert's gathered
    tokens (the authors apply their dropout module there, so each expert draws
    its own mask).
    """
    num_tokens = x_flat.shape[0]
    delta = x_flat.new_zeros(num_tokens, lora_b.shape[1])  # [T, out]
    for expert in range(lora_a.shape[0]):
        token, slot = torch.nonzero(indices == expert, as_tuple=True)  # [n_e] each
        if token.numel() == 0:  # a host sync per expert, as in the authors' loop
            continue
        routed = expert_input(expert, token, x_flat[token])  # [n_e, in]
        update = F.linear(F.linear(routed, lora_a[expert]), lora_b[expert]) * scaling  # [n_e, out]
        delta.index_add_(0, token, update * weights[token, slot].unsqueeze(-1))
    return delta


def reference_moe_lora(x, weight, bias, router, lora_a, lora_b, top_k, scaling, dropout_mask=None,
                       expert_masks=None):
    """y = x W^T + b + scaling * sum_j w_j B[idx_j] A[idx_j] (x * mask), and the router logits.

    x [..., in]; weight [out, in]; bias [out] or None; router [E, in];
    lora_a [E, r, in]; lora_b [E, out, r]. dropout_mask, when given, has the
    shape of the flattened x [T, in] and multiplies x on the expert path only,
    one mask shared by all experts. expert_masks, when given, is one such mask
    per expert (a list of E [T, in] tensors): expert e's tokens go through
    expert_masks[e], as the authors' per-expert dropout calls draw them.
    Returns (y [..., out], router_logits [T, E] in x's dtype).
    """
    in_features = x.shape[-1]
    x_flat = x.reshape(-1, in_features)  # [T, in]
    router_logits = F.linear(x_flat, router)  # [T, E]
    weights, indices, _ = reference_route(router_logits, top_k)
    weights = weights.to(x.dtype)  # the authors cast w back to x's dtype
    expert_x = x_flat if dropout_mask is None else x_flat * dropout_mask.to(x.dtype)
    if expert_masks is None:
        def expert_input(expert, token, rows):
            return rows
    else:
        def expert_input(expert, token, rows):
            return rows * expert_masks[expert][token].to(x.dtype)
    delta = _expert_loop(expert_x, weights, indices, lora_a, lora_b, scaling, expert_input)
    y = F.linear(x_flat, weight, bias) + delta  # [T, out]
    return y.reshape(*x.shape[:-1], weight.shape[0]), router_logits


def reference_load_balancing_loss(logits_list, top_k_list, coef, mask=None):
    """coef * sum_l E_l * sum_e f_e * Pbar_e (docs/design.md, Fidelity to the papers and the authors' code), written plainly.

    logits_list[l] is [N_l, E_l]: the logits of all adapted modules of layer l
    stacked along rows. mask (bool [N], True = a real token) drops padding
    rows; each layer's rows are N_l / N stacked copies of the N tokens, so the
    mask is tiled that many times. f is a constant (no gradient); the gradient
    reaches the logits through Pbar only.
    """
    if len(logits_list) != len(top_k_list):
        raise ValueError(
            f"reference_load_balancing_loss: {len(logits_list)} logits but {len(top_k_list)} top_k values"
        )
    total = 0.0
    for logits, top_k in zip(logits_list, top_k_list):
        probs = torch.softmax(logits.to(_router_dtype(logits.dtype)), dim=-1)  # [N_l, E_l]
        num_rows, num_experts = probs.shape
        if mask is not None:
            keep_token = mask.reshape(-1).to(torch.bool)
            if num_rows % keep_token.numel() != 0:
                raise ValueError(
                    f"reference_load_balancing_loss: {num_rows} rows are not a multiple of the mask's "
                    f"{keep_token.numel()} tokens"
                )
            probs = probs[keep_token.repeat(num_rows // keep_token.numel())]
            num_rows = probs.shape[0]
        selected = torch.topk(probs, top_k, dim=-1).indices  # [N_l, k_l]
        layer_loss = 0.0
        for expert in range(num_experts):
            fraction = (selected == expert).sum().item() / (num_rows * top_k)  # f_e, a constant
            mean_prob = probs[:, expert].sum() / num_rows  # Pbar_e
            layer_loss = layer_loss + fraction * mean_prob
        total = total + num_experts * layer_loss
    return coef * total


class ReferenceMoLALinear(nn.Module):
    """The authors' MoLA linear layer: a frozen base plus a router and E LoRA experts.

    Parameter names (router, lora_a, lora_b, base) and shapes equal
    mola.MoLALinear's, so state dicts move between the two. The dropout
    module is applied to each expert's gathered tokens, as in the authors'
    code, so a token routed to two experts sees two independent masks, as
    mola's default per-expert masks (mola's "shared" mode uses one). With
    dropout 0 the two compute the same function.
    """

    def __init__(self, base, num_experts, top_k, rank, alpha=16, dropout=0.0):
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"ReferenceMoLALinear: top_k must be in [1, {num_experts}], got {top_k}")
        self.base = base
        for p in self.base.parameters():
            p.requires_grad_(False)
        self.num_experts = num_experts
        self.top_k = top_k
        self.rank = rank
        self.scaling = alpha / rank
        factory = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.router = nn.Parameter(torch.empty(num_experts, base.in_features, **factory))
        self.lora_a = nn.Parameter(torch.empty(num_experts, rank, base.in_features, **factory))
        self.lora_b = nn.Parameter(torch.zeros(num_experts, base.out_features, rank, **factory))
        self.lora_dropout = nn.Dropout(dropout)
        self.router_logits = None
        self.reset_parameters()

    def reset_parameters(self):
        # LoRA init as in the authors' code: A and the router Kaiming-uniform
        # (a = sqrt(5), i.e. nn.Linear's default), B zero (docs/design.md, Fidelity to the papers and the authors' code).
        nn.init.kaiming_uniform_(self.router, a=math.sqrt(5))
        with torch.no_grad():
            for expert in range(self.num_experts):
                nn.init.kaiming_uniform_(self.lora_a[expert], a=math.sqrt(5))
            self.lora_b.zero_()

    def forward(self, x):
        x_flat = x.reshape(-1, x.shape[-1])  # [T, in]
        router_logits = F.linear(x_flat, self.router)  # [T, E]
        weights, indices, _ = reference_route(router_logits, self.top_k)
        weights = weights.to(x.dtype)
        delta = _expert_loop(
            x_flat, weights, indices, self.lora_a, self.lora_b, self.scaling,
            lambda expert, token, rows: self.lora_dropout(rows),
        )
        self.router_logits = router_logits
        y = self.base(x_flat) + delta  # [T, out]
        return y.reshape(*x.shape[:-1], y.shape[-1])
