"""Tiny random-weight transformers models and helpers shared by the integration tests."""
from __future__ import annotations

import torch

transformers = __import__("pytest").importorskip("transformers")

from centroidkv.cache import cache_argument  # noqa: E402  (needs transformers)

VOCAB = 97


def tiny_model(family: str = "llama", attn: str = "centroidkv", seed: int = 0, **overrides):
    """A 2-layer model of the given family with random weights (fp32, eval mode)."""
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048)
    if family == "llama":
        config = transformers.LlamaConfig(**common)
    elif family == "qwen2":
        config = transformers.Qwen2Config(**common, use_sliding_window=False)
    elif family == "mistral":
        config = transformers.MistralConfig(**common, sliding_window=None)
    elif family == "gemma3":
        config = transformers.Gemma3TextConfig(**common, head_dim=16, sliding_window=24,
                                               layer_types=["sliding_attention", "full_attention"],
                                               query_pre_attn_scalar=16)
    else:
        raise ValueError(family)
    for key, value in overrides.items():
        setattr(config, key, value)
    config._attn_implementation = attn
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation=attn)
    return model.eval()


@torch.no_grad()
def teacher_forced_logits(model, cache, prompt, continuation, attention_mask=None):
    """Logits of the prefill's last token and of each decode step fed `continuation` [B, n]."""
    name = cache_argument(model)
    positions = None
    if attention_mask is not None:  # as generate() does: positions count real tokens only
        positions = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)
    out = model(prompt, attention_mask=attention_mask, position_ids=positions, use_cache=True, **{name: cache})
    logits = [out.logits[:, -1]]
    mask = attention_mask
    for step in range(continuation.shape[1]):
        if mask is not None:
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        kwargs = {name: cache, "attention_mask": mask}
        if mask is not None:  # positions from the mask, as generate() derives them
            kwargs["position_ids"] = (mask.long().cumsum(-1) - 1)[:, -1:]
        out = model(continuation[:, step:step + 1], use_cache=True, **kwargs)
        logits.append(out.logits[:, -1])
    return torch.stack(logits, dim=1)
