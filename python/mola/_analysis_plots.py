"""The plots and the page of ``mola.analysis`` (matplotlib, Agg backend).

Apart from analysis.py because the numbers need no matplotlib. Every figure
has a fixed size (inches x DPI, no tight bounding box), so a plot's pixel size
depends only on the adapter's shape: ``figure_size`` says what it will be.

    redundancy.png      curves over layers, one per target: mean pairwise distance on B A, A, B
    expert_norm.png     heatmaps layer x expert, one per target: ||B_e A_e||_F
    selection.png       heatmaps layer x expert, one per target and one for all: share of selections
    fusion_weight.png   heatmaps layer x expert: mean renormalised weight when selected
    entropy.png         curves over layers, one per target: router entropy, and log E (uniform)
    balance_loss.png    the balance loss per layer (1 = perfect balance)
"""
from __future__ import annotations

import html
import math
import os
from typing import Any, Dict, List, Optional, Tuple

__all__ = ["write_plots", "figure_size", "DPI"]

DPI = 100
ALL = "all targets"


def _grid(panels: int, layers: int) -> Tuple[int, int, float, float]:
    """(rows, cols, width, height) in inches of a heatmap grid."""
    cols = min(4, panels)
    rows = math.ceil(panels / cols)
    return rows, cols, 4.0 * cols, max(3.0, 0.25 * layers + 1.5) * rows


def figure_size(name: str, num_targets: int, num_layers: int) -> Tuple[int, int]:
    """The (width, height) in pixels that ``name`` is drawn at for an adapter of this shape."""
    if name == "redundancy.png":
        return 15 * DPI, 45 * DPI // 10
    if name in ("entropy.png", "balance_loss.png"):
        return 7 * DPI, 45 * DPI // 10
    panels = num_targets + (name != "expert_norm.png")  # the routing heatmaps add "all targets"
    _, _, width, height = _grid(panels, num_layers)
    return round(width * DPI), round(height * DPI)


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _single_expert_note(layers: List[Dict[str, Any]]) -> str:
    ones = [str(l["layer"]) for l in layers if l["experts"] < 2]
    return f" (layers {', '.join(ones)} have one expert: no pairs, not drawn)" if ones else ""


def _redundancy(result: Dict[str, Any], path: str) -> None:
    plt = _pyplot()
    layers = result["redundancy"]["layers"]
    targets = result["config"]["targets"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for ax, (measure, label) in zip(axes, (("BA", "B A"), ("A", "A"), ("B", "B"))):
        for target in targets:
            ys = [l["targets"].get(target, {}).get(measure) for l in layers]
            ax.plot([l["layer"] for l in layers], [math.nan if y is None else y for y in ys], "o-", label=target,
                    lw=1.2, ms=3)
        ax.set_title(f"mean pairwise ||{label}_a - {label}_b||_F")
        ax.set_xlabel("layer")
        ax.set_xticks([l["layer"] for l in layers])
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("distance between experts")
    axes[-1].legend(fontsize=8)
    fig.suptitle("expert redundancy: lower = more alike" + _single_expert_note(layers), fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.94))
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def _heatmaps(layers: List[Dict[str, Any]], grids: Dict[str, List[List[Optional[float]]]], title: str,
              colorbar: str, path: str, vmin: Optional[float] = None, vmax: Optional[float] = None) -> None:
    """One heatmap (layer x expert) per entry of ``grids``; missing experts (fewer in a layer) stay blank."""
    import numpy as np

    plt = _pyplot()
    width = max(l["experts"] for l in layers)
    rows, cols, w, h = _grid(len(grids), len(layers))
    fig, axes = plt.subplots(rows, cols, figsize=(w, h), squeeze=False)
    for ax in axes.flat[len(grids):]:
        ax.axis("off")
    for ax, (name, grid) in zip(axes.flat, grids.items()):
        data = np.full((len(layers), width), np.nan)
        for i, row in enumerate(grid):
            for e, v in enumerate(row):
                data[i, e] = np.nan if v is None else v
        image = ax.imshow(data, aspect="auto", origin="lower", cmap="viridis", vmin=vmin, vmax=vmax)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("expert", fontsize=8)
        ax.set_ylabel("layer", fontsize=8)
        ax.set_xticks(range(width))
        ax.set_yticks(range(len(layers)), [str(l["layer"]) for l in layers])
        ax.tick_params(labelsize=7)
        if width <= 8 and len(layers) <= 12:
            norm = image.norm
            for i in range(len(layers)):
                for e in range(width):
                    if not np.isnan(data[i, e]):
                        dark = norm(data[i, e]) < 0.6  # viridis is dark below ~60%: white text there
                        ax.text(e, i, f"{data[i, e]:.2f}", ha="center", va="center", fontsize=6,
                                color="white" if dark else "black")
        fig.colorbar(image, ax=ax, label=colorbar)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.94))
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def _routing_grids(routing: List[Dict[str, Any]], targets: List[str], field: str) -> Dict[str, List[list]]:
    grids: Dict[str, List[list]] = {}
    for target in targets:
        grid = []
        for l in routing:
            t = l["targets"].get(target)
            if t is None:
                grid.append([None] * l["experts"])
            elif field == "share":
                total = sum(t["count"])
                grid.append([c / total if total else None for c in t["count"]])
            else:
                grid.append(t["fusion_weight"])
        grids[target] = grid
    combined = []
    for l in routing:
        counts = [sum(t["count"][e] for t in l["targets"].values()) for e in range(l["experts"])]
        if field == "share":
            total = sum(counts)
            combined.append([c / total if total else None for c in counts])
        else:  # the selection-weighted mean over targets
            sums = [sum(t["fusion_weight"][e] * t["count"][e] for t in l["targets"].values()
                        if t["fusion_weight"][e] is not None) for e in range(l["experts"])]
            combined.append([s / c if c else None for s, c in zip(sums, counts)])
    grids[ALL] = combined
    return grids


