"""Shared by the model tests: weights for tiny random transformers models that
keep activations at unit scale, so logits are far from ties and greedy
decoding is stable across implementations."""
import math

import torch


def randomize(model, family):
    # Unit-scale activations: linear weights N(0, 1/in), embeddings N(0, 1);
    # norm weights away from neutral (gemma stores w for a scale of 1 + w).
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(-0.5, 0.5) if family == "gemma" else p.uniform_(0.5, 1.5)
            elif p.dim() == 2 and "embed_tokens" not in name:
                p.normal_(0.0, 1.0 / math.sqrt(p.shape[1]))
            else:
                p.normal_(0.0, 1.0)


def family_config(family, head_dim=32, mistral=None, **common):
    """A transformers config of ``family`` over the ``common`` sizes: llama with
    2 KV heads, mistral with 2 KV heads and a sliding window of 5 (``mistral``:
    more of its settings), gemma with 1 KV head of ``head_dim``."""
    import transformers
    if family == "llama":
        return transformers.LlamaConfig(num_key_value_heads=2, **common)
    if family == "mistral":
        return transformers.MistralConfig(num_key_value_heads=2, sliding_window=5, **(mistral or {}), **common)
    if family == "gemma":
        return transformers.GemmaConfig(num_key_value_heads=1, head_dim=head_dim, **common)
    raise AssertionError(family)


def save_tiny_llama(path, vocab=61):
    """Writes a random 4-layer llama (hidden 32, GQA 4/2 heads, fp32, seed 0)
    as a Hugging Face checkpoint in ``path``, the model the trainer tests use."""
    import transformers
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(path)
    return path
