"""``mola.injection``, the module of ``mola.inject``: turn a transformers decoder (LLaMA, Mistral, Gemma) into a MoLA model.

The target ``nn.Linear`` layers are found by their Hugging Face module path,
``...layers.{i}.{self_attn|mlp}.{name}``, so any ``nn.Module`` laid out like
``LlamaForCausalLM`` works, wrapped or not. The layer index ``i`` picks that
layer's E, k and r from ``MoLAConfig.resolve`` (docs/design.md, The MoLA layer) and becomes
the module's ``layer_index``, which ``mola.aux_loss`` groups by (docs/design.md, The balance loss).

The same path rule names the adapter's tensors (docs/design.md, The adapter files): the part from
``layers.{i}`` on, behind ``model.``, as in Hugging Face checkpoints. It lives
here, beside the matching, so that inject and adapter.py cannot disagree.
"""
from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any, Dict, List, Tuple, Union

from torch import nn

from .config import MoLAConfig
from .nn import MoLALinear

__all__ = ["inject", "adapter_key", "mola_modules"]

#: Methods inject builds: MoLALinear layers ("lora" is MoLA with E = k = 1), and
#: "molex", whose blocks hold those of its base method plus a gate per layer.
METHODS = ("mola", "lora", "molex")

# A decoder-layer linear: group 1 is the key suffix from "layers." on,
# group 2 the layer index, group 3 the module's own name (q_proj, ...).
_LAYER_RE = re.compile(r"(?:^|\.)(layers\.(\d+)\.(?:self_attn|mlp)\.([A-Za-z0-9_]+))$")


def adapter_key(path: str) -> str:
    """The adapter tensor prefix of the module at ``path`` (docs/design.md, The adapter files).

    ``model.layers.3.self_attn.q_proj`` for ``LlamaForCausalLM``'s path, for a
    bare ``LlamaModel``'s ``layers.3.self_attn.q_proj`` and for any wrapper's
    ``base_model.model.model.layers.3.self_attn.q_proj`` alike.
    """
    match = _LAYER_RE.search(path)
    if match is None:
        raise ValueError(f"module path {path!r} is not a decoder-layer linear "
                         "('...layers.{i}.self_attn.q_proj' or '...layers.{i}.mlp.up_proj'); "
                         "MoLA adapters are keyed by that path")
    return "model." + match.group(1)


