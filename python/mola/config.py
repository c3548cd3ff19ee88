"""mola.MoLAConfig: the adapter configuration as a Python dataclass.

It mirrors the C++ ``mola::AdapterConfig`` field for field (the same names are
the dataclass fields, the JSON keys and the C++ members). The rules, the
layer-wise presets and the parameter count live only in C++
(src/config.cpp) and are reached through ``mola._C`` with JSON strings, so
Python and C++ can never disagree about what a config means. Python's own work
here is turning Python values (tuples, numpy or torch integers) into JSON and
reading files.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import numbers
import operator
import os
from collections.abc import Iterable, Mapping
from typing import Any, Dict, List, Sequence, Tuple, Union

from . import _C

#: An int (every layer), a list (4 group counts or one per layer), or, for
#: experts only, a preset string such as "triangle", "2468" or "10-2-2-2".
PerLayer = Union[int, str, List[int]]

# The defaults come from C++ so that there is one source for them.
_DEFAULTS: Dict[str, Any] = json.loads(_C.config_default_json())

# For values JSON cannot carry to C++ at all; C++ words every other error.
_EXPECTED = {
    "method": "a string such as 'mola'",
    "experts": "an int, a list of ints, or a preset string such as 'triangle'",
    "top_k": "an int or a list of ints",
    "rank": "an int or a list of ints",
    "alpha": "a finite number > 0 (default 16)",
    "dropout": "a number with 0 <= dropout < 1 (default 0.05)",
    "dropout_masks": "'per_expert' or 'shared'",
    "targets": "a list of module names such as ['q_proj', 'v_proj']",
    "aux_loss_coef": "a finite number >= 0 (default 0.001)",
    "compute": "one of 'auto', 'dense', 'grouped'",
    "init": "one of 'kaiming', 'gaussian', 'pissa'",
    "base_method": "'lora' or 'mola'",
    "molex_pool": "one of 'mean', 'last', 'token'",
    "molex_alpha": "a number in [0, 1] (default 0.5)",
    "molex_alpha_learned": "True or False",
    "molex_gate_grad": "one of 'straight_through', 'prob', 'none'",
    "molex_exclude_self": "True or False",
    "molex_aux_loss_coef": "a finite number >= 0 (default 0)",
}

#: MoLExConfig's own fields (JSON keys of MoLEx configs only; C++ rejects them for other methods).
MOLEX_FIELDS = ("base_method", "molex_pool", "molex_alpha", "molex_alpha_learned", "molex_gate_grad",
                "molex_exclude_self", "molex_aux_loss_coef")

__all__ = ["MoLAConfig", "MoLExConfig", "PerLayer", "preset_names", "expand_preset"]


def preset_names() -> List[str]:
    """The named expert-allocation presets, in the papers' order."""
    return list(_C.preset_names())


def expand_preset(spec: str, num_layers: int) -> List[int]:
    """Experts per layer for a preset string and a model with ``num_layers`` layers."""
    return list(_C.expand_preset(spec, _layers(num_layers)))


