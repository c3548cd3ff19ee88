"""mola.analysis and `mola analyze` (docs/analysis.md), against hand-computed values.

- Redundancy: a hand-built adapter whose expert distances are known in closed
  form (multiples of sqrt 2 and sqrt 5), a pair of experts with equal B A but
  different A and B, a one-expert layer (no pairs: null), and random experts
  against B A formed explicitly.
- Routing: counts, fusion weights, entropy and balance loss of a fixed set of
  router probabilities worked out by hand, the balance loss also against
  mola.ops.load_balancing_loss, and a dense (k = E) layer.
- End to end: the bundled stories260K model with an adapter over ScienceQA rows:
  counts per module sum to tokens x k with padding left out, and the per-layer
  balance loss equals the op's on each example run alone (no padding at all).
- Output: every plot is a PNG (signature, IHDR) of the expected pixel size and
  index.html references each one.
"""
import json
import math
import struct
from pathlib import Path

import pytest
import torch

import mola
from mola import analysis
from mola.__main__ import main
from mola.adapter import write_adapter_files

ROOT = Path(__file__).resolve().parents[3]
RECIPE = ROOT / "configs" / "recipes" / "tiny" / "scienceqa-2468.json"
STORIES = ROOT / "data" / "models" / "stories260K"


def png_size(path):
    """(width, height) from the IHDR chunk, after checking the PNG signature."""
    data = Path(path).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def hand_adapter(directory):
    """Layer 0: one expert. Layer 1: three experts, in 3, out 2, r 2.
    q_proj: A_e = c_e [I2 | 0], B_e = I2 with c = 0, 1, 3: B A and A differ by |c_a - c_b| sqrt 2, B not at all.
    v_proj: A_e = [I2 | 0], B_e = d_e diag(1, 2) with d = 1, -1, 2: B A and B differ by |d_a - d_b| sqrt 5."""
    resolved = mola.MoLAConfig(experts=[1, 3], top_k=1, rank=2, targets=("q_proj", "v_proj")).resolve(2)
    base = torch.tensor([[1.0, 0, 0], [0, 1.0, 0]])
    tensors = {}
    for target, path in (("q_proj", "self_attn.q_proj"), ("v_proj", "self_attn.v_proj")):
        key0, key1 = f"model.layers.0.{path}.mola.", f"model.layers.1.{path}.mola."
        tensors[key0 + "router"] = torch.ones(1, 3)
        tensors[key0 + "lora_a"] = base[None].clone()
        tensors[key0 + "lora_b"] = torch.eye(2)[None].clone()
        tensors[key1 + "router"] = torch.zeros(3, 3)
        if target == "q_proj":
            tensors[key1 + "lora_a"] = torch.stack([c * base for c in (0.0, 1.0, 3.0)])
            tensors[key1 + "lora_b"] = torch.eye(2).expand(3, 2, 2).clone()
        else:
            tensors[key1 + "lora_a"] = base.expand(3, 2, 3).clone()
            tensors[key1 + "lora_b"] = torch.stack([d * torch.diag(torch.tensor([1.0, 2.0])) for d in (1.0, -1.0, 2.0)])
    write_adapter_files(directory, tensors, resolved, "test")
    return resolved


def test_redundancy_of_a_hand_built_adapter(tmp_path):
    hand_adapter(tmp_path / "adapter")
    result = analysis.analyze(str(tmp_path / "adapter"), out=str(tmp_path / "out"), log=lambda line: None)
    layers = result["redundancy"]["layers"]
    assert layers[0]["targets"]["q_proj"] == {"BA": None, "A": None, "B": None, "norm_BA": [math.sqrt(2)]}
    q, v = layers[1]["targets"]["q_proj"], layers[1]["targets"]["v_proj"]
    # pairs (0,1), (0,2), (1,2): |c| differences 1, 3, 2 -> mean 2; |d| differences 2, 1, 3 -> mean 2
    assert q["BA"] == pytest.approx(2 * math.sqrt(2), rel=1e-12)
    assert q["A"] == pytest.approx(2 * math.sqrt(2), rel=1e-12)
    assert q["B"] == 0.0
    assert v["BA"] == pytest.approx(2 * math.sqrt(5), rel=1e-12)
    assert v["A"] == 0.0
    assert v["B"] == pytest.approx(2 * math.sqrt(5), rel=1e-12)
    assert q["norm_BA"] == pytest.approx([0.0, math.sqrt(2), 3 * math.sqrt(2)], abs=1e-12)
    assert v["norm_BA"] == pytest.approx([math.sqrt(5), math.sqrt(5), 2 * math.sqrt(5)], rel=1e-12)
    on_disk = json.loads((tmp_path / "out" / "analysis.json").read_text())
    assert on_disk["redundancy"]["layers"][1]["targets"]["v_proj"]["B"] == pytest.approx(2 * math.sqrt(5))
    assert on_disk["redundancy"]["layers"][0]["targets"]["v_proj"]["BA"] is None
    assert "routing" not in on_disk
    # Plots: sizes as drawn (DPI 100): redundancy 15 x 4.5 in; expert_norm 2 panels of 4 x 3 in.
    assert png_size(tmp_path / "out" / "redundancy.png") == (1500, 450)
    assert png_size(tmp_path / "out" / "expert_norm.png") == (800, 300)
    page = (tmp_path / "out" / "index.html").read_text()
    for name in ("redundancy.png", "expert_norm.png"):
        assert f'src="{name}"' in page
    assert "layers 0 have one expert: no pairs" in page
    assert "no data given" in page
    assert sorted(p.name for p in (tmp_path / "out").glob("*.png")) == ["expert_norm.png", "redundancy.png"]


