"""Loading at scale (bench/scale.py and mola.CausalLM.from_pretrained): no
random initialisation, no fp32 staging, the checkpoint's bytes used where
they lie; a 16-bit base with an fp32 adapter; 16-bit compute on a CPU without
native bf16 kept off ATen's slow path.

The memory test runs bench/scale.py itself on a scaled-down llama (2 layers)
and checks mola's peak resident memory after loading against the weights'
size; the full-size figures are in bench/results/scale-*.json.
"""
import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch

import mola

ROOT = pathlib.Path(__file__).resolve().parents[3]
transformers = pytest.importorskip("transformers")


def test_bench_scale_loads_within_the_weights_size(tmp_path):
    out = tmp_path / "scale.json"
    args = [sys.executable, str(ROOT / "bench" / "scale.py"), "--shape", "llama-2-7b", "--layers", "2",
            "--hidden", "1024", "--intermediate", "2816", "--vocab", "8000", "--rows", "mola", "--train",
            "--steps", "1", "--checkpoint-dir", str(tmp_path / "ckpt"), "-o", str(out)]
    done = subprocess.run(args, capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    weights_mb = report["checkpoint"]["bytes"] / (1 << 20)
    assert 3 <= len(list((tmp_path / "ckpt").glob("*.safetensors"))) or weights_mb < 4096  # sharded at 4 GiB
    row = report["rows"]["mola"]
    grown = row["peak_rss_after_load_mb"] - row["rss_before_load_mb"]
    # Loading makes no copy of the bf16 weights (a view of the mapped file) and
    # no fp32 staging: at most the weights' size and a fixed allowance.
    assert grown <= 1.1 * weights_mb + 64, (grown, weights_mb)
    assert row["adapter_dtypes"] == ["torch.float32"]  # the adapter trains in fp32 over the bf16 base
    assert len(row["step_s"]) == 1 and row["loss"] == row["loss"]  # a finite loss


@pytest.fixture(scope="module")
def sharded_bf16(tmp_path_factory):
    """The tiny llama saved in bf16, in several shards with an index."""
    d = tmp_path_factory.mktemp("bf16")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(d, max_shard_size="20KB")
    assert (d / "model.safetensors.index.json").exists()
    return d, model.eval()


def test_sharded_bf16_loads_as_transformers_does(sharded_bf16):
    d, hf = sharded_bf16
    ids = torch.randint(0, 61, (2, 9))
    with torch.no_grad():
        want = hf(input_ids=ids).logits
        for dtype in (torch.bfloat16, torch.float32):
            m = mola.CausalLM.from_pretrained(str(d), dtype=dtype)
            assert {p.dtype for p in m.parameters()} == {dtype}
            got = m(ids).logits
            tol = 0 if dtype == torch.bfloat16 else 0.05
            assert (got.float() - want.float()).abs().max().item() <= tol


def test_writing_a_view_of_the_file_never_changes_the_file(sharded_bf16):
    d, hf = sharded_bf16
    before = {f: (d / f).read_bytes() for f in os.listdir(d) if f.endswith(".safetensors")}
    m = mola.CausalLM.from_pretrained(str(d), dtype=torch.bfloat16)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(1.0)  # copy-on-write pages: the process's own
    m.attach(mola.MoLAConfig(experts=2, top_k=1, rank=2, init="pissa"))  # PiSSA changes base weights in place
    assert {f: (d / f).read_bytes() for f in before} == before
    again = mola.CausalLM.from_pretrained(str(d), dtype=torch.bfloat16)
    ids = torch.randint(0, 61, (1, 5))
    with torch.no_grad():
        assert torch.equal(again(ids).logits, hf(input_ids=ids).logits)


def test_a_16bit_base_gets_an_fp32_adapter(sharded_bf16):
    d, hf = sharded_bf16
    cpp = mola.CausalLM.from_pretrained(str(d), dtype=torch.bfloat16)
    cpp.attach(mola.MoLAConfig(experts="2,4,6,8", top_k=2, rank=4))
    adapter = {n: p for n, p in cpp.named_parameters() if ".mola." in n}
    assert {p.dtype for p in adapter.values()} == {torch.float32}
    assert {p.dtype for n, p in cpp.named_parameters() if n not in adapter} == {torch.bfloat16}
    injected = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.bfloat16)
    mola.inject(injected, mola.MoLAConfig(experts="2,4,6,8", top_k=2, rank=4))
    assert {p.dtype for p in injected.parameters() if p.requires_grad} == {torch.float32}
    cpp.train()
    ids = torch.randint(0, 61, (2, 7))
    out = cpp(ids, labels=ids)
    assert out.logits.dtype == torch.bfloat16
    (out.loss + cpp.aux_loss()).backward()
    grads = [p.grad for p in adapter.values() if p.grad is not None]
    assert grads and all(g.dtype == torch.float32 for g in grads)


