"""Adapters trained with the MoLA authors' code (GCYZSL/MoLA), imported into
mola's adapter format (docs/design.md, Fidelity to the papers and the authors' code):

    mola.authors.import_authors_adapter("their_run/", "out/adapter")   # then mola.load_adapter(...)

Their directory holds a peft ``adapter_config.json`` (``r`` a per-layer list,
``lora_alpha``, ``lora_dropout``, ``target_modules``; no expert counts, no
top-k) and ``adapter_model.bin`` (or ``.safetensors``) with one tensor per
expert: ``base_model.model.model.layers.{j}.{self_attn|mlp}.{proj}.lora_A_{e}.weight``
[r, in], ``lora_B_{e}.weight`` [out, r] and ``...{proj}.router.router.weight``
[E_j, in] (in memory ``lora_A.default_{e}``; both spellings are read). E per
layer comes from the router shapes; top-k is not stored, so it is an argument
(2, the authors' value, capped at E). The ``.bin`` is read with
``torch.load(weights_only=True)``: tensors only, no code runs.
"""
from __future__ import annotations

import json
import os
import re
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import torch

from .adapter import write_adapter_files
from .config import MoLAConfig

__all__ = ["import_authors_adapter"]

_KEY = re.compile(r"^(?:base_model\.model\.)?(model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+_proj))\."
                  r"(?:(lora_[AB])(?:_|\.default_)(\d+)\.weight|router\.router\.weight)$")


def _read_weights(src: str) -> Tuple[Dict[str, torch.Tensor], str]:
    st = os.path.join(src, "adapter_model.safetensors")
    if os.path.exists(st):
        from safetensors.torch import load_file
        return load_file(st), st
    bin_path = os.path.join(src, "adapter_model.bin")
    if os.path.exists(bin_path):
        try:
            return torch.load(bin_path, map_location="cpu", weights_only=True), bin_path
        except Exception as e:  # noqa: BLE001  (a pickle with code in it is refused here)
            raise ValueError(f"import_authors_adapter: {bin_path} is not a plain tensor dict "
                             f"(torch.load(weights_only=True) refused it: {e})") from None
    raise FileNotFoundError(f"import_authors_adapter: neither adapter_model.safetensors nor adapter_model.bin in "
                            f"{src!r}; give the directory the authors' training wrote")


