"""Versioned views with real Feast and real online stores (SQLite, Redis).

The scenario that withdrew the first attempt (c2a9afd): an edit is built and materialized, the
edit is reverted, a build at an earlier cutoff is followed by a rebuild of the same later
cutoff, and the online store must end on the table's current value. Also: an unchanged item has
no row in a later materialization window and keeps its online value; an online store that was
never materialized into gets every entity; Feast's point-in-time join keeps a row older than
any finite TTL; and Feast's Redis store skipping an equal timestamp, which the client works
around, is pinned.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import pandas as pd
import pytest

from streamrec.data.store import DataStore
from streamrec.data.synth import SynthConfig, synthesize
from streamrec.features import offline
from streamrec.features.client import FeatureClient
from streamrec.features.spec import VIEWS_BY_NAME

pytestmark = [pytest.mark.integration, pytest.mark.filterwarnings("ignore::FutureWarning")]


def _world(tmp_path: Path) -> tuple[Path, pd.Timestamp]:
    d = tmp_path / "data"
    synthesize(SynthConfig(users=30, items=20, days=6, seed=8), d, progress=False)
    end = DataStore(d).events()["timestamp"].max().ceil("h")
    return d, end


def _set_categories(d: Path, item: int, cats: list[str]) -> None:
    ds = DataStore(d)
    items = ds.items()
    items.at[items.index[items["item_id"] == item][0], "categories"] = cats
    ds.upsert_items(items)


def _online_categories(fc: FeatureClient, ids: list[int]) -> list[list[str]]:
    got = fc.online_features("item", ids, defaults=False)
    return [list(c) if c is not None else [] for c in got["categories"]]


def _client(d: Path, backend: str, redis_url_factory: Callable[[], str] | None) -> FeatureClient:
    if backend == "redis":
        assert redis_url_factory is not None
        return FeatureClient(d, online="redis", redis_url=redis_url_factory())
    return FeatureClient(d, online="sqlite")


@pytest.mark.parametrize("backend", ["sqlite", "redis"])
def test_a_reverted_edit_rebuilt_at_the_same_cutoff_reaches_the_online_store(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    d, end = _world(tmp_path)
    factory = request.getfixturevalue("redis_url_factory") if backend == "redis" else None
    fc = _client(d, backend, factory)
    item = int(DataStore(d).items()["item_id"].iloc[0])
    original = list(DataStore(d).items()["categories"].iloc[0])
    t1, t2 = end - pd.Timedelta(days=2), end
    stop: datetime = (end + pd.Timedelta(hours=1)).to_pydatetime()

    fc.build(cutoffs=[t2])
    fc.apply()
    fc.materialize(stop)
    assert _online_categories(fc, [item]) == [original]
    _set_categories(d, item, ["opera"])  # the edit, built at the same cutoff and materialized
    fc.build(cutoffs=[t2])
    fc.materialize(stop)
    assert _online_categories(fc, [item]) == [["opera"]]

    _set_categories(d, item, original)  # reverted
    report = fc.build(cutoffs=[t1])  # an earlier cutoff: t2 keeps its own (edited) value
    assert report.rewritten["item_metadata"] == [t2.isoformat()]
    fc.build(cutoffs=[t2])  # the same cutoff again: the reverted value, dated t2 as online
    mat = fc.materialize(stop)
    assert mat.views["item_metadata"]["start"] == t1.isoformat()
    assert _online_categories(fc, [item]) == [original]  # the table's current value
    checked = fc.check(sample=20)
    for view in ("item_metadata", "user_profile", "item_table"):
        assert checked.per_view[view]["mismatches"] == 0, checked.details[:3]
    # The full-snapshot views rebuilt at t2 with another category vocabulary: SQLite upserts them;
    # Feast's Redis store skips a row dated as the one it holds, so there the streaming
    # category_prefs keep the first build's vector until a later cutoff (as before versions).
    stale = {v: c["mismatches"] for v, c in checked.per_view.items() if c["mismatches"]}
    assert stale == (
        {} if backend == "sqlite" else {"user_category_prefs": stale.get("user_category_prefs")}
    ), stale


@pytest.mark.parametrize("backend", ["sqlite", "redis"])
def test_an_unchanged_item_keeps_its_online_value_and_a_new_store_gets_every_item(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    d, end = _world(tmp_path)
    factory = request.getfixturevalue("redis_url_factory") if backend == "redis" else None
    fc = _client(d, backend, factory)
    items = DataStore(d).items()
    ids = items["item_id"].astype(int).tolist()
    before = [list(c) for c in items["categories"]]
    fc.build(cutoffs=[end - pd.Timedelta(days=3)])
    fc.apply()
    first = fc.materialize((end - pd.Timedelta(days=2)).to_pydatetime())
    assert first.views["item_metadata"]["rows"] == len(ids)

    _set_categories(d, ids[1], ["news"])  # one edit, built a year later
    later = end + pd.Timedelta(days=400)
    assert fc.build(cutoffs=[later]).rows["item_metadata"] == 1
    mat = fc.materialize((later + pd.Timedelta(hours=1)).to_pydatetime())
    assert mat.views["item_metadata"]["rows"] == 1  # the unchanged items have no row in the window
    assert _online_categories(fc, ids) == [before[0], ["news"], *before[2:]]  # the others kept
    assert fc.check(sample=30).mismatches == 0

    # point-in-time joins keep the unchanged items' 400-day-old rows (no TTL)
    rows = pd.DataFrame({"user_id": 1, "item_id": ids, "timestamp": later + pd.Timedelta(days=1), "label": 0})
    joined = fc.training_set(rows)
    assert [list(c) for c in joined["categories"]] == [before[0], ["news"], *before[2:]]

    # an online store never materialized into (here Redis / SQLite beside the used one) gets all
    other = FeatureClient(d, online="sqlite") if backend == "redis" else None
    if other is None:
        other = FeatureClient(d, online="redis", redis_url=request.getfixturevalue("redis_url_factory")())
    other.apply()
    fresh = other.materialize((later + pd.Timedelta(hours=1)).to_pydatetime())
    assert fresh.views["item_metadata"]["rows"] == len(ids)
    assert _online_categories(other, ids) == [before[0], ["news"], *before[2:]]

    # ... and so does the first store once emptied (its SQLite file removed, its Redis db flushed)
    if backend == "sqlite":
        (d / "features" / "online_store.db").unlink()
        fc = FeatureClient(d, online="sqlite")
        fc.apply()
    else:
        fc.store._get_provider().online_store._get_client(fc.store.config.online_store).flushdb()
    refilled = fc.materialize((later + pd.Timedelta(hours=2)).to_pydatetime())
    assert refilled.views["item_metadata"].get("rows") == len(ids), refilled.views["item_metadata"]
    assert _online_categories(fc, ids) == [before[0], ["news"], *before[2:]]


def test_feasts_redis_store_skips_a_row_dated_as_the_one_it_holds(
    tmp_path: Path, redis_url_factory: Callable[[], str]
) -> None:
    """What the client works around (``Materializer.forget_times``), pinned on Feast 0.67."""
    d, end = _world(tmp_path)
    fc = FeatureClient(d, online="redis", redis_url=redis_url_factory())
    fc.build(cutoffs=[end])
    fc.apply()
    fc.materialize((end + pd.Timedelta(hours=1)).to_pydatetime())
    item = int(DataStore(d).items()["item_id"].iloc[0])
    row = {
        "item_id": item,
        "primary_category": "opera",
        "categories": ["opera"],
        "creator": "x",
        "published_at": 0,
        "promoted": False,
        "flagged": False,
        "event_timestamp": end,
        "created_timestamp": pd.Timestamp.now(tz="UTC"),
    }
    view = VIEWS_BY_NAME["item_metadata"]
    fc._write_online(view, [row])  # the same event time as the materialized row: skipped
    assert _online_categories(fc, [item])[0] != ["opera"]
    fc._write_online(view, [{**row, "event_timestamp": end + pd.Timedelta(microseconds=1)}])
    assert _online_categories(fc, [item]) == [["opera"]]


def test_each_online_store_has_its_own_materialization_window(
    tmp_path: Path, redis_url_factory: Callable[[], str]
) -> None:
    """SQLite materializing an edit first leaves it pending for Redis (one registry, two stores)."""
    d, end = _world(tmp_path)
    item = int(DataStore(d).items()["item_id"].iloc[0])
    h = pd.Timedelta(hours=1)
    sq = FeatureClient(d, online="sqlite")
    rd = FeatureClient(d, online="redis", redis_url=redis_url_factory())
    sq.build(cutoffs=[end])
    sq.apply()
    sq.materialize((end + h).to_pydatetime())
    rd.materialize((end + h).to_pydatetime())
    _set_categories(d, item, ["opera"])
    sq.build(cutoffs=[end + 2 * h])
    sq.materialize((end + 3 * h).to_pydatetime())  # Feast's registry end moves to end + 3h
    mat = rd.materialize((end + 4 * h).to_pydatetime())
    assert mat.views["item_metadata"]["start"] == (end + h).isoformat()  # Redis's own end
    assert _online_categories(rd, [item]) == _online_categories(sq, [item]) == [["opera"]]
    assert rd.materialized_until("item_metadata") == end + 4 * h
    assert sq.materialized_until("item_metadata") == end + 3 * h
    assert rd.check(sample=20).per_view["item_metadata"]["mismatches"] == 0
    # a rebuilt earlier cutoff is pending for each store until that store materializes it
    _set_categories(d, item, ["news"])
    sq.build(cutoffs=[end + 2 * h])
    assert (
        sq.materialize((end + 5 * h).to_pydatetime()).views["item_metadata"]["start"]
        == (end + 2 * h).isoformat()
    )
    assert (
        rd.materialize((end + 5 * h).to_pydatetime()).views["item_metadata"]["start"]
        == (end + 2 * h).isoformat()
    )
    assert _online_categories(rd, [item]) == _online_categories(sq, [item]) == [["news"]]


def test_a_flushed_redis_written_to_by_a_push_is_refilled(
    tmp_path: Path, redis_url_factory: Callable[[], str]
) -> None:
    """The empty check is per view: a push after the flush does not hide it."""
    d, end = _world(tmp_path)
    h = pd.Timedelta(hours=1)
    fc = FeatureClient(d, online="redis", redis_url=redis_url_factory())
    fc.build(cutoffs=[end])
    fc.apply()
    fc.materialize((end + h).to_pydatetime())
    fc.build(cutoffs=[end + 2 * h])  # nothing changed: no versioned row in the next window
    fc.store._get_provider().online_store._get_client(fc.store.config.online_store).flushdb()
    events = DataStore(d).events()
    event = events[events["label"] == 1].iloc[0]
    fc.push_interaction(
        {
            "user_id": int(event["user_id"]),
            "item_id": int(event["item_id"]),
            "event_type": "click",
            "timestamp": end + 2.5 * h,
        }
    )
    mat = fc.materialize((end + 3 * h).to_pydatetime())
    ids = DataStore(d).items()["item_id"].astype(int).tolist()
    assert mat.views["item_metadata"]["rows"] == len(ids)
    assert all(_online_categories(fc, ids))
    assert fc.check(sample=30).per_view["user_profile"]["mismatches"] == 0


def test_an_edit_rebuilt_at_the_same_cutoff_reaches_redis_after_an_upgrade(
    tmp_path: Path, redis_url_factory: Callable[[], str]
) -> None:
    """Redis filled before per-store ends and markers: the first materialization reloads the
    view from its earliest row, and an equal event time must not keep the old value."""
    d, end = _world(tmp_path)
    h = pd.Timedelta(hours=1)
    fc = FeatureClient(d, online="redis", redis_url=redis_url_factory())
    item = int(DataStore(d).items()["item_id"].iloc[0])
    fc.build(cutoffs=[end])
    fc.apply()
    fc.materialize((end + h).to_pydatetime())
    meta_file = d / "features" / "meta.json"  # the state an older version left behind
    meta = json.loads(meta_file.read_text())
    meta.pop("online_ends")
    meta_file.write_text(json.dumps(meta))
    client = fc.store._get_provider().online_store._get_client(fc.store.config.online_store)
    client.delete(fc._redis_marker("item_metadata"), fc._redis_marker("user_profile"))
    _set_categories(d, item, ["opera"])
    fc.build(cutoffs=[end])  # the same cutoff rebuilt with the edit
    mat = fc.materialize((end + 2 * h).to_pydatetime())
    assert mat.views["item_metadata"]["start"] == end.isoformat()
    assert _online_categories(fc, [item]) == [["opera"]]
    assert fc.check(sample=20).per_view["item_metadata"]["mismatches"] == 0


def test_an_extra_build_after_the_newest_cutoff_reaches_the_online_store(tmp_path: Path) -> None:
    d, end = _world(tmp_path)
    h = pd.Timedelta(hours=1)
    fc = FeatureClient(d, online="sqlite")
    item = int(DataStore(d).items()["item_id"].iloc[0])
    fc.build(cutoffs=[end])
    fc.apply()
    fc.materialize((end + 3 * h).to_pydatetime())
    _set_categories(d, item, ["opera"])
    fc.build(cutoffs=[end + h], extra=True)  # after the newest stored cutoff, before the last end
    fc.build(cutoffs=[end + 5 * h])  # unchanged since: no row
    mat = fc.materialize((end + 6 * h).to_pydatetime())
    assert mat.views["item_metadata"]["start"] == (end + h).isoformat()
    assert _online_categories(fc, [item]) == [["opera"]]
    assert fc.check(sample=20).per_view["item_metadata"]["mismatches"] == 0


def test_sqlite_serves_only_the_features_a_view_has(tmp_path: Path) -> None:
    """A user_profile table with tenure_days rows (written before user_tenure) serves none."""
    import sqlite3

    from feast.protos.feast.types.Value_pb2 import Value as ValueProto

    d, end = _world(tmp_path)
    fc = FeatureClient(d, online="sqlite")
    fc.build(cutoffs=[end])
    fc.apply()
    fc.materialize((end + pd.Timedelta(hours=1)).to_pydatetime())
    user = int(DataStore(d).users()["user_id"].iloc[0])
    key = fc._online_rows("user", [user])
    assert key["user_profile"][0] is not None
    fvs = fc._require_applied()
    db = sqlite3.connect(d / "features" / "online_store.db")
    profile = f'"{fc.store.config.project}_{fvs["user_profile"].name}"'
    tenure = f'"{fc.store.config.project}_{fvs["user_tenure"].name}"'
    blob = ValueProto(float_val=999.0).SerializeToString()
    with db:  # old rows left in user_profile's table, the users not in user_tenure yet
        db.execute(
            f"INSERT INTO {profile} (entity_key, feature_name, value, event_ts, created_ts) "
            f"SELECT entity_key, 'tenure_days', ?, MAX(event_ts), MAX(created_ts) FROM {profile} "
            "GROUP BY entity_key",
            (blob,),
        )
        db.execute(f"DELETE FROM {tenure}")
    db.close()
    fc = FeatureClient(d, online="sqlite")
    assert "tenure_days" not in fc._online_rows("user", [user])["user_profile"][0][1]
    assert fc.online_user_features(user)["tenure_days"] == 0.0  # the default, not the old row


def test_a_failed_materialization_keeps_the_ends_of_the_views_written_before(tmp_path: Path) -> None:
    import sqlite3

    from streamrec.errors import OnlineStoreUnavailableError

    d, end = _world(tmp_path)
    fc = FeatureClient(d, online="sqlite")
    fc.build(cutoffs=[end])
    fc.apply()
    fvs = fc._require_applied()
    with sqlite3.connect(d / "features" / "online_store.db") as db:  # a later view cannot be written
        db.execute(f'DROP TABLE "{fc.store.config.project}_{fvs["item_popularity"].name}"')
    stop = end + pd.Timedelta(hours=1)
    with pytest.raises(OnlineStoreUnavailableError):
        fc.materialize(stop.to_pydatetime())
    meta = json.loads((d / "features" / "meta.json").read_text())
    ends = meta["online_ends"][fc.settings.describe()]
    assert ends["user_profile"] == ends["item_metadata"] == stop.isoformat()
    assert "item_popularity" not in ends and "item_popularity" in meta["pending"][fc.settings.describe()]
    assert "item_metadata" not in meta["pending"][fc.settings.describe()]


def test_a_client_whose_store_has_no_recorded_end_reads_the_newest_one(
    tmp_path: Path, redis_url_factory: Callable[[], str]
) -> None:
    """Another spelling of the Redis URL, or the default SQLite client, still sees every item.

    The item table and the check read offline rows up to the materialization end; a client
    whose store key is not in ``online_ends`` read None (0 items), and its check passed having
    compared 0 rows.
    """
    d, end = _world(tmp_path)
    h = pd.Timedelta(hours=1)
    url = redis_url_factory()
    assert "127.0.0.1" in url
    fc = FeatureClient(d, online="redis", redis_url=url)
    fc.build(cutoffs=[end])
    fc.apply()
    fc.materialize((end + h).to_pydatetime())
    n = len(DataStore(d).items())
    other = FeatureClient(d, online="redis", redis_url=url.replace("127.0.0.1", "localhost"))
    for client in (fc, other, FeatureClient(d)):
        table = client.item_table()
        assert len(table) == n
        assert sum(1 for c in table.category_lists() if len(c)) == n
        assert table.materialized_until["item_metadata"] == (end + h).isoformat()
        assert not client.item_table_is_stale()
    report = other.check(sample=20)
    assert report.ok and report.checked > 0 and report.per_view["item_metadata"]["checked"] > 0


def test_check_fails_when_nothing_was_compared(tmp_path: Path) -> None:
    """Built and applied but never materialized: 0 rows compared is not a pass."""
    d, end = _world(tmp_path)
    fc = FeatureClient(d, online="sqlite")
    fc.build(cutoffs=[end])
    fc.apply()
    report = fc.check(sample=10)
    assert report.checked == 0
    assert not report.ok and "materialize" in (report.unverified or "")


def test_a_view_without_rows_in_the_first_window_after_an_upgrade_keeps_its_end(tmp_path: Path) -> None:
    """A data directory from before ``online_ends``: a view skipped for an empty window still
    reads as materialized afterwards (it read as never, and the item table dropped it)."""
    d, end = _world(tmp_path)
    h = pd.Timedelta(hours=1)
    fc = FeatureClient(d, online="sqlite")
    fc.build(cutoffs=[end])
    fc.apply()
    fc.materialize((end + h).to_pydatetime())
    mf = d / "features" / "meta.json"
    meta = json.loads(mf.read_text())
    meta.pop("online_ends")
    meta.pop("pending", None)
    mf.write_text(json.dumps(meta))
    report = fc.materialize((end + 2 * h).to_pydatetime())
    assert "no rows between" in report.views["item_popularity"]["skipped"]
    until = FeatureClient(d).item_table().materialized_until
    for name in ("item_engagement_7d", "item_popularity", "item_metadata"):
        assert until[name] == (end + 2 * h).isoformat()


def test_a_build_during_a_materialization_keeps_its_meta_and_reaches_the_online_store(tmp_path: Path) -> None:
    """meta.json is changed under a lock, re-read, only the operation's own keys: the build's
    last_build, defaults and pending survive the materialization that was running, and the
    item it edited reaches the online store with the next materialization."""
    d, end = _world(tmp_path)
    h = pd.Timedelta(hours=1)
    ids = DataStore(d).items()["item_id"].astype(int).tolist()
    item, item2 = ids[0], ids[1]
    fc = FeatureClient(d, online="sqlite")
    fc.build(cutoffs=[end])
    fc.apply()
    fc.materialize((end + h / 2).to_pydatetime())
    _set_categories(d, item2, ["jazz"])
    fc.build(cutoffs=[end + h])  # item_metadata has rows in the next window
    other = FeatureClient(d, online="sqlite")
    m = FeatureClient(d, online="sqlite")
    feast_materialize = m.store.materialize
    done: list[int] = []

    def during(**kw: object) -> None:
        feast_materialize(**kw)
        if not done and kw.get("feature_views") == ["item_engagement_7d"]:
            done.append(1)
            _set_categories(d, item, ["opera"])
            other.build(cutoffs=[end + 2 * h])

    m.store.materialize = during
    m.materialize((end + 3 * h).to_pydatetime())
    assert done
    meta = json.loads((d / "features" / "meta.json").read_text())
    assert meta["last_build"]["as_of"] == (end + 2 * h).isoformat()
    assert "opera" in meta["category_vocab"]
    fc.materialize((end + 4 * h).to_pydatetime())
    assert _online_categories(fc, [item, item2]) == [["opera"], ["jazz"]]


def _snapshot(fc: FeatureClient) -> tuple[object, dict[bytes, bytes]]:
    """The Redis client and a DUMP of every key: the RDB taken here."""
    client = fc.store._get_provider().online_store._get_client(fc.store.config.online_store)
    return client, {k: client.dump(k) for k in client.scan_iter()}


def _restore(client: object, snapshot: dict[bytes, bytes]) -> None:
    client.flushdb()  # type: ignore[attr-defined]
    for k, v in snapshot.items():
        client.restore(k, 0, v)  # type: ignore[attr-defined]


def test_redis_restored_from_an_older_snapshot_gets_the_rows_written_since(
    tmp_path: Path, redis_url_factory: Callable[[], str]
) -> None:
    """A snapshot (RDB) taken after the first materialization, restored after the second: Redis
    holds the older marker and the older rows while meta.json records the newer end. A marker
    older than the recorded end reloads the view from its earliest row, as a missing one.
    """
    d, end = _world(tmp_path)
    h = pd.Timedelta(hours=1)
    fc = FeatureClient(d, online="redis", redis_url=redis_url_factory())
    ids = DataStore(d).items()["item_id"].astype(int).tolist()
    item = ids[0]
    original = list(DataStore(d).items()["categories"].iloc[0])
    fc.build(cutoffs=[end])
    fc.apply()
    fc.materialize((end + h).to_pydatetime())
    client, snapshot = _snapshot(fc)
    _set_categories(d, item, ["opera"])
    fc.build(cutoffs=[end + 2 * h])
    fc.materialize((end + 3 * h).to_pydatetime())
    assert _online_categories(fc, [item]) == [["opera"]]

    _restore(client, snapshot)  # restored from the older snapshot
    assert _online_categories(fc, [item]) == [original]
    assert client.get(fc._redis_marker("item_metadata")) == (end + h).isoformat().encode()  # type: ignore[attr-defined]
    mat = fc.materialize((end + 4 * h).to_pydatetime())
    assert mat.views["item_metadata"]["start"] == end.isoformat()  # the earliest row, not end + 3h
    assert mat.views["item_metadata"]["rows"] == len(ids)
    assert "before the recorded end" in mat.views["item_metadata"]["reloaded"]
    assert _online_categories(fc, [item]) == [["opera"]]
    assert fc.check(sample=20).per_view["item_metadata"]["mismatches"] == 0
    assert client.get(fc._redis_marker("item_metadata")) == (end + 4 * h).isoformat().encode()  # type: ignore[attr-defined]


def test_redis_restored_from_before_a_rebuilt_earlier_cutoff_is_repaired(
    tmp_path: Path, redis_url_factory: Callable[[], str]
) -> None:
    """The review's repro: the cutoff rebuilt with an edit is dated at or before the snapshot's
    marker, so after the restore it lies in no window between the marker and the recorded end;
    the next materialization skipped ('no rows between ...') and Redis kept the old value while
    `check` reported it. Now the stale marker reloads the view."""
    d, end = _world(tmp_path)
    h = pd.Timedelta(hours=1)
    fc = FeatureClient(d, online="redis", redis_url=redis_url_factory())
    item = int(DataStore(d).items()["item_id"].iloc[0])
    fc.build(cutoffs=[end])
    fc.apply()
    fc.materialize((end + h).to_pydatetime())
    client, snapshot = _snapshot(fc)
    _set_categories(d, item, ["opera"])
    fc.build(cutoffs=[end])  # a correction: the same, already materialized cutoff rebuilt
    fc.materialize((end + 3 * h).to_pydatetime())
    assert _online_categories(fc, [item]) == [["opera"]]

    _restore(client, snapshot)
    mat = fc.materialize((end + 4 * h).to_pydatetime())
    assert "skipped" not in mat.views["item_metadata"], mat.views["item_metadata"]
    assert mat.views["item_metadata"]["start"] == end.isoformat()
    assert _online_categories(fc, [item]) == [["opera"]]
    assert fc.check(sample=20).per_view["item_metadata"]["mismatches"] == 0


def test_an_empty_window_moves_the_redis_marker_and_does_not_reload(
    tmp_path: Path, redis_url_factory: Callable[[], str]
) -> None:
    """A window with no row records its end and sets the marker to it: a marker behind the
    recorded end would read as a restore and reload the view every time."""
    d, end = _world(tmp_path)
    h = pd.Timedelta(hours=1)
    fc = FeatureClient(d, online="redis", redis_url=redis_url_factory())
    fc.build(cutoffs=[end])
    fc.apply()
    fc.materialize((end + h).to_pydatetime())
    client = fc.store._get_provider().online_store._get_client(fc.store.config.online_store)
    empty = fc.materialize((end + 2 * h).to_pydatetime())  # nothing built since: no row
    for name in ("item_metadata", "user_profile"):
        assert empty.views[name]["skipped"].startswith("no rows between"), empty.views[name]
        assert client.get(fc._redis_marker(name)) == (end + 2 * h).isoformat().encode()
        assert fc.materialized_until(name) == end + 2 * h
    fc.build(cutoffs=[end + 3 * h])  # nothing changed: still no versioned row
    again = fc.materialize((end + 4 * h).to_pydatetime())
    for name in ("item_metadata", "user_profile"):
        assert again.views[name] == {
            "skipped": f"no rows between {(end + 2 * h).isoformat()} and {(end + 4 * h).isoformat()}"
        }, again.views[name]
        assert client.get(fc._redis_marker(name)) == (end + 4 * h).isoformat().encode()


def test_a_redis_marker_newer_than_the_recorded_end_keeps_the_recorded_start(
    tmp_path: Path, redis_url_factory: Callable[[], str]
) -> None:
    """The other way round (meta.json restored from an older copy): the recorded end is earlier.
    An unparseable marker tells nothing: the view is reloaded, as with no marker."""
    d, end = _world(tmp_path)
    h = pd.Timedelta(hours=1)
    fc = FeatureClient(d, online="redis", redis_url=redis_url_factory())
    users = DataStore(d).users()["user_id"].astype(int).tolist()
    fc.build(cutoffs=[end])
    fc.apply()
    fc.materialize((end + h).to_pydatetime())
    client = fc.store._get_provider().online_store._get_client(fc.store.config.online_store)
    client.set(fc._redis_marker("item_metadata"), (end + 5 * h).isoformat())
    client.set(fc._redis_marker("user_profile"), "not a time")
    mat = fc.materialize((end + 6 * h).to_pydatetime())
    assert (
        mat.views["item_metadata"]["skipped"]
        == f"no rows between {(end + h).isoformat()} and {(end + 6 * h).isoformat()}"
    )
    profile = mat.views["user_profile"]
    assert profile["start"] == end.isoformat() and profile["rows"] == len(users), profile
    assert "is not a time" in profile["reloaded"]
    for name in ("item_metadata", "user_profile"):
        assert client.get(fc._redis_marker(name)) == (end + 6 * h).isoformat().encode()
    assert fc.check(sample=20).per_view["user_profile"]["mismatches"] == 0


def test_check_of_a_store_never_materialized_next_to_one_that_was_says_so(
    tmp_path: Path, redis_url_factory: Callable[[], str]
) -> None:
    """It compared against the other store's end and listed every row as a mismatch."""
    from typer.testing import CliRunner

    from streamrec.cli import app

    d, end = _world(tmp_path)
    h = pd.Timedelta(hours=1)
    url = redis_url_factory()
    rd = FeatureClient(d, online="redis", redis_url=url)
    rd.build(cutoffs=[end])
    rd.apply()
    rd.materialize((end + h).to_pydatetime())
    sq = FeatureClient(d, online="sqlite")
    stores = [sq, FeatureClient(d, online="redis", redis_url=redis_url_factory()), sq]
    for n, never in enumerate(stores):
        if n == 2:
            sq.apply()  # its tables exist, empty: every row read as a mismatch
        report = never.check(sample=10)
        assert not report.ok and report.checked == 0 and report.mismatches == 0 and not report.details
        assert "never materialized" in (report.unverified or ""), report.unverified
        assert rd.settings.describe() in (report.unverified or "")
    res = CliRunner().invoke(app, ["features", "check", "--data-dir", str(d), "--online-store", "sqlite"])
    assert res.exit_code == 1 and "never materialized" in res.output and "MISMATCH" not in res.output, (
        res.output
    )
    sq.materialize((end + h).to_pydatetime())  # once materialized, it is checked
    assert sq.check(sample=10).ok
    assert rd.check(sample=10).ok


