"""``mola.save_adapter`` / ``mola.load_adapter``: the adapter directory of docs/design.md, The adapter files.

Two files, the same ones the C++ model reads and writes:
- ``adapter_config.json``: ``MoLAConfig.resolve(num_layers)`` (method, per-layer
  experts / top_k / rank / scaling, alpha, dropout, targets, aux_loss_coef,
  compute, num_layers) plus ``base_model_name``;
- ``adapter_model.safetensors``: per adapted module at Hugging Face path P
  (from ``model.layers.`` on), ``P.mola.router`` [E, in], ``P.mola.lora_a``
  [E, r, in] and ``P.mola.lora_b`` [E, out, r]; for MoLEx also, per layer t,
  ``model.layers.{t}.molex.gate.weight`` [L, hidden], ``.molex.gate.bias`` [L]
  and, when learned, ``.molex.alpha`` [1].
Safetensors only, never pickle. Each file is written under a temporary name and
renamed, so an interrupted save never leaves a half-written file.
Both functions also take a ``mola.CausalLM`` (the C++ model) and hand it to its
own ``save_adapter`` / ``load_adapter``, which write and read the same files.
"""
from __future__ import annotations

import difflib
import json
import math
import os
import secrets
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple, Union

import torch
from torch import nn

from .config import MOLEX_FIELDS, MoLAConfig
from .injection import _inject_resolved, adapter_key, mola_modules, num_decoder_layers
from .nn import MoLALinear

__all__ = ["save_adapter", "load_adapter", "read_adapter_config", "CONFIG_NAME", "WEIGHTS_NAME"]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PARAMS = ("router", "lora_a", "lora_b")  # the MoLALinear parameters, as "<key>.mola.<name>"

_CONFIG_FIELDS = [f for f in MoLAConfig.__dataclass_fields__]
_DERIVED = ["num_layers", "scaling", "base_model_name"]  # written by resolve() / save, not config fields

PathLike = Union[str, os.PathLike]


def _is_cpp_model(model: Any) -> bool:
    """A ``mola.CausalLM``: the C++ model, which saves and loads its adapter itself."""
    from ._models import CausalLM
    return isinstance(model, CausalLM)


def save_adapter(model: Union[nn.Module, Any], directory: PathLike,
                 state_dict: Optional[Mapping[str, torch.Tensor]] = None) -> None:
    """Write the adapter of an injected ``model`` (or a ``mola.CausalLM`` with an
    attached adapter) to ``directory`` (created if needed).

    ``state_dict``: take the adapter tensors from this full state dict (keys as
    ``model.state_dict()``'s) instead of the modules. A model sharded with FSDP2
    holds only its shard of each parameter: gather the full state dict first
    (``torch.distributed.checkpoint.state_dict.get_model_state_dict`` with
    ``full_state_dict=True``) and pass it here, on the rank that writes.
    """
    if _is_cpp_model(model):
        if state_dict is not None:
            raise ValueError("save_adapter: state_dict is for nn.Module models; a mola.CausalLM "
                             "saves its own adapter tensors")
        model.save_adapter(os.fspath(directory))
        return
    resolved = _model_config(model, "save_adapter")
    modules = _keyed_modules(model, resolved, "save_adapter")
    paths = {adapter_key(path): path for path, _ in mola_modules(model)}
    tensors = {}
    for key, m in modules.items():
        for name in PARAMS:
            if state_dict is None:
                tensor = getattr(m, name)
                if _is_sharded(tensor):
                    raise ValueError(f"save_adapter: {paths[key]}.{name} is a sharded DTensor (FSDP2); "
                                     "gather the full state dict with torch.distributed.checkpoint.state_dict."
                                     "get_model_state_dict(model, options=StateDictOptions(full_state_dict=True)) "
                                     "and pass it as state_dict=")
            else:
                full = f"{paths[key]}.{name}"
                if full not in state_dict:
                    raise ValueError(f"save_adapter: state_dict has no {full!r}; give the model's full "
                                     f"state dict (it has {len(state_dict)} keys)")
                tensor = state_dict[full]
                if _is_sharded(tensor):
                    raise ValueError(f"save_adapter: state_dict[{full!r}] is a sharded DTensor; gather "
                                     "it with full_state_dict=True first")
                if tuple(tensor.shape) != tuple(getattr(m, name).shape):
                    raise ValueError(f"save_adapter: state_dict[{full!r}] has shape {list(tensor.shape)} "
                                     f"but the module's is {list(getattr(m, name).shape)}")
            tensors[f"{key}.mola.{name}"] = tensor.detach().to("cpu").contiguous()
    tensors.update({key: p.detach().to("cpu").contiguous() for key, p in _gate_params(model, resolved).items()})
    config = dict(resolved)
    name = _base_model_name(model)
    if name:
        config["base_model_name"] = name
    write_adapter_files(directory, tensors, config, "save_adapter")