def _layer(dtype, seed=0, base_dtype=None):
    torch.manual_seed(seed)
    base = torch.nn.Linear(96, 160, dtype=base_dtype or dtype)
    layer = mola.MoLALinear(base, num_experts=4, top_k=2, rank=4, dropout=0.0)
    with torch.no_grad():
        layer.lora_b.normal_(0, 0.1)
    return layer


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("compute", ["dense", "grouped"])
def test_16bit_op_on_the_cpu_computes_in_fp32_from_16bit_storage(dtype, compute):
    """On a CPU without native 16-bit matmul the op runs in fp32 from the 16-bit
    tensors: it equals the fp32 op on the same (16-bit) values, rounded once."""
    if not mola.ops.cpu_computes_in_fp32(dtype):
        pytest.skip(f"this CPU has native {dtype} matrix units: the op computes in {dtype} there")
    torch.manual_seed(1)
    x = torch.randn(3, 11, 96).to(dtype)
    w, b = (torch.randn(160, 96) / 10).to(dtype), torch.randn(160).to(dtype)
    router, a = (torch.randn(4, 96) / 10).to(dtype), (torch.randn(4, 4, 96) / 10).to(dtype)
    bb = (torch.randn(4, 160, 4) / 10).to(dtype)
    args16 = [t.clone().requires_grad_() for t in (x, router, a, bb)]
    args32 = [t.float().clone().requires_grad_() for t in (x, router, a, bb)]
    y16, z16 = mola.ops.moe_lora(args16[0], w, b, *args16[1:], top_k=2, scaling=2.0, compute=compute)
    y32, z32 = mola.ops.moe_lora(args32[0], w.float(), b.float(), *args32[1:], top_k=2, scaling=2.0,
                                 compute=compute)
    assert y16.dtype == dtype and z16.dtype == dtype
    eps = 2 ** -7 if dtype == torch.bfloat16 else 2 ** -10
    scale = y32.abs().max().item()
    assert (y16.float() - y32).abs().max().item() <= 2 * eps * scale
    g = torch.randn_like(y32)
    torch.autograd.backward([y16], [g.to(dtype)])
    torch.autograd.backward([y32], [g.to(dtype).float()])
    for t16, t32 in zip(args16, args32):
        assert t16.grad.dtype == dtype
        ref = t32.grad.abs().max().item()
        assert (t16.grad.float() - t32.grad).abs().max().item() <= 4 * eps * ref + 1e-6


def test_16bit_frozen_linears_of_the_model_train_on_the_fast_path(sharded_bf16):
    """lm_head and a projection without an adapter are frozen 16-bit linears: their
    input gradient (dy W) is computed in fp32 from the 16-bit weight, and equals
    the fp32 model's to bf16 rounding."""
    d, _ = sharded_bf16
    ids = torch.randint(0, 61, (2, 7))
    grads = {}
    for dtype in (torch.bfloat16, torch.float32):
        torch.manual_seed(3)
        m = mola.CausalLM.from_pretrained(str(d), dtype=dtype)
        m.attach(mola.MoLAConfig(experts=2, top_k=1, rank=4, targets=("q_proj",), dropout=0.0))
        with torch.no_grad():
            for n, p in m.named_parameters():
                if n.endswith("lora_b"):
                    p.normal_(0, 0.1)
        m.train()
        m(ids, labels=ids).loss.backward()
        grads[dtype] = {n: p.grad.float() for n, p in m.named_parameters() if p.grad is not None}
    for name, ref in grads[torch.float32].items():
        got = grads[torch.bfloat16][name]
        assert (got - ref).abs().max().item() <= 0.05 * ref.abs().max().item() + 1e-6, name


_CUDA_LOAD = """
import json, pathlib, sys, torch, mola
def hwm():
    for line in pathlib.Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
torch.zeros(1, device="cuda")  # the CUDA context before the baseline
before = hwm()
m = mola.CausalLM.from_pretrained(sys.argv[1], dtype=torch.bfloat16, device="cuda")
print(json.dumps({"grown": hwm() - before, "devices": sorted({p.device.type for p in m.parameters()})}))
"""


@pytest.mark.skipif(not torch.cuda.is_available(), reason="loading onto a GPU needs one (none on this machine)")
def test_loading_onto_cuda_holds_one_shard_at_a_time(tmp_path):
    """8 shards of about 24 MB onto the GPU: the host's peak grows by about one
    shard (its mapped pages), never by the whole checkpoint."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=4000, hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
                                      num_attention_heads=8, max_position_embeddings=128)
    hf = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    hf.save_pretrained(tmp_path / "ckpt", max_shard_size="24MB")
    shards = list((tmp_path / "ckpt").glob("*.safetensors"))
    total = sum(f.stat().st_size for f in shards)
    assert len(shards) >= 6
    done = subprocess.run([sys.executable, "-c", _CUDA_LOAD, str(tmp_path / "ckpt")], capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["devices"] == ["cuda"]
    assert report["grown"] < 0.5 * total, (report["grown"], total)
    cpu = mola.CausalLM.from_pretrained(str(tmp_path / "ckpt"), dtype=torch.bfloat16)
    gpu = mola.CausalLM.from_pretrained(str(tmp_path / "ckpt"), dtype=torch.bfloat16, device="cuda")
    ids = torch.randint(0, 4000, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(gpu(ids.cuda()).logits.float().cpu(), cpu(ids).logits.float(),
                                   rtol=0.05, atol=0.05)