def mola_modules(model: nn.Module) -> List[Tuple[str, MoLALinear]]:
    """``(module path, module)`` for every MoLALinear of ``model``, in module order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, MoLALinear)]


def inject(model: nn.Module, cfg: Union[MoLAConfig, Mapping, None] = None, *,
           path: Union[str, os.PathLike, None] = None) -> nn.Module:
    """Replace the target linears of ``model`` by ``mola.MoLALinear`` in place.

    Args:
        model: a transformers causal LM (or any module whose decoder layers
            sit at ``...layers.{i}.{self_attn|mlp}.*_proj``).
        cfg: a ``MoLAConfig`` (or a dict of its fields); None means the
            defaults. ``targets`` name the modules to adapt (``q_proj`` ...).
        path: an adapter directory written by ``mola.save_adapter`` (or by the
            C++ model): its config is injected and its weights loaded, trainable
            (for inference, use ``mola.load_adapter``, which freezes it).

    Every other parameter is frozen. The new modules take the model's mode:
    an eval model (as ``from_pretrained`` returns it) stays in eval mode, with
    no dropout, until ``model.train()``. The resolved per-layer config (the
    content of adapter_config.json) is kept as ``model.mola_config``.
    Returns ``model``.
    """
    if path is not None:
        if cfg is not None:
            raise ValueError("inject: give cfg or path, not both; the adapter at "
                             f"{os.fspath(path)!r} carries its own config")
        _check_not_injected(model)
        from .adapter import load_adapter  # adapter.py imports this module
        load_adapter(model, path, is_trainable=True)  # inject is for training; the model keeps its mode
        return model
    cfg = _as_config(cfg)
    num_layers = num_decoder_layers(model)
    _inject_resolved(model, cfg.resolve(num_layers))
    return model


def num_decoder_layers(model: nn.Module) -> int:
    """``model.config.num_hidden_layers`` when there is one, else counted from the module paths."""
    config = getattr(model, "config", None)
    n = getattr(config, "num_hidden_layers", None)
    if isinstance(n, int) and not isinstance(n, bool) and n > 0:
        return n
    indices = [int(m.group(2)) for name, _ in model.named_modules()
               if (m := _LAYER_RE.search(name)) is not None]
    if not indices:
        raise ValueError(_no_layers_message(model))
    return max(indices) + 1


def _inject_resolved(model: nn.Module, resolved: Dict[str, Any]) -> None:
    """Inject the layers a resolved config (``MoLAConfig.resolve`` output) describes."""
    _check_not_injected(model)
    method = resolved.get("method")
    if method not in METHODS:
        raise ValueError(f"inject: method {method!r} is not an adapter inject builds; "
                         f"use one of {list(METHODS)}")
    num_layers = int(resolved["num_layers"])
    targets = list(resolved["targets"])
    available = sorted(_layer_linear_names(model))
    if not available:
        raise ValueError(_no_layers_message(model))
    found = _find_targets(model, targets)
    names = {name for _, _, name, _ in found}
    missing = [t for t in targets if t not in names]
    if missing:
        raise ValueError(f"inject: target {missing[0]!r} matches no module of the decoder layers; "
                         f"the linears there are {available}; fix cfg.targets")
    for path, index, name, linear in found:
        if index >= num_layers:
            raise ValueError(f"inject: module {path!r} is in layer {index} but the config covers "
                             f"{num_layers} layers; resolve the config for {index + 1} or more layers")
    # What trained before inject trains again after mola.unload.
    model.__dict__["_mola_requires_grad"] = {n for n, p in model.named_parameters() if p.requires_grad}
    # Freeze first: the new modules' adapter parameters are the only trainable ones.
    model.requires_grad_(False)
    for path, index, name, linear in found:
        module = MoLALinear(linear, num_experts=resolved["experts"][index],
                            top_k=resolved["top_k"][index], rank=resolved["rank"][index],
                            alpha=resolved["alpha"], dropout=resolved["dropout"],
                            compute=resolved["compute"], layer_index=index,
                            init=resolved.get("init", "kaiming"),
                            dropout_masks=resolved.get("dropout_masks", "per_expert"))
        # The host's mode: an eval model stays in eval (no dropout), as transformers'
        # from_pretrained leaves it, until the user calls model.train().
        module.train(linear.training)
        parent_path, _, child = path.rpartition(".")
        setattr(model.get_submodule(parent_path), child, module)
    if method == "molex":
        from .molex import install
        install(model, resolved)
    model.mola_config = dict(resolved)
    from .lifecycle import install_methods
    install_methods(model)


def _find_targets(model: nn.Module, targets: List[str]) -> List[Tuple[str, int, str, nn.Linear]]:
    """``(path, layer index, name, linear)`` of each target linear, in module order."""
    out = []
    for path, module in model.named_modules():
        match = _LAYER_RE.search(path)
        if match is None or match.group(3) not in targets:
            continue
        if not isinstance(module, nn.Linear):
            raise ValueError(f"inject: target {match.group(3)!r} at {path!r} is a "
                             f"{type(module).__name__}, not an nn.Linear; MoLA adapts linear layers only")
        out.append((path, int(match.group(2)), match.group(3), module))
    return out


def _layer_linear_names(model: nn.Module) -> set:
    return {m.group(3) for path, module in model.named_modules()
            if isinstance(module, nn.Linear) and (m := _LAYER_RE.search(path)) is not None}


def _check_not_injected(model: nn.Module) -> None:
    modules = mola_modules(model)
    if not modules:
        from .molex import molex_gates
        modules = molex_gates(model)
    if modules:
        raise ValueError(f"inject: the model already has {len(modules)} MoLALinear modules "
                         f"(e.g. {modules[0][0]!r}); inject a fresh model, or use "
                         "mola.load_adapter to load other weights into these")


def _no_layers_message(model: nn.Module) -> str:
    return (f"inject: found no decoder layers in {type(model).__name__}; MoLA adapts linears at "
            "module paths '...layers.{i}.self_attn.q_proj' / '...layers.{i}.mlp.up_proj' "
            "as in transformers' LLaMA, Mistral and Gemma models")


def _as_config(cfg: Union[MoLAConfig, Mapping, None]) -> MoLAConfig:
    if cfg is None:
        return MoLAConfig()
    if isinstance(cfg, MoLAConfig):
        return cfg
    if isinstance(cfg, Mapping):
        return MoLAConfig.from_dict(cfg)
    raise ValueError(f"inject: cfg must be a mola.MoLAConfig or a dict of its fields; "
                     f"got {type(cfg).__name__}")