def test_pairwise_distances_without_forming_ba_match_the_explicit_products():
    a = torch.randn(2, 3, 5, dtype=torch.float64)
    a[1] = 2 * a[0]
    b = torch.randn(2, 4, 3, dtype=torch.float64)
    b[1] = b[0] / 2  # the same B A from different A and B
    d = analysis.pairwise_distances(a, b)
    assert d["BA"] == pytest.approx(0.0, abs=1e-6)
    assert d["A"] == pytest.approx(a[0].norm().item())
    assert d["B"] == pytest.approx((b[0] / 2).norm().item())
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(5, 4, 7, generator=g), torch.randn(5, 6, 4, generator=g)
    prods = [b[e].double() @ a[e].double() for e in range(5)]
    want = sum((prods[i] - prods[j]).norm() for i in range(5) for j in range(i + 1, 5)) / 10
    assert analysis.pairwise_distances(a, b)["BA"] == pytest.approx(want.item(), rel=1e-9)


def test_routing_counts_weights_entropy_and_balance_on_fixed_probabilities():
    probs = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.6, 0.3], [0.25, 0.15, 0.6], [0.7, 0.2, 0.1]], dtype=torch.float64)
    logits = probs.log().float()  # softmax(log p) = p
    stats = analysis.RoutingStats({"experts": [3, 2], "top_k": [2, 2]})
    stats.add(0, "q_proj", logits[:2])  # two batches accumulate as one
    stats.add(0, "q_proj", logits[2:])
    stats.add(0, "v_proj", logits.flip(1))  # v: expert order reversed
    dense = torch.tensor([[0.0, math.log(3)], [math.log(3), 0.0], [0.0, 0.0]])
    stats.add(1, "q_proj", dense)
    layers = stats.result(["q_proj", "v_proj"])
    q = layers[0]["targets"]["q_proj"]
    # top-2 per row: {0,1}, {1,2}, {2,0}, {0,1}
    assert q["count"] == [3, 3, 2]
    assert q["tokens"] == 4
    w0 = [0.5 / 0.8, 0.25 / 0.85, 0.7 / 0.9]
    w1 = [0.3 / 0.8, 0.6 / 0.9, 0.2 / 0.9]
    w2 = [0.3 / 0.9, 0.6 / 0.85]
    assert q["fusion_weight"] == pytest.approx([sum(w0) / 3, sum(w1) / 3, sum(w2) / 2], rel=1e-5)
    assert layers[0]["targets"]["v_proj"]["count"] == [2, 3, 3]
    entropy = -(probs * probs.log()).sum(1).mean().item()
    assert q["entropy"] == pytest.approx(entropy, rel=1e-5)
    # Balance over both targets stacked (8 rows, k = 2): f = counts / 16, Pbar = column means.
    stacked = torch.cat([probs, probs.flip(1)])
    f = torch.tensor([5.0, 6.0, 5.0]) / 16
    by_hand = 3 * (f * stacked.mean(0)).sum().item()
    assert layers[0]["balance_loss"] == pytest.approx(by_hand, rel=1e-5)
    op = mola.ops.load_balancing_loss([torch.cat([logits, logits.flip(1)])], [2], coef=1.0)
    assert layers[0]["balance_loss"] == pytest.approx(op.item(), rel=1e-5)
    # Dense layer (k = E = 2): every token picks both, weights are the softmax.
    d = layers[1]["targets"]["q_proj"]
    assert d["count"] == [3, 3]
    assert d["fusion_weight"] == pytest.approx([(0.25 + 0.75 + 0.5) / 3, (0.75 + 0.25 + 0.5) / 3], rel=1e-5)
    assert layers[1]["balance_loss"] == pytest.approx(1.0, rel=1e-5)
    assert layers[1]["max_entropy"] == pytest.approx(math.log(2))
    with pytest.raises(ValueError, match=r"expected \[tokens, 3\]"):
        stats.add(0, "q_proj", torch.zeros(2, 4))


