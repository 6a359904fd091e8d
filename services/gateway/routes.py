"""The gateway's route table, in one place: path, methods, upstream, required scope.

scope None: public (no credentials; rate-limited per client address); "": any authenticated caller.
Routes to paths an upstream does not implement yet still proxy: the upstream's 404 passes through.
"""
from __future__ import annotations

from dataclasses import dataclass

READ = ("GET", "HEAD")
WRITE = ("POST", "PUT", "PATCH", "DELETE")
ALL = READ + WRITE


@dataclass(frozen=True)
class Route:
    path: str
    methods: tuple[str, ...]
    upstream: str  # "orchestrator" | "features" | "auth" | "pipeline"
    scope: str | None
    count_tokens: bool = False  # input tokens per minute (embeddings)
    # Forward the caller's Authorization / X-API-Key (auth checks credentials itself); other
    # upstreams get the principal in X-Principal headers instead.
    forward_credentials: bool = False
    # Uploads stream through (up to GATEWAY_MAX_UPLOAD_BYTES) instead of being held in memory.
    stream_body: bool = False
    summary: str = ""


ROUTES: tuple[Route, ...] = (
    # prediction path
    Route("/v1/predict/{model}", ("POST",), "orchestrator", "predict", summary="Predict with a model"),
    Route("/v1/embeddings", ("POST",), "orchestrator", "predict", count_tokens=True, summary="Text embeddings"),
    Route("/v1/feedback", ("POST",), "orchestrator", "predict", summary="Ground-truth labels for predictions"),
    # feature store
    Route("/v1/features/online", ("GET", "POST"), "features", "features:read", summary="Online features"),
    Route("/v1/features/historical", ("POST",), "features", "features:read",
          summary="Point-in-time historical features"),
    Route("/v1/features/push", ("POST",), "features", "features:write", summary="Push feature values"),
    Route("/v1/features/{rest:path}", READ, "features", "features:read", summary="Feature registry (read)"),
    Route("/v1/features/{rest:path}", WRITE, "features", "features:write", summary="Feature registry (write)"),
    # jobs: the pipeline's control app serves the job API (docs/pipeline.md)
    Route("/v1/jobs/batch-inference", ("POST",), "pipeline", "jobs", stream_body=True,
          summary="Submit a batch inference job (file upload)"),
    Route("/v1/jobs", ALL, "pipeline", "jobs", summary="Jobs"),
    Route("/v1/jobs/{rest:path}", ALL, "pipeline", "jobs", summary="Jobs"),
    # auth: public login / refresh / logout and keys; the rest needs a principal
    Route("/v1/auth/token", ("POST",), "auth", None, forward_credentials=True, summary="Log in (OAuth2 password)"),
    Route("/v1/auth/refresh", ("POST",), "auth", None, forward_credentials=True, summary="Rotate a refresh token"),
    Route("/v1/auth/logout", ("POST",), "auth", None, forward_credentials=True, summary="Log out"),
    Route("/v1/auth/register", ("POST",), "auth", None, forward_credentials=True, summary="Self-registration"),
    Route("/v1/auth/me", ("GET",), "auth", "", forward_credentials=True, summary="The caller"),
    Route("/v1/auth/logout-all", ("POST",), "auth", "", forward_credentials=True,
          summary="Sign out everywhere (every session and access token)"),
    # privacy (docs/privacy.md): any authenticated caller, about their own data
    Route("/v1/me/export", ("GET",), "auth", "", forward_credentials=True,
          summary="Export everything stored about the caller"),
    Route("/v1/me", ("DELETE",), "auth", "", forward_credentials=True,
          summary="Erase the caller's account and data"),
    Route("/.well-known/jwks.json", ("GET",), "auth", None, summary="Token signing keys (JWKS)"),
    # admin: auth's admin API, everything else to the orchestrator
    Route("/admin/users/{user_id}/data", ("GET", "DELETE"), "auth", "admin", forward_credentials=True,
          summary="Export or erase a user's data (admin)"),
    Route("/admin/audit", READ, "auth", "admin", forward_credentials=True, summary="Audit log (admin)"),
    # the feature store's registry, apply, materialise, stats and PII key rotation (docs/features.md)
    Route("/admin/features/{rest:path}", ALL, "features", "admin", summary="Feature registry and materialisation (admin)"),
    Route("/admin/users", ALL, "auth", "admin", forward_credentials=True, summary="Users (admin)"),
    Route("/admin/users/{rest:path}", ALL, "auth", "admin", forward_credentials=True, summary="Users (admin)"),
    Route("/admin/api-keys", ALL, "auth", "admin", forward_credentials=True, summary="API keys (admin)"),
    Route("/admin/api-keys/{rest:path}", ALL, "auth", "admin", forward_credentials=True, summary="API keys (admin)"),
    Route("/admin/signing-keys/{rest:path}", ALL, "auth", "admin", forward_credentials=True,
          summary="Signing keys (admin)"),
    # model quality, drift and training: the pipeline (before the orchestrator's catch-all)
    Route("/admin/models/{model}/quality", READ, "pipeline", "admin", summary="Model quality per version (admin)"),
    Route("/admin/models/{model}/drift", READ, "pipeline", "admin", summary="Feature drift per version (admin)"),
    Route("/admin/models/{model}/train", ("POST",), "pipeline", "admin", summary="Queue a training run (admin)"),
    Route("/admin/models/{model}/training", READ, "pipeline", "admin", summary="Training runs (admin)"),
    Route("/admin/{rest:path}", ALL, "orchestrator", "admin", summary="Admin API of the orchestrator"),
)
