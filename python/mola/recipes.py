"""``mola.recipes``: a recipe run from Python (``train``, ``evaluate_recipe``,
``load_recipe``), the same code as ``mola train`` / ``mola eval`` (the C++
library, through the bindings)::

    import mola.recipes
    summary = mola.recipes.train("configs/recipes/tiny/scienceqa-2468.json", {"train.epochs": 1})
"""
from __future__ import annotations

import os
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

from . import _C

Overrides = Optional[Union[Mapping[str, Any], Sequence[str]]]


def train(recipe: Union[str, os.PathLike], overrides: Overrides = None, process_group: Any = None) -> Dict[str, Any]:
    """Train as the recipe file says; ``overrides`` are ``{"train.epochs": 1}`` or
    ``["train.epochs=1"]`` (as ``--set``). Returns the run's summary.json as a dict.
    Bad recipes raise ValueError naming the key.

    ``process_group``: a ``torch.distributed`` ProcessGroup (e.g. ``group.WORLD``
    after ``init_process_group``) to train as one of its ranks; every rank calls
    ``train`` with the same recipe, rank 0 writes the outputs and returns the
    summary (the other ranks get ``{recipe, output_dir, adapter, train, rank}``)."""
    return _C.train_recipe(os.fspath(recipe), overrides, process_group)


def evaluate_recipe(recipe: Union[str, os.PathLike], adapter: str = "", split: str = "test",
             overrides: Overrides = None) -> Dict[str, Any]:
    """Accuracy of the recipe's model (with ``adapter`` loaded, when given) on ``split``
    ("test", "validation" or a JSON Lines path), by generation and by option log-likelihood."""
    return _C.eval_recipe(os.fspath(recipe), adapter, split, overrides)


def load_recipe(recipe: Union[str, os.PathLike], overrides: Overrides = None) -> Dict[str, Any]:
    """Read and validate a recipe; returns its JSON after the overrides. Raises ValueError."""
    return _C.load_recipe(os.fspath(recipe), overrides)


__all__: List[str] = ["train", "evaluate_recipe", "load_recipe"]