@pytest.fixture(scope="module")
def stories_adapter(tmp_path_factory):
    """An adapter on the bundled stories260K (5 layers) with distinct experts and a one-expert layer."""
    path = tmp_path_factory.mktemp("run") / "adapter"
    model = mola.CausalLM.from_pretrained(str(STORIES))
    torch.manual_seed(0)
    model.attach(mola.MoLAConfig(experts=[1, 2, 3, 4, 4], top_k=[1, 2, 2, 2, 3], rank=4, dropout=0.0,
                                 targets=("q_proj", "down_proj")))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.adapter_state_dict().items():
            p.add_(torch.randn(p.shape, generator=g) * (2.0 if name.endswith("router") else 0.1))
    model.save_adapter(str(path))
    return path


def test_analyze_command_end_to_end_on_stories260k(stories_adapter, tmp_path):
    rows = (ROOT / "data" / "tasks" / "scienceqa" / "test.jsonl").read_text().splitlines()[:12]
    data = tmp_path / "rows.jsonl"
    data.write_text("\n".join(rows) + "\n")
    out = tmp_path / "analysis"
    assert main(["analyze", str(stories_adapter), "--data", str(data), "--recipe", str(RECIPE), "--out", str(out),
                 "--batch-size", "5"]) == 0
    result = json.loads((out / "analysis.json").read_text())
    routing = result["routing"]
    # The tokens as training builds them (the recipe's template, task and tokenizer), no padding.
    inputs = analysis.find_run_inputs(str(stories_adapter), recipe=str(RECIPE))
    examples = analysis._examples(str(data), inputs, 0)
    assert routing["examples"] == 12 and routing["tokens"] == sum(len(e) for e in examples)
    for layer in routing["layers"]:
        k = min(layer["top_k"], layer["experts"])
        for t in layer["targets"].values():
            assert sum(t["count"]) == routing["tokens"] * k
    # Oracle: each example alone (no padding), the op's balance loss per layer over the stacked targets.
    model = mola.CausalLM.from_pretrained(str(STORIES))
    model.load_adapter(str(stories_adapter))
    model.eval()
    per_layer = {}
    with torch.no_grad():
        for e in examples:
            model(torch.tensor([e]))
            for key, logits in model.router_logits().items():
                per_layer.setdefault(int(key.split(".")[2]), []).append(logits.clone())
    cfg = result["config"]
    for layer in routing["layers"]:
        want = mola.ops.load_balancing_loss([torch.cat(per_layer[layer["layer"]])], [cfg["top_k"][layer["layer"]]],
                                            coef=1.0)
        assert layer["balance_loss"] == pytest.approx(want.item(), rel=1e-4)
    assert result["redundancy"]["layers"][0]["targets"]["q_proj"]["BA"] is None
    # Plots: 2 targets -> routing heatmaps of 3 panels (4 x 3 in each); 5 layers fit in 3 in.
    sizes = {"redundancy.png": (1500, 450), "expert_norm.png": (800, 300), "selection.png": (1200, 300),
             "fusion_weight.png": (1200, 300), "entropy.png": (700, 450), "balance_loss.png": (700, 450)}
    page = (out / "index.html").read_text()
    for name, size in sizes.items():
        assert png_size(out / name) == size, name
        assert page.count(f'src="{name}"') == 1
    assert "padding excluded" in page


def test_analyze_errors_name_the_fix(stories_adapter, tmp_path, capsys):
    data = tmp_path / "rows.jsonl"
    data.write_text((ROOT / "data" / "tasks" / "scienceqa" / "test.jsonl").read_text().splitlines()[0] + "\n")
    assert main(["analyze", str(stories_adapter), "--data", str(data)]) == 2
    assert "give it with --model PATH" in capsys.readouterr().err
    assert main(["analyze", str(tmp_path / "nowhere")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["analyze", str(stories_adapter), "--data", str(tmp_path / "none.jsonl"), "--model",
                 str(STORIES)]) == 2
    assert "data file" in capsys.readouterr().err


def test_report_links_to_the_analysis_when_there_is_one(tmp_path):
    from mola.report import write_report

    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0, "lr": 0.001}\n')
    page = Path(write_report(str(tmp_path))).read_text()
    assert "analysis/index.html" not in page
    (tmp_path / "analysis").mkdir()
    (tmp_path / "analysis" / "index.html").write_text("<html></html>")
    page = Path(write_report(str(tmp_path))).read_text()
    assert page.count("href='analysis/index.html'") == 1
    assert json.loads((tmp_path / "report.json").read_text())["analysis"].endswith("analysis/index.html")
