"""``mola.MoLALinear`` and ``mola.aux_loss``: the PyTorch face of the op.

MoLALinear owns its parameters as ``nn.Parameter`` and calls
``torch.ops.mola.moe_lora``; it re-implements none of the math. Its parameter
names equal the C++ ``mola::nn::MoLALinear``'s, so state dicts move between them.
"""
import math
import weakref
from collections import OrderedDict
from typing import List, Optional, Sequence, Union

import torch
from torch import nn

from . import _C
from .ops import compute_code, load_balancing_loss, shared_mask

DEFAULT_AUX_LOSS_COEF = 1e-3  # the authors' router_aux_loss_coef (docs/design.md, Fidelity to the papers and the authors' code)
INITS = ("kaiming", "gaussian", "pissa")  # mola::AdapterConfig::inits()


def _is_quantized(base: nn.Linear) -> bool:
    w = base.weight
    plain = type(w) in (torch.Tensor, nn.Parameter) and w.dtype.is_floating_point
    return not plain or type(base).forward is not nn.Linear.forward


class MoLALinear(nn.Module):
    """A frozen ``nn.Linear`` plus a top-k router over E LoRA experts (docs/design.md, The MoLA layer).

    Args:
        base: the pretrained layer; it is frozen and kept as ``.base``.
        num_experts: E, the number of LoRA experts.
        top_k: experts per token (``1 <= top_k <= num_experts``; ``top_k == E`` is dense).
        rank: r, the LoRA rank of every expert.
        alpha: LoRA alpha; the experts' output is scaled by ``alpha / rank``.
        dropout: dropout on the experts' input.
        dropout_masks: ``"per_expert"`` (each expert a token is routed to draws
            its own mask, as the MoLA authors' code) or ``"shared"`` (one mask
            for all of a token's experts: faster, a deviation from the authors).
        compute: ``"auto"``, ``"dense"`` or ``"grouped"`` (docs/design.md, Strategies and kernels).
        layer_index: the transformer layer this module belongs to; ``aux_loss``
            groups by it (None: a group of its own).
        init: ``"kaiming"`` (default), ``"gaussian"`` or ``"pissa"`` (see
            ``mola.MoLAConfig``). PiSSA changes ``base.weight`` in place (W minus
            its rank-r truncated SVD) and gives every expert the same principal
            A and B; the routing weights of a token sum to 1, so the layer's
            output is unchanged at the start.

    ``forward(x)`` returns ``y`` and keeps the router logits ``[T, E]`` of that
    call in ``.router_logits``. For ``mola.aux_loss`` it also keeps the logits
    of every training forward (train mode, grad enabled, a trainable adapter)
    since the balance loss was last taken; a backward pass through a forward
    (``backward`` or ``torch.autograd.grad``) drops that forward's, whose graph
    it spent, so a loop that never takes the balance loss holds no more than
    one step's logits. A copy (``copy.deepcopy``, pickle) starts with none.
    """

    def __init__(self, base: nn.Linear, num_experts: int, top_k: int, rank: int,
                 alpha: float = 16.0, dropout: float = 0.0, compute="auto",
                 layer_index: Optional[int] = None, init: str = "kaiming",
                 dropout_masks: str = "per_expert"):
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
        self._shared_dropout_mask = shared_mask(dropout_masks)  # checks the value
        self.dropout_masks = dropout_masks
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
        #: Whether the base is quantized (bitsandbytes' Linear4bit / Linear8bitLt,
        #: torchao's NF4 or int8 weight tensors, or any nn.Linear whose weight is
        #: not a plain floating tensor or whose forward is its own): its own
        #: forward then gives the base output and the op adds the experts (its
        #: base-free form, an empty weight).
        self.quantized_base = _is_quantized(base)
        if init == "pissa" and self.quantized_base:
            raise ValueError(f"init='pissa' moves part of the base weight into the adapter, but the base "
                             f"{type(base).__name__} is quantized; use init='kaiming' or 'gaussian'")
        # Over a 16-bit or quantized base the adapter trains in fp32 (and so does
        # its optimizer state), as PEFT's autocast_adapter_dtype; forward casts it to x's dtype.
        wide = self.quantized_base or w.dtype in (torch.bfloat16, torch.float16)
        kw = dict(device=w.device, dtype=torch.float32 if wide else w.dtype)
        self.router = nn.Parameter(torch.empty(num_experts, base.in_features, **kw))
        self.lora_a = nn.Parameter(torch.empty(num_experts, rank, base.in_features, **kw))
        self.lora_b = nn.Parameter(torch.empty(num_experts, base.out_features, rank, **kw))
        self.router_logits: Optional[torch.Tensor] = None
        self._pending_logits: List[torch.Tensor] = []
        self.reset_parameters()
        self._register_release_hooks()
        #: True inside ``mola.disable_adapter``: the module computes its base layer alone.
        self.adapter_disabled = False
        if init == "pissa":
            pissa_init(self.base.weight, self.lora_a, self.lora_b, self.scaling)
            # The principal part PiSSA moved out of the base weight (scaling * B0 A0, the
            # same for every expert): the base model is base + it, for unload and
            # disable_adapter. Not saved: a fresh inject recomputes it from the base.
            self.register_buffer("pissa_a0", self.lora_a[0].detach().clone(), persistent=False)
            self.register_buffer("pissa_b0", self.lora_b[0].detach().clone(), persistent=False)

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
        """LoRA's init, as the authors' code (docs/design.md, Fidelity to the papers and the authors' code): router and A
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
        if self.adapter_disabled:
            return self.base_forward(x)
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
        router, lora_a, lora_b = self.router, self.lora_a, self.lora_b
        if router.dtype != x.dtype:  # an fp32 adapter over a 16-bit base: differentiable casts
            router, lora_a, lora_b = router.to(x.dtype), lora_a.to(x.dtype), lora_b.to(x.dtype)
        if self.quantized_base:  # the base's own forward, then the experts alone
            y, logits = torch.ops.mola.moe_lora(
                x, x.new_empty(0), None, router, lora_a, lora_b,
                self.top_k, self.scaling, self.dropout, self.training, self._compute_code, seed,
                self._shared_dropout_mask)
            y = self.base(x).to(y.dtype) + y
        else:
            y, logits = torch.ops.mola.moe_lora(
                x, self.base.weight, self.base.bias, router, lora_a, lora_b,
                self.top_k, self.scaling, self.dropout, self.training, self._compute_code, seed,
                self._shared_dropout_mask)
        self.router_logits = logits
        if self.training and torch.is_grad_enabled() and (
                self.router.requires_grad or self.lora_a.requires_grad or self.lora_b.requires_grad):
            self._pending_logits.append(logits)
            if not torch.compiler.is_compiling() and logits.grad_fn is not None:
                # A backward pass through this forward (backward or autograd.grad)
                # spends its graph: its logits no longer count. Under torch.compile
                # the parameters' hooks (_register_release_hooks) do this instead.
                logits.grad_fn.register_prehook(_SpentForward(self, logits))
        return y

    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The pretrained layer alone: ``x W^T + b`` (with PiSSA, W is the residual
        plus the principal part taken out of it at the start)."""
        if self.quantized_base:
            return self.base(x)
        y = nn.functional.linear(x, self.base.weight, self.base.bias)
        if self.init == "pissa":
            a0, b0 = self.pissa_a0.to(x.dtype), self.pissa_b0.to(x.dtype)
            y = y + self.scaling * nn.functional.linear(nn.functional.linear(x, a0), b0)
        return y

    @torch.no_grad()
    def base_weight(self) -> torch.Tensor:
        """The pretrained weight as it was before inject (PiSSA's principal part added back)."""
        w = self.base.weight
        if self.init != "pissa":
            return w.detach().clone()
        ct = torch.float64 if w.dtype == torch.float64 else torch.float32
        return (w.to(ct) + self.scaling * self.pissa_b0.to(ct) @ self.pissa_a0.to(ct)).to(w.dtype)

    def take_router_logits(self) -> List[torch.Tensor]:
        """The logits ``mola.aux_loss`` counts, and forgets them: those of every
        training forward since the last call (or since a backward pass reached
        through them), else ``[router_logits]`` of the last forward, else []."""
        pending, self._pending_logits = self._pending_logits, []
        if pending:
            return pending
        return [] if self.router_logits is None else [self.router_logits]

    def _register_release_hooks(self) -> None:
        # After a backward pass has accumulated a gradient into the adapter,
        # the logits kept so far have had their graph consumed: drop them.
        release = _SpentForward(self, None)
        for p in (self.router, self.lora_a, self.lora_b):
            # The hook stays with the tensor when requires_grad changes later; torch
            # only refuses to register it on a tensor that is frozen now.
            frozen = not p.requires_grad
            p.requires_grad_(True)
            p.register_post_accumulate_grad_hook(release)
            p.requires_grad_(not frozen)

    def __getstate__(self):
        # The kept logits belong to this module's autograd graph: a copy
        # (deepcopy, pickle) starts without them, as a fresh module does.
        state = super().__getstate__()
        state["router_logits"] = None
        state["_pending_logits"] = []
        return state

    def __setstate__(self, state) -> None:
        super().__setstate__(state)
        self._register_release_hooks()

    def extra_repr(self) -> str:
        """The settings shown in ``repr(module)``."""
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"num_experts={self.num_experts}, top_k={self.top_k}, rank={self.rank}, "
                f"alpha={self.alpha}, dropout={self.dropout}, dropout_masks={self.dropout_masks!r}, "
                f"compute={self.compute!r}, "
                f"layer_index={self.layer_index}, init={self.init!r}")


