"""torch.compile(fullgraph=True) over mola (docs/python.md, issue 6): a transformers
model after mola.inject, and the op called from a user's own nn.Module.

The compiled call must trace into a single graph (fullgraph=True already fails
on a break; the compile counter also proves one frame, so nothing fell back to
eager) and give the eager results: logits, the loss with mola.aux_loss, and the
adapter gradients. aot_eager (AOTAutograd with the fake kernels, eager ATen
kernels) runs the whole model in seconds on 2 cores and keeps the RNG stream,
so dropout masks agree; inductor (C++ codegen) is exercised on the user module,
where its compile time stays small.
"""
import copy
from pathlib import Path

import pytest
import torch
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend

import mola

transformers = pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[3]
TINY = ROOT / "data" / "models" / "stories260K"


def _injected_model(dropout, layers=None):
    """The bundled tiny llama, or (``layers``) a random one of its shape with fewer layers."""
    torch.manual_seed(0)
    if layers is None:
        model = transformers.AutoModelForCausalLM.from_pretrained(str(TINY), dtype=torch.float32)
        experts = "2,4,6,8"
    else:
        config = transformers.AutoConfig.from_pretrained(str(TINY), num_hidden_layers=layers)
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        experts = 4
    mola.inject(model, mola.MoLAConfig(experts=experts, top_k=2, rank=4, alpha=8, dropout=dropout))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # B starts at zero; give the experts an effect on the output
        for module in model.modules():
            if isinstance(module, mola.MoLALinear):
                module.lora_b.copy_(torch.randn(module.lora_b.shape, generator=g) * 0.1)
    return model.train()


def _step(model, call, ids, seed):
    """logits, LM loss, aux loss and the adapter gradients of one training step."""
    torch.manual_seed(seed)  # the dropout seeds MoLALinear draws come from this stream
    out = call(input_ids=ids, labels=ids)
    aux = mola.aux_loss(model)
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(out.loss + aux, params)
    return out.logits.detach(), out.loss.detach(), aux.detach(), grads


def _max_diff(a, b):
    if isinstance(a, (tuple, list)):
        return max(_max_diff(x, y) for x, y in zip(a, b))
    return (a - b).abs().max().item()


def _ids(seq, seed=2):
    return torch.randint(0, 512, (2, seq), generator=torch.Generator().manual_seed(seed))


def test_injected_transformers_model_is_one_graph_and_matches_eager():
    torch._dynamo.reset()
    eager = _injected_model(dropout=0.05)
    twin = copy.deepcopy(eager)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(twin, backend=counter, fullgraph=True)
    for seed in (3, 4):  # two steps: the second reuses the graph
        ids = _ids(16, seed)
        want = _step(eager, eager, ids, seed)
        got = _step(twin, compiled, ids, seed)
        diffs = dict(logits=_max_diff(got[0], want[0]), loss=_max_diff(got[1], want[1]),
                     aux=_max_diff(got[2], want[2]), grads=_max_diff(got[3], want[3]))
        print(f"aot_eager vs eager, step seed {seed}: max |diff| {diffs}")
        assert diffs["logits"] <= 1e-5 and diffs["loss"] <= 1e-6 and diffs["aux"] <= 1e-7, diffs
        assert diffs["grads"] <= 1e-5, diffs
        # every MoLALinear exposes its router logits after the compiled call, as in eager
        assert all(m.router_logits is not None for m in twin.modules() if isinstance(m, mola.MoLALinear))
    assert counter.frame_count == 1, f"{counter.frame_count} graphs: the model did not compile as one"
    # 5 layers x 7 projections, each one mola::moe_lora node in the single graph
    mola_op = (torch.ops.mola.moe_lora, torch.ops.mola.moe_lora.default)
    ops = [n for n in counter.graphs[0].graph.nodes if n.op == "call_function" and n.target in mola_op]
    assert len(ops) == 5 * 7


