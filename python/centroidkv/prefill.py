"""Prefill that also tells the cache how surprising each prompt token was.

A pass key or a needle is text the model could not predict; most prose it could. A token's
surprisal, -log p(token | prefix), therefore marks what must stay exact even before any question
is known (results/eval/README.md). The model computes it for free during the prefill, except for
the logits of every position, which `generate` does not ask for; this function asks for them
(in chunks, so a long prompt never holds [T, vocab] logits at once) and hands them to the cache.

    ids = tokenizer(prompt, return_tensors="pt").input_ids
    cache = CentroidKVCache(ratio=0.75)                    # default policy: info_share=0.7
    centroidkv.prefill(model, ids[:, :-1], cache)          # all but the last prompt token
    out = model.generate(ids, **{cache_argument(model): cache}, max_new_tokens=32)
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .cache import CentroidKVCache, cache_argument


@torch.no_grad()  # not inference_mode: generate must be able to update the cache afterwards
def prefill(model, input_ids: Tensor, cache: CentroidKVCache, attention_mask: Optional[Tensor] = None,
            logits_chunk: int = 1024) -> Tensor:
    """Runs input_ids [B, T] through `model` into `cache`, hands the cache every token's surprisal
    (CentroidKVCache.observe_tokens) and returns the logits of the last position [B, vocab].

    Generation continues with `model.generate(full_ids, ...)` on the same cache, where full_ids
    extends input_ids by at least one token (generate needs one token it has not seen)."""
    if not isinstance(cache, CentroidKVCache):
        raise TypeError(f"centroidkv.prefill: cache must be a CentroidKVCache, got {type(cache).__name__}")
    attn = getattr(model.config, "_attn_implementation", None)
    if attn != "centroidkv":
        raise ValueError(f"centroidkv.prefill: load the model with attn_implementation='centroidkv' (it has {attn!r})")
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"centroidkv.prefill: input_ids must be [batch, tokens] with tokens > 0, "
                         f"got {list(input_ids.shape)}")
    if attention_mask is not None and attention_mask.shape != input_ids.shape:
        raise ValueError(f"centroidkv.prefill: attention_mask must have input_ids' shape {list(input_ids.shape)}, "
                         f"got {list(attention_mask.shape)}")
    past = cache.get_seq_length()
    kwargs = {cache_argument(model): cache, "use_cache": True}
    if attention_mask is not None:  # positions as generate derives them under left padding
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp_min(0) + past
        kwargs.update(attention_mask=attention_mask, position_ids=position_ids)
    if not cache.options.policy.token_scores:  # nothing to hand over: a plain prefill
        return model(input_ids=input_ids, logits_to_keep=1, **kwargs).logits[:, -1].float()
    cache.token_score_gate.waiting = True  # layers hold this call's tokens until observe_tokens
    try:
        hidden = model.get_decoder()(input_ids=input_ids, **kwargs).last_hidden_state
    finally:
        cache.token_score_gate.waiting = False
    head = model.get_output_embeddings()
    softcap = getattr(model.config, "final_logit_softcapping", None)
    batch, tokens = input_ids.shape
    surprisal = torch.zeros(batch, tokens, device=hidden.device)
    last = None
    for start in range(0, tokens, logits_chunk):
        stop = min(tokens, start + logits_chunk)
        logits = head(hidden[:, start:stop]).float()
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        if stop < tokens:  # position t predicts token t + 1
            nll = -torch.log_softmax(logits, -1).gather(-1, input_ids[:, start + 1:stop + 1, None])[..., 0]
        else:
            nll = -torch.log_softmax(logits[:, :-1], -1).gather(-1, input_ids[:, start + 1:, None])[..., 0]
            last = logits[:, -1]
        surprisal[:, start + 1:start + 1 + nll.shape[1]] = nll
    real = None
    if attention_mask is not None:  # a row's first real token follows padding: nothing predicted it
        real = attention_mask.bool()
        surprisal[:, 1:] *= real[:, :-1]
    cache.observe_tokens(surprisal, real)
    return last
