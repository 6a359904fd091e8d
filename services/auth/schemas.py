from __future__ import annotations

import uuid
from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field


class TokenResponse(BaseModel):
    access_token: str
    token_type: str = "bearer"
    expires_in: int
    refresh_token: str
    scope: str


class RefreshRequest(BaseModel):
    refresh_token: str = Field(min_length=1, max_length=512)


class UserOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: uuid.UUID
    email: str
    role: str
    disabled: bool
    created_at: datetime | None = None


class MeOut(UserOut):
    scopes: list[str]


class UserCreate(BaseModel):
    email: str = Field(min_length=3, max_length=320)
    password: str = Field(min_length=1, max_length=1024)  # rules: passwords.py
    role: str = "viewer"


class RegisterRequest(BaseModel):
    email: str = Field(min_length=3, max_length=320)
    password: str = Field(min_length=1, max_length=1024)  # rules: passwords.py


class UserUpdate(BaseModel):
    role: str | None = None
    disabled: bool | None = None


class ApiKeyCreate(BaseModel):
    name: str = Field(min_length=1, max_length=200)
    role: str = "service"
    scopes: list[str] | None = None
    expires_in_s: int | None = Field(default=None, gt=0, le=10 * 365 * 86400)  # at most ten years
    rate_limit_rpm: int | None = Field(default=None, gt=0, le=2**31 - 1)
    # The user the key belongs to (default: the caller, or the owner of the calling key). The key
    # acts with at most that user's current rights, and is erased with them.
    owner_id: uuid.UUID | None = None


class ApiKeyOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: uuid.UUID
    prefix: str
    name: str
    role: str
    scopes: list[str]
    rate_limit_rpm: int | None
    owner_id: uuid.UUID | None
    created_at: datetime
    expires_at: datetime | None
    last_used_at: datetime | None
    revoked_at: datetime | None


class ApiKeyCreated(ApiKeyOut):
    key: str = Field(description="The API key itself. Shown this once; only its hash is stored.")


class IntrospectRequest(BaseModel):
    api_key: str = Field(max_length=512)


class RotateOut(BaseModel):
    kid: str


class SubjectLinkIn(BaseModel):
    entity: str = Field(min_length=1, max_length=63, pattern=r"^[a-z_][a-z0-9_]*$", examples=["customer"])
    entity_id: str = Field(min_length=1, max_length=200, examples=["C0042"])


class AuditEventIn(BaseModel):
    """An admin action of another service; `details` must carry no secrets or personal data."""

    service: str = Field(min_length=1, max_length=32)
    actor: str = Field(min_length=1, max_length=200)
    actor_role: str = Field(default="", max_length=32)
    action: str = Field(min_length=1, max_length=64)
    target: str = Field(default="", max_length=300)
    details: dict = Field(default_factory=dict)
