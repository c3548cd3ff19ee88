"""mola.CausalLM: the C++ decoder (llama, mistral, gemma; design.md 7) as bound
in python/bindings/models.cpp. Re-exported here so that the Python package's
public names live in Python modules, like the rest of mola's API.

    model = mola.CausalLM.from_pretrained("path/to/checkpoint", dtype=torch.bfloat16, device="cuda")
    logits, loss = model(input_ids, attention_mask, labels)
"""
from ._C import CausalLM

__all__ = ["CausalLM"]
