"""Centroid values fitted by least squares to what the context's own queries read (a merge-rule
candidate for issue 16's centroid dividend, evaluation only; in the spirit of output-preserving
merges such as KeepKV and least-squares ones such as GRKV).

SPEC.md's centroid value is its members' size-weighted mean. Here the keys, sizes and exact
tokens stay as the policy chose them; only the centroids' values change, to the ridge
least-squares solution that makes the compressed region give, for each probe query, the output
the full region gives (its attention-weighted mean value, normalised over the region's own
slots), with the mean values as the ridge's prior. The probes are the context's own queries after
the region (its exact tail: they see all of the region, as later queries will), so the fit knows
no question. match="numerator" (an ablation) fits the unnormalised numerator (sum_i exp(q.k_i) v_i,
relative to the full region's mass) instead: where a centroid's logit undercounts its members'
mass it inflates the values to make up for it, and prose KL rose 2.3x (round 10).

fit_centroid_masses (round 11) fixes that undercount where it arises, in the sizes: a mean key's
logit is below its members' log-mean-exp, so a centroid draws less attention than its members
did. Each centroid's size becomes the effective size whose logit bias gives the probes its
members' attention mass (in the spirit of attention-matching compaction's fitted biases).
fit_centroid_logits fits the key along with the size, to the members' log-sum-exp; it is what
makes fitted centroids pay on prose (round 11).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..reference import EPS


MATCHES = ("output", "numerator")


def probe_queries(queries: Tensor, heads: int) -> Tensor:
    """[1, Hq, N, D] queries -> [1, H, G * N, D]: every query head of a KV head's group probes it."""
    if queries.shape[1] % heads:
        raise ValueError(f"centroidkv.eval: {queries.shape[1]} query heads do not group into {heads} KV heads")
    return queries.float().reshape(1, heads, -1, queries.shape[-1])


def probe_logits(probes: Tensor, keys: Tensor) -> Tensor:
    """[1, H, P, M] logits of the probes (probe_queries) against the region's keys [1, H, M, D]."""
    return probes @ keys.float().transpose(-1, -2)


def member_masses(logits: Tensor) -> tuple[Tensor, Tensor]:
    """Each token's attention mass for each probe, [1, H, M, P], from the probe logits [1, H, P, M],
    relative to the probe's largest logit over the region (returned, [1, H, P, 1], so that
    centroids are measured on the same scale). Carried through the merges as extra value
    channels, a centroid's mean times its size is its members' total mass."""
    shift = logits.amax(-1, keepdim=True)
    return (logits - shift).exp().transpose(-1, -2), shift


def fit_centroid_masses(probes: Tensor, shift: Tensor, centroid_keys: Tensor, centroid_sizes: Tensor,
                        mean_masses: Tensor, size_bias: float = 1.0, ridge: float = 0.1) -> Tensor:
    """Effective sizes [1, H, C] for centroids [1, H, C, D] whose members had these mean masses
    [1, H, C, P] per probe (member_masses, merged): each centroid's weight w = size ** size_bias
    is the least-squares fit of w * exp(q.k - shift) to its members' total mass over the probes,
    pulled toward size ** size_bias by `ridge` (relative to the centroids' mean normal equation,
    as in fit_centroid_values), so a centroid the probes hardly see keeps its size."""
    if size_bias <= 0:
        raise ValueError(f"fit_centroid_masses: size_bias must be > 0 (a weight to fit), got {size_bias}")
    own = (centroid_keys.float() @ probes.transpose(-1, -2) - shift.transpose(-1, -2)).exp()  # [1, H, C, P]
    target = mean_masses.float() * centroid_sizes.float()[..., None]
    prior = centroid_sizes.float() ** size_bias
    normal = (own * own).sum(-1)
    lam = ridge * normal.mean(-1, keepdim=True) + EPS
    weight = ((own * target).sum(-1) + lam * prior) / (normal + lam)
    return weight.clamp_min(EPS) ** (1.0 / size_bias)


