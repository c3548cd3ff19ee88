"""``mola.trainable.set_trainable``: which adapter tensors train (docs/recipes.md).

The C++ Trainer does the same from its ``trainable`` option (TrainOptions,
recipe key ``train.trainable``); this is the helper for a training loop of
one's own, on an injected transformers model or on a ``mola.CausalLM``.
"""
from __future__ import annotations

from typing import Any, Dict

from torch import nn

from .injection import mola_modules

__all__ = ["set_trainable", "TRAINABLE"]

#: "all": routers and experts (the papers'); "experts": A and B, routers frozen
#: (the authors' unused mark_only_lora_B_as_trainable); "routers": experts frozen.
TRAINABLE = ("all", "experts", "routers")


def set_trainable(model: Any, trainable: str = "all") -> Dict[str, int]:
    """Sets ``requires_grad`` on the adapter of ``model`` by ``trainable``.

    ``model`` is an injected ``nn.Module`` (its ``mola.MoLALinear`` modules) or
    a ``mola.CausalLM`` with an adapter (its ``*.mola.router`` / ``lora_a`` /
    ``lora_b`` tensors, shared with C++). The base stays frozen. Returns the
    number of trainable and frozen adapter elements, ``{"trainable": n,
    "frozen": m}``. A fresh Kaiming or Gaussian adapter has B = 0, so its
    routers get no gradient from the language-model loss alone: train routers
    only on experts that already learned, or with the balance loss.
    """
    if trainable not in TRAINABLE:
        raise ValueError(f"set_trainable: trainable={trainable!r} is not one of {', '.join(TRAINABLE)} "
                         "(all: routers and experts; experts: routers frozen; routers: experts frozen)")
    routers, experts = trainable != "experts", trainable != "routers"
    tensors = []  # (tensor, is_router): MoLALinear modules and MoLEx gates of a transformers model
    from ._models import CausalLM
    if isinstance(model, CausalLM):
        if not model.has_adapter:
            raise ValueError("set_trainable: the model has no adapter; add one first (CausalLM.attach(cfg))")
        return model.set_trainable(trainable)  # C++'s selection, the one the Trainer uses
    if isinstance(model, nn.Module):
        for _, m in mola_modules(model):
            tensors += [(m.router, True), (m.lora_a, False), (m.lora_b, False)]
        tensors += [(p, True) for name, p in model.named_parameters() if ".molex." in name]
    else:
        raise ValueError(f"set_trainable: expected an nn.Module or a mola.CausalLM; got {type(model).__name__}")
    if not tensors:
        raise ValueError("set_trainable: the model has no adapter; add one first "
                         "(mola.inject(model, cfg), or CausalLM.attach(cfg))")
    counts = {"trainable": 0, "frozen": 0}
    for tensor, is_router in tensors:
        on = routers if is_router else experts
        tensor.requires_grad_(on)
        counts["trainable" if on else "frozen"] += tensor.numel()
    return counts