class _SpentForward:
    """Forgets a MoLALinear's kept router logits once a backward pass has spent
    their graph: those of one forward (a hook on its autograd node), or all of
    them (``logits`` None: a hook on the adapter's parameters). Holds the module
    weakly and the logits by identity, so the graph keeps neither alive."""

    def __init__(self, module: "MoLALinear", logits: Optional[torch.Tensor]):
        self.module = weakref.ref(module)
        self.logits = None if logits is None else id(logits)

    def __call__(self, *_args) -> None:
        module = self.module()
        if module is None:
            return
        if self.logits is None:
            module._pending_logits = []
        else:
            module._pending_logits = [t for t in module._pending_logits if id(t) != self.logits]


@torch.no_grad()
def pissa_init(weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float) -> None:
    """PiSSA (Meng et al. 2024) in place: C++'s ``mola::nn::detail::pissa_init``,
    the one the C++ model uses.

    With the SVD ``weight = U S V^T`` (fp32; fp64 for an fp64 weight) and r =
    ``lora_a.shape[1]``: every expert gets ``A = sqrt(S_r / s) V_r^T`` and
    ``B = U_r sqrt(S_r / s)``, and ``weight`` becomes ``weight - U_r S_r V_r^T``
    (= weight - s B A). That product does not depend on the SVD's signs, so the
    adjusted weight is the same wherever it is recomputed. A rank above
    min(out, in) raises ValueError.
    """
    _C.pissa_init(weight, lora_a, lora_b, float(scaling))


