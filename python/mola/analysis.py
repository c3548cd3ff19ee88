"""``mola.analysis`` and ``mola analyze``: seeing inside a trained mixture (docs/analysis.md).

    python -m mola analyze out/tiny/scienceqa-2468/adapter --data data/tasks/scienceqa/test.jsonl
    mola.analysis.analyze("out/run/adapter", data="test.jsonl")      # the same, from Python

From the adapter alone: per layer and target, the mean pairwise Frobenius
distance between its experts (the redundancy of the MoLA papers' section 6.2),
on each expert's B A, on A and on B. With data: the model runs with the adapter
over the rows (prompts built as training built them, through mola.data) and,
per layer and target, each expert's selection count and mean fusion weight, the
router entropy, and per layer the balance loss of docs/design.md, The balance loss. Padding tokens
are left out of every routing figure. The numbers go to analysis.json, the
plots (_analysis_plots.py) to PNG files, and index.html shows them.
"""
from __future__ import annotations

import json
import math
import os
import re
import sys
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

import torch

from .adapter import CONFIG_NAME, WEIGHTS_NAME, read_adapter_config
from .injection import adapter_key, mola_modules
from .ops import moe_lora_route

__all__ = ["analyze", "load_adapter_tensors", "expert_redundancy", "pairwise_distances", "expert_norms", "RoutingStats",
           "router_logits", "find_run_inputs"]

# "model.layers.3.self_attn.q_proj.mola.lora_a" -> layer 3, target q_proj, tensor lora_a
_KEY_RE = re.compile(r"^model\.layers\.(\d+)\.(?:self_attn|mlp)\.([A-Za-z0-9_]+)\.mola\.(router|lora_a|lora_b)$")


# ---------------------------------------------------------------- redundancy

def load_adapter_tensors(directory: str) -> Tuple[Dict[str, Any], Dict[str, torch.Tensor]]:
    """The resolved config and the tensors of an adapter directory (safetensors, no pickle)."""
    from safetensors.torch import load_file

    resolved = read_adapter_config(directory)
    path = os.path.join(os.fspath(directory), WEIGHTS_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path!r} does not exist; an adapter directory holds {CONFIG_NAME} and {WEIGHTS_NAME}")
    return resolved, load_file(path, device="cpu")


def pairwise_distances(lora_a: torch.Tensor, lora_b: torch.Tensor) -> Dict[str, Optional[float]]:
    """Mean over expert pairs a < b of ||X_a - X_b||_F for X = B A, A and B.

    lora_a ``[E, r, in]``, lora_b ``[E, out, r]``; computed in float64. B A is
    never formed: ||B_a A_a - B_b A_b||^2 = G_aa + G_bb - 2 G_ab with G_ab =
    <B_a A_a, B_b A_b>_F = sum((B_a^T B_b) * (A_a A_b^T)), r x r products only,
    so a 4096 x 11008 layer costs no more memory than its A and B. One expert
    has no pairs: every value is None then.
    """
    experts = lora_a.shape[0]
    if experts < 2:
        return {"BA": None, "A": None, "B": None}
    a, b = lora_a.to(torch.float64), lora_b.to(torch.float64)
    pairs = torch.triu_indices(experts, experts, offset=1)  # [2, E(E-1)/2]
    gram = _gram_ba(a, b)
    diag = gram.diagonal()
    ba = (diag[:, None] + diag[None, :] - 2 * gram).clamp_min(0).sqrt()  # [E, E]
    flat_a, flat_b = a.reshape(experts, -1), b.reshape(experts, -1)
    dist_a = (flat_a[:, None] - flat_a[None, :]).norm(dim=-1)  # [E, E]
    dist_b = (flat_b[:, None] - flat_b[None, :]).norm(dim=-1)
    return {name: float(d[pairs[0], pairs[1]].mean()) for name, d in (("BA", ba), ("A", dist_a), ("B", dist_b))}


