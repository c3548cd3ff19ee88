"""``mola.MoLALinear`` and ``mola.aux_loss``: the PyTorch face of the op.

MoLALinear owns its parameters as ``nn.Parameter`` and calls
``torch.ops.mola.moe_lora``; it re-implements none of the math. Its parameter
names equal the C++ ``mola::nn::MoLALinear``'s, so state dicts move between them.
"""
import math
from collections import OrderedDict
from typing import Optional

import torch
from torch import nn

from .ops import compute_code, load_balancing_loss

DEFAULT_AUX_LOSS_COEF = 1e-3  # the authors' router_aux_loss_coef (methods.md 1.2)
INITS = ("kaiming", "gaussian", "pissa")  # mola::AdapterConfig::inits()


class MoLALinear(nn.Module):
    """A frozen ``nn.Linear`` plus a top-k router over E LoRA experts (design 2.1).

    Args:
        base: the pretrained layer; it is frozen and kept as ``.base``.
        num_experts: E, the number of LoRA experts.
        top_k: experts per token (``1 <= top_k <= num_experts``; ``top_k == E`` is dense).
        rank: r, the LoRA rank of every expert.
        alpha: LoRA alpha; the experts' output is scaled by ``alpha / rank``.
        dropout: dropout on the experts' input (one mask shared by all experts).
        compute: ``"auto"``, ``"dense"`` or ``"grouped"`` (design section 4).
        layer_index: the transformer layer this module belongs to; ``aux_loss``
            groups by it (None: a group of its own).
        init: ``"kaiming"`` (default), ``"gaussian"`` or ``"pissa"`` (see
            ``mola.MoLAConfig``). PiSSA changes ``base.weight`` in place (W minus
            its rank-r truncated SVD) and gives every expert the same principal
            A and B; the routing weights of a token sum to 1, so the layer's
            output is unchanged at the start.

    ``forward(x)`` returns ``y`` and keeps the router logits ``[T, E]`` of that
    call in ``.router_logits`` for ``mola.aux_loss``.
    """

    def __init__(self, base: nn.Linear, num_experts: int, top_k: int, rank: int,
                 alpha: float = 16.0, dropout: float = 0.0, compute="auto",
                 layer_index: Optional[int] = None, init: str = "kaiming"):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise ValueError(f"MoLALinear wraps an nn.Linear; got {type(base).__name__}")
        if num_experts < 1:
            raise ValueError(f"num_experts={num_experts} must be at least 1")
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k={top_k} must be between 1 and num_experts={num_experts}; "
                             "lower top_k or add experts")
        if rank < 1:
            raise ValueError(f"rank={rank} must be at least 1")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout={dropout} must be in [0, 1)")
        if init not in INITS:
            raise ValueError(f"init={init!r} is not one of {', '.join(INITS)}")
        self.compute = compute
        self._compute_code = compute_code(compute)
        self.base = base
        self.base.requires_grad_(False)
        self.num_experts, self.top_k, self.rank = int(num_experts), int(top_k), int(rank)
        self.alpha, self.dropout = float(alpha), float(dropout)
        self.scaling = self.alpha / self.rank
        self.layer_index = layer_index
        self.init = init
        w = base.weight
        kw = dict(device=w.device, dtype=w.dtype)
        self.router = nn.Parameter(torch.empty(num_experts, base.in_features, **kw))
        self.lora_a = nn.Parameter(torch.empty(num_experts, rank, base.in_features, **kw))
        self.lora_b = nn.Parameter(torch.empty(num_experts, base.out_features, rank, **kw))
        self.router_logits: Optional[torch.Tensor] = None
        self.reset_parameters()
        if init == "pissa":
            pissa_init(self.base.weight, self.lora_a, self.lora_b, self.scaling)

    @property
    def in_features(self) -> int:
        """The base layer's input width."""
        return self.base.in_features

    @property
    def out_features(self) -> int:
        """The base layer's output width."""
        return self.base.out_features

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """LoRA's init, as the authors' code (methods.md 1.1): router and A
        ``kaiming_uniform_(a=sqrt(5))`` per expert matrix, which is
        ``U(-1/sqrt(in), 1/sqrt(in))``; B zero, so the module starts as the base layer.
        With ``init="gaussian"`` A is drawn from N(0, std 1/r) instead (PEFT's
        ``init_lora_weights="gaussian"``). PiSSA changes the base weight, so it is
        applied once, at construction, not here."""
        bound = 1.0 / math.sqrt(self.base.in_features)
        self.router.uniform_(-bound, bound)
        if self.init == "gaussian":
            self.lora_a.normal_(0.0, 1.0 / self.rank)
        else:
            self.lora_a.uniform_(-bound, bound)
        self.lora_b.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``y = base(x) + scaling * sum_j w_j B_j A_j dropout(x)`` for ``x [..., in]``;
        keeps the router logits ``[T, E]`` of this call in ``.router_logits``."""
        seed = None
        if self.training and self.dropout > 0.0:
            # A fresh mask per call, drawn on x's device from torch's generator
            # there (torch.manual_seed repeats it); the op regenerates the mask
            # from it in backward. On CUDA the kernels read the seed on the
            # device: no host sync, and every replay of a captured CUDA graph
            # draws a new mask rather than the one baked in at capture. (No
            # query of the capture state here: torch.compile cannot trace it.)
            seed = torch.randint(0, 2**62, (1,), dtype=torch.int64,
                                 device=x.device if x.is_cuda else None)
        y, logits = torch.ops.mola.moe_lora(
            x, self.base.weight, self.base.bias, self.router, self.lora_a, self.lora_b,
            self.top_k, self.scaling, self.dropout, self.training, self._compute_code, seed)
        self.router_logits = logits
        return y

    def extra_repr(self) -> str:
        """The settings shown in ``repr(module)``."""
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"num_experts={self.num_experts}, top_k={self.top_k}, rank={self.rank}, "
                f"alpha={self.alpha}, dropout={self.dropout}, compute={self.compute!r}, "
                f"layer_index={self.layer_index}, init={self.init!r}")


@torch.no_grad()
def pissa_init(weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float) -> None:
    """PiSSA (Meng et al. 2024) in place, as ``mola::nn::detail::pissa_init``.

    With the SVD ``weight = U S V^T`` (fp32; fp64 for an fp64 weight) and r =
    ``lora_a.shape[1]``: every expert gets ``A = sqrt(S_r / s) V_r^T`` and
    ``B = U_r sqrt(S_r / s)``, and ``weight`` becomes ``weight - U_r S_r V_r^T``
    (= weight - s B A). That product does not depend on the SVD's signs, so the
    adjusted weight is the same wherever it is recomputed.
    """
    experts, r, in_features = lora_a.shape
    out_features = weight.shape[0]
    if r > min(weight.shape):
        raise ValueError(f"init pissa: rank {r} exceeds min(out, in) = {min(weight.shape)} of the base weight "
                         f"{list(weight.shape)}; lower the rank or use init 'kaiming'")
    w = weight.to(torch.float64 if weight.dtype == torch.float64 else torch.float32)
    u, s, vh = torch.linalg.svd(w, full_matrices=False)  # [out, m], [m], [m, in]
    u_r, s_r, vh_r = u[:, :r], s[:r], vh[:r]
    root = (s_r / scaling).sqrt()  # [r]
    lora_a.copy_((root[:, None] * vh_r).expand(experts, r, in_features))    # [E, r, in]
    lora_b.copy_((u_r * root[None, :]).expand(experts, out_features, r))    # [E, out, r]
    weight.copy_(w - (u_r * s_r[None, :]) @ vh_r)                           # W - U_r S_r V_r^T


def aux_loss(model: nn.Module, coef: Optional[float] = None,
             mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The balance loss (design 2.2) over every MoLALinear of ``model`` that ran a forward.

    Modules are grouped by ``.layer_index`` (those with None form a group each);
    each group's router logits are stacked along rows, in module order, as the
    authors stack the seven modules of a decoder layer. ``coef`` None means 0.001.
    ``mask`` (bool, one entry per token, e.g. the attention mask) leaves padding
    out of the loss; the authors' code includes it (the default, None). For a MoLEx
    model with ``molex_aux_loss_coef`` > 0 the gates' balance loss is added (``mola.molex_balance_loss``).
    """
    groups: "OrderedDict[object, list]" = OrderedDict()
    for name, module in model.named_modules():
        if isinstance(module, MoLALinear) and module.router_logits is not None:
            key = module.layer_index if module.layer_index is not None else ("module", name)
            groups.setdefault(key, []).append(module)
    if not groups:
        raise ValueError("aux_loss: the model has no MoLALinear that ran a forward; "
                         "call the model on a batch first")
    logits, top_k = [], []
    for key, modules in groups.items():
        ks = {m.top_k for m in modules}
        es = {m.num_experts for m in modules}
        if len(ks) != 1 or len(es) != 1:
            raise ValueError(f"aux_loss: the modules of layer {key} disagree on num_experts "
                             f"{sorted(es)} or top_k {sorted(ks)}; a layer shares one E and k")
        logits.append(torch.cat([m.router_logits for m in modules], dim=0))
        top_k.append(ks.pop())
    loss = load_balancing_loss(logits, top_k, DEFAULT_AUX_LOSS_COEF if coef is None else float(coef), mask)
    # A MoLEx model (mola.inject with a MoLExConfig) adds its gates' balance loss, as the C++
    # CausalLM.aux_loss does: molex_aux_loss_coef times the sum over layers (coef does not change it).
    config = getattr(model, "mola_config", None)
    if isinstance(config, dict) and config.get("method") == "molex" and config.get("molex_aux_loss_coef", 0) > 0:
        from .molex import molex_balance_loss
        loss = loss + config["molex_aux_loss_coef"] * molex_balance_loss(model)
    return loss
