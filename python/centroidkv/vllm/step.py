"""One engine step's attention work, from the requests' token counts and block table (plan.py):
which blocks each request's attention reads, and which groups the step clusters afterwards.
Single-token requests (decode steps) are batched into one padded attention call. No vLLM import.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .plan import MergePlan


@dataclass
class StepPlan:
    plan: MergePlan
    decode_tokens: Tensor  # [Nd] long: token index of each single-token request
    decode_blocks: Tensor  # [Nd, max live blocks] long: live block ids, padded with a live one
    decode_lengths: Tensor  # [Nd] long: live slots of each
    prefills: list  # (first token, end token, live block ids, live slots) of longer requests
    fresh: list  # (first token, end token) of requests whose step is their whole context so far
    groups: Tensor  # [N, G] long: block ids of every group the step clusters afterwards

    @classmethod
    def build(cls, plan: MergePlan, seq_lens: list, query_starts: list, block_table: Tensor) -> "StepPlan":
        """seq_lens[i]: request i's tokens after the step; query_starts: its new tokens are
        query_starts[i] .. query_starts[i + 1] - 1; block_table[i]: its block ids by logical block."""
        decode_tokens, decode_rows, decode_lengths, prefills, fresh, groups = [], [], [], [], [], []
        for row, after in enumerate(seq_lens):
            first, end = query_starts[row], query_starts[row + 1]
            before = after - (end - first)
            ids = block_table[row]
            live = ids[plan.live_blocks(after, clustered_at=before)].long()
            live_tokens = plan.live_tokens(after, clustered_at=before)
            if end - first == 1:
                decode_tokens.append(first)
                decode_rows.append(live)
                decode_lengths.append(live_tokens)
            elif before == 0:  # only its own tokens, all exact: plain causal attention
                fresh.append((first, end))
            elif end > first:
                prefills.append((first, end, live, live_tokens))
            for group in range(plan.clustered_groups(before), plan.clustered_groups(after)):
                start = plan.first_block(group)
                groups.append(ids[start:start + plan.group_blocks].long())
        widest = max((len(r) for r in decode_rows), default=0)
        padded = [torch.cat([r, r[:1].expand(widest - len(r))]) for r in decode_rows]
        long = dict(dtype=torch.long, device=block_table.device)
        return cls(plan, torch.tensor(decode_tokens, **long),
                   torch.stack(padded) if padded else torch.empty((0, 0), **long),
                   torch.tensor(decode_lengths, **long), prefills, fresh,
                   torch.stack(groups) if groups else torch.empty((0, plan.group_blocks), **long))
