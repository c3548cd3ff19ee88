"""mola: mixture-of-LoRA-experts fine-tuning (MoLA, MoLEx) on a C++/CUDA core.

``import mola`` loads the C++ library (registering ``torch.ops.mola.*``), the
fake kernels torch.compile needs, and the Python API.
"""
import torch  # noqa: F401  (libmola links libtorch: torch must be loaded first)

from . import _C  # noqa: F401  (registers the ops)
from . import _fake  # noqa: F401  (fake kernels for torch.compile)
from . import ops
from ._models import CausalLM
from .config import MoLAConfig, MoLExConfig, expand_preset, preset_names
from .nn import MoLALinear, aux_loss
from .molex import MoLExGate, molex_balance_loss
from .inject import inject
from .adapter import load_adapter, save_adapter
from .lifecycle import disable_adapter, merge_and_unload, print_trainable_parameters, unload
from .authors import import_authors_adapter
from ._run import evaluate_recipe, load_recipe, train
from .evaluation import EvalOptions, evaluate, majority_baseline, parse_answer
from . import data
from ._trainer import NonFiniteLossError, Trainer, TrainOptions
from .trainable import set_trainable
from . import analysis

__version__ = "0.1.0"
built_with_cuda = _C.built_with_cuda

__all__ = ["CausalLM", "MoLAConfig", "MoLExConfig", "MoLExGate", "molex_balance_loss", "MoLALinear", "aux_loss", "ops", "expand_preset", "preset_names",
           "built_with_cuda", "__version__",
           "inject", "save_adapter", "load_adapter", "train", "evaluate_recipe", "load_recipe", "data",
           "EvalOptions", "evaluate", "majority_baseline", "parse_answer",
           "Trainer", "TrainOptions", "NonFiniteLossError", "import_authors_adapter", "set_trainable", "analysis",
           "unload", "merge_and_unload", "disable_adapter", "print_trainable_parameters"]