def write_adapter_files(directory: PathLike, tensors: Dict[str, torch.Tensor], config: Dict[str, Any],
                        who: str) -> None:
    """The two files of an adapter directory, each written atomically, weights first."""
    from safetensors.torch import save_file

    directory = os.fspath(directory)
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise ValueError(f"{who}: {directory!r} is a file; give a directory for "
                         f"{CONFIG_NAME} and {WEIGHTS_NAME}")
    os.makedirs(directory, exist_ok=True)
    # Weights first: a directory whose config is present has its weights too.
    _write_atomic(os.path.join(directory, WEIGHTS_NAME),
                  lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    text = json.dumps(config, indent=2, sort_keys=True) + "\n"
    _write_atomic(os.path.join(directory, CONFIG_NAME),
                  lambda tmp: _write_text(tmp, text))


def load_adapter(model: Union[nn.Module, Any], directory: PathLike, is_trainable: bool = False
                 ) -> Union[nn.Module, Any]:
    """Load the adapter in ``directory`` into ``model``; returns ``model``.

    As PEFT's ``from_pretrained``: by default the adapter is for inference, so
    its tensors are frozen (``requires_grad`` False) and the whole model is put
    in eval mode (no dropout). ``is_trainable=True`` leaves the model's mode
    alone and makes the adapter trainable, to continue training it.

    ``directory`` is an adapter directory (``mola.save_adapter``) or a
    whole-model directory written by an injected model's ``save_pretrained``
    (its adapter is in ``directory/mola_adapter``). A model without MoLALinear
    modules is first injected with the saved config. An injected model must
    match it layer by layer (experts, top_k, rank, scaling). Tensors load by
    name; a missing or unexpected key or a shape mismatch is a ValueError that
    names the key. A ``mola.CausalLM`` loads it with its own ``load_adapter``
    (attaching first when it has no adapter; the C++ checks and errors apply).
    """
    directory = adapter_directory(directory)
    if _is_cpp_model(model):
        model.load_adapter(directory, is_trainable=is_trainable)
        return model
    _load_adapter_weights(model, directory)
    adapter = [p for _, m in mola_modules(model) for p in (m.router, m.lora_a, m.lora_b)]
    from .molex import molex_gates
    adapter += [p for _, g in molex_gates(model) for p in g.parameters()]
    for p in adapter:
        p.requires_grad_(bool(is_trainable))
    if not is_trainable:
        model.eval()
    return model


def adapter_directory(directory: PathLike) -> str:
    """``directory`` itself, or its ``mola_adapter`` folder when that holds the adapter
    (a whole-model checkpoint of ``save_pretrained``, a Trainer checkpoint)."""
    directory = os.fspath(directory)
    inner = os.path.join(directory, "mola_adapter")
    if not os.path.isfile(os.path.join(directory, CONFIG_NAME)) and os.path.isfile(os.path.join(inner, CONFIG_NAME)):
        return inner
    return directory


def _load_adapter_weights(model: nn.Module, directory: str) -> None:
    """Injects ``model`` when needed and copies the adapter's tensors into it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    resolved = read_adapter_config(directory)
    weights = os.path.join(directory, WEIGHTS_NAME)
    if not os.path.isfile(weights):
        raise FileNotFoundError(f"load_adapter: {weights!r} does not exist; an adapter directory "
                                f"holds {CONFIG_NAME} and {WEIGHTS_NAME} (written by mola.save_adapter)")

    if not mola_modules(model):
        num_layers = num_decoder_layers(model)
        if num_layers != resolved["num_layers"]:
            raise ValueError(f"load_adapter: the adapter in {directory!r} was made for "
                             f"{resolved['num_layers']} layers but the model has {num_layers}; "
                             "load it into the model it was trained on")
        _inject_resolved(model, resolved)
    elif getattr(model, "mola_config", None) is None:
        model.mola_config = dict(resolved)
    else:
        have = model.mola_config
        for key in ("method",) + MOLEX_FIELDS:
            if have.get(key) != resolved.get(key):
                raise ValueError(f"load_adapter: the adapter in {directory!r} has {key}={resolved.get(key)!r} "
                                 f"but the model was injected with {key}={have.get(key)!r}; load it into a "
                                 "fresh model (mola.inject(model, path=...))")
    modules = _keyed_modules(model, resolved, "load_adapter")

    try:
        state = load_file(weights, device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"load_adapter: {weights!r} is not a readable safetensors file ({e}); "
                         "write it again with mola.save_adapter") from None
    expected = {f"{key}.mola.{name}": getattr(m, name) for key, m in modules.items() for name in PARAMS}
    expected.update(_gate_params(model, resolved))
    missing = [k for k in expected if k not in state]
    if missing:
        raise ValueError(f"load_adapter: {weights!r} has no tensor {missing[0]!r} "
                         f"({len(missing)} missing in all); the adapter targets other modules than "
                         f"the model's {sorted({k.split('.')[-3] for k in expected})}")
    unexpected = sorted(k for k in state if k not in expected)
    if unexpected:
        raise ValueError(f"load_adapter: {weights!r} holds {unexpected[0]!r} ({len(unexpected)} "
                         "unexpected in all), which no MoLALinear of the model matches; "
                         "inject the same targets and layers the adapter was trained with")
    for key, param in expected.items():
        if tuple(state[key].shape) != tuple(param.shape):
            raise ValueError(f"load_adapter: {key!r} has shape {list(state[key].shape)} in "
                             f"{weights!r} but the model's is {list(param.shape)}; the adapter "
                             "was made for another base model or config")
    with torch.no_grad():
        for key, param in expected.items():
            param.copy_(state[key])


def read_adapter_config(directory: PathLike) -> Dict[str, Any]:
    """The resolved config of the adapter in ``directory``, validated (by C++, as MoLAConfig)."""
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"adapter directory {directory!r} does not exist; give the directory "
                                "mola.save_adapter wrote (a relative path starts at "
                                f"{os.getcwd()!r})")
    path = os.path.join(directory, CONFIG_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path!r} does not exist; an adapter directory holds "
                                f"{CONFIG_NAME} and {WEIGHTS_NAME} (written by mola.save_adapter)")
    with open(path, encoding="utf-8") as f:
        try:
            d = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON: {e.msg} at line {e.lineno}, "
                             f"column {e.colno}") from None
    if not isinstance(d, dict):
        raise ValueError(f"{path}: must hold a JSON object (the resolved MoLA config); got {d!r}")
    # What save_adapter writes: resolve()'s keys (C++ decides them) and the base model name.
    valid = sorted(set(_CONFIG_FIELDS + _DERIVED) | set(MOLEX_FIELDS) | set(MoLAConfig().resolve(1)))
    for key in d:
        if key not in valid:
            nearest = difflib.get_close_matches(str(key), valid, n=1, cutoff=0.0)
            raise ValueError(f"{path}: unknown key {key!r}; did you mean {nearest[0]!r}?")
    num_layers = d.get("num_layers")
    if not isinstance(num_layers, int) or isinstance(num_layers, bool) or num_layers < 1:
        raise ValueError(f"{path}: num_layers must be an int >= 1 (the model's decoder layers); "
                         f"got {num_layers!r}")
    try:
        fields = _CONFIG_FIELDS + list(MOLEX_FIELDS)
        resolved = MoLAConfig.from_dict({k: d[k] for k in fields if k in d}).resolve(num_layers)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    saved = d.get("scaling")
    if saved is not None and (not isinstance(saved, list) or len(saved) != num_layers or not all(
            isinstance(s, (int, float)) and math.isclose(s, r, rel_tol=1e-6)
            for s, r in zip(saved, resolved["scaling"]))):
        raise ValueError(f"{path}: scaling {saved!r} is not alpha / rank = {resolved['scaling']}; "
                         "the file was edited by hand: fix alpha, rank or scaling")
    if "base_model_name" in d:
        resolved["base_model_name"] = d["base_model_name"]
    return resolved


def _keyed_modules(model: nn.Module, resolved: Dict[str, Any], who: str) -> Dict[str, MoLALinear]:
    """Adapter key -> MoLALinear, after checking each module against the resolved config."""
    modules = mola_modules(model)
    if not modules:
        raise ValueError(f"{who}: the model has no MoLALinear modules; call mola.inject(model, cfg) first")
    out: Dict[str, MoLALinear] = {}
    for path, m in modules:
        key = adapter_key(path)
        if key in out:
            raise ValueError(f"{who}: two MoLALinear modules map to the adapter key {key!r}; "
                             "a model with one decoder stack is expected")
        layer = int(key.split(".")[2])  # "model.layers.{i}...."
        if layer >= resolved["num_layers"]:
            raise ValueError(f"{who}: {path!r} is in layer {layer} but the adapter config covers "
                             f"{resolved['num_layers']} layers")
        for what, have, want in _settings(m, resolved, layer):
            if what == "scaling" and math.isclose(have, want, rel_tol=1e-6):
                continue
            if have != want:
                raise ValueError(f"{who}: layer {layer} ({path}): the adapter config has {what}={want} "
                                 f"but the model's module has {what}={have}; inject the model with "
                                 "the adapter's config (or load into a fresh model)")
        want_init = resolved.get("init", "kaiming")
        if (m.init == "pissa") != (want_init == "pissa"):
            raise ValueError(f"{who}: layer {layer} ({path}): the adapter config has init={want_init!r} but the "
                             f"model's module has init={m.init!r}, and only PiSSA adjusts the base weights; "
                             "load into a fresh model (mola.load_adapter injects it with the adapter's config)")
        out[key] = m
    return out


def _gate_params(model: nn.Module, resolved: Dict[str, Any]) -> Dict[str, torch.Tensor]:
    """The MoLEx gate parameters by adapter key (``model.layers.{t}.molex.gate.weight`` ...); {} otherwise."""
    if resolved.get("method") != "molex":
        return {}
    from .molex import molex_gates
    gates = {g.layer_index: g for _, g in molex_gates(model)}
    if sorted(gates) != list(range(resolved["num_layers"])):
        raise ValueError(f"the model has MoLEx gates at layers {sorted(gates)} but the adapter config calls "
                         f"for one in each of {resolved['num_layers']} layers; inject the MoLEx config first")
    out = {}
    for t, g in sorted(gates.items()):
        out[f"model.layers.{t}.molex.gate.weight"] = g.gate.weight
        out[f"model.layers.{t}.molex.gate.bias"] = g.gate.bias
        if g.alpha is not None:
            out[f"model.layers.{t}.molex.alpha"] = g.alpha
    return out


def _settings(m: MoLALinear, resolved: Dict[str, Any], layer: int) -> List[Tuple[str, Any, Any]]:
    return [("experts", m.num_experts, resolved["experts"][layer]),
            ("top_k", m.top_k, resolved["top_k"][layer]),
            ("rank", m.rank, resolved["rank"][layer]),
            ("scaling", m.scaling, resolved["scaling"][layer])]


def _is_sharded(tensor: torch.Tensor) -> bool:
    """A DTensor (FSDP2, tensor parallel) that is not fully replicated here."""
    placements = getattr(tensor, "placements", None)
    return placements is not None and not all(p.is_replicate() for p in placements)


def _model_config(model: nn.Module, who: str) -> Dict[str, Any]:
    resolved = getattr(model, "mola_config", None)
    if not isinstance(resolved, dict):
        raise ValueError(f"{who}: the model has no mola_config (the resolved MoLA config); "
                         "add the adapter with mola.inject(model, cfg), which records it")
    return resolved


def _base_model_name(model: nn.Module) -> str:
    config = getattr(model, "config", None)
    for attr in ("_name_or_path", "model_type"):
        value = getattr(config, attr, None)
        if isinstance(value, str) and value:
            return value
    return ""


def _write_text(path: str, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


def _write_atomic(path: str, write: Callable[[str], None]) -> None:
    """``write(tmp)`` to a temporary name beside ``path``, then rename it to ``path``.

    The writer creates the file, so it gets the usual permissions (mkstemp's are 0600).
    """
    tmp = os.path.join(os.path.dirname(path) or ".",
                       f".{os.path.basename(path)}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
