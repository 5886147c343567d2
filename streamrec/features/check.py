"""Online-offline consistency of the feature store (``streamrec features check``)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from streamrec.features import offline
from streamrec.features.defaults import normalize_value
from streamrec.features.spec import VIEWS, schema_report

if TYPE_CHECKING:
    from streamrec.features.client import FeatureClient


@dataclass
class CheckReport:
    """Online-offline consistency and the definition schema report.

    ``checked`` counts entity rows compared (per view, plus item-table rows); ``mismatches``
    counts those with at least one differing value. ``ok`` is false on any mismatch or
    schema problem, when the store reads as never materialized, or when nothing was
    compared although the offline store has rows.
    """

    checked: int
    mismatches: int
    mismatched_values: int
    per_view: dict[str, dict[str, int]]
    details: list[dict[str, Any]]
    schema: dict[str, list[str]]
    online_store: str
    ok: bool = field(default=True)
    #: Why nothing was verified: the store reads as never materialized (:func:`never_materialized`;
    #: nothing compared), or nothing was compared although offline rows exist.
    unverified: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for JSON output."""
        return asdict(self)


def check_store(
    client: FeatureClient, sample: int = 100, seed: int = 0, *, max_details: int = 20
) -> CheckReport:
    """Compare online values with the offline store for a sample of entities.

    For each view, samples up to ``sample`` entities among the newest offline rows (up to
    the view's materialization end, plus pushed / training rows), reads them through Feast's
    ``get_online_features`` and compares every value (floats to 1e-5 relative). Also
    compares the item table with the online item features, and adds the definition
    :func:`~streamrec.features.spec.schema_report`.

    A store this data directory never materialized into (:func:`never_materialized`) is not
    compared (against another store's end, or Feast's registry end, every row would differ):
    the report fails with that reason in ``unverified``.

    Returns:
        The report; ``ok`` is false on any mismatch or schema problem, when the store was never
        materialized, or when no row was compared although the offline store has rows (nothing
        materialized: nothing verified).

    Raises:
        OnlineStoreUnavailableError: the online store cannot be reached.
        FeatureStoreError: definitions not applied.
    """
    fvs = client._require_applied(refresh=True)
    never = never_materialized(client, fvs)
    if never is not None:  # compared against another store's end, every row would differ
        return CheckReport(
            checked=0,
            mismatches=0,
            mismatched_values=0,
            per_view={v.name: {"checked": 0, "mismatches": 0} for v in VIEWS},
            details=[],
            schema=schema_report(),
            online_store=client.settings.describe(),
            ok=False,
            unverified=never,
        )
    rng = np.random.default_rng(seed)
    per_view: dict[str, dict[str, int]] = {}
    details: list[dict[str, Any]] = []
    checked = mismatches = values = 0
    for v in VIEWS:
        end = client.materialized_until(v.name, fvs)
        latest = offline.read_latest(client.features_dir, v, end).to_pandas()
        if latest.empty:
            per_view[v.name] = {"checked": 0, "mismatches": 0}
            continue
        ids = latest[v.join_key].to_numpy()
        pick = np.sort(rng.choice(ids, size=min(sample, len(ids)), replace=False))
        expected = latest.set_index(v.join_key).loc[pick]
        refs = [f"{v.name}:{f}" for f in v.feature_names]
        with client._online_guard("check"):
            got = client.store.get_online_features(
                features=refs, entity_rows=[{v.join_key: int(i)} for i in pick]
            ).to_dict()
        bad_rows = 0
        for r, eid in enumerate(pick):
            row_bad = False
            for f in v.feature_names:
                a, b = normalize_value(f, got[f][r]), normalize_value(f, expected.at[eid, f])
                if not _same(a, b):
                    row_bad = True
                    values += 1
                    if len(details) < max_details:
                        details.append(_detail(v.name, eid, f, a, b))
            bad_rows += row_bad
        per_view[v.name] = {"checked": len(pick), "mismatches": bad_rows}
        checked += len(pick)
        mismatches += bad_rows
    # The in-memory item table against Feast's online answer.
    table = client.item_table(refresh=True)
    if len(table):
        pick = np.sort(rng.choice(table.item_ids, size=min(sample, len(table)), replace=False))
        online = client.online_features("item", pick.tolist())
        bad_rows = 0
        for r, iid in enumerate(pick):
            row = table.row(int(iid)) or {}
            row_bad = False
            for f in row:
                a = normalize_value(f, online.at[r, f])
                if not _same(a, normalize_value(f, row[f])):
                    row_bad = True
                    values += 1
                    if len(details) < max_details:
                        details.append(_detail("item_table", iid, f, a, row[f]))
            bad_rows += row_bad
        per_view["item_table"] = {"checked": len(pick), "mismatches": bad_rows}
        checked += len(pick)
        mismatches += bad_rows
    schema = schema_report()
    # Nothing compared while there are offline rows: nothing was verified (never materialized).
    unverified = checked == 0 and any(offline.time_range(client.features_dir, v) for v in VIEWS)
    ok = mismatches == 0 and not any(schema.values()) and not unverified
    return CheckReport(
        checked=checked,
        mismatches=mismatches,
        mismatched_values=values,
        per_view=per_view,
        details=details,
        schema=schema,
        online_store=client.settings.describe(),
        ok=ok,
        unverified=(
            "nothing compared: no offline rows up to this store's materialized end "
            "(run `streamrec features materialize`)"
            if unverified
            else None
        ),
    )