def aux_loss(model: nn.Module, coef: Optional[float] = None,
             mask: Union[torch.Tensor, Sequence[torch.Tensor], None] = None) -> torch.Tensor:
    """The balance loss (docs/design.md, The balance loss) over every MoLALinear of ``model`` that ran a forward.

    Which forwards count: every training forward (train mode, grad enabled)
    since the balance loss was last taken, so two forwards before one
    backward (two sequences scored separately) are balanced together, as one
    batch of their tokens; taking the loss forgets them. Without such a
    forward (eval mode, ``torch.no_grad``, or the loss taken already) the
    last forward counts. A backward pass through a forward (``backward`` or
    ``torch.autograd.grad``) also forgets it: its graph is spent. (Under
    ``torch.compile`` a backward that accumulates into the adapter's
    gradients forgets every forward before it.)

    Modules are grouped by ``.layer_index`` (those with None form a group each);
    each group's router logits are stacked along rows, in module order, as the
    authors stack the seven modules of a decoder layer. ``coef`` None means the
    injected config's ``aux_loss_coef`` (``model.mola_config``), else 0.001.
    ``mask`` (bool, one entry per token, e.g. the attention mask) leaves padding
    out of the loss; the authors' code includes it (the default, None). When
    several forwards count, give one mask per forward (a list, in call order)
    or one mask over all their tokens. For a MoLEx model with
    ``molex_aux_loss_coef`` > 0 the gates' balance loss is added (``mola.molex.molex_balance_loss``).
    """
    from ._models import CausalLM
    if isinstance(model, CausalLM):  # the C++ model keeps the same rule
        return model.aux_loss(coef, mask)
    groups: "OrderedDict[object, list]" = OrderedDict()
    for name, module in model.named_modules():
        if isinstance(module, MoLALinear):
            taken = module.take_router_logits()
            if taken:
                key = module.layer_index if module.layer_index is not None else ("module", name)
                groups.setdefault(key, []).append((module, taken))
    if not groups:
        raise ValueError("aux_loss: the model has no MoLALinear that ran a forward; "
                         "call the model on a batch first")
    logits, top_k = [], []
    forwards = set()
    for key, entries in groups.items():
        ks = {m.top_k for m, _ in entries}
        es = {m.num_experts for m, _ in entries}
        if len(ks) != 1 or len(es) != 1:
            raise ValueError(f"aux_loss: the modules of layer {key} disagree on num_experts "
                             f"{sorted(es)} or top_k {sorted(ks)}; a layer shares one E and k")
        forwards.update(len(taken) for _, taken in entries)
        logits.append(torch.cat([t for _, taken in entries for t in taken], dim=0))
        top_k.append(ks.pop())
    if isinstance(mask, (list, tuple)):
        if len(forwards) == 1 and len(mask) != next(iter(forwards)):
            raise ValueError(f"aux_loss: got {len(mask)} masks but {next(iter(forwards))} forward(s) count "
                             "since the balance loss was last taken; give one mask per forward, in call order")
        mask = torch.cat([m.reshape(-1) for m in mask]) if mask else None
    if coef is None:  # the injected config's coefficient, as CausalLM.aux_loss takes its adapter's
        config = getattr(model, "mola_config", None)
        coef = config.get("aux_loss_coef", DEFAULT_AUX_LOSS_COEF) if isinstance(config, dict) else DEFAULT_AUX_LOSS_COEF
    loss = load_balancing_loss(logits, top_k, float(coef), mask)
    # A MoLEx model (mola.inject with a MoLExConfig) adds its gates' balance loss, as the C++
    # CausalLM.aux_loss does: molex_aux_loss_coef times the sum over layers (coef does not change it).
    config = getattr(model, "mola_config", None)
    if isinstance(config, dict) and config.get("method") == "molex" and config.get("molex_aux_loss_coef", 0) > 0:
        from .molex import molex_balance_loss
        loss = loss + config["molex_aux_loss_coef"] * molex_balance_loss(model)
    return loss