@dataclasses.dataclass
class MoLAConfig:
    """Settings of a MoLA adapter (docs/design.md, The MoLA layer; see ``mola::AdapterConfig``).

    experts, top_k and rank are each an int, a list of 4 group counts or one
    count per transformer layer; experts may also be a preset: ``rectangle``
    (5555), ``triangle`` (8642, more experts in the lower layers), ``inverted``
    (2468), ``hourglass`` (8228), ``diamond`` (2882), any 4 digits, or 4 counts
    such as "10-2-2-2". The layers split into 4 contiguous groups; the first
    L mod 4 groups get one layer more. Invalid values raise ValueError.

    ``method="lora"`` is a plain LoRA: one expert, top_k 1 (their defaults then,
    and the only values allowed).

    ``init`` is how the experts start (docs/recipes.md, Training variants): ``"kaiming"`` (LoRA's and
    the authors': A Kaiming-uniform, B zero), ``"gaussian"`` (A ~ N(0, std
    1/r) as PEFT's ``init_lora_weights="gaussian"``, B zero) or ``"pissa"``
    (PiSSA: every expert gets the principal part of the base weight, A =
    sqrt(S_r/s) V_r^T and B = U_r sqrt(S_r/s), and the base weight becomes
    W - U_r S_r V_r^T, so the model's output is unchanged at the start).

    ``dropout_masks``: ``"per_expert"`` (default: each expert a token is routed
    to draws its own dropout mask over the token's features, as the MoLA authors'
    code, which calls dropout inside its per-expert loop) or ``"shared"`` (one
    mask per token for all its experts: faster, and a deviation from the authors).

    ``method="molex"`` is MoLEx (docs/molex.md) with its defaults; ``MoLExConfig``
    has its settings as fields (``from_dict`` and ``from_json`` return one for
    method "molex").
    """

    method: str = _DEFAULTS["method"]
    # None: the method's default (8 and 2 for "mola", 1 and 1 for "lora"), filled in by C++.
    experts: PerLayer = None
    top_k: PerLayer = None
    rank: PerLayer = _DEFAULTS["rank"]
    alpha: float = _DEFAULTS["alpha"]
    dropout: float = _DEFAULTS["dropout"]
    dropout_masks: str = _DEFAULTS["dropout_masks"]
    targets: Tuple[str, ...] = tuple(_DEFAULTS["targets"])
    aux_loss_coef: float = _DEFAULTS["aux_loss_coef"]
    compute: str = _DEFAULTS["compute"]
    init: str = _DEFAULTS["init"]

    def __post_init__(self) -> None:
        # Validate in C++ and keep its normal form: lists as lists, numbers as
        # float/int, targets as a tuple (so that equal configs compare equal).
        for key, value in self._normalized().items():
            setattr(self, key, tuple(value) if key == "targets" else value)

    # ------------------------------------------------------------- JSON
    def to_dict(self) -> Dict[str, Any]:
        """The config as plain JSON values (validated again, so later edits are checked)."""
        return self._normalized()

    def to_json(self, path: Union[str, os.PathLike, None] = None) -> str:
        """The config as indented JSON; also written to ``path`` when given."""
        text = json.dumps(self.to_dict(), indent=2)
        if path is not None:
            with open(path, "w", encoding="utf-8") as f:
                f.write(text + "\n")
        return text

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "MoLAConfig":
        """Build from a mapping with any subset of the field names as keys."""
        if not isinstance(d, Mapping):
            raise ValueError(f"MoLAConfig.from_dict needs a mapping such as {{'experts': 8}}; got {d!r}")
        if d.get("method") == "molex" and not issubclass(cls, MoLExConfig):
            return MoLExConfig.from_dict(d)
        if not issubclass(cls, MoLExConfig):
            for key in d:
                if key in MOLEX_FIELDS:
                    raise ValueError(f"{key} is a MoLEx setting, but method is {d.get('method', 'mola')!r}; "
                                     f"drop {key} or set method 'molex' (mola.MoLExConfig)")
        names = [f.name for f in dataclasses.fields(cls)]
        for key in d:
            if key not in names:
                nearest = difflib.get_close_matches(str(key), names, n=1, cutoff=0.0)
                raise ValueError(
                    f"MoLAConfig: unknown key {key!r}; did you mean {nearest[0]!r}? Valid keys: {', '.join(names)}"
                )
        return cls(**d)

    @classmethod
    def from_json(cls, path_or_str: Union[str, os.PathLike]) -> "MoLAConfig":
        """Build from a JSON file, or from JSON text (a string starting with '{')."""
        if isinstance(path_or_str, str) and path_or_str.lstrip().startswith(("{", "[")):
            return cls.from_dict(_loads(path_or_str, "adapter config"))

        path = os.fspath(path_or_str)
        if not os.path.exists(path):
            raise FileNotFoundError(
                f"adapter config file {path!r} does not exist; check the path "
                f"(a relative path starts at the working directory {os.getcwd()!r})"
            )
        if os.path.isdir(path):
            raise IsADirectoryError(f"adapter config file {path!r} is a directory; give the JSON file inside it")
        with open(path, encoding="utf-8") as f:
            text = f.read()
        d = _loads(text, f"adapter config file {path!r}")
        if not isinstance(d, dict):
            raise ValueError(f"adapter config file {path!r} must hold a JSON object such as {{\"experts\": 8}}")
        try:
            return cls.from_dict(d)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None

    # ------------------------------------------------------------ model
    def resolve(self, num_layers: int) -> Dict[str, Any]:
        """Per-layer settings for a model with ``num_layers`` layers.

        Returns a dict with ``experts``, ``top_k``, ``rank`` and ``scaling``
        (alpha / rank) as lists of length num_layers, plus ``num_layers`` and
        the scalar fields: what adapter_config.json holds.
        """
        return json.loads(_C.config_resolve(self._json(), _layers(num_layers)))

    def num_parameters(self, shapes: Union[Mapping[str, Any], Sequence[Any]], num_layers: int) -> int:
        """Trainable parameters as the MoLA papers count them.

        sum over layers l of E_l * sum over targets t of (r_l * (in_t + out_t) + in_t).
        ``shapes`` maps each target name to ``(in_features, out_features)`` (or
        to a module with those attributes, such as an ``nn.Linear``), or is a
        list of ``(name, in_features, out_features)``. Names not in targets are
        ignored; a target without a shape is an error.
        """
        return int(_C.config_num_parameters(self._json(), _layers(num_layers), _shape_list(shapes)))

    # ---------------------------------------------------------- helpers
    def _json(self) -> str:
        d = {}
        for f in dataclasses.fields(self):
            if f.name in ("experts", "top_k") and getattr(self, f.name) is None:
                continue  # C++ fills in the method's default
            value = _plain(f.name, getattr(self, f.name))
            try:  # what JSON cannot hold (objects, NaN) never reaches C++; the rest C++ judges
                json.dumps(value, allow_nan=False)
            except (TypeError, ValueError):
                raise ValueError(f"{f.name} must be {_EXPECTED[f.name]}; got {value!r}") from None
            d[f.name] = value
        return json.dumps(d)

    def _normalized(self) -> Dict[str, Any]:
        d = json.loads(_C.config_normalize(self._json()))
        return {f.name: d[f.name] for f in dataclasses.fields(self)}  # field order, not C++'s sorted keys