def fit_centroid_logits(probes: Tensor, shift: Tensor, centroid_keys: Tensor, centroid_sizes: Tensor,
                        mean_masses: Tensor, region_masses: Tensor, size_bias: float = 1.0,
                        ridge: float = 0.1) -> tuple[Tensor, Tensor]:
    """Keys [1, H, C, D] and effective sizes [1, H, C] fitted together so that each centroid's
    logit q.k + size_bias * log(size) follows its members' log-sum-exp over the probes: a weighted
    least-squares line in q, each probe weighted by the share of its attention (region_masses
    [1, H, P], member_masses summed over the region) those members drew, pulled toward the mean
    key and log size by `ridge` (relative to the centroids' mean normal equation). A mean key
    gets the direction right but undercounts the mass, and more so for the probes that see its
    members most spread; this fits both."""
    if size_bias <= 0:
        raise ValueError(f"fit_centroid_logits: size_bias must be > 0 (a bias to fit), got {size_bias}")
    mass = mean_masses.float() * centroid_sizes.float()[..., None]              # [1, H, C, P]
    target = mass.clamp_min(torch.finfo(torch.float32).tiny).log() + shift.transpose(-1, -2)
    share = mass / region_masses.float()[..., None, :].clamp_min(EPS)
    design = torch.cat([probes, torch.ones_like(probes[..., :1])], -1)[:, :, None]  # [1, H, 1, P, D + 1]
    weighted = share[..., None] * design
    gram = weighted.transpose(-1, -2) @ design                                  # [1, H, C, D + 1, D + 1]
    rhs = (weighted * target[..., None]).sum(-2)
    prior = torch.cat([centroid_keys.float(), size_bias * centroid_sizes.float().log()[..., None]], -1)
    lam = ridge * gram.diagonal(dim1=-2, dim2=-1).mean((-1, -2))[..., None, None, None] + EPS
    eye = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
    fitted = torch.cholesky_solve((rhs + lam[..., 0] * prior)[..., None], torch.linalg.cholesky(gram + lam * eye))[..., 0]
    return fitted[..., :-1].to(centroid_keys.dtype), (fitted[..., -1] / size_bias).exp()


def fit_centroid_values(queries: Tensor, keys: Tensor, values: Tensor, slot_keys: Tensor, slot_values: Tensor,
                        slot_sizes: Tensor, exact: int, size_bias: float = 1.0, ridge: float = 0.1,
                        match: str = "output", full_logits: Optional[Tensor] = None) -> Tensor:
    """slot_values with the centroid rows (slots exact.., after the `exact` exact tokens) refitted.

    queries [1, Hq, N, D] (scaled, after rotary; Hq a multiple of H), keys / values [1, H, M, *]
    the uncompressed region, slot_* [1, H, B, *] its compressed slots. `ridge` scales the pull
    toward the mean values (relative to the mean diagonal of the normal equations). Logits are
    not soft-capped (neither SmolLM2 nor Gemma-3 caps attention logits). full_logits: the region's
    probe_logits, where the caller has them already."""
    heads = keys.shape[1]
    if match not in MATCHES:
        raise ValueError(f"fit_centroid_values: match must be one of {MATCHES}, got {match!r}")
    probes = probe_queries(queries, heads)
    if slot_keys.shape[2] == exact or queries.shape[2] == 0:  # no centroid, or nothing to fit to
        return slot_values
    if full_logits is None:
        full_logits = probe_logits(probes, keys)
    target = torch.softmax(full_logits, -1) @ values.float()
    slot_logits = probes @ slot_keys.float().transpose(-1, -2) + size_bias * slot_sizes.float().log()[:, :, None]
    if match == "output":
        weights = torch.softmax(slot_logits, -1)             # [1, H, G * N, B]
    else:  # relative to the full region's mass
        weights = (slot_logits - torch.logsumexp(full_logits, -1, keepdim=True)).exp()
    exact_weights, centroid_weights = weights[..., :exact], weights[..., exact:]
    residual = target - exact_weights @ slot_values[..., :exact, :].float()
    prior = slot_values[..., exact:, :].float()
    gram = centroid_weights.transpose(-1, -2) @ centroid_weights
    lam = ridge * gram.diagonal(dim1=-2, dim2=-1).mean(-1)[..., None, None] + EPS
    eye = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
    # gram + lam I is symmetric positive definite: Cholesky (torch.linalg.solve's batched LU fails
    # inside MKL from about 192 centroids with the CPU build of torch 2.13)
    factor = torch.linalg.cholesky(gram + lam * eye)
    fitted = torch.cholesky_solve(centroid_weights.transpose(-1, -2) @ residual + lam * prior, factor)
    return torch.cat([slot_values[..., :exact, :], fitted.to(slot_values.dtype)], 2)
