"""Keeping recall under compression: exact tokens chosen by observation-window attention.

Two ways to spend a token budget on a run of cached tokens, given per-token importance scores
(the attention of the last prompt queries, summed over each KV head's query group, SnapKV-style):

- protect_and_cluster: the top `protect_fraction` of the budget, by max-pooled score (part of
  it by token surprisal, see protection_scores), stays exact (size 1); the other tokens, in their
  original order, are clustered by bipartite soft matching (cluster_budget.py) into the rest.
- absorb_evicted: the top `budget` tokens by max-pooled score survive; every other token is
  merged into its most key-similar survivor (size-weighted centroid, so attention adds
  log(size)); the top `protect_fraction` of the budget never absorbs anything and stays exact.

Both operate per (row, KV head); outputs have exactly `budget` slots.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .cluster_budget import cluster_to_budget
from ..reference import EPS, segment_average


def pooled_scores(scores: Tensor, kernel: int = 7, taper: float = 1.0, core: int = 7) -> Tensor:
    """Max-pool of [B, H, L] scores along L (odd kernel, same length): a neighbourhood of an
    important token counts as important, so a needle's sentence is kept whole (SnapKV).
    taper < 1 (scores >= 0): only the `core` nearest neighbours inherit a token's full score, the
    rest of the kernel `taper` times it, so a strong peak (the needle the question points at)
    still keeps its sentence while weak peaks no longer spend a whole kernel of budget each."""
    if kernel <= 1:
        return scores.float()
    b, h, length = scores.shape
    flat = scores.float().reshape(b * h, 1, length)

    def pool(k: int) -> Tensor:
        return F.max_pool1d(flat, k, stride=1, padding=k // 2).reshape(b, h, length)

    if taper >= 1.0 or core >= kernel:
        return pool(kernel)
    return torch.maximum(pool(core), taper * pool(kernel))


def spread_scores(scores: Tensor, span: tuple[int, int]) -> Tensor:
    """[B, H, L] scores where each token lends its score to the span[0] tokens before it and the
    span[1] tokens after it (each keeps the largest it is lent): span (k // 2, k // 2) is the
    symmetric max-pool of width k. A surprising word is the cue of what follows it (a name, then
    its number), so surprisal reaches further forward than back (results/eval/README.md)."""
    before, after = span
    if before == after:
        return pooled_scores(scores, 2 * before + 1)
    b, h, length = scores.shape
    padded = F.pad(scores.float().reshape(b * h, 1, length), (after, before), value=float("-inf"))
    return F.max_pool1d(padded, before + after + 1, stride=1).reshape(b, h, length)


def run_minimum(scores: Tensor, run: int) -> Tensor:
    """[B, H, L] scores -> the smallest score in a centred window of `run` tokens (odd): high
    only inside a run of tokens that are all high. On surprisal that marks a number or a code
    (every digit unpredictable) rather than one rare word, since prose has a predictable token
    every few tokens (results/eval/README.md, round 7)."""
    if run <= 1:
        return scores.float()
    b, h, length = scores.shape
    flat = -scores.float().reshape(b * h, 1, length)
    return -F.max_pool1d(flat, run, stride=1, padding=run // 2).reshape(b, h, length)


def window_ranking(window: Tensor, slots: int, pool: int = 7, taper: float = 1.0, wide_share: float = 0.0,
                   core: int = 7) -> Tensor:
    """Window scores [B, H, L] ranked for `slots` exact slots: max-pooled over `pool` with the
    outer neighbours tapered (pooled_scores), except that the top round(wide_share * slots)
    tokens by the untapered pool rank first: whole sentences around the strongest peaks (a
    needle under its question), while weaker peaks bring only their `core` nearest neighbours
    when taper is 0."""
    ranking = pooled_scores(window, pool, taper, core)
    if wide_share <= 0 or pool <= core:
        return ranking
    wide = pooled_scores(window, pool).topk(min(window.shape[-1], round(wide_share * slots)), dim=-1).indices
    above = (ranking.amax(-1, keepdim=True) + 1.0).expand_as(wide)
    return ranking.scatter_(-1, wide, above)


def top_tokens(scores: Tensor, count: int) -> tuple[Tensor, Tensor]:
    """(indices of the `count` highest scores, the other indices), each sorted by position."""
    order = scores.sort(dim=-1, descending=True, stable=True).indices
    return order[..., :count].sort(dim=-1).values, order[..., count:].sort(dim=-1).values


def protection_scores(window: Optional[Tensor], info: Optional[Tensor], protect: int, info_share: float = 0.0,
                      pool: int = 7, info_span: tuple[int, int] = (15, 15), taper: float = 1.0,
                      wide_share: float = 0.0, info_run: int = 1) -> Optional[Tensor]:
    """Scores [B, H, L] whose top `protect` are the tokens to keep exact: the top
    round((1 - info_share) * protect) by max-pooled window attention (window_ranking), then the
    best of the rest by token surprisal `info` [B, H or 1, L] (query-agnostic: a needle is
    unpredictable text, prose mostly is not), first reduced to its minimum over runs of
    `info_run` tokens (run_minimum), then spread over `info_span` (the tokens before and after a
    surprising one that are kept with it, spread_scores), so that a chosen token's neighbours
    stay with it. Without token scores (None or all zero) the window ranks everything."""
    if info is None or info_share <= 0 or not bool(info.any()):
        return None if window is None else window_ranking(window, protect, pool, taper, wide_share)
    info = info.expand(info.shape[0], window.shape[1] if window is not None else 1, -1)
    info = spread_scores(run_minimum(info, info_run), info_span)
    if window is None:
        return info
    from_window = round((1.0 - info_share) * protect)
    ranked = window_ranking(window, from_window, pool, taper, wide_share)
    chosen = ranked.sort(dim=-1, descending=True, stable=True).indices[..., :from_window]
    ranking = torch.zeros_like(info).scatter_(-1, chosen, 3.0)
    rest = info.masked_fill(ranking > 0, float("-inf"))
    chosen = rest.sort(dim=-1, descending=True, stable=True).indices[..., :protect - from_window]
    return ranking.scatter_(-1, chosen, 2.0)


def _gather(x: Tensor, index: Tensor) -> Tensor:
    if x.dim() == 4:
        return x.gather(2, index[..., None].expand(-1, -1, -1, x.shape[-1]))
    return x.gather(2, index)


def protected_count(budget: int, protect_fraction: float) -> int:
    """Slots of a budget kept exact: at most budget - 1, so the clustered rest keeps a slot."""
    return max(0, min(budget - 1, round(protect_fraction * budget)))


def protect_and_cluster(keys: Tensor, values: Tensor, sizes: Optional[Tensor], scores: Optional[Tensor],
                        budget: int, protect_fraction: float = 0.5, chunk_size: int = 32,
                        num_merge: Optional[int] = None, pool: int = 7, info: Optional[Tensor] = None,
                        info_share: float = 0.0, info_span: tuple[int, int] = (15, 15), taper: float = 1.0,
                        wide_share: float = 0.0, cluster=cluster_to_budget, info_run: int = 1
                        ) -> tuple[Tensor, Tensor, Tensor, Optional[Tensor]]:
    """[protected exact tokens | clustered rest], `budget` slots per (row, head), ranked by
    protection_scores(scores, info, ...). Also returns the protected tokens' indices [B, H, P]
    in the input (in slot order; None when nothing is protected), so that callers can carry
    per-token data along. `cluster` (cluster_to_budget's signature) merges the rest."""
    if sizes is None:
        sizes = torch.ones(keys.shape[:3], device=keys.device)
    protect = protected_count(budget, protect_fraction)
    ranking = protection_scores(scores, info, protect, info_share, pool, info_span, taper, wide_share, info_run)
    if ranking is None or protect == 0:
        return (*cluster(keys, values, sizes, budget, chunk_size, num_merge), None)
    kept, rest = top_tokens(ranking, protect)
    ck, cv, cs = cluster(_gather(keys, rest), _gather(values, rest), _gather(sizes.float(), rest),
                         budget - protect, chunk_size, num_merge)
    return (torch.cat([_gather(keys, kept), ck], 2), torch.cat([_gather(values, kept), cv], 2),
            torch.cat([_gather(sizes.float(), kept), cs], 2), kept)


def absorb_evicted(keys: Tensor, values: Tensor, sizes: Optional[Tensor], scores: Tensor, budget: int,
                   protect_fraction: float = 0.0, pool: int = 7) -> tuple[Tensor, Tensor, Tensor]:
    """Top-`budget` survivors by pooled score; the rest merged into their nearest absorbing
    survivor by key cosine; survivors in the top protect_fraction stay exact."""
    if sizes is None:
        sizes = torch.ones(keys.shape[:3], device=keys.device)
    sizes = sizes.float()
    if not 0 < budget <= keys.shape[2]:
        raise ValueError(f"centroidkv: budget must be in [1, {keys.shape[2]}], got {budget}")
    pooled = pooled_scores(scores, pool)
    survivors, evicted = top_tokens(pooled, budget)
    if evicted.shape[-1] == 0:
        return keys, values, sizes
    protect = min(budget - 1, round(protect_fraction * budget))
    kn = keys.float() / keys.float().norm(dim=-1, keepdim=True).clamp_min(EPS)
    sim = _gather(kn, evicted) @ _gather(kn, survivors).transpose(-1, -2)  # [B, H, E, S]
    if protect > 0:  # the best-scored survivors are not allowed to absorb
        rank = pooled.gather(-1, survivors).argsort(dim=-1, descending=True).argsort(dim=-1)
        sim = sim.masked_fill((rank < protect)[:, :, None, :], float("-inf"))
    target = sim.nan_to_num(float("-inf")).argmax(dim=-1)  # survivor slot of each evicted token
    slots = torch.empty(keys.shape[:3], dtype=torch.long, device=keys.device)
    slots.scatter_(-1, survivors, torch.arange(budget, device=keys.device).expand_as(survivors).contiguous())
    slots.scatter_(-1, evicted, target)
    new_sizes = torch.zeros(*sizes.shape[:2], budget, device=keys.device).scatter_add_(-1, slots, sizes)
    return (segment_average(keys, slots, sizes, budget), segment_average(values, slots, sizes, budget), new_sizes)