def _entropy(routing: List[Dict[str, Any]], targets: List[str], path: str) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    xs = [l["layer"] for l in routing]
    for target in targets:
        ys = [l["targets"].get(target, {}).get("entropy", math.nan) for l in routing]
        ax.plot(xs, ys, "o-", label=target, lw=1.2, ms=3)
    ax.plot(xs, [l["max_entropy"] for l in routing], "k--", lw=1, label="log E (uniform router)")
    ax.set_xlabel("layer")
    ax.set_xticks(xs)
    ax.set_ylabel("mean router entropy (nats / token)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def _balance(routing: List[Dict[str, Any]], path: str) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    xs = [l["layer"] for l in routing]
    ax.bar(xs, [math.nan if l["balance_loss"] is None else l["balance_loss"] for l in routing], color="tab:blue")
    ax.axhline(1.0, color="gray", ls="--", lw=1)
    ax.set_xticks(xs, [f"{l['layer']}\n(E={l['experts']}, k={l['top_k']})" for l in routing])
    ax.set_xlabel("layer")
    ax.set_ylabel("E * sum_e f_e * Pbar_e")
    ax.set_title("balance loss per layer (docs/design.md, The balance loss; 1 = perfectly balanced)", fontsize=10)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def write_plots(result: Dict[str, Any], out: str) -> Dict[str, str]:
    """Draws the plots the result has numbers for into ``out`` and writes index.html; returns
    {file name: its one-line explanation}, in page order."""
    targets = list(result["config"]["targets"])
    layers = result["redundancy"]["layers"]
    items: Dict[str, str] = {}
    _redundancy(result, os.path.join(out, "redundancy.png"))
    items["redundancy.png"] = (
        "Mean Frobenius distance between the experts of each layer and target, on each expert's B A, on A and "
        "on B: low values mean redundant experts (the MoLA papers find it rises with depth)."
        + _single_expert_note(layers))
    norms = {t: [l["targets"][t]["norm_BA"] if t in l["targets"] else [None] * l["experts"] for l in layers]
             for t in targets}
    _heatmaps(layers, norms, "||B_e A_e||_F per expert (0 = untouched since initialisation with B = 0)",
              "||B A||_F", os.path.join(out, "expert_norm.png"))
    items["expert_norm.png"] = ("How far each expert moved: the Frobenius norm of its B A per layer and expert "
                                "(blank: the layer has fewer experts).")
    routing = result.get("routing")
    if routing is not None:
        rl = routing["layers"]
        note = f" ({routing['examples']} examples, {routing['tokens']} tokens, padding excluded)"
        _heatmaps(rl, _routing_grids(rl, targets, "share"), "share of top-k selections per expert" + note,
                  "share", os.path.join(out, "selection.png"), vmin=0.0)
        items["selection.png"] = ("Which experts the routers pick: each expert's share of the top-k selections "
                                  "per layer and target (uniform is 1/E), counts in analysis.json.")
        _heatmaps(rl, _routing_grids(rl, targets, "weight"), "mean fusion weight when selected" + note,
                  "renormalised weight", os.path.join(out, "fusion_weight.png"), vmin=0.0, vmax=1.0)
        items["fusion_weight.png"] = ("How much a selected expert counts: its mean renormalised top-k weight "
                                      "(1/k means the selected experts share equally; blank: never selected).")
        _entropy(rl, targets, os.path.join(out, "entropy.png"))
        items["entropy.png"] = ("How sure the routers are: the mean entropy of the softmax over all experts, "
                                "against log E, the entropy of a router that cannot tell experts apart.")
        _balance(rl, os.path.join(out, "balance_loss.png"))
        items["balance_loss.png"] = ("Load balance per layer as the auxiliary loss measures it (all targets "
                                     "stacked): 1 is perfectly even use, E/k is all tokens on the same k experts.")
    _write_index(result, items, out)
    return items


def _write_index(result: Dict[str, Any], items: Dict[str, str], out: str) -> None:
    lines = [f"adapter: {result['adapter']}",
             f"experts per layer {result['config']['experts']}, top_k {result['config']['top_k']}, "
             f"targets {', '.join(result['config']['targets'])}"]
    routing = result.get("routing")
    if routing is None:
        lines.append("no data given (--data): routing plots are not drawn")
    else:
        lines.append(f"routing on {routing['data']}: {routing['examples']} examples, {routing['tokens']} tokens "
                     "(padding excluded)")
    body = "".join(f"<li>{html.escape(line)}</li>" for line in lines)
    figures = "".join(f'<figure><img src="{name}" alt="{name}"><figcaption>{html.escape(text)}</figcaption>'
                      "</figure>" for name, text in items.items())
    page = ("<!doctype html><html><head><meta charset='utf-8'><title>mola analyze</title>"
            "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto}img{max-width:100%}"
            "figure{margin:1.5em 0}</style></head><body><h1>mola analyze</h1>"
            f"<ul>{body}</ul>{figures}<p>The numbers: <a href='analysis.json'>analysis.json</a></p></body></html>\n")
    with open(os.path.join(out, "index.html"), "w", encoding="utf-8") as f:
        f.write(page)
