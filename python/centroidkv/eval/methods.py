"""Compression methods compared by the harness, each a small dataclass (kvpress-style).

A method turns the middle region of one layer's prompt cache (between the exact sink and tail,
see budget.py) into exactly `budget` slots per KV head. It sees that region's keys and values,
and scores recorded during the prefill: `window` (attention of the last W prompt queries) and
`totals` (attention summed over all prompt queries), both summed over the query heads of each KV
head's group, and each token's `surprisal` under the model (query-agnostic). Product policies (centroidkv.policies) and evaluation-only
baselines and ablations live side by side here so that they run under one protocol.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..policies.cluster_budget import PARTITIONS, cluster_to_budget
from ..policies.protection import (absorb_evicted, protect_and_cluster, protected_count, protection_scores,
                         run_minimum, spread_scores, top_tokens, window_ranking)
from ..reference import EPS
from .fitted_values import (fit_centroid_logits, fit_centroid_masses, fit_centroid_values, member_masses,
                            probe_logits, probe_queries)


@dataclass
class Region:
    keys: Tensor            # [1, H, M, Dk] post-rotary
    values: Tensor          # [1, H, M, Dv]
    window: Tensor          # [1, H, M] observation-window attention
    totals: Tensor          # [1, H, M] attention summed over all prompt queries
    budget: int
    generator: torch.Generator
    surprisal: Optional[Tensor] = None  # [1, 1, M] -log p(token | prefix) under the model, nats
    # {"sum" | "max": [1, H, M]} attention while the model repeats the context (reconstruction_scores)
    reconstruction: Optional[dict] = None
    # [1, Hq, N, D] the context's own queries, scaled, after rotary (AttentionState.queries)
    queries: Optional[Tensor] = None
    depth: int = 0  # how many compressed layers come before this region's layer


Result = tuple[Tensor, Tensor, Tensor]  # keys, values, sizes of the `budget` slots


def _keep(region: Region, index: Tensor) -> Result:
    k = region.keys.gather(2, index[..., None].expand(-1, -1, -1, region.keys.shape[-1]))
    v = region.values.gather(2, index[..., None].expand(-1, -1, -1, region.values.shape[-1]))
    return k, v, torch.ones(index.shape, device=index.device)


@dataclass
class Method:
    # attention adds size_bias * log(size) for this method's slots (1 = SPEC.md, 0 = no bias, between:
    # a tempered bias); keyword-only so subclasses' fields come first
    size_bias: float = field(default=1.0, kw_only=True)

    def compress(self, region: Region) -> Result:
        raise NotImplementedError


@dataclass
class Full(Method):
    """No compression (the reference every score is relative to)."""


@dataclass
class Clustering(Method):
    """Bipartite soft matching to the budget (SPEC.md; the paper-style policy by default:
    chunk 32, r = c/2 per pass, key cosine, alternating partition, log(size) bias).
    Ablations: chunk_size, num_merge (smaller r, more passes), partition "halves",
    metric "keys+values", size_bias 0."""
    chunk_size: int = 32
    num_merge: Optional[int] = None
    partition: str = "alternating"
    metric: str = "keys"

    def __post_init__(self):
        if self.chunk_size < 2 or self.chunk_size % 2:
            raise ValueError(f"Clustering: chunk_size must be even >= 2, got {self.chunk_size}")
        if self.num_merge is not None and not 1 <= self.num_merge <= self.chunk_size // 2:
            raise ValueError(f"Clustering: num_merge must be in [1, c/2], got {self.num_merge}")
        if self.partition not in PARTITIONS:
            raise ValueError(f"Clustering: partition must be one of {PARTITIONS}")
        if self.metric not in ("keys", "keys+values"):
            raise ValueError("Clustering: metric must be 'keys' or 'keys+values'")

    def compress(self, region):
        return cluster_to_budget(region.keys, region.values, None, region.budget, self.chunk_size,
                                 self.num_merge, self.metric, self.partition)


@dataclass
class StreamingLLM(Method):
    """Keeps the most recent tokens (Xiao et al., 2023: attention sinks + recent window)."""

    def compress(self, region):
        m = region.keys.shape[2]
        index = torch.arange(m - region.budget, m).expand(*region.keys.shape[:2], -1)
        return _keep(region, index)


@dataclass
class SnapKV(Method):
    """Top tokens by observation-window attention, max-pooled (Li et al., 2024). The window
    is the last W prompt tokens (the question when it is in the prompt)."""
    pool: int = 7
    info_share: float = 0.0  # share of the budget ranked by token surprisal instead (1 = surprisal only)
    info_span: tuple[int, int] = (15, 15)  # tokens before / after a surprising one kept with it
    info_run: int = 1

    def __post_init__(self):
        if self.pool < 1 or self.pool % 2 == 0:
            raise ValueError(f"SnapKV: pool must be odd >= 1, got {self.pool}")

    def compress(self, region):
        scores = protection_scores(region.window, region.surprisal, region.budget, self.info_share, self.pool,
                                   self.info_span, info_run=self.info_run)
        return _keep(region, top_tokens(scores, region.budget)[0])


@dataclass
class H2O(Method):
    """Top tokens by attention accumulated over all prompt queries (Zhang et al., 2023;
    one-shot after prefill, without H2O's own recent window: the exact tail plays that role)."""

    def compress(self, region):
        return _keep(region, top_tokens(region.totals, region.budget)[0])


def _reconstruction(region: Region, reduce: str) -> Tensor:
    if region.reconstruction is None:
        raise ValueError("centroidkv.eval: this method ranks by reconstruction attention, which the runner "
                         "records only for methods that declare it (needs_reconstruction)")
    return region.reconstruction[reduce]


@dataclass
class Reconstruction(Method):
    """Query-agnostic, KVzip-style (Kim et al., 2025): after the context, the model is asked to
    repeat it and reads it again; each token's score is the attention the repeating queries pay
    it (summed over them and over each KV head's query group, or with reduce="max" the largest any
    of them paid, KVzip's choice); the top tokens, max-pooled, stay."""
    pool: int = 7
    reduce: str = "sum"

    def compress(self, region):
        scores = protection_scores(_reconstruction(region, self.reduce), None, region.budget, 0.0, self.pool)
        return _keep(region, top_tokens(scores, region.budget)[0])


@dataclass
class KeyNorm(Method):
    """Keeps the tokens with the smallest key L2 norm (Devoto et al., 2024)."""

    def compress(self, region):
        return _keep(region, top_tokens(-region.keys.float().norm(dim=-1), region.budget)[0])


@dataclass
class Random(Method):
    """Keeps a uniformly random subset per KV head (seeded)."""

    def compress(self, region):
        scores = torch.rand(region.keys.shape[:3], generator=region.generator)
        return _keep(region, top_tokens(scores, region.budget)[0])


RANKINGS = ("window", "reconstruction", "reconstruction_max")


@dataclass
class ProtectedClustering(Method):
    """Product policy: SnapKV-protected exact tokens + clustering of the rest
    (centroidkv.policies.protection.protect_and_cluster)."""
    protect_fraction: float = 0.5
    chunk_size: int = 32
    num_merge: Optional[int] = 8
    pool: int = 7
    info_share: float = 0.0  # share of the protected slots ranked by token surprisal
    info_span: tuple[int, int] = (15, 15)  # tokens before / after a surprising one kept with it
    info_run: int = 1        # surprisal's minimum over centred runs of this many tokens (run_minimum)
    taper: float = 1.0       # weight of the window pool's outer neighbours (pooled_scores)
    wide_share: float = 0.0  # window slots ranked first by the untapered pool (window_ranking)
    # what ranks the protected tokens: "window", or query-agnostic "reconstruction" (summed) and
    # "reconstruction_max" (reconstruction_scores)
    scores: str = "window"
    cluster_rest = staticmethod(cluster_to_budget)  # the merge rule for the unprotected tokens

    def __post_init__(self):
        if not 0.0 <= self.protect_fraction <= 1.0:
            raise ValueError(f"ProtectedClustering: protect_fraction must be in [0, 1], got {self.protect_fraction}")
        if self.scores not in RANKINGS:
            raise ValueError(f"ProtectedClustering: scores must be one of {RANKINGS}, got {self.scores!r}")

    def attention(self, region: Region) -> Tensor:
        if self.scores == "window":
            return region.window
        return _reconstruction(region, "max" if self.scores == "reconstruction_max" else "sum")

    def compress(self, region):
        return self.protect_and_cluster(region)[:3]

    def protect_and_cluster(self, region: Region) -> tuple[Tensor, Tensor, Tensor, Optional[Tensor]]:
        """keys, values, sizes of the slots and the protected tokens' indices (protect_and_cluster)."""
        return protect_and_cluster(region.keys, region.values, None, self.attention(region), region.budget,
                                   self.protect_fraction, self.chunk_size, self.num_merge, self.pool,
                                   region.surprisal, self.info_share, self.info_span, self.taper,
                                   self.wide_share, self.cluster_rest, self.info_run)

    def ranking(self, region: Region, protect: int) -> Tensor:
        """Scores whose top `protect` are the tokens compress keeps exact when it protects that many."""
        return protection_scores(self.attention(region), region.surprisal, protect, self.info_share, self.pool,
                                 self.info_span, self.taper, self.wide_share, self.info_run)


def smoothed(info: Tensor, width: int) -> Tensor:
    """Each token's surprisal averaged over `width` neighbours: a span of sustained surprise
    (an inserted sentence, a list of names) outranks one unpredictable word."""
    b, h, m = info.shape
    return F.avg_pool1d(info.float().reshape(b * h, 1, m), width, stride=1, padding=width // 2,
                        count_include_pad=False).reshape(b, h, m)


@dataclass
class ProtectedVariant(ProtectedClustering):
    """Ablations of the product ranking (measured, not adopted; results/eval/README.md):
    info_smooth > 1 averages surprisal over spans before pooling, recent_share gives that share
    of the protected slots to the most recent tokens. The scores are pooled here and ranked by
    protection_scores with pool 1."""
    info_smooth: int = 1
    recent_share: float = 0.0

    def compress(self, region):
        ranking = self.ranking(region, protected_count(region.budget, self.protect_fraction))
        return protect_and_cluster(region.keys, region.values, None, ranking, region.budget,
                                   self.protect_fraction, self.chunk_size, self.num_merge, 1)[:3]

    def ranking(self, region: Region, protect: int) -> Tensor:
        m = region.keys.shape[2]
        recent = torch.arange(m - round(self.recent_share * protect), m)
        from_window = round((1.0 - self.info_share) * (protect - len(recent)))
        window = window_ranking(self.attention(region), from_window, self.pool, self.taper, self.wide_share)
        window = window.index_fill_(-1, recent, float("-inf"))
        info = region.surprisal
        if info is not None:
            info = smoothed(info, self.info_smooth) if self.info_smooth > 1 else info.float()
            info = spread_scores(run_minimum(info, self.info_run), self.info_span).index_fill_(-1, recent, float("-inf"))
        ranking = protection_scores(window, info, protect - len(recent), self.info_share, 1, (0, 0))
        return ranking.nan_to_num(0.0, posinf=0.0, neginf=-1.0).index_fill_(-1, recent, float("inf"))


def cluster_keeping_key_norms(keys: Tensor, values: Tensor, sizes: Tensor, budget: int, chunk_size: int,
                              num_merge: Optional[int]) -> Result:
    """cluster_to_budget, then each centroid key rescaled to its members' size-weighted mean key
    norm (the mean norm travels as an extra value channel through the same merges). A plain mean
    of keys that point in slightly different directions is shorter than they are, which flattens
    its logits toward 0; this keeps the direction SPEC.md's centroid has and the length its
    members had."""
    norms = keys.float().norm(dim=-1, keepdim=True)
    ck, cv, cs = cluster_to_budget(keys, torch.cat([values.float(), norms], -1), sizes, budget, chunk_size, num_merge)
    ck = ck.float() * (cv[..., -1:] / ck.float().norm(dim=-1, keepdim=True).clamp_min(EPS))
    return ck, cv[..., :-1], cs


@dataclass
class NormKeepingClustering(ProtectedClustering):
    """The product ranking (ProtectedClustering) with cluster_keeping_key_norms as the merge rule
    (a merge-rule candidate for issue 16's centroid dividend; measured, results/eval/README.md)."""
    cluster_rest = staticmethod(cluster_keeping_key_norms)


@dataclass
class DullCentroids(ProtectedClustering):
    """The product ranking, but the centroids stand only for the dullest unprotected tokens: the
    `skip` share of them ranked highest (just below the protection cutoff: a needle's unprotected
    neighbours, a name's tail) is evicted instead of merged, so that no centroid blurs what a
    later question looks for (a merge-rule candidate for issue 16's needle dividend, round 12).
    At most as many are evicted as leave the centroid slots one token each."""
    skip: float = 0.5

    def __post_init__(self):
        super().__post_init__()
        if not 0.0 <= self.skip <= 1.0:
            raise ValueError(f"DullCentroids: skip must be in [0, 1], got {self.skip}")

    def protect_and_cluster(self, region: Region) -> tuple[Tensor, Tensor, Tensor, Optional[Tensor]]:
        protect = protected_count(region.budget, self.protect_fraction)
        ranking = self.ranking(region, protect)
        if ranking is None or protect == 0:
            return super().protect_and_cluster(region)
        kept, rest = top_tokens(ranking, protect)
        slots = region.budget - protect
        drop = min(round(self.skip * rest.shape[-1]), rest.shape[-1] - slots)
        dull = rest.gather(-1, top_tokens(ranking.gather(-1, rest), drop)[1])  # in position order
        merged = self.cluster_rest(*_keep(region, dull), slots, self.chunk_size, self.num_merge)
        keys, values, sizes = (torch.cat([exact, merge], 2) for exact, merge in zip(_keep(region, kept), merged))
        return keys, values, sizes, kept


@dataclass
class FittedValueClustering(ProtectedClustering):
    """The product ranking and merges (ProtectedClustering), then the centroids' values refitted
    by fit_centroid_values (fitted_values.py) to the region's probe queries (a merge-rule candidate
    for issue 16's centroid dividend; measured, results/eval/README.md round 10)."""
    ridge: float = 0.1
    match: str = "output"

    def _require_probes(self, region: Region) -> None:
        if region.queries is None:
            raise ValueError(f"{type(self).__name__}: the region carries no probe queries")

    def compress(self, region: Region):
        self._require_probes(region)
        keys, values, sizes, kept = self.protect_and_cluster(region)
        exact = 0 if kept is None else kept.shape[-1]
        fitted = fit_centroid_values(region.queries, region.keys, region.values, keys, values, sizes, exact,
                                     self.size_bias, self.ridge, self.match)
        return keys, fitted, sizes


@dataclass
class MassFittedClustering(FittedValueClustering):
    """The product ranking and merges, with each centroid's size replaced by the effective size
    that gives the probe queries its members' attention mass (fit_centroid_masses; the members'
    masses travel through the merges as extra value channels), then, with fit_values, its value
    refitted as in FittedValueClustering (round 11). With fit_keys the key and size are fitted
    together to the members' log-sum-exp (fit_centroid_logits)."""
    mass_ridge: float = 0.1
    fit_values: bool = True
    fit_keys: bool = False
    # regions of the first `keys_from_depth` compressed layers get only the value fit (round 12:
    # on Gemma-3 the key fit reproduces the first global layer worse for queries it was not fitted to)
    keys_from_depth: int = 0

    def compress(self, region: Region):
        if region.depth < self.keys_from_depth:
            return super().compress(region)
        self._require_probes(region)
        probes = probe_queries(region.queries, region.keys.shape[1])
        logits = probe_logits(probes, region.keys)
        masses, shift = member_masses(logits)
        dv = region.values.shape[-1]
        carried = replace(region, values=torch.cat([region.values.float(), masses], -1))
        keys, values, sizes, kept = self.protect_and_cluster(carried)
        exact = 0 if kept is None else kept.shape[-1]
        values, merged_masses = values[..., :dv].to(region.values.dtype), values[..., exact:, dv:]
        if self.fit_keys:
            centroid_keys, fitted = fit_centroid_logits(probes, shift, keys[..., exact:, :], sizes[..., exact:],
                                                        merged_masses, masses.sum(2), self.size_bias, self.mass_ridge)
            keys = torch.cat([keys[..., :exact, :], centroid_keys], 2)
        else:
            fitted = fit_centroid_masses(probes, shift, keys[..., exact:, :], sizes[..., exact:], merged_masses,
                                         self.size_bias, self.mass_ridge)
        sizes = torch.cat([sizes[..., :exact], fitted], -1)
        if self.fit_values:
            values = fit_centroid_values(region.queries, region.keys, region.values, keys, values, sizes, exact,
                                         self.size_bias, self.ridge, self.match, logits)
        return keys, values, sizes


@dataclass
class FittedNormKeepingClustering(FittedValueClustering):
    """FittedValueClustering whose centroid keys keep their members' mean norm
    (cluster_keeping_key_norms): a centroid's logit then undercounts its members' mass less."""
    cluster_rest = staticmethod(cluster_keeping_key_norms)


@dataclass
class AbsorbEvicted(Method):
    """SnapKV survivors; evicted tokens merged into their most key-similar survivor
    (centroidkv.policies.protection.absorb_evicted). protect_fraction 0 = the plain
    merge-evicted-into-nearest-survivor baseline (as in CaM / KVMerger-style merging)."""
    protect_fraction: float = 0.0
    pool: int = 7

    def __post_init__(self):
        if not 0.0 <= self.protect_fraction < 1.0:
            raise ValueError(f"AbsorbEvicted: protect_fraction must be in [0, 1), got {self.protect_fraction}")

    def compress(self, region):
        return absorb_evicted(region.keys, region.values, None, region.window, region.budget,
                              self.protect_fraction, self.pool)


def twin(product, kind: type = ProtectedClustering) -> ProtectedClustering:
    """The harness twin (a `kind`) of a product ProtectedClustering (centroidkv.policies.protected)."""
    # every field of the product policy has a harness field of the same name
    return kind(**{f.name: getattr(product, f.name) for f in fields(product)})


def product_default(kind: type = ProtectedClustering) -> ProtectedClustering:
    """The harness twin of the product's default policy."""
    from ..policies import ProtectedClustering as Product
    return twin(Product(), kind)


def round3_default(kind: type = ProtectedClustering, **changes) -> ProtectedClustering:
    """The product's default of rounds 3 to 6 (`protected90_s30t25`), which the `default_*`
    variants measured then were built on; pinned, so their names keep meaning what they measured."""
    return kind(**{"protect_fraction": 0.9, "pool": 31, "info_share": 0.3, "taper": 0.25, **changes})


def product_query_agnostic() -> ProtectedClustering:
    """The harness twin of ProtectedClustering.query_agnostic() (every protected slot by surprisal,
    counted by runs)."""
    from ..policies import ProtectedClustering as Product
    return twin(Product.query_agnostic())


def round7_agnostic(**changes) -> ProtectedClustering:
    """query_agnostic() with SPEC.md's log(size) bias, as rounds 7 and 8 measured it; pinned, so
    the `agnostic_*` names keep meaning what they measured."""
    return replace(product_query_agnostic(), **{"size_bias": 1.0, **changes})


def default_p80() -> ProtectedClustering:
    """The product default with 20% of its slots for centroids (round 9's `default_p80` measured
    the same on the round-7 default's fields)."""
    return replace(product_default(), protect_fraction=0.8)


def fitted(policy, keep_norms: bool = False, masses: bool = False, **changes) -> ProtectedClustering:
    """`policy()` (a harness ProtectedClustering) with its centroid values fitted by least squares
    (with keep_norms its centroid keys at their members' mean norm; with masses its centroid sizes
    fitted to their members' attention mass first)."""
    kind = MassFittedClustering if masses else FittedNormKeepingClustering if keep_norms else FittedValueClustering
    return replace(twin(policy(), kind), **changes)


METHODS = {
    "full": Full,
    # the paper-style policy and its ablations
    "paper": Clustering,
    "paper_nobias": lambda: Clustering(size_bias=0.0),
    "paper_halves": lambda: Clustering(partition="halves"),
    "paper_kv": lambda: Clustering(metric="keys+values"),
    "paper_r4": lambda: Clustering(num_merge=8),      # r = c/4 per pass, more passes
    "paper_c8": lambda: Clustering(chunk_size=8),
    "paper_c16": lambda: Clustering(chunk_size=16),
    "paper_c64": lambda: Clustering(chunk_size=64),
    "paper_c128": lambda: Clustering(chunk_size=128),
    # eviction baselines
    "streaming": StreamingLLM,
    "snapkv": SnapKV,
    "snapkv_p31": lambda: SnapKV(pool=31),            # wider neighbourhood: whole needle sentences
    "surprisal": lambda: SnapKV(info_share=1.0),      # query-agnostic: most surprising tokens (pool 31)
    "h2o": H2O,
    "knorm": KeyNorm,
    "random": Random,
    "absorb": AbsorbEvicted,                          # merge evicted into nearest survivor
    # product policy candidates
    "protected50": lambda: ProtectedClustering(protect_fraction=0.5),
    "protected90": lambda: ProtectedClustering(protect_fraction=0.9),
    "protected90_p31": lambda: ProtectedClustering(protect_fraction=0.9, pool=31),
    "protected90_s30": lambda: ProtectedClustering(protect_fraction=0.9, pool=31, info_share=0.3),
    "protected90_s50": lambda: ProtectedClustering(protect_fraction=0.9, pool=31, info_share=0.5),
    "protected90_p7s50": lambda: ProtectedClustering(protect_fraction=0.9, info_share=0.5),
    "protected90_p7s30": lambda: ProtectedClustering(protect_fraction=0.9, info_share=0.3),
    "protected90_p7s30i15": lambda: ProtectedClustering(protect_fraction=0.9, info_share=0.3, info_span=(7, 7)),
    "protected90_s30t25": round3_default,
    "protected90_s50t25": lambda: ProtectedClustering(protect_fraction=0.9, pool=31, info_share=0.5, taper=0.25),
    "protected90_s30w50": lambda: ProtectedClustering(protect_fraction=0.9, pool=31, info_share=0.3, wide_share=0.5,
                                                      taper=0.0),
    "default": product_default,                         # whatever CentroidKVCache uses by default
    "agnostic": product_query_agnostic,                 # ProtectedClustering.query_agnostic()
    "kvzip": Reconstruction,                            # query-agnostic: reconstruction attention
    "default_rec": lambda: round3_default(scores="reconstruction"),
    "kvzip_max": lambda: Reconstruction(pool=1, reduce="max"),  # KVzip's own ranking, no pooling
    "kvzip_max_p7": lambda: Reconstruction(reduce="max"),
    "default_recmax": lambda: round3_default(scores="reconstruction_max"),
    # merge rules (issue 16): the round-3 default's ranking, another centroid
    "default_normkeep": lambda: round3_default(NormKeepingClustering),
    # query-agnostic rankings (round 7): surprisal spread forward from its cue; runs of unpredictable
    # tokens (agnostic_run7 ranks as the preset since round 7; protected90_s100 as it did in round 6)
    "agnostic_cue": lambda: round7_agnostic(info_run=1, info_span=(0, 12)),
    "agnostic_run7": lambda: round7_agnostic(info_run=7, info_span=(10, 4)),
    "default_run7": lambda: round3_default(info_run=7, info_span=(10, 4)),
    "surprisal_run7": lambda: SnapKV(info_share=1.0, info_run=7, info_span=(10, 4)),
    # the window and runs of seven sharing the protected slots (round 7; default_s70_run7 = the default since)
    "default_s50_run7": lambda: round3_default(info_share=0.5, info_run=7, info_span=(10, 4)),
    "default_s70_run7": lambda: round3_default(info_share=0.7, info_run=7, info_span=(10, 4)),
    "agnostic_run7_p95": lambda: round7_agnostic(protect_fraction=0.95),
    "agnostic_run7_nobias": lambda: round7_agnostic(size_bias=0.0),  # log(size) off
    # a tempered size bias (round 8): attention adds size_bias * log(size)
    "agnostic_b50": lambda: round7_agnostic(size_bias=0.5),
    "agnostic_b25": lambda: round7_agnostic(size_bias=0.25),
    "default_b50": lambda: replace(product_default(), size_bias=0.5),
    "default_b25": lambda: replace(product_default(), size_bias=0.25),
    # the centroids' share of the round-7 default's budget, and merges per pass (round 9)
    "default_p80": lambda: round3_default(info_share=0.7, info_run=7, info_span=(10, 4), protect_fraction=0.8),
    "default_p70": lambda: round3_default(info_share=0.7, info_run=7, info_span=(10, 4), protect_fraction=0.7),
    "default_r4": lambda: round3_default(info_share=0.7, info_run=7, info_span=(10, 4), num_merge=4),
    # the window's share of the exact slots halved (round 9: window_coverage.py keeps more needles)
    "default_s85": lambda: round3_default(info_share=0.85, info_run=7, info_span=(10, 4)),
    # centroid values fitted by least squares to the context's own queries (round 10; fitted_values.py)
    "default_fit": lambda: fitted(product_default),
    "default_fit_r1": lambda: fitted(product_default, ridge=1.0),
    "default_fit_r01": lambda: fitted(product_default, ridge=0.01),
    "default_fit_num": lambda: fitted(product_default, match="numerator"),
    "default_fit_normkeep": lambda: fitted(product_default, keep_norms=True),
    "default_p80_fit": lambda: fitted(default_p80),
    # centroid sizes fitted to their members' attention mass, then values (round 11)
    "default_mass": lambda: fitted(product_default, masses=True, fit_values=False),
    "default_fitmass": lambda: fitted(product_default, masses=True),
    "default_p80_fitmass": lambda: fitted(default_p80, masses=True),
    "default_p80_fitmass_r01": lambda: fitted(default_p80, masses=True, mass_ridge=0.01),
    "default_p70_fitmass": lambda: fitted(lambda: replace(product_default(), protect_fraction=0.7), masses=True),
    # centroid keys and sizes fitted to their members' log-sum-exp, then values (round 11)
    "default_logit": lambda: fitted(product_default, masses=True, fit_keys=True, fit_values=False),
    "default_fitlogit": lambda: fitted(product_default, masses=True, fit_keys=True),
    "default_fitlogit_r1": lambda: fitted(product_default, masses=True, fit_keys=True, mass_ridge=1.0),
    "default_p80_fitlogit": lambda: fitted(default_p80, masses=True, fit_keys=True),
    "default_fitlogit_late": lambda: fitted(product_default, masses=True, fit_keys=True, keys_from_depth=1),
    # centroids only for the dullest unprotected tokens, the next-ranked evicted (round 12)
    "default_dull50": lambda: product_default(DullCentroids),
    "default_dull25": lambda: replace(product_default(DullCentroids), skip=0.25),
    "default_dull90": lambda: replace(product_default(DullCentroids), skip=0.9),
    # ablations of the ranking (ProtectedVariant): span-averaged surprisal, a recency share
    "protected90_s30a15": lambda: ProtectedVariant(protect_fraction=0.9, pool=31, info_share=0.3, info_smooth=15),
    "protected90_s30r20": lambda: ProtectedVariant(protect_fraction=0.9, pool=31, info_share=0.3, recent_share=0.2),
    "protected90_r20": lambda: ProtectedVariant(protect_fraction=0.9, recent_share=0.2),
    "protected90_s30w25": lambda: ProtectedClustering(protect_fraction=0.9, pool=31, info_share=0.3, wide_share=0.25,
                                                      taper=0.0),
    "protected90_s30w75": lambda: ProtectedClustering(protect_fraction=0.9, pool=31, info_share=0.3, wide_share=0.75,
                                                      taper=0.0),
    "protected90_s30w50t25": lambda: ProtectedClustering(protect_fraction=0.9, pool=31, info_share=0.3, wide_share=0.5,
                                                         taper=0.25),
    "protected90_w50": lambda: ProtectedClustering(protect_fraction=0.9, pool=31, wide_share=0.5, taper=0.0),
    "protected90_t25": lambda: ProtectedClustering(protect_fraction=0.9, pool=31, taper=0.25),  # window only
    "protected90_s100": lambda: ProtectedClustering(protect_fraction=0.9, pool=31, info_share=1.0),
    "protected90_nobias": lambda: ProtectedClustering(protect_fraction=0.9, size_bias=0.0),
    "absorb_p50": lambda: AbsorbEvicted(protect_fraction=0.5),
    "absorb_p90": lambda: AbsorbEvicted(protect_fraction=0.9),
}
MAIN_METHODS = ["full", "paper", "paper_r4", "streaming", "snapkv", "h2o", "knorm", "random",
                "absorb", "protected50", "protected90", "absorb_p50", "absorb_p90"]
ABLATIONS = ["paper_nobias", "paper_halves", "paper_kv", "paper_c8", "paper_c16", "paper_c64",
             "paper_c128", "protected90_nobias"]


CONTROL = "+evict"  # "<method>+evict": the method's eviction control (eviction_control)


@dataclass
class EvictionControl(Method):
    """A ranking method's tokens with the centroids' slots given to the next exact tokens: the
    top `budget` of its ranking kept exact, the rest dropped, nothing merged. (protect_fraction
    1.0 is not this: it keeps one slot for a centroid of every other token.)"""
    ranked: ProtectedClustering

    def compress(self, region):
        kept, _ = top_tokens(self.ranked.ranking(region, region.budget), region.budget)
        return _keep(region, kept)


def eviction_control(method: Method) -> Method:
    """What a clustering policy gains over this control at the same budget is its centroid
    dividend (report.py)."""
    if isinstance(method, ProtectedClustering):
        return EvictionControl(ranked=method, size_bias=method.size_bias)
    raise ValueError(f"centroidkv.eval: {type(method).__name__} has no eviction control at the same "
                     "ranking (ProtectedClustering and its variants have)")


def needs_reconstruction(method: Method) -> bool:
    """Whether the runner must record the reconstruction pass (an extra forward) for `method`."""
    if isinstance(method, EvictionControl):
        method = method.ranked
    return isinstance(method, Reconstruction) or (isinstance(method, ProtectedClustering)
                                                  and method.scores != "window")


def has_control(name: str) -> bool:
    return not name.endswith(CONTROL) and name in METHODS and isinstance(METHODS[name](), ProtectedClustering)


def make_method(name: str) -> Method:
    if name.endswith(CONTROL) and name[:-len(CONTROL)] in METHODS:
        return eviction_control(make_method(name[:-len(CONTROL)]))
    if name not in METHODS:
        raise ValueError(f"centroidkv.eval: unknown method {name!r}; known: {sorted(METHODS)}, "
                         f"each of the ProtectedClustering ones also with {CONTROL!r}")
    return METHODS[name]()
