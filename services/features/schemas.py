"""Pydantic v2 models: registry specs (shared by the API, `aistack features apply` and the
service) and the request/response shapes of the public and admin endpoints."""
from __future__ import annotations

import math
import re
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

from services.chassis.limits import reject_non_finite

from .dtypes import MAX_TTL_SECONDS, check_text

NAME = r"^[a-z_][a-z0-9_]{0,62}$"
FeatureDtype = Literal["int", "float", "string", "bool"]
KeyDtype = Literal["string", "int"]
Status = Literal["present", "missing", "expired"]
_DURATION = re.compile(r"^\s*(\d+)\s*([smhdw]?)\s*$")
_UNIT = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
RESERVED = {"event_time", "created_time", "id", "_ts", "_v"}  # _ts/_v: online.META
# Free text that Postgres can store (no NUL, no lone surrogates); names have their own pattern.
Text = Annotated[str, AfterValidator(lambda v: check_text(v))]


def parse_duration(value: Any) -> int:
    """Seconds from 3600, "3600", "90s", "30m", "24h", "7d" or "2w"."""
    if isinstance(value, bool):
        raise ValueError("a duration is a number of seconds or a string like '24h'")  # noqa: TRY004 (pydantic)
    if isinstance(value, (int, float)):
        if not math.isfinite(value):
            raise ValueError("a duration must be finite")
        return int(value)
    match = _DURATION.match(str(value)[:40])
    if not match:
        raise ValueError(f"bad duration {str(value)[:40]!r}: use seconds or '30m', '24h', '7d'")
    return int(match.group(1)) * _UNIT[match.group(2)]


# -- registry specs ----------------------------------------------------------------------------
class EntitySpec(BaseModel):
    """A thing features describe, identified by its join key (e.g. customer / customer_id)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=NAME, examples=["customer"])
    join_key: str = Field(pattern=NAME, examples=["customer_id"])
    dtype: KeyDtype = "string"
    description: Text = Field(default="", max_length=2000)


class FeatureSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=NAME, examples=["txn_count_24h"])
    dtype: FeatureDtype = "float"
    description: Text = Field(default="", max_length=2000)
    pii: bool = Field(default=False, description=(
        "Personal data: values are encrypted at rest (offline and online stores) and never logged "
        "(docs/privacy.md)."))


class FeatureViewSpec(BaseModel):
    """A group of typed features of one entity, written and read together, with a TTL."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=NAME, examples=["customer_transactions"])
    entity: str = Field(pattern=NAME, examples=["customer"])
    features: list[FeatureSpec] = Field(min_length=1)
    ttl_seconds: int = Field(default=0, ge=0, le=MAX_TTL_SECONDS, description=(
        f"Values older than this read as expired; 0: never. At most {MAX_TTL_SECONDS} (50 years)."))
    description: Text = Field(default="", max_length=2000)
    owner: Text = Field(default="", max_length=200)
    tags: dict[Annotated[Text, Field(max_length=200)], Annotated[Text, Field(max_length=2000)]] = Field(
        default_factory=dict, max_length=64)

    @model_validator(mode="before")
    @classmethod
    def _ttl_alias(cls, data: Any) -> Any:
        # Declarative files may write `ttl: 7d`; the API stores seconds.
        if isinstance(data, dict) and "ttl" in data:
            data = dict(data)
            ttl = data.pop("ttl")
            if "ttl_seconds" in data:
                raise ValueError("give one of 'ttl' or 'ttl_seconds'")
            data["ttl_seconds"] = parse_duration(ttl)
        return data

    @field_validator("features")
    @classmethod
    def _unique(cls, features: list[FeatureSpec]) -> list[FeatureSpec]:
        names = [f.name for f in features]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"duplicate feature names: {', '.join(dupes)}")
        reserved = sorted(set(names) & RESERVED)
        if reserved:
            raise ValueError(f"reserved feature names: {', '.join(reserved)}")
        return features


class RegistryDoc(BaseModel):
    """The declarative file `aistack features apply` reads (YAML) and `POST /admin/features/apply` takes."""

    model_config = ConfigDict(extra="forbid")

    entities: list[EntitySpec] = Field(default_factory=list)
    feature_views: list[FeatureViewSpec] = Field(default_factory=list)


class Entity(EntitySpec):
    version: int
    created_at: datetime | None = None
    updated_at: datetime | None = None


class FeatureView(FeatureViewSpec):
    version: int
    created_at: datetime | None = None
    updated_at: datetime | None = None


class Change(BaseModel):
    kind: Literal["entity", "feature_view"]
    name: str
    action: Literal["created", "updated", "unchanged", "deleted"]
    version: int
    diff: dict[str, Any] = Field(default_factory=dict, description="field -> [old, new] for updates")


class ApplyRequest(RegistryDoc):
    dry_run: bool = False


class ApplyResponse(BaseModel):
    dry_run: bool
    changes: list[Change]


class HistoryEntry(BaseModel):
    kind: str
    name: str
    version: int
    action: str
    spec: dict[str, Any]
    changed_at: datetime