def test_training_step_with_aux_loss_compiles_once_for_every_length():
    """model + aux loss in one compiled function, dynamic shapes: one graph for
    three sequence lengths (no op specialises the token count)."""
    torch._dynamo.reset()
    eager = _injected_model(dropout=0.0, layers=2)  # tracing with symbolic shapes costs per layer
    twin = copy.deepcopy(eager)

    def loss_fn(model, ids):
        out = model(input_ids=ids, labels=ids)
        return out.loss + mola.aux_loss(model)

    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(loss_fn, backend=counter, fullgraph=True, dynamic=True)
    params_e = [p for p in eager.parameters() if p.requires_grad]
    params_c = [p for p in twin.parameters() if p.requires_grad]
    for seq in (16, 24, 9):
        ids = _ids(seq)
        want = loss_fn(eager, ids)
        got = compiled(twin, ids)
        g_want = torch.autograd.grad(want, params_e)
        g_got = torch.autograd.grad(got, params_c)
        print(f"dynamic, seq {seq}: loss diff {_max_diff(got, want):.3g}, grads {_max_diff(g_got, g_want):.3g}")
        assert _max_diff(got, want) <= 1e-6 and _max_diff(g_got, g_want) <= 1e-5
    # One graph with every op serves the three lengths. (With dynamic=True dynamo
    # may also hand the backend an empty graph, which runs nothing.)
    graphs = [g for g in counter.graphs if any(n.op == "call_function" for n in g.graph.nodes)]
    assert len(graphs) == 1, f"recompiled: {len(graphs)} graphs for 3 lengths"
    targets = [n.target for n in graphs[0].graph.nodes if n.op == "call_function"]
    assert sum(t in (torch.ops.mola.moe_lora, torch.ops.mola.moe_lora.default) for t in targets) == 2 * 7
    assert sum(t in (torch.ops.mola.load_balancing_loss, torch.ops.mola.load_balancing_loss.default)
               for t in targets) == 1


class RoutedMLP(nn.Module):
    """A user's module that calls the mola ops itself: two routed layers with
    their own parameters, the balance loss and the routing of the first layer."""

    def __init__(self, dim=24, hidden=40, experts=4, rank=4):
        super().__init__()
        g = torch.Generator().manual_seed(5)

        def p(*shape, scale=0.2):
            return nn.Parameter(torch.randn(*shape, generator=g) * scale)

        self.w1, self.b1, self.w2 = p(hidden, dim), p(hidden), p(dim, hidden)
        self.w1.requires_grad_(False)
        self.router1, self.router2 = p(experts, dim), p(experts, hidden)
        self.a1, self.bb1 = p(experts, rank, dim), p(experts, hidden, rank)
        self.a2, self.bb2 = p(experts, rank, hidden), p(experts, dim, rank)

    def forward(self, x):
        h, logits1 = mola.ops.moe_lora(x, self.w1, self.b1, self.router1, self.a1, self.bb1, 2, 2.0)
        y, logits2 = torch.ops.mola.moe_lora(torch.relu(h), self.w2, None, self.router2, self.a2, self.bb2,
                                             1, 0.5, 0.0, True, 2, None)  # grouped, top-1
        aux = mola.ops.load_balancing_loss([logits1, logits2], [2, 1])
        weights, _, _ = mola.ops.moe_lora_route(logits1.detach(), 2)  # routing statistics, no gradient
        return y, aux, weights


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_ops_in_a_user_module_compile_fullgraph(backend):
    torch._dynamo.reset()
    eager = RoutedMLP()
    twin = copy.deepcopy(eager)
    counter = CompileCounterWithBackend(backend)
    compiled = torch.compile(twin, backend=counter, fullgraph=True)
    x = torch.randn(3, 7, 24, generator=torch.Generator().manual_seed(6))

    def run(call, module):
        y, aux, weights = call(x)
        loss = y.square().mean() + aux
        params = [p for p in module.parameters() if p.requires_grad]
        return (y, aux, weights), torch.autograd.grad(loss, params)

    want_out, want_grads = run(eager, eager)
    got_out, got_grads = run(compiled, twin)
    print(f"{backend} vs eager: outputs {_max_diff(got_out, want_out):.3g}, grads {_max_diff(got_grads, want_grads):.3g}")
    for got, want in zip(got_out, want_out):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for got, want in zip(got_grads, want_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert counter.frame_count == 1