def test_forget_times_covers_every_entity_in_chunks(
    tmp_path: Path, redis_url_factory: Callable[[], str]
) -> None:
    """One Redis pipeline per chunk (one of 200k keys took 2.3 s), every entity's time dropped."""
    from feast.infra.online_stores.redis import _versioned_fv_name
    from feast.protos.feast.types.EntityKey_pb2 import EntityKey as EntityKeyProto
    from feast.protos.feast.types.Value_pb2 import Value as ValueProto

    from streamrec.features.materialize import Materializer

    d, end = _world(tmp_path)
    h = pd.Timedelta(hours=1)
    fc = FeatureClient(d, online="redis", redis_url=redis_url_factory())
    fc.build(cutoffs=[end])
    fc.apply()
    fc.materialize((end + h).to_pydatetime())
    fvs = fc._require_applied()
    online, config = fc.store._get_provider().online_store, fc.store.config
    client = online._get_client(config.online_store)
    ids = DataStore(d).items()["item_id"].astype(int).tolist()
    view = VIEWS_BY_NAME["item_metadata"]
    ts_key = f"_ts:{_versioned_fv_name(fvs[view.name], config)}"
    protos = [EntityKeyProto(join_keys=["item_id"], entity_values=[ValueProto(int64_val=i)]) for i in ids]
    keys = online._generate_redis_keys_for_entities(config, protos)
    assert all(client.hexists(k, ts_key) for k in keys)

    executes: list[int] = []
    pipeline = type(client.pipeline(transaction=False))
    real_execute = pipeline.execute

    def counting(self: object, *a: object, **kw: object) -> object:
        out = real_execute(self, *a, **kw)
        executes.append(len(out))
        return out

    m = Materializer(fc.store, fc.settings, fc.features_dir, fc._online_guard)
    chunk = 7
    assert len(ids) > 2 * chunk
    pipeline.execute = counting  # type: ignore[method-assign]
    try:
        touched = m.forget_times(view, fvs[view.name], end - h, end + h, chunk=chunk)
    finally:
        pipeline.execute = real_execute  # type: ignore[method-assign]
    assert touched == len(ids)
    assert executes == [chunk] * (len(ids) // chunk) + ([len(ids) % chunk] if len(ids) % chunk else [])
    assert not any(client.hexists(k, ts_key) for k in keys)  # every entity, values kept
    assert _online_categories(fc, ids) == [list(c) for c in DataStore(d).items()["categories"]]


def test_a_redis_materialization_reads_each_views_window_once(
    tmp_path: Path, redis_url_factory: Callable[[], str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The window's entities are read once per view: counted, then their Redis times dropped."""
    from streamrec.features import materialize as mat_module

    d, end = _world(tmp_path)
    h = pd.Timedelta(hours=1)
    item = int(DataStore(d).items()["item_id"].iloc[0])
    fc = FeatureClient(d, online="redis", redis_url=redis_url_factory())
    fc.build(cutoffs=[end])
    fc.apply()
    fc.materialize((end + h).to_pydatetime())
    _set_categories(d, item, ["opera"])
    fc.build(cutoffs=[end])  # the same cutoff rebuilt: Redis's equal time must be dropped
    reads: list[str] = []
    real = mat_module.entities_between

    def counted(features_dir: Path, view: object, start: pd.Timestamp, stop: pd.Timestamp) -> object:
        reads.append(view.name)  # type: ignore[attr-defined]
        return real(features_dir, view, start, stop)  # type: ignore[arg-type]

    monkeypatch.setattr(mat_module, "entities_between", counted)
    report = fc.materialize((end + 2 * h).to_pydatetime())
    assert report.views["item_metadata"]["start"] == end.isoformat()
    written = [v for v, r in report.views.items() if "rows" in r or "no rows" in r.get("skipped", "")]
    assert sorted(reads) == sorted(written) and len(set(reads)) == len(reads), reads
    assert _online_categories(fc, [item]) == [["opera"]]


def test_check_reads_never_materialized_only_next_to_a_store_with_an_end(
    tmp_path: Path, redis_url_factory: Callable[[], str]
) -> None:
    """No store with a recorded end: the usual 'nothing compared' failure, not 'never
    materialized'. A Redis filled by plain `feast materialize` (no marker, no end of its own)
    next to a materialized SQLite store reads as never materialized; `materialize` fills it."""
    d, end = _world(tmp_path)
    h = pd.Timedelta(hours=1)
    sq = FeatureClient(d, online="sqlite")
    sq.apply()
    assert all(
        "no offline rows" in r.get("skipped", "") for r in sq.materialize(end.to_pydatetime()).views.values()
    )
    assert json.loads((d / "features" / "meta.json").read_text())["online_ends"] == {
        sq.settings.describe(): {}
    }
    sq.build(cutoffs=[end])
    report = sq.check(sample=10)
    assert not report.ok and report.checked == 0
    assert "nothing compared: no offline rows" in (report.unverified or ""), report.unverified

    sq.materialize((end + h).to_pydatetime())
    rd = FeatureClient(d, online="redis", redis_url=redis_url_factory())
    rd.apply()
    built = [v.name for v in VIEWS_BY_NAME.values() if offline.time_range(d / "features", v)]
    rd.store.materialize(  # plain Feast: no marker, no end recorded
        start_date=(end - 400 * 24 * h).to_pydatetime(),
        end_date=(end + h).to_pydatetime(),
        feature_views=built,
    )
    client = rd.store._get_provider().online_store._get_client(rd.store.config.online_store)
    assert client.dbsize() and not client.exists(rd._redis_marker("item_metadata"))  # rows, no marker
    report = rd.check(sample=10)
    assert not report.ok and report.checked == 0
    assert "never materialized" in (report.unverified or "") and sq.settings.describe() in (
        report.unverified or ""
    )
    mat = rd.materialize((end + 2 * h).to_pydatetime())
    assert mat.views["item_metadata"]["start"] == end.isoformat()  # from its earliest row
    assert rd.check(sample=10).ok
