"""HTTP client of the feature store for other services (the pipeline's training, the orchestrator).

Other services never read the `features` schema; they call these endpoints.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import httpx


def get_historical_features(base_url: str, entity: str, entity_rows: Any, features: Sequence[str], *,
                            id_column: str = "id", timestamp_column: str = "timestamp", chunk: int = 10_000,
                            timeout: float = 120.0, full_names: bool = False):
    """Point-in-time correct training data: `entity_rows` (a DataFrame or a list of dicts with
    id and timestamp columns) joined with `features` as of each row's timestamp.

    Returns a pandas DataFrame: the entity rows' columns plus one column per feature (null where
    the status is missing or expired). Large frames go in chunks.
    """
    import pandas as pd

    frame = entity_rows if isinstance(entity_rows, pd.DataFrame) else pd.DataFrame(list(entity_rows))
    frame = frame.reset_index(drop=True)
    stamps = pd.to_datetime(frame[timestamp_column], utc=True)
    payload_rows = [{"id": _plain(i), "timestamp": t.isoformat()} for i, t in zip(frame[id_column], stamps)]
    out: list[dict] = []
    names: list[str] = []
    with httpx.Client(base_url=base_url, timeout=timeout) as http:
        for start in range(0, len(payload_rows), chunk):
            body = {"entity": entity, "features": list(features), "full_names": full_names,
                    "rows": payload_rows[start:start + chunk]}
            response = http.post("/v1/features/historical", json=body)
            response.raise_for_status()
            data = response.json()
            names = data["features"]
            out.extend(r["values"] for r in data["rows"])
    values = pd.DataFrame(out, columns=names) if out else pd.DataFrame(columns=names)
    return pd.concat([frame, values], axis=1)


def _plain(value: Any) -> Any:
    item = getattr(value, "item", None)
    return item() if item is not None and not isinstance(value, str) else value
