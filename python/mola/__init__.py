"""mola: mixture-of-LoRA-experts fine-tuning (MoLA, MoLEx) on a C++/CUDA core.

``import mola`` loads the C++ library (registering ``torch.ops.mola.*``), the
fake kernels torch.compile needs, and the Python API. The top level holds what
a user meets first: the layer and its configs, ``inject`` and the adapter
files, the balance loss, the C++ model and its trainer, and the adapter's
lifecycle (unload, merge, disable, count). The rest lives in submodules:

    mola.recipes       train / evaluate_recipe / load_recipe: recipe runs from Python
    mola.evaluation    EvalOptions, evaluate, majority_baseline, parse_answer
    mola.analysis      expert redundancy and routing of an adapter
    mola.integrations  transformers' Trainer (MoLATrainer), expert_load_counts
    mola.authors       import_authors_adapter: the MoLA authors' checkpoints
    mola.molex         MoLExGate, molex_balance_loss
    mola.trainable     set_trainable: which adapter tensors train
    mola.config        expand_preset, preset_names
    mola.ops           the op family (torch.ops.mola.*)
    mola.data          tokenizer, prompt templates, task data
    mola.injection     the module behind mola.inject (mola_modules, adapter_key)
"""
import importlib
import warnings

import torch  # noqa: F401  (libmola links libtorch: torch must be loaded first)

from . import _C  # noqa: F401  (registers the ops)
from . import _fake  # noqa: F401  (fake kernels for torch.compile)
from . import ops
from ._models import CausalLM
from .config import MoLAConfig, MoLExConfig
from .nn import MoLALinear, aux_loss
from .injection import inject
from .adapter import load_adapter, save_adapter
from .lifecycle import disable_adapter, merge_and_unload, print_trainable_parameters, unload
from ._trainer import NonFiniteLossError, Trainer, TrainOptions
from . import analysis, authors, config, data, evaluation, molex, quant, recipes, trainable  # noqa: F401

__version__ = "0.1.0"
built_with_cuda = _C.built_with_cuda

__all__ = ["MoLALinear", "MoLAConfig", "MoLExConfig", "inject", "save_adapter", "load_adapter", "aux_loss",
           "CausalLM", "Trainer", "TrainOptions", "NonFiniteLossError",
           "unload", "merge_and_unload", "disable_adapter", "print_trainable_parameters",
           "built_with_cuda", "__version__"]

# Names that lived at the top level before 0.2: they still work, for one
# release, with a DeprecationWarning that names their home.
_MOVED = {
    "train": "recipes", "evaluate_recipe": "recipes", "load_recipe": "recipes",
    "EvalOptions": "evaluation", "evaluate": "evaluation", "majority_baseline": "evaluation",
    "parse_answer": "evaluation",
    "import_authors_adapter": "authors",
    "MoLExGate": "molex", "molex_balance_loss": "molex",
    "set_trainable": "trainable",
    "expand_preset": "config", "preset_names": "config",
}


def __getattr__(name):
    home = _MOVED.get(name)
    if home is None:
        raise AttributeError(f"module 'mola' has no attribute {name!r}")
    warnings.warn(f"mola.{name} moved to mola.{home}.{name}; the old name goes away in the next release",
                  DeprecationWarning, stacklevel=2)
    return getattr(importlib.import_module(f"mola.{home}"), name)