def import_authors_adapter(src_dir: Union[str, os.PathLike], out_dir: Union[str, os.PathLike],
                           top_k: Union[int, Sequence[int]] = 2, aux_loss_coef: float = 0.001,
                           base_model_name: Optional[str] = None) -> Dict[str, Any]:
    """Convert the authors' adapter in ``src_dir`` to mola's files in ``out_dir``;
    returns the resolved adapter config written there.

    ``top_k``: experts per token, which the authors' files do not store: one
    value for every layer (capped at each layer's E), or one per layer (a list
    as long as the adapter's layers, each between 1 and that layer's E), as the
    authors' runs may set it layer by layer."""
    src = os.fspath(src_dir)
    config_path = os.path.join(src, "adapter_config.json")
    if not os.path.exists(config_path):
        raise FileNotFoundError(f"import_authors_adapter: {config_path} not found")
    with open(config_path, encoding="utf-8") as f:
        peft_config = json.load(f)
    weights, weights_path = _read_weights(src)

    # (layer, path, projection) -> {"router": W, "lora_A": {e: A}, "lora_B": {e: B}}
    modules: Dict[Tuple[int, str, str], Dict[str, Any]] = {}
    for key, tensor in weights.items():
        m = _KEY.match(key)
        if m is None:
            raise ValueError(f"import_authors_adapter: {weights_path}: unexpected key {key!r}; expected "
                             "...layers.{j}.{self_attn|mlp}.{proj}.lora_A_{e}.weight / lora_B_{e}.weight / "
                             "router.router.weight")
        path, layer, _, proj, which, expert = m.groups()
        entry = modules.setdefault((int(layer), path, proj), {"lora_A": {}, "lora_B": {}})
        if which is None:
            entry["router"] = tensor
        else:
            entry[which][int(expert)] = tensor
    if not modules:
        raise ValueError(f"import_authors_adapter: {weights_path} holds no adapter tensors")

    num_layers = max(layer for layer, _, _ in modules) + 1
    order = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    targets = sorted({proj for _, _, proj in modules}, key=lambda p: (order.index(p) if p in order else len(order), p))
    experts, ranks = [0] * num_layers, [0] * num_layers
    tensors: Dict[str, torch.Tensor] = {}
    for (layer, path, proj), entry in sorted(modules.items()):
        if "router" not in entry:
            raise ValueError(f"import_authors_adapter: {path}.{proj} has experts but no router.router.weight")
        e_count = entry["router"].shape[0]
        for which in ("lora_A", "lora_B"):
            if sorted(entry[which]) != list(range(e_count)):
                raise ValueError(f"import_authors_adapter: {path} has {which}_{{e}} for experts "
                                 f"{sorted(entry[which])}, but its router has {e_count} rows")
        a = torch.stack([entry["lora_A"][e] for e in range(e_count)])  # [E, r, in]
        b = torch.stack([entry["lora_B"][e] for e in range(e_count)])  # [E, out, r]
        for name, got in (("experts", e_count), ("rank", a.shape[1])):
            seen = (experts if name == "experts" else ranks)[layer]
            if seen and seen != got:
                raise ValueError(f"import_authors_adapter: layer {layer} has {name} {seen} in one projection and "
                                 f"{got} in {path}; mola needs one value per layer")
        experts[layer], ranks[layer] = e_count, a.shape[1]
        tensors[f"{path}.mola.router"] = entry["router"].contiguous()
        tensors[f"{path}.mola.lora_a"] = a.contiguous()
        tensors[f"{path}.mola.lora_b"] = b.contiguous()
    missing = [j for j in range(num_layers) if experts[j] == 0]
    if missing:
        raise ValueError(f"import_authors_adapter: no adapter tensors for layers {missing}")
    r_config = peft_config.get("r")
    if isinstance(r_config, list) and len(r_config) >= num_layers and list(r_config[:num_layers]) != ranks:
        raise ValueError(f"import_authors_adapter: adapter_config.json says r = {r_config[:num_layers]} but the "
                         f"tensors have ranks {ranks}")

    if isinstance(top_k, bool) or not isinstance(top_k, (int, list, tuple)):
        raise ValueError(f"import_authors_adapter: top_k={top_k!r} must be an int or a list of one int per layer")
    if isinstance(top_k, int):
        if top_k < 1:
            raise ValueError(f"import_authors_adapter: top_k={top_k} must be >= 1")
        per_layer = [min(top_k, e) for e in experts]
    else:
        per_layer = list(top_k)
        if len(per_layer) != num_layers:
            raise ValueError(f"import_authors_adapter: top_k has {len(per_layer)} values but the adapter has "
                             f"{num_layers} layers; give one per layer (or one int for all)")
        for j, (k, e) in enumerate(zip(per_layer, experts)):
            if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= e:
                raise ValueError(f"import_authors_adapter: top_k[{j}] = {k!r} must be an int between 1 and "
                                 f"layer {j}'s {e} experts")
    cfg = MoLAConfig(experts=experts, top_k=per_layer, rank=ranks,
                     alpha=float(peft_config.get("lora_alpha", 16)),
                     dropout=float(peft_config.get("lora_dropout", 0.05)),
                     targets=tuple(targets), aux_loss_coef=aux_loss_coef)
    resolved = cfg.resolve(num_layers)
    name = base_model_name if base_model_name is not None else peft_config.get("base_model_name_or_path") or ""
    if name:
        resolved["base_model_name"] = name
    write_adapter_files(out_dir, tensors, resolved, "import_authors_adapter")
    return resolved
