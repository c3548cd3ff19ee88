"""MoLEx on transformers models (docs/molex.md): ``mola.molex.MoLExGate`` and the layer wrapper ``mola.inject`` installs.

At decoder layer t a gate over the model's L layers picks a layer j from the
layer input z_t, and the layer's output becomes

    alpha * u_t(z_t) + (1 - alpha) * u_j(z_t)

u being the whole decoder block with its own adapters (MoLALinear). The
arithmetic mirrors the C++ ``mola::nn::MoLExGate`` (include/mola/nn/molex.h,
where every choice marked "ours" is explained) operation for operation, and
the parameter names are the same (``model.layers.{t}.molex.gate.weight``,
``.gate.bias``, ``.alpha``), so adapters move between the two.

How it sits in a transformers model: each decoder layer keeps its class and
its module names (so the adapter keys stay ``model.layers.{t}.self_attn.q_proj``)
and gains a child ``molex`` (the gate) and an instance ``forward`` that runs
its own block, the chosen blocks (class ``forward`` on block j, with j's own
adapters), and mixes them. A forward pre-hook on the layer stack (``LlamaModel``
and kin) records the 2-D attention mask so that pooling ignores padding.

KV cache: block j's attention has ``layer_idx = j``, so it would write into
layer j's entries of transformers' cache. Injected MoLEx models therefore run
with ``use_cache=False`` (``inject`` sets ``config.use_cache`` and the
generation config's to False) in training and generation; a forward given a
cache raises ValueError. The C++ model keeps a second cache per branch instead.
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["MoLExGate", "molex_pool", "molex_gates", "molex_balance_loss"]

POOLS = ("mean", "last", "token")
GATE_GRADS = ("straight_through", "prob", "none")


def molex_pool(z: torch.Tensor, padding: Optional[torch.Tensor], pool: str) -> torch.Tensor:
    """The gate input per unit, fp32: [batch, hidden] ("mean", "last") or [batch * seq, hidden] ("token").

    ``padding`` is [batch, seq] (nonzero = token) or None (no padding).
    """
    x = z.float()  # [batch, seq, hidden]
    if pool == "token":
        return x.reshape(-1, x.shape[-1])
    if pool == "mean":
        if padding is None:
            return x.mean(1)
        m = padding.float().unsqueeze(-1)  # [batch, seq, 1]
        return (x * m).sum(1) / m.sum(1).clamp_min(1.0)
    if pool == "last":
        seq = x.shape[1]
        if padding is None:
            index = torch.full((x.shape[0],), seq - 1, dtype=torch.long, device=x.device)
        else:
            pos = torch.arange(seq, dtype=torch.long, device=x.device)
            index = (padding.long() * pos).amax(1)  # the last token, right or left padding alike
        return x.gather(1, index.view(-1, 1, 1).expand(x.shape[0], 1, x.shape[2])).squeeze(1)
    raise ValueError(f"molex_pool: pool {pool!r} is not one of {list(POOLS)}")


class MoLExGate(nn.Module):
    """The gate of MoLEx at one decoder layer (the C++ ``mola::nn::MoLExGate``).

    Args:
        hidden_size: the model's hidden size (the gate's input).
        num_layers: L, the layers the gate chooses from.
        layer_index: t, the layer this gate belongs to.
        pool: "mean" (non-padding tokens), "last" (last non-padding token) or "token".
        alpha: the weight of the layer's own block; with ``alpha_learned`` the
            start of ``sigmoid(self.alpha)``.
        gate_grad: "straight_through" (u_j times p_j / p_j.detach(), value 1),
            "prob" (times p_j) or "none".
        exclude_self: never choose j = t.
    """

    def __init__(self, hidden_size: int, num_layers: int, layer_index: int, *, pool: str = "mean",
                 alpha: float = 0.5, alpha_learned: bool = False, gate_grad: str = "straight_through",
                 exclude_self: bool = False, dtype: Optional[torch.dtype] = None,
                 device: Optional[torch.device] = None):
        super().__init__()
        if pool not in POOLS:
            raise ValueError(f"MoLExGate: pool {pool!r} is not one of {list(POOLS)}")
        if gate_grad not in GATE_GRADS:
            raise ValueError(f"MoLExGate: gate_grad {gate_grad!r} is not one of {list(GATE_GRADS)}")
        if not 0 <= layer_index < num_layers:
            raise ValueError(f"MoLExGate: layer_index {layer_index} must be in [0, num_layers={num_layers})")
        self.num_layers, self.layer_index, self.pool = num_layers, layer_index, pool
        self.alpha_init, self.gate_grad, self.exclude_self = float(alpha), gate_grad, exclude_self
        self.gate = nn.Linear(hidden_size, num_layers, bias=True, dtype=dtype, device=device)
        self.alpha = (nn.Parameter(torch.zeros(1, dtype=dtype, device=device)) if alpha_learned else None)
        self.last: Optional[Dict[str, torch.Tensor]] = None  # the last route(), for the balance loss
        #: True inside ``mola.disable_adapter``: the layer runs its own block alone.
        self.adapter_disabled = False
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """nn.Linear's weight init, a zero bias (no layer favoured), alpha = logit(alpha)."""
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.gate.weight, a=math.sqrt(5))
            self.gate.bias.zero_()
            if self.alpha is not None:
                self.alpha.fill_(math.log(self.alpha_init / (1.0 - self.alpha_init)))

    def route(self, z: torch.Tensor, padding: Optional[torch.Tensor]) -> Dict[str, torch.Tensor]:
        """``choice`` ([batch] or [batch, seq] int64), ``scale`` (its shape, fp32), ``probs``, ``valid``."""
        pooled = molex_pool(z, padding, self.pool)  # [units, hidden] fp32
        logits = F.linear(pooled, self.gate.weight.float(), self.gate.bias.float())  # [units, L]
        if self.exclude_self:
            logits = logits.index_fill(1, torch.tensor([self.layer_index], device=logits.device), float("-inf"))
        probs = logits.softmax(-1)
        choice = probs.argmax(-1)  # [units]
        p = probs.gather(1, choice.unsqueeze(1)).squeeze(1)
        if self.gate_grad == "straight_through":
            scale = p / p.detach()
        elif self.gate_grad == "prob":
            scale = p
        else:
            scale = torch.ones_like(p)
        if self.pool == "token":
            batch, seq = z.shape[0], z.shape[1]
            choice, scale = choice.view(batch, seq), scale.view(batch, seq)
            valid = (padding.reshape(-1).bool() if padding is not None
                     else torch.ones(batch * seq, dtype=torch.bool, device=z.device))
        else:
            valid = torch.ones(choice.shape[0], dtype=torch.bool, device=z.device)
        self.last = {"choice": choice, "scale": scale, "probs": probs, "valid": valid}
        return self.last

    def alpha_value(self) -> torch.Tensor:
        """alpha as a 0-dim fp32 tensor."""
        if self.alpha is not None:
            return self.alpha.float().sigmoid().squeeze(0)
        return torch.tensor(self.alpha_init, dtype=torch.float32, device=self.gate.weight.device)

    def mix(self, own: torch.Tensor, other: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """alpha * own + (1 - alpha) * scale * other, in own's dtype."""
        a = self.alpha_value()
        w = (1 - a) * scale
        return own * a.to(own.dtype) + other * w.to(own.dtype)

    def balance_loss(self) -> torch.Tensor:
        """n * sum_j f_j * P_j over the last route() (n = choosable layers; 1 when uniform)."""
        if self.last is None:
            raise ValueError("MoLExGate.balance_loss: the gate has not routed yet; run a forward first")
        valid = self.last["valid"]
        probs = self.last["probs"][valid]
        choice = self.last["choice"].reshape(-1)[valid]
        count = torch.zeros(self.num_layers, dtype=probs.dtype, device=probs.device).index_add(
            0, choice, torch.ones(choice.shape[0], dtype=probs.dtype, device=probs.device))
        units = max(1.0, float(choice.shape[0]))
        n = self.num_layers - (1 if self.exclude_self else 0)
        return n * ((count / units) * (probs.sum(0) / units)).sum()

    def __getstate__(self):
        # The last route belongs to this gate's autograd graph: a copy starts without it.
        state = super().__getstate__()
        state["last"] = None
        return state

    def extra_repr(self) -> str:
        """The gate's settings, for ``print(model)``."""
        return (f"layer_index={self.layer_index}, num_layers={self.num_layers}, pool={self.pool!r}, "
                f"alpha={self.alpha_init}, alpha_learned={self.alpha is not None}, "
                f"gate_grad={self.gate_grad!r}, exclude_self={self.exclude_self}")


class _Context:
    """What every wrapped layer of one model shares: the layers and the last 2-D attention mask."""

    def __init__(self, layers: List[nn.Module]):
        self.layers = layers
        self.padding: Optional[torch.Tensor] = None
        self.use_cache: Dict[str, Any] = {}  # config name -> its use_cache before inject (for unload)

    def __getstate__(self):
        return {"layers": self.layers, "padding": None, "use_cache": self.use_cache}


def molex_gates(model: nn.Module) -> List[Tuple[str, MoLExGate]]:
    """``(module path, gate)`` for every MoLExGate of ``model``, in module order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, MoLExGate)]


def molex_balance_loss(model: nn.Module) -> torch.Tensor:
    """The sum over layers of the gates' balance losses of the last forward (no coefficient)."""
    gates = molex_gates(model)
    if not gates:
        raise ValueError("molex_balance_loss: the model has no MoLEx gates; inject a MoLExConfig first")
    return sum(g.balance_loss() for _, g in gates)


def install(model: nn.Module, resolved: Dict[str, Any]) -> None:
    """Give every decoder layer of ``model`` a gate and the MoLEx forward (called by ``mola.inject``)."""
    stack, layers = _decoder_stack(model)
    num_layers = int(resolved["num_layers"])
    if len(layers) != num_layers:
        raise ValueError(f"inject: the MoLEx config covers {num_layers} layers but the model has "
                         f"{len(layers)} decoder layers; resolve the config for {len(layers)}")
    ctx = _Context(list(layers))
    hidden = _hidden_size(model, layers[0])
    ref = next(layers[0].parameters())
    for t, layer in enumerate(layers):
        gate = MoLExGate(hidden, num_layers, t, pool=resolved["molex_pool"], alpha=resolved["molex_alpha"],
                         alpha_learned=resolved["molex_alpha_learned"], gate_grad=resolved["molex_gate_grad"],
                         exclude_self=resolved["molex_exclude_self"], device=ref.device,
                         dtype=torch.float32 if ref.dtype in (torch.bfloat16, torch.float16) else ref.dtype)
        gate.train(layer.training)
        layer.add_module("molex", gate)
        layer._molex_ctx = ctx
        layer.forward = _BoundForward(layer)
    stack.register_forward_pre_hook(_RecordPadding(ctx), with_kwargs=True)
    # Block j's attention would write into layer j's cache entries (see the module docstring).
    for name in ("config", "generation_config"):
        config = getattr(model, name, None)
        if config is not None and hasattr(config, "use_cache"):
            ctx.use_cache[name] = config.use_cache
            config.use_cache = False


def _decoder_stack(model: nn.Module) -> Tuple[nn.Module, nn.ModuleList]:
    """The module holding ``layers`` (LlamaModel and kin) and that ModuleList."""
    for name, module in model.named_modules():
        layers = getattr(module, "layers", None)
        if isinstance(layers, nn.ModuleList) and len(layers) and all(
                hasattr(l, "self_attn") and hasattr(l, "mlp") for l in layers):
            return module, layers
    raise ValueError(f"inject: MoLEx found no decoder layer list in {type(model).__name__}; it wraps "
                     "model.model.layers of transformers' LLaMA, Mistral and Gemma models")


def _hidden_size(model: nn.Module, layer: nn.Module) -> int:
    n = getattr(getattr(model, "config", None), "hidden_size", None)
    if isinstance(n, int):
        return n
    return layer.input_layernorm.weight.shape[0]


class _RecordPadding:
    """The forward pre-hook on the layer stack that keeps the 2-D attention mask
    for the gates' pooling. An object, so that a deepcopy records into the copy's context."""

    def __init__(self, ctx: _Context):
        self.ctx = ctx

    def __call__(self, module, args, kwargs):
        mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
        self.ctx.padding = mask.ne(0) if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
        return None


def uninstall(model: nn.Module) -> None:
    """Undo ``install``: the decoder layers lose their gate and MoLEx forward (``mola.unload``)."""
    stack, layers = _decoder_stack(model)
    ctx = getattr(layers[0], "_molex_ctx", None)
    for name, value in (ctx.use_cache.items() if ctx is not None else ()):
        config = getattr(model, name, None)
        if config is not None:
            config.use_cache = value
    for key, hook in list(stack._forward_pre_hooks.items()):
        if isinstance(hook, _RecordPadding):
            del stack._forward_pre_hooks[key]
            stack._forward_pre_hooks_with_kwargs.pop(key, None)
    for layer in layers:
        if isinstance(layer.__dict__.get("forward"), _BoundForward):
            del layer.forward
        layer.__dict__.pop("_molex_ctx", None)
        if "molex" in layer._modules:
            del layer._modules["molex"]


class _BoundForward:
    """A decoder layer's instance ``forward`` under MoLEx. An object rather than a
    closure, so that ``copy.deepcopy`` and pickle carry it to the copy's layer."""

    def __init__(self, layer: nn.Module):
        self.layer = layer

    def __call__(self, hidden_states, *args, **kwargs):
        return _molex_forward(self.layer, hidden_states, *args, **kwargs)


# Keyword arguments of a transformers decoder layer that hold one entry per batch row.
_PER_ROW = ("attention_mask", "position_ids", "position_embeddings")


def _rows(value: Any, rows: torch.Tensor, batch: int) -> Any:
    if isinstance(value, tuple):
        return tuple(_rows(v, rows, batch) for v in value)
    if isinstance(value, torch.Tensor) and value.dim() >= 2 and value.shape[0] == batch:
        return value.index_select(0, rows)
    return value


def _run_block(layer: nn.Module, hidden_states: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor:
    """Block ``layer`` as the second branch, its class forward, its MoLA router logits left as they were."""
    from .nn import MoLALinear
    kept = [(m, m.router_logits, list(m._pending_logits)) for m in layer.modules() if isinstance(m, MoLALinear)]
    out = type(layer).forward(layer, hidden_states, *args, **kwargs)
    for m, logits, pending in kept:
        m.router_logits, m._pending_logits = logits, pending
    return out[0] if isinstance(out, tuple) else out


def _molex_forward(layer: nn.Module, hidden_states: torch.Tensor, *args, **kwargs):
    if kwargs.get("past_key_values") is not None:
        raise ValueError("MoLEx (mola.inject): a transformers model with MoLEx runs without a KV cache, "
                         "because block j would write into layer j's cache; call it with use_cache=False "
                         "(also in generate)")
    if args:
        raise ValueError("MoLEx (mola.inject): the decoder layer got positional arguments after "
                         "hidden_states; pass them by keyword as transformers' models do")
    ctx, gate = layer._molex_ctx, layer.molex
    if gate.adapter_disabled:
        return type(layer).forward(layer, hidden_states, **kwargs)
    t = gate.layer_index
    out = type(layer).forward(layer, hidden_states, **kwargs)
    as_tuple = isinstance(out, tuple)
    own = out[0] if as_tuple else out  # [batch, seq, hidden]
    padding = ctx.padding
    if padding is not None and padding.shape != hidden_states.shape[:2]:
        padding = None  # not this stack's mask (e.g. a cached step); pool over every token
    r = gate.route(hidden_states, padding)
    choice, batch = r["choice"], hidden_states.shape[0]
    sources = torch.unique(choice).tolist()  # one host sync per layer
    if gate.pool == "token":
        other = torch.zeros_like(own)
        for d in sources:
            u = own if d == t else _run_block(ctx.layers[d], hidden_states, (), kwargs)
            other = torch.where(choice.eq(d).unsqueeze(-1), u, other)
        mixed = gate.mix(own, other, r["scale"].unsqueeze(-1))
    else:
        if len(sources) == 1:
            d = sources[0]
            other = own if d == t else _run_block(ctx.layers[d], hidden_states, (), kwargs)
        else:
            other = own
            for d in sources:
                if d == t:
                    continue
                rows = choice.eq(d).nonzero().squeeze(1)
                sub = {k: (_rows(v, rows, batch) if k in _PER_ROW else v) for k, v in kwargs.items()}
                u = _run_block(ctx.layers[d], hidden_states.index_select(0, rows), (), sub)
                other = other.index_copy(0, rows, u)
        mixed = gate.mix(own, other, r["scale"].view(batch, 1, 1))
    return (mixed,) + tuple(out[1:]) if as_tuple else mixed
