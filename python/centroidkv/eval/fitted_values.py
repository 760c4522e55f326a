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
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..reference import EPS


MATCHES = ("output", "numerator")


def fit_centroid_values(queries: Tensor, keys: Tensor, values: Tensor, slot_keys: Tensor, slot_values: Tensor,
                        slot_sizes: Tensor, exact: int, size_bias: float = 1.0, ridge: float = 0.1,
                        match: str = "output") -> Tensor:
    """slot_values with the centroid rows (slots exact.., after the `exact` exact tokens) refitted.

    queries [1, Hq, N, D] (scaled, after rotary; Hq a multiple of H), keys / values [1, H, M, *]
    the uncompressed region, slot_* [1, H, B, *] its compressed slots. `ridge` scales the pull
    toward the mean values (relative to the mean diagonal of the normal equations). Logits are
    not soft-capped (neither SmolLM2 nor Gemma-3 caps attention logits)."""
    heads = keys.shape[1]
    if match not in MATCHES:
        raise ValueError(f"fit_centroid_values: match must be one of {MATCHES}, got {match!r}")
    if queries.shape[1] % heads:
        raise ValueError(f"fit_centroid_values: {queries.shape[1]} query heads do not group into {heads} KV heads")
    if slot_keys.shape[2] == exact or queries.shape[2] == 0:  # no centroid, or nothing to fit to
        return slot_values
    # every query head of a KV head's group probes it: [1, H, G * N, D]
    probes = queries.float().reshape(1, heads, -1, queries.shape[-1])
    full_logits = probes @ keys.float().transpose(-1, -2)
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