def _gram_ba(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[E, E]: <B_a A_a, B_b A_b>_F from A [E, r, in] and B [E, out, r], without forming B A."""
    gram_b = torch.einsum("aor,bos->abrs", b, b)  # [E, E, r, r]: B_a^T B_b
    gram_a = torch.einsum("ari,bsi->abrs", a, a)  # [E, E, r, r]: A_a A_b^T
    return (gram_b * gram_a).sum((2, 3))


def expert_norms(lora_a: torch.Tensor, lora_b: torch.Tensor) -> List[float]:
    """||B_e A_e||_F of each expert (float64): how far training moved it from B = 0."""
    gram = _gram_ba(lora_a.to(torch.float64), lora_b.to(torch.float64))
    return [float(v) for v in gram.diagonal().clamp_min(0).sqrt()]


def expert_redundancy(tensors: Dict[str, torch.Tensor], resolved: Dict[str, Any]) -> List[Dict[str, Any]]:
    """Per layer: ``{"layer", "experts", "targets": {target: {"BA", "A", "B", "norm_BA"}}}``: the
    pairwise_distances and the expert_norms of each target, from adapter tensors keyed as docs/design.md, The adapter files
    (``model.layers.{l}.self_attn.q_proj.mola.lora_a``)."""
    found: Dict[Tuple[int, str], Dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        if ".molex." in key:  # a MoLEx adapter's layer gates: not experts
            continue
        match = _KEY_RE.match(key)
        if match is None:
            raise ValueError(f"expert_redundancy: tensor key {key!r} is not an adapter key "
                             "('model.layers.{l}.self_attn.q_proj.mola.lora_a'); is this a mola adapter?")
        found.setdefault((int(match.group(1)), match.group(2)), {})[match.group(3)] = tensor
    layers = []
    for layer in range(int(resolved["num_layers"])):
        targets = {}
        for target in resolved["targets"]:
            entry = found.get((layer, target))
            if entry is None or "lora_a" not in entry or "lora_b" not in entry:
                continue
            targets[target] = {**pairwise_distances(entry["lora_a"], entry["lora_b"]),
                               "norm_BA": expert_norms(entry["lora_a"], entry["lora_b"])}
        layers.append({"layer": layer, "experts": int(resolved["experts"][layer]), "targets": targets})
    return layers


# ------------------------------------------------------------------- routing

class RoutingStats:
    """Routing figures accumulated over batches of router logits (padding already removed).

    ``add(layer, target, logits)`` with logits ``[tokens, E]``. The routing rule
    is the op's own (``mola.ops.moe_lora_route``: softmax in fp32, top-k,
    weights renormalised over the k selected; k >= E is dense). Per (layer, target): how often each expert
    is selected, its mean renormalised weight when selected (its fusion weight;
    None when never selected) and the mean entropy (nats) of the full softmax.
    Per layer, over the rows of all its targets stacked: the balance loss
    L_l = E_l * sum_e f_e * Pbar_e of docs/design.md, The balance loss (1 at perfect balance).
    """

    def __init__(self, resolved: Dict[str, Any]):
        self.experts = [int(e) for e in resolved["experts"]]
        self.top_k = [int(k) for k in resolved["top_k"]]
        self._per: Dict[Tuple[int, str], Dict[str, Any]] = {}
        self._layer: Dict[int, Dict[str, Any]] = {}

    def add(self, layer: int, target: str, logits: torch.Tensor) -> None:
        """Count one batch of router logits ``[tokens, E]`` of ``target`` in ``layer``
        (padding removed), routed as the op routes them."""
        experts, k = self.experts[layer], min(self.top_k[layer], self.experts[layer])
        if logits.dim() != 2 or logits.shape[1] != experts:
            raise ValueError(f"RoutingStats.add: layer {layer} {target} logits have shape {list(logits.shape)}; "
                             f"expected [tokens, {experts}]")
        logits = logits.detach()
        weights, index, _ = moe_lora_route(logits, k)  # [T, k] each
        p = logits.to(weights.dtype).softmax(-1)  # [T, E]: for the entropy and the balance loss
        flat = index.reshape(-1).cpu()
        count = torch.bincount(flat, minlength=experts).to(torch.float64)
        weight_sum = torch.zeros(experts, dtype=torch.float64).index_add_(0, flat, weights.reshape(-1).cpu().double())
        entropy = -(p * p.clamp_min(1e-30).log()).sum(-1).double().sum().item()
        s = self._per.setdefault((layer, target), {"count": torch.zeros(experts, dtype=torch.float64),
                                                   "weight": torch.zeros(experts, dtype=torch.float64),
                                                   "entropy": 0.0, "tokens": 0})
        s["count"] += count
        s["weight"] += weight_sum
        s["entropy"] += entropy
        s["tokens"] += p.shape[0]
        t = self._layer.setdefault(layer, {"count": torch.zeros(experts, dtype=torch.float64),
                                           "p": torch.zeros(experts, dtype=torch.float64), "rows": 0})
        t["count"] += count
        t["p"] += p.double().sum(0).cpu()
        t["rows"] += p.shape[0]

    def result(self, targets: Iterable[str]) -> List[Dict[str, Any]]:
        """Per layer: experts, top_k, balance_loss, and per target count / fusion_weight / entropy / tokens."""
        layers = []
        for layer, experts in enumerate(self.experts):
            k = min(self.top_k[layer], experts)
            entry: Dict[str, Any] = {"layer": layer, "experts": experts, "top_k": self.top_k[layer],
                                     "max_entropy": math.log(experts), "balance_loss": None, "targets": {}}
            t = self._layer.get(layer)
            if t is not None and t["rows"] > 0:
                f = t["count"] / (t["rows"] * k)
                pbar = t["p"] / t["rows"]
                entry["balance_loss"] = float(experts * (f * pbar).sum())
            for target in targets:
                s = self._per.get((layer, target))
                if s is None or s["tokens"] == 0:
                    continue
                count = s["count"]
                weight = [float(w / c) if c > 0 else None for w, c in zip(s["weight"], count)]
                entry["targets"][target] = {"count": [int(c) for c in count], "fusion_weight": weight,
                                            "entropy": s["entropy"] / s["tokens"], "tokens": s["tokens"]}
            layers.append(entry)
        return layers


def router_logits(model: Any) -> Dict[str, torch.Tensor]:
    """The last forward's router logits ``[tokens, E]`` by adapter key (``model.layers.3.self_attn.q_proj``),
    from a ``mola.CausalLM`` or from the ``MoLALinear`` modules of an injected model."""
    from ._models import CausalLM
    if isinstance(model, CausalLM):
        return dict(model.router_logits())
    return {adapter_key(path): m.router_logits for path, m in mola_modules(model) if m.router_logits is not None}


def collect_routing(model: Any, batches: Iterable[Tuple[torch.Tensor, torch.Tensor]], resolved: Dict[str, Any],
                    progress: Optional[Callable[[int], None]] = None) -> RoutingStats:
    """Runs ``model`` (eval, no grad) on ``(input_ids, attention_mask)`` batches and gathers RoutingStats,
    leaving out the tokens whose attention_mask is 0."""
    stats = RoutingStats(resolved)
    was_training = getattr(model, "training", False)
    model.eval()
    with torch.no_grad():
        for ids, mask in batches:
            model(ids, attention_mask=mask)
            keep = mask.reshape(-1).bool()  # [batch * seq], row-major as the logits' rows
            for key, logits in router_logits(model).items():
                match = re.match(r"^model\.layers\.(\d+)\.(?:self_attn|mlp)\.([A-Za-z0-9_]+)$", key)
                stats.add(int(match.group(1)), match.group(2), logits[keep.to(logits.device)])
            if progress is not None:
                progress(ids.shape[0])
    if was_training:
        model.train()
    return stats


# ----------------------------------------------------------- the whole thing

def find_run_inputs(adapter: str, model: Optional[str] = None, recipe: Optional[str] = None) -> Dict[str, Any]:
    """Where the base model, tokenizer and prompt template of ``adapter`` are: ``model`` when given, else the
    recipe (``recipe``, or the recipe.json that ``mola train`` wrote beside the adapter), else the adapter's
    base_model_name when it is a directory. Raises FileNotFoundError naming the fix."""
    from . import _C

    run_dir = os.path.dirname(os.path.abspath(os.fspath(adapter)))
    if recipe is None:
        for candidate in (os.path.join(run_dir, "recipe.json"), os.path.join(os.path.dirname(run_dir), "recipe.json")):
            if os.path.isfile(candidate):
                recipe = candidate
                break
    inputs: Dict[str, Any] = {"recipe": recipe, "model_path": "", "tokenizer": "", "template": "", "task": "auto",
                              "cutoff_len": 256, "train_on_inputs": True, "add_eos_token": True, "test": ""}
    if recipe is not None:
        if not os.path.isfile(recipe):
            raise FileNotFoundError(f"analyze: recipe {recipe!r} does not exist; give the recipe the adapter was "
                                    "trained with (--recipe) or the base model (--model)")
        inputs.update(_C.recipe_inputs(os.fspath(recipe)))
    if model is not None:
        inputs["model_path"] = os.fspath(model)
        inputs["tokenizer"] = os.path.join(inputs["model_path"], "tokenizer.model")
    if not inputs["model_path"]:
        name = read_adapter_config(adapter).get("base_model_name", "")
        if name and os.path.isdir(name):
            inputs["model_path"] = name
            inputs["tokenizer"] = os.path.join(name, "tokenizer.model")
    if not inputs["model_path"] or not os.path.isdir(inputs["model_path"]):
        raise FileNotFoundError(
            f"analyze: cannot find the base model of {os.fspath(adapter)!r}: "
            + (f"{inputs['model_path']!r} is not a directory" if inputs["model_path"] else
               "no recipe.json beside it and its base_model_name is not a directory")
            + "; give it with --model PATH (a Hugging Face checkpoint directory) or --recipe RECIPE.json")
    if recipe is None:
        default = os.path.join("data", "templates", "alpaca.json")
        inputs["template"] = default if os.path.isfile(default) else ""
    return inputs


def _examples(data: str, inputs: Dict[str, Any], max_examples: int) -> List[List[int]]:
    from . import data as mdata

    rows = mdata.load_rows(data, inputs["task"])
    if max_examples > 0:
        rows = rows[:max_examples]
    if not rows:
        raise ValueError(f"analyze: {data!r} has no rows to route")
    template = (mdata.PromptTemplate.from_json_file(inputs["template"]) if inputs["template"]
                else mdata.PromptTemplate.raw())
    tokenizer = mdata.Tokenizer.from_file(inputs["tokenizer"])
    options = mdata.DataOptions(inputs["cutoff_len"], inputs["train_on_inputs"], inputs["add_eos_token"])
    return [list(e.input_ids) for e in mdata.tokenize_rows(rows, template, tokenizer, options)]


def _batches(examples: List[List[int]], batch_size: int, device: str):
    for start in range(0, len(examples), batch_size):
        chunk = examples[start:start + batch_size]
        width = max(len(e) for e in chunk)
        ids = torch.zeros(len(chunk), width, dtype=torch.long)  # pad id 0, right padding (docs/recipes.md)
        mask = torch.zeros(len(chunk), width, dtype=torch.long)
        for i, e in enumerate(chunk):
            ids[i, :len(e)] = torch.tensor(e, dtype=torch.long)
            mask[i, :len(e)] = 1
        yield ids.to(device), mask.to(device)


def analyze(adapter: str, data: Optional[str] = None, model: Optional[str] = None, out: Optional[str] = None,
            max_examples: int = 256, batch_size: int = 8, recipe: Optional[str] = None, device: str = "cpu",
            log: Callable[[str], None] = lambda line: print(line, file=sys.stderr, flush=True)) -> Dict[str, Any]:
    """Analyses the adapter directory ``adapter`` and writes analysis.json, the PNG plots and index.html into
    ``out`` (default: ``analysis`` beside the adapter). With ``data`` (JSON Lines in the recipe's task
    format; the first ``max_examples`` rows, 0 = all) the routing is measured too. Returns the JSON written."""
    from ._analysis_plots import write_plots

    adapter = os.fspath(adapter)
    resolved, tensors = load_adapter_tensors(adapter)
    out = os.fspath(out) if out is not None else os.path.join(os.path.dirname(os.path.abspath(adapter)), "analysis")
    os.makedirs(out, exist_ok=True)
    result: Dict[str, Any] = {
        "adapter": os.path.abspath(adapter), "config": resolved,
        "redundancy": {"measure": "mean over expert pairs a < b of the Frobenius norm ||X_a - X_b||_F, "
                                  "for X = B A (unscaled), A and B; null where a layer has one expert",
                       "layers": expert_redundancy(tensors, resolved)}}
    log(f"analyze: redundancy of {sum(len(l['targets']) for l in result['redundancy']['layers'])} modules "
        f"in {resolved['num_layers']} layers")
    if data is not None:
        from ._models import CausalLM

        if not os.path.isfile(data):
            raise FileNotFoundError(f"analyze: data file {data!r} does not exist; give a JSON Lines file in the "
                                    "task format of the recipe (--data)")
        inputs = find_run_inputs(adapter, model, recipe)
        examples = _examples(data, inputs, max_examples)
        log(f"analyze: routing {len(examples)} examples of {data} through {inputs['model_path']} "
            f"(template {inputs['template'] or 'raw'}, task {inputs['task']})")
        net = CausalLM.from_pretrained(inputs["model_path"], device=device)
        net.load_adapter(adapter)
        done = [0]

        def progress(n: int) -> None:
            done[0] += n
            if done[0] == len(examples) or done[0] % (batch_size * 8) == 0:
                log(f"analyze: {done[0]}/{len(examples)} examples routed")

        stats = collect_routing(net, _batches(examples, batch_size, device), resolved, progress)
        result["routing"] = {"data": os.path.abspath(data), "model": os.path.abspath(inputs["model_path"]),
                             "template": inputs["template"] or "raw", "task": inputs["task"],
                             "examples": len(examples), "padding": "excluded",
                             "layers": stats.result(resolved["targets"])}
        result["routing"]["tokens"] = next((t["tokens"] for l in result["routing"]["layers"]
                                            for t in l["targets"].values()), 0)
    result["plots"] = write_plots(result, out)
    with open(os.path.join(out, "analysis.json"), "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2)
    log(f"analyze: wrote {os.path.join(out, 'index.html')}")
    return result
