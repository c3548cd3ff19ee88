"""What happens to an injected model after ``mola.inject``: saving it whole,
switching the adapter off, taking it out again, counting what trains.

    mola.print_trainable_parameters(model)   # trainable params: ... || all params: ... || trainable%: ...
    with mola.disable_adapter(model):         # the base model alone, inside the block
        base_logits = model(ids).logits
    model.save_pretrained("out/")             # the base under its own names + out/mola_adapter/
    base = mola.unload(model)                 # the transformers model as it was before inject

A routed mixture cannot be merged into the base weights (``merge_and_unload``
says why); a plain LoRA adapter (one expert per layer) can.

``inject`` gives a transformers model three methods of its own (instance
attributes, carried by ``copy.deepcopy`` and pickle, removed by ``unload``):
``save_pretrained`` writes a checkpoint that ``from_pretrained`` reads back as
the base model, with the adapter in its ``mola_adapter`` folder;
``disable_adapters`` / ``enable_adapters`` switch the adapter off and on, as
transformers' own methods do for PEFT adapters.
"""
from __future__ import annotations

import contextlib
import os
from typing import Any, Dict, Iterator, Tuple

import torch
from torch import nn

from .nn import MoLALinear

__all__ = ["unload", "merge_and_unload", "disable_adapter", "print_trainable_parameters",
           "trainable_parameters", "ADAPTER_DIRNAME"]

#: The adapter's folder inside a whole-model checkpoint (``save_pretrained``) or a
#: Trainer checkpoint. A folder of its own keeps transformers' from_pretrained
#: from taking the directory for a PEFT adapter (it looks for adapter_config.json).
ADAPTER_DIRNAME = "mola_adapter"

# The instance methods inject installs, by name.
_METHODS = ("save_pretrained", "disable_adapters", "enable_adapters")


def _modules(model: nn.Module):
    return [(name, m) for name, m in model.named_modules() if isinstance(m, MoLALinear)]


def _gates(model: nn.Module):
    from .molex import molex_gates
    return molex_gates(model)


def _is_cpp_model(model: Any) -> bool:
    from ._models import CausalLM
    return isinstance(model, CausalLM)


def _require_injected(model: nn.Module, who: str) -> None:
    if not _modules(model):
        raise ValueError(f"{who}: the model has no MoLALinear modules; there is no mola adapter to "
                         "act on (add one with mola.inject(model, cfg) or mola.load_adapter)")


# --------------------------------------------------------------- counting

def trainable_parameters(model: Any) -> Tuple[int, int]:
    """``(trainable, total)`` parameter counts of ``model`` (an ``nn.Module`` or a ``mola.CausalLM``)."""
    params = model.parameters()
    seen, trainable, total = set(), 0, 0
    for p in params:
        if id(p) in seen:  # tied weights count once
            continue
        seen.add(id(p))
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
    return trainable, total


def print_trainable_parameters(model: Any) -> Tuple[int, int]:
    """Prints ``trainable params: N || all params: M || trainable%: P`` (PEFT's line) and returns ``(N, M)``."""
    trainable, total = trainable_parameters(model)
    share = 100.0 * trainable / total if total else 0.0
    print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {share:.4f}")
    return trainable, total


# --------------------------------------------------------------- on / off

@contextlib.contextmanager
def disable_adapter(model: Any) -> Iterator[Any]:
    """``with mola.disable_adapter(model):`` runs the base model alone inside the block.

    Every MoLALinear computes its pretrained layer (with a PiSSA adapter, the
    residual plus the principal part PiSSA took out of it) and every MoLEx layer
    its own block; the adapter is switched back on when the block ends, also
    after an exception. Works on an injected ``nn.Module`` and on a ``mola.CausalLM``.
    """
    if _is_cpp_model(model):
        before = model.adapter_enabled
        model.adapter_enabled = False
        try:
            yield model
        finally:
            model.adapter_enabled = before
        return
    _require_injected(model, "disable_adapter")
    modules = _modules(model) + _gates(model)
    before = [(m, m.adapter_disabled) for _, m in modules]
    for _, m in modules:
        m.adapter_disabled = True
    try:
        yield model
    finally:
        for m, state in before:
            m.adapter_disabled = state


class _SetEnabled:
    """``model.disable_adapters()`` / ``model.enable_adapters()`` on an injected transformers
    model: transformers' names for the same switch (its own methods look for PEFT)."""

    def __init__(self, model: nn.Module, enabled: bool):
        self.model, self.enabled = model, enabled

    def __call__(self) -> None:
        for _, m in _modules(self.model) + _gates(self.model):
            m.adapter_disabled = not self.enabled


# --------------------------------------------------------------- whole-model save

def base_state_dict(model: nn.Module, state_dict: Dict[str, torch.Tensor] = None) -> Dict[str, torch.Tensor]:
    """The base model's state dict under its own names: ``...q_proj.base.weight`` becomes
    ``...q_proj.weight``; the adapter's tensors (routers, experts, MoLEx gates) are left out."""
    _require_injected(model, "save_pretrained")
    for path, m in _modules(model):
        if m.init == "pissa":
            raise ValueError(f"save_pretrained: {path} was initialised with PiSSA, which moved the principal "
                             "part of the base weights into the adapter; a whole-model checkpoint would hold "
                             "the residual weights. Save the adapter with mola.save_adapter(model, dir) and "
                             "keep the original base checkpoint (loading the adapter recomputes the residual)")
    if state_dict is None:
        state_dict = model.state_dict()
    prefixes = [path + "." for path, _ in _modules(model)]
    gate_prefixes = [path + "." for path, _ in _gates(model)]
    out = {}
    for key, tensor in state_dict.items():
        if any(key.startswith(g) for g in gate_prefixes):
            continue
        owner = next((p for p in prefixes if key.startswith(p)), None)
        if owner is None:
            out[key] = tensor
            continue
        rest = key[len(owner):]
        if rest.startswith("base."):
            out[owner + rest[len("base."):]] = tensor
        # router, lora_a, lora_b and PiSSA buffers belong to the adapter
    return out