def never_materialized(client: FeatureClient, fvs: dict[str, Any]) -> str | None:
    """Why the client's online store reads as never materialized, or None.

    Never materialized: ``meta.json`` records no end for this store (``online_ends``; a data
    directory from before those cannot tell) while another store has one, and this store
    holds no versioned view (SQLite: empty tables; Redis: no marker key). Only then would the
    check read the offline rows up to another store's end and list every row as a mismatch;
    with no end recorded for any store it compares against Feast's registry end, or compares
    nothing and fails as such. Another spelling of a materialized Redis URL, which has no end
    of its own but holds the markers, is checked against the newest recorded end. A Redis
    filled only by plain ``feast materialize`` holds rows but no marker and no end of its own:
    next to a store with one it reads as never materialized (``streamrec features
    materialize`` loads every view from its earliest row and sets the markers).
    """
    from streamrec.features.materialize import Materializer

    ends = client._meta().get("online_ends")
    here = client.settings.describe()
    if ends is None or ends.get(here):
        return None
    others = sorted(s for s, e in ends.items() if e and s != here)
    if not others:  # no other store's end to read the offline rows up to
        return None
    materializer = Materializer(client.store, client.settings, client.features_dir, client._online_guard)
    if not all(materializer.view_empty(fvs[v.name]) for v in VIEWS if v.versioned and v.name in fvs):
        return None
    return (
        f"online store {here} was never materialized: nothing compared"
        f" (materialized: {', '.join(others)}); run `streamrec features materialize` with this online store"
    )


def _same(a: Any, b: Any) -> bool:
    if a is None or b is None:
        return a is None and b is None
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        x, y = np.asarray(a), np.asarray(b)
        if x.shape != y.shape:
            return False
        if x.dtype.kind == "f" or y.dtype.kind == "f":
            return bool(np.allclose(x.astype(np.float64), y.astype(np.float64), rtol=1e-5, atol=1e-6))
        return bool((x == y).all())
    if isinstance(a, float) or isinstance(b, float):
        return math.isclose(float(a), float(b), rel_tol=1e-5, abs_tol=1e-6)
    return bool(a == b)


def _detail(view: str, entity: Any, feature: str, online: Any, offline_value: Any) -> dict[str, Any]:
    return {
        "view": view,
        "entity": int(entity),
        "feature": feature,
        "online": _jsonable(online),
        "offline": _jsonable(offline_value),
    }


def _jsonable(v: Any) -> Any:
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, np.generic):
        return v.item()
    return v
