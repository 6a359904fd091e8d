"""Traffic policy per model: which version serves a request, what is mirrored, what is merged.

Pure logic, no I/O: the same principal always hashes to the same bucket, so an A/B split is
sticky without storing assignments, and every replica decides identically.
"""
from __future__ import annotations

import hashlib
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

BUCKETS = 10_000


class Shadow(BaseModel):
    """Mirror `percent` % of routed requests (sampled by request id) to `version` after answering.
    Requests answered from the cache are not mirrored unless `mirror_cached`."""

    model_config = ConfigDict(extra="forbid")
    version: str
    percent: float = Field(100.0, ge=0, le=100)
    mirror_cached: bool = False


class Ensemble(BaseModel):
    model_config = ConfigDict(extra="forbid")
    versions: list[str] = Field(min_length=2)
    method: Literal["mean", "vote"] = "mean"


class Policy(BaseModel):
    """`routes` maps version -> weight: A/B is {"1": 50, "2": 50}, a canary {"1": 95, "2": 5},
    blue/green {"2": 100}. Empty routes means the newest version the model server has."""

    model_config = ConfigDict(extra="forbid")

    routes: dict[str, float] = Field(default_factory=dict)
    shadow: Shadow | None = None
    ensemble: Ensemble | None = None
    fallback: str | None = None
    cache_ttl_s: int = Field(300, ge=0, description="0 disables the response cache for this model")
    timeout_s: float = Field(5.0, gt=0, le=120)

    @model_validator(mode="after")
    def _weights(self):
        if any(w < 0 for w in self.routes.values()):
            raise ValueError("route weights must be >= 0")
        if self.routes and sum(self.routes.values()) <= 0:
            raise ValueError("route weights must add up to more than 0")
        return self

    def versions(self) -> set[str]:
        """Every version this policy can send traffic to (validated against the model server)."""
        vs = set(self.routes)
        if self.shadow:
            vs.add(self.shadow.version)
        if self.ensemble:
            vs.update(self.ensemble.versions)
        if self.fallback:
            vs.add(self.fallback)
        return vs


def bucket(principal: str, model: str, salt: str = "") -> int:
    """Stable across processes and restarts (unlike Python's salted hash())."""
    digest = hashlib.sha256(f"{model}\x00{principal}\x00{salt}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % BUCKETS


def choose_version(policy: Policy, model: str, principal: str) -> str | None:
    """The routed version for this principal, or None to let the model server pick its newest."""
    live = [(v, w) for v, w in sorted(policy.routes.items()) if w > 0]
    if not live:
        return None
    total = sum(w for _, w in live)
    point = bucket(principal, model) / BUCKETS * total
    acc = 0.0
    for version, weight in live:
        acc += weight
        if point < acc:
            return version
    return live[-1][0]


def mirrors(policy: Policy, model: str, request_id: str) -> bool:
    """Whether this request is copied to the shadow version: a share of requests by request id (not
    by input, which would mirror a given input always or never)."""
    return bool(policy.shadow) and bucket(request_id, model, "shadow") < policy.shadow.percent / 100 * BUCKETS


def combine(method: str, per_version: list[list[dict]]) -> list[dict]:
    """Merge the rows of several versions: mean of probabilities, or majority vote on labels."""
    merged = []
    for rows in zip(*per_version):
        if method == "mean" and all("probability" in r for r in rows):
            probs = [sum(col) / len(rows) for col in zip(*(r["probability"] for r in rows))]
            merged.append({"label": max(range(len(probs)), key=probs.__getitem__), "probability": probs})
        else:
            votes: dict = {}
            for r in rows:
                votes[r["label"]] = votes.get(r["label"], 0) + 1
            # Ties go to the first version listed: deterministic, and documented.
            best = max(votes.values())
            merged.append({"label": next(r["label"] for r in rows if votes[r["label"]] == best),
                           "votes": {str(k): v for k, v in votes.items()}})
    return merged