# -- online read -------------------------------------------------------------------------------
FEATURE_REF = ("Feature references: 'view:feature' (e.g. 'customer_transactions:txn_count_24h') or a "
               "bare view name for all of its features.")


class OnlineRequest(BaseModel):
    """Latest values for many entity ids across views, read from Redis in one pipelined round trip."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{
        "entity": "customer", "ids": ["C0001", "C0002"],
        "features": ["customer_transactions:txn_count_24h", "customer_transactions:avg_amount_30d"]}]})

    entity: str = Field(description="Entity name, e.g. 'customer'.")
    ids: list[str | int] = Field(min_length=1, description="Join-key values, e.g. customer ids.")
    features: list[str] = Field(min_length=1, description=FEATURE_REF)
    full_names: bool = Field(default=False, description=(
        "Key values by 'view:feature' instead of the bare feature name (required when two views "
        "share a feature name)."))


class EntityValues(BaseModel):
    id: str | int
    values: dict[str, Any] = Field(description="Feature -> value; null unless the status is 'present'.")
    statuses: dict[str, Status] = Field(description="Feature -> present | missing | expired.")
    event_times: dict[str, datetime | None] = Field(description="Feature -> event time of the stored value.")


class OnlineResponse(BaseModel):
    entity: str
    join_key: str
    features: list[str] = Field(description="The keys of values/statuses/event_times, in request order.")
    results: list[EntityValues] = Field(description="One per requested id, in request order.")


# -- push --------------------------------------------------------------------------------------
class PushRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{
        "view": "customer_transactions",
        "rows": [{"customer_id": "C0001", "event_time": "2025-01-01T12:00:00Z", "txn_count_24h": 3.0,
                  "txn_amount_24h": 182.4, "avg_amount_30d": 61.2, "account_age_days": 412.0,
                  "chargebacks_90d": 0.0, "distinct_merchants_7d": 4.0}]}]})

    view: str
    rows: list[dict[str, Any]] = Field(min_length=1, description=(
        "Each row: the entity's join key, `event_time` (ISO 8601 or epoch seconds; default now) "
        "and every feature of the view, typed as the registry says (null allowed; no NaN or infinity)."))
    to: Literal["online_and_offline", "online", "offline"] = "online_and_offline"

    @field_validator("rows")
    @classmethod
    def _finite(cls, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return reject_non_finite(rows, "rows")


class PushResponse(BaseModel):
    view: str
    rows: int
    offline_written: int
    online_written: int
    online_unchanged: int = Field(default=0, description=(
        "Rows whose values were already stored online for their event time (nothing to write)."))
    online_skipped_older: int = Field(description=(
        "Rows not written online because a newer event (or, at the same event time, a row committed "
        "later) is stored."))


# -- historical --------------------------------------------------------------------------------
class EntityRow(BaseModel):
    id: str | int
    timestamp: datetime = Field(description="Values are as of this instant: event time <= timestamp.")


class HistoricalRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{
        "entity": "customer", "features": ["customer_transactions"],
        "rows": [{"id": "C0001", "timestamp": "2025-01-01T12:00:00Z"}]}]})

    entity: str
    features: list[str] = Field(min_length=1, description=FEATURE_REF)
    rows: list[EntityRow] = Field(min_length=1)
    full_names: bool = False


class HistoricalRow(EntityValues):
    timestamp: datetime


class HistoricalResponse(BaseModel):
    entity: str
    join_key: str
    features: list[str]
    rows: list[HistoricalRow] = Field(description="One per entity row, in request order.")


# -- materialisation and stats -----------------------------------------------------------------
class MaterializeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    views: list[str] | None = Field(default=None, description="Default: every view.")
    start: datetime | None = Field(default=None, description=(
        "Window start (event time, inclusive). Give start and/or end for an explicit window; "
        "give neither for an incremental run from where the last one stopped."))
    end: datetime | None = Field(default=None, description="Window end (exclusive); default now.")


class MaterializeResult(BaseModel):
    view: str
    incremental: bool
    start: datetime | None
    end: datetime
    entities: int = Field(description="Entities whose latest value in the window was copied.")
    written: int = Field(description="Online values written.")
    unchanged: int = Field(default=0, description="Entities whose stored online value was already this one.")
    invalid: int = Field(default=0, description=(
        "Offline rows that cannot be stored online (written before today's type bounds); skipped, logged."))
    error: str | None = Field(default=None, description="Why this view failed; the other views still ran.")


class MaterializeResponse(BaseModel):
    results: list[MaterializeResult]


class ViewStats(BaseModel):
    view: str
    version: int
    ttl_seconds: int
    offline_rows: int
    offline_newest_event_time: datetime | None
    online_newest_event_time: datetime | None
    freshness_seconds: float | None = Field(description="Age of the newest online value.")
    materialized_to: datetime | None
    last_materialization: dict[str, Any] | None


class StatsResponse(BaseModel):
    views: list[ViewStats]
    online_reads: dict[str, float] = Field(description="Counts of values served by status since start.")