@dataclasses.dataclass
class MoLExConfig(MoLAConfig):
    """Settings of a MoLEx adapter (docs/molex.md): ``MoLAConfig`` with ``method="molex"``.

    At each decoder layer t a gate over the model's L layers picks one layer j
    and the layer's output becomes alpha * u_t(z_t) + (1 - alpha) * u_j(z_t),
    u the whole decoder block with its own adapters. ``base_method`` ("lora",
    the default, or "mola") is the adapter inside every block; experts,
    top_k, rank, alpha, dropout, targets and aux_loss_coef are its settings.
    The gate (choices marked ours are not in the paper's available text):

    - ``molex_pool``: the gate input, "mean" over non-padding tokens (ours,
      default), the "last" non-padding token, or "token" (each token routed
      on its own; no KV cache in generation);
    - ``molex_alpha`` (0.5, ours) and ``molex_alpha_learned`` (False; True
      makes it sigmoid of a per-layer parameter starting at molex_alpha);
    - ``molex_gate_grad``: "straight_through" (ours, default; u_j times
      p_j / p_j.detach(), forward value unchanged), "prob" (times p_j,
      which changes the forward value) or "none";
    - ``molex_exclude_self``: never pick j = t (False);
    - ``molex_aux_loss_coef``: weight of a balance loss over the gates'
      choices (0, off).

    Example: ``mola.inject(model, mola.MoLExConfig(base_method="mola", experts="2468"))``.
    """

    method: str = "molex"
    base_method: str = "lora"
    molex_pool: str = "mean"
    molex_alpha: float = 0.5
    molex_alpha_learned: bool = False
    molex_gate_grad: str = "straight_through"
    molex_exclude_self: bool = False
    molex_aux_loss_coef: float = 0.0

    def __post_init__(self) -> None:
        if self.method != "molex":
            raise ValueError(f"MoLExConfig: method is always 'molex'; got {self.method!r} "
                             "(use mola.MoLAConfig for lora and mola adapters)")
        super().__post_init__()


def _loads(text: str, what: str) -> Any:
    """json.loads with an error that says where the JSON breaks and what to check."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(
            f"{what} is not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}; "
            "check for a missing comma, quote or brace"
        ) from None


def _plain(name: str, value: Any) -> Any:
    """A field value as the JSON the C++ parser expects; wrong types pass through for C++ to reject."""
    if name in ("experts", "top_k", "rank"):
        if isinstance(value, (str, bool, float)):
            return value
        if isinstance(value, Iterable) and not isinstance(value, Mapping) and not hasattr(value, "__index__"):
            return [_plain_int(v) for v in value]
        if hasattr(value, "__index__") and getattr(value, "ndim", 0) == 1:  # a 1-D tensor or array
            return [_plain_int(v) for v in value]
        return _plain_int(value)
    if name == "targets":
        if isinstance(value, str):
            raise ValueError(f"targets must be a list of module names, not the string {value!r}; write [{value!r}]")
        return list(value) if isinstance(value, Iterable) else value
    if isinstance(value, numbers.Real) and not isinstance(value, (bool, numbers.Integral)):
        return float(value)  # numpy and torch floats
    return value


def _plain_int(value: Any) -> Any:
    if isinstance(value, bool):
        return value
    try:
        return operator.index(value)
    except TypeError:
        return value


def _layers(num_layers: Any) -> int:
    if isinstance(num_layers, bool):
        raise ValueError(f"num_layers must be an int such as 32; got {num_layers!r}")
    try:
        return operator.index(num_layers)
    except TypeError:
        raise ValueError(f"num_layers must be an int such as 32; got {num_layers!r}") from None


def _shape_list(shapes: Union[Mapping[str, Any], Sequence[Any]]) -> List[Tuple[str, int, int]]:
    """Normalises the shapes accepted by num_parameters to [(name, in, out)]."""
    if isinstance(shapes, Mapping):
        entries = []
        for name, shape in shapes.items():
            if hasattr(shape, "in_features") and hasattr(shape, "out_features"):
                shape = (shape.in_features, shape.out_features)
            entries.append((name, *tuple(shape)) if isinstance(shape, Iterable) else (name, shape))
    else:
        entries = [tuple(e) if isinstance(e, Iterable) and not isinstance(e, str) else (e,) for e in shapes]
    out = []
    for e in entries:
        if len(e) != 3 or not isinstance(e[0], str):
            raise ValueError(
                f"num_parameters: shape entry {e!r} is not (name, in_features, out_features); "
                "pass e.g. {'q_proj': (4096, 4096)} or [('q_proj', 4096, 4096)]"
            )
        try:
            out.append((e[0], operator.index(e[1]), operator.index(e[2])))
        except TypeError:
            raise ValueError(f"num_parameters: the sizes of {e[0]!r} must be ints; got {e[1]!r} -> {e[2]!r}") from None
    return out