class _SavePretrained:
    """``model.save_pretrained(dir, ...)`` on an injected transformers model: the base
    model's files under its own tensor names (``from_pretrained(dir)`` gives the base
    model back, with no missing or unexpected key), and the adapter in
    ``dir/mola_adapter`` (``mola.load_adapter(model, dir)`` finds it there)."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __call__(self, save_directory, *args, state_dict=None, is_main_process: bool = True, **kwargs):
        from .adapter import save_adapter
        model = self.model
        clean = base_state_dict(model, state_dict)
        type(model).save_pretrained(model, save_directory, *args, state_dict=clean,
                                    is_main_process=is_main_process, **kwargs)
        if is_main_process:
            save_adapter(model, os.path.join(os.fspath(save_directory), ADAPTER_DIRNAME),
                         state_dict=state_dict)


def install_methods(model: nn.Module) -> None:
    """Give an injected transformers model its ``save_pretrained``, ``disable_adapters``
    and ``enable_adapters`` (models without ``save_pretrained`` get only the switches)."""
    if callable(getattr(type(model), "save_pretrained", None)):
        model.save_pretrained = _SavePretrained(model)
    model.disable_adapters = _SetEnabled(model, False)
    model.enable_adapters = _SetEnabled(model, True)


def _remove_methods(model: nn.Module) -> None:
    for name in _METHODS:
        if isinstance(model.__dict__.get(name), (_SavePretrained, _SetEnabled)):
            del model.__dict__[name]


# --------------------------------------------------------------- unload / merge

def unload(model: nn.Module) -> nn.Module:
    """Takes the adapter out of an injected model in place and returns it: every
    MoLALinear gives back its pretrained ``nn.Linear`` (a PiSSA base gets its
    principal part back), MoLEx layers their plain forward, and the parameters
    that trained before inject train again. ``save_pretrained`` then writes the
    base model as it was; the adapter's weights are dropped (save them first with
    ``mola.save_adapter``)."""
    if _is_cpp_model(model):
        model.detach_adapter()
        return model
    _require_injected(model, "unload")
    config = getattr(model, "mola_config", None)
    if isinstance(config, dict) and config.get("method") == "molex":
        from .molex import uninstall
        uninstall(model)
    for path, m in _modules(model):
        base = m.base
        if m.init == "pissa":
            with torch.no_grad():
                base.weight.copy_(m.base_weight())
        base.train(m.training)
        parent_path, _, child = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        setattr(parent, child, base)
    trained = model.__dict__.pop("_mola_requires_grad", None)
    if trained is not None:
        for name, p in model.named_parameters():
            p.requires_grad_(name in trained)
    model.__dict__.pop("mola_config", None)
    _remove_methods(model)
    return model


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Folds a plain LoRA adapter (one expert per layer, method "lora") into the base
    weights, ``W + scaling * B A``, and unloads it; returns the model.

    A MoLA adapter (several experts, top-k routing) cannot be merged: each token
    picks its own experts with weights computed from that token, so the layer's
    update ``scaling * sum_j w_j(x) B_j A_j`` changes from token to token and no
    single weight matrix equals it. MoLEx mixes whole layers per sequence, which
    no weight matrix can express either. Both raise ValueError.
    """
    if _is_cpp_model(model):
        raise ValueError("merge_and_unload: a mola.CausalLM keeps its adapter beside the base weights; "
                         "save it with model.save_adapter(dir)")
    _require_injected(model, "merge_and_unload")
    config = getattr(model, "mola_config", None) or {}
    if config.get("method") == "molex":
        raise ValueError("merge_and_unload: a MoLEx adapter mixes the output of another whole layer, chosen per "
                         "sequence, into each layer; no change of weights can express that. Keep the adapter "
                         "(mola.save_adapter) or take it out without merging (mola.unload)")
    quantized = [(path, m) for path, m in _modules(model) if m.quantized_base]
    if quantized:
        path, m = quantized[0]
        raise ValueError(f"merge_and_unload: the base layer of {path} is quantized ({type(m.base).__name__}); "
                         "merging into it would round the update to the base's 4 or 8 bits. Load the base "
                         "unquantized and merge there (the adapter files load over either), or keep the adapter")
    routed = [(path, m) for path, m in _modules(model) if m.num_experts > 1]
    if routed:
        path, m = routed[0]
        raise ValueError(f"merge_and_unload: {path} routes each token to {m.top_k} of {m.num_experts} LoRA experts "
                         "with weights computed from that token, so its update sum_j w_j(x) B_j A_j differs "
                         "from token to token and no single weight matrix equals it; only a plain LoRA adapter "
                         "(one expert, method 'lora') merges. Keep the adapter (mola.save_adapter) or take it "
                         "out without merging (mola.unload)")
    with torch.no_grad():
        for _, m in _modules(model):
            w = m.base.weight
            ct = torch.float64 if w.dtype == torch.float64 else torch.float32
            # One expert: its routing weight is 1 for every token, and with PiSSA the
            # trained A, B already hold the principal part, so W_res + s B A is the whole layer.
            merged = w.to(ct) + m.scaling * m.lora_b[0].to(ct) @ m.lora_a[0].to(ct)
            w.copy_(merged.to(w.dtype))
            m.init = "kaiming"  # the principal part is in the merged weight; unload must not add it again
    return unload(model)
