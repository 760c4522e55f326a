"""Policies: what happens to the tokens that leave a CentroidKVCache's recent window.

One file per job: base.py (the contract: Segment, Policy; how to write a policy), plain.py (the
paper's PlainClustering), protected.py (ProtectedClustering, the default, and
AbsorbIntoSurvivors), protection.py (their tensor work: which tokens stay exact), and
cluster_budget.py (clustering to an exact slot budget). Imports go one way, from the policies
down to the tensor work, so any of them can be imported first.
"""
from __future__ import annotations

from .base import Policy, Segment
from .plain import PlainClustering
from .protected import AbsorbIntoSurvivors, ProtectedClustering


def validate_policy(policy) -> Policy:
    """The policy a cache uses: the given one, or the default chosen by the evaluation
    (results/eval/README.md): ProtectedClustering, which keeps the tokens an observation window
    attends to exact and clusters the rest. PlainClustering() is the paper's policy."""
    if policy is None:
        return ProtectedClustering()
    if not isinstance(policy, Policy):
        raise TypeError(f"policy must be a centroidkv.policies.Policy, got {type(policy).__name__}")
    return policy


__all__ = ["AbsorbIntoSurvivors", "Policy", "PlainClustering", "ProtectedClustering", "Segment", "validate_policy"]
