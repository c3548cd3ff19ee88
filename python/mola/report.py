"""The report of a training run (docs/recipes.md): plots and a page from the files
``mola train`` writes into its output directory.

    python -m mola report OUT_DIR        # or mola.report.write_report(OUT_DIR)

reads ``metrics.jsonl`` (one line per step and per evaluation),
``eval.json`` (accuracy before and after training, majority baseline) and
``expert_load.json`` (the share of tokens each expert of each layer received),
and writes ``loss.png``, ``expert_load.png``, ``report.json`` (the figures in
one place) and ``report.html`` (the plots with a line of explanation each),
which links to ``analysis/index.html`` when ``mola analyze`` wrote one there
(``make run`` does).
matplotlib draws off-screen (the Agg backend); nothing here needs a display.
"""
from __future__ import annotations

import html
import json
import os
from typing import Any, Dict, List, Optional

__all__ = ["write_report", "read_metrics"]


def read_metrics(output_dir: str) -> List[Dict[str, Any]]:
    """The lines of ``metrics.jsonl`` as dicts (a missing file is an error naming it)."""
    path = os.path.join(output_dir, "metrics.jsonl")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: is {output_dir!r} the output_dir of a `mola train` run?")
    rows = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{number}: not a JSON line ({e.msg})") from None
    return rows


def _read_json(output_dir: str, name: str) -> Optional[Dict[str, Any]]:
    path = os.path.join(output_dir, name)
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _plot_loss(metrics: List[Dict[str, Any]], path: str) -> Dict[str, Any]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [m for m in metrics if "loss" in m and "eval_loss" not in m]
    evals = [m for m in metrics if "eval_loss" in m]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot([m["step"] for m in train], [m["loss"] for m in train], label="training loss (LM)", lw=1.2)
    if evals:
        ax.plot([m["step"] for m in evals], [m["eval_loss"] for m in evals], "o-", label="validation loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats / token)")
    ax.grid(alpha=0.3)
    ax.legend()
    if train and "lr" in train[0]:
        lr_ax = ax.twinx()
        lr_ax.plot([m["step"] for m in train], [m["lr"] for m in train], color="gray", lw=0.8, ls="--")
        lr_ax.set_ylabel("learning rate (dashed)", color="gray")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return {"first_loss": train[0]["loss"] if train else None, "last_loss": train[-1]["loss"] if train else None,
            "steps": train[-1]["step"] if train else 0}


def _plot_expert_load(load: Dict[str, Any], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    layers = load["layers"]
    width = max(layer["experts"] for layer in layers)
    grid = np.full((len(layers), width), np.nan)
    for i, layer in enumerate(layers):
        grid[i, :layer["experts"]] = layer["share"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 0.5 * len(layers) + 2.5), gridspec_kw={"width_ratios": [3, 2]})
    image = axes[0].imshow(grid, aspect="auto", cmap="viridis", origin="lower")
    axes[0].set_xlabel("expert")
    axes[0].set_ylabel("layer")
    axes[0].set_yticks(range(len(layers)), [str(layer["layer"]) for layer in layers])
    axes[0].set_xticks(range(width))
    axes[0].set_title("share of top-k selections (blank: no such expert)")
    fig.colorbar(image, ax=axes[0])
    # How far each layer is from uniform use: max share x E (1 = perfectly even).
    imbalance = [max(layer["share"]) * layer["experts"] for layer in layers]
    axes[1].barh(range(len(layers)), imbalance)
    axes[1].axvline(1.0, color="gray", ls="--")
    axes[1].set_yticks(range(len(layers)), [f"{layer['layer']} (E={layer['experts']})" for layer in layers])
    axes[1].set_xlabel("busiest expert's share x E (1 = uniform)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _accuracy_lines(ev: Dict[str, Any]) -> List[str]:
    lines = []
    for when in ("before", "after"):
        result = ev.get(when)
        if not result:
            continue
        parts = [f"{label} {result[key]:.1f}%" for key, label in (("generate_accuracy", "accuracy by generation"),
                                                                  ("loglik_accuracy", "by option log-likelihood"))
                 if key in result]
        lines.append(f"{when} training: " + ", ".join(parts))
    baseline = (ev.get("after") or ev.get("before") or {}).get("majority_accuracy")
    if baseline is not None:
        lines.append(f"majority-class baseline: {baseline:.1f}%")
    return lines


def write_report(output_dir: str) -> str:
    """Writes the plots, report.json and report.html into ``output_dir``; returns the page's path."""
    output_dir = os.fspath(output_dir)
    metrics = read_metrics(output_dir)
    summary: Dict[str, Any] = {"output_dir": os.path.abspath(output_dir)}
    summary["loss"] = _plot_loss(metrics, os.path.join(output_dir, "loss.png"))
    items = [("loss.png", "Training loss per optimizer step (and validation loss where measured); the dashed "
              "line is the learning-rate schedule.")]
    load = _read_json(output_dir, "expert_load.json")
    if load and load.get("layers"):
        _plot_expert_load(load, os.path.join(output_dir, "expert_load.png"))
        summary["expert_load"] = {f"layer {layer['layer']}": [round(s, 4) for s in layer["share"]]
                                  for layer in load["layers"]}
        items.append(("expert_load.png", "How the routers spread tokens over each layer's experts after training: "
                      "the share of top-k selections per expert, and the busiest expert's share times E."))
    ev = _read_json(output_dir, "eval.json")
    if ev:
        summary["eval"] = ev
    analysis = os.path.join(output_dir, "analysis", "index.html")
    if os.path.exists(analysis):
        summary["analysis"] = os.path.abspath(analysis)
    with open(os.path.join(output_dir, "report.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2)

    loss = summary["loss"]
    lines = []
    if loss["first_loss"] is not None:
        lines.append(f"loss {loss['first_loss']:.4f} at step 1 -> {loss['last_loss']:.4f} at step {loss['steps']}")
    if ev:
        lines.extend(_accuracy_lines(ev))
    body = "".join(f"<li>{html.escape(line)}</li>" for line in lines)
    if "analysis" in summary:
        body += ("<li><a href='analysis/index.html'>analysis of the adapter</a>: expert redundancy and routing "
                 "(mola analyze)</li>")
    figures = "".join(f'<figure><img src="{name}" alt="{name}"><figcaption>{html.escape(text)}</figcaption></figure>'
                      for name, text in items)
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>mola run: {html.escape(output_dir)}</title>"
            "<style>body{font-family:sans-serif;max-width:960px;margin:2em auto}img{max-width:100%}"
            "figure{margin:1.5em 0}</style></head><body>"
            f"<h1>mola run</h1><p>{html.escape(os.path.abspath(output_dir))}</p><ul>{body}</ul>{figures}"
            "</body></html>\n")
    path = os.path.join(output_dir, "report.html")
    with open(path, "w", encoding="utf-8") as f:
        f.write(page)
    return path
