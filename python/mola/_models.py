"""mola.CausalLM: the C++ decoder (llama, mistral, gemma; docs/design.md, Models and loading) as bound
in python/bindings/models.cpp. Re-exported here so that the Python package's
public names live in Python modules, like the rest of mola's API.

    model = mola.CausalLM.from_pretrained("path/to/checkpoint", dtype=torch.bfloat16, device="cuda")
    out = model(input_ids, attention_mask, labels)    # CausalLMOutput: out.logits, out.loss
    logits, loss = out                                 # it is a namedtuple

Adapters live in the C++ model (docs/design.md, The adapter files):

    model.attach(mola.MoLAConfig(experts="inverted", top_k=2, rank=8))  # freezes the base
    opt = torch.optim.AdamW([p for _, p in model.named_parameters() if p.requires_grad], lr=3e-4)
    out = model(ids, labels=ids); (out.loss + model.aux_loss()).backward(); opt.step()
    model.save_adapter("out/")                         # adapter_config.json + adapter_model.safetensors
    fresh.load_adapter("out/")
"""
from ._C import CausalLM, CausalLMOutput

__all__ = ["CausalLM", "CausalLMOutput"]
