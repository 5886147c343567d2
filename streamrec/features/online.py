"""Raw online-store access on Feast's cached views: one-round-trip reads, provider writes, the push lock."""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from datetime import UTC
from pathlib import Path
from typing import Any

from streamrec.errors import OnlineStoreUnavailableError
from streamrec.features.push import utc_timestamp
from streamrec.features.repo import OnlineStoreSettings
from streamrec.features.spec import CREATED_FIELD, TIMESTAMP_FIELD, View
from streamrec.paths import exclusive_file_lock

#: Entity keys per SQLite statement of the one-statement online read (SQLite caps bound variables).
SQLITE_KEYS_PER_STATEMENT = 500
#: The Redis push lock expires this long after it was taken (a holder that died frees it).
PUSH_LOCK_TTL_S = 30.0
#: How long a push waits for the Redis push lock before giving up.
PUSH_LOCK_WAIT_S = 10.0


def online_errors() -> tuple[type[BaseException], ...]:
    """The exceptions that mean the online store cannot be reached."""
    import redis.exceptions

    return (redis.exceptions.RedisError, sqlite3.Error, ConnectionError, TimeoutError, OSError)


def read_rows(
    store: Any, kind: str, reader: list[tuple[Any, list[str]]], keys: list[Any]
) -> dict[str, list[Any]]:
    """Raw online rows: ``view -> [(event_ts, {feature: python value}) | None per key]``.

    ``kind`` is the online store's (``sqlite`` or ``redis``), ``reader`` the cached views with
    the features to read, ``keys`` the entity key protos. The caller guards the online errors.
    """
    from feast.type_map import feast_value_type_to_python_type

    provider = store._get_provider()
    online = provider.online_store
    out: dict[str, list[Any]] = {}
    if kind == "redis" and hasattr(online, "_generate_hset_keys_for_features"):
        results = redis_read(store, online, reader, keys)
    elif kind == "sqlite" and hasattr(online, "_get_conn"):
        results = sqlite_read(store, online, reader, keys)
    else:  # copies: Feast appends to the list it is given
        results = [provider.online_read(store.config, fv, keys, list(names)) for fv, names in reader]
    for (fv, _), res in zip(reader, results, strict=True):
        rows: list[Any] = []
        for ts, values in res:
            conv = {k: feast_value_type_to_python_type(v) for k, v in (values or {}).items()}
            # SQLite answers None for an absent entity, Redis empty values (and epoch 0)
            rows.append((ts, conv) if any(v is not None for v in conv.values()) else None)
        out[fv.name] = rows
    return out


def redis_read(
    store: Any, online: Any, reader: list[tuple[Any, list[str]]], keys: list[Any]
) -> list[list[Any]]:
    """All views of one entity in one pipelined round trip.

    Feast keeps every view of an entity in one Redis hash (field = hash of ``view:feature``);
    its ``online_read`` issues one round trip per view. This reads all the views' fields with
    one ``HMGET`` per entity, using the online store's own key and decoding helpers (pinned
    Feast 0.67; see ADR-002).
    """
    config = store.config
    plan = []
    fields: list[Any] = []
    for fv, names in reader:
        requested, hset_keys = online._generate_hset_keys_for_features(fv, list(names))
        plan.append((fv.name, requested, len(fields), len(hset_keys)))
        fields += hset_keys
    redis_keys = online._generate_redis_keys_for_entities(config, keys)
    client = online._get_client(config.online_store)
    pipe = client.pipeline(transaction=False)
    for k in redis_keys:
        pipe.hmget(k, fields)
    replies = pipe.execute()
    return [
        [online._get_features_for_entity(reply[start : start + n], name, requested) for reply in replies]
        for name, requested, start, n in plan
    ]


def sqlite_read(
    store: Any, online: Any, reader: list[tuple[Any, list[str]]], keys: list[Any]
) -> list[list[Any]]:
    """All views of one entity in one SQLite statement.

    Feast keeps one table per view and its ``online_read`` runs one query per view (five
    for a user, ~0.3 ms together here). This runs one ``UNION ALL`` over the same tables on
    the online store's own connection and decodes the rows as Feast does: per entity the
    requested features present (a row of a feature the view no longer has, such as
    ``user_profile``'s ``tenure_days`` written before ``user_tenure``, is left out) and the
    row timestamp (UTC), ``(None, None)`` when it has no row
    (pinned Feast 0.67; see ADR-002).
    """
    from feast.infra.key_encoding_utils import serialize_entity_key
    from feast.infra.online_stores.sqlite import _quote_id, _table_id
    from feast.protos.feast.types.Value_pb2 import Value as ValueProto

    config = store.config
    versioned = bool(getattr(config.registry, "enable_online_feature_view_versioning", False))
    version = config.entity_key_serialization_version
    blobs = [serialize_entity_key(k, entity_key_serialization_version=version) for k in keys]
    tables = [_quote_id(_table_id(config.project, fv, versioned)) for fv, _ in reader]
    conn = online._get_conn(config)
    found: list[dict[bytes, tuple[Any, dict[str, Any]]]] = [{} for _ in reader]
    wanted = [set(names) for _, names in reader]  # a table may keep a feature the view dropped
    for start in range(0, len(blobs), SQLITE_KEYS_PER_STATEMENT):  # stay under SQLite's variable cap
        chunk = blobs[start : start + SQLITE_KEYS_PER_STATEMENT]
        marks = ",".join(f"?{i + 1}" for i in range(len(chunk)))
        sql = " UNION ALL ".join(
            f"SELECT {j}, entity_key, feature_name, value, event_ts FROM {t} WHERE entity_key IN ({marks})"
            for j, t in enumerate(tables)
        )
        for j, key, name, blob, ts in conn.execute(sql, chunk).fetchall():
            if name not in wanted[j]:
                continue
            value = ValueProto()
            value.ParseFromString(blob)
            ts = ts.astimezone(UTC) if ts.tzinfo is not None else ts.replace(tzinfo=UTC)
            feats = found[j].get(key, (None, {}))[1]
            feats[name] = value
            found[j][key] = (ts, feats)  # like Feast: the timestamp of the entity's last row
    return [[view.get(b, (None, None)) for b in blobs] for view in found]


def write_rows(store: Any, fv: Any, view: View, rows: list[dict[str, Any]]) -> None:
    """Write feature rows of ``view`` to the online store through the provider, on the cached ``fv``.

    The same conversion and ``online_write_batch`` that ``FeatureStore.push`` and
    ``write_to_online_store`` end in, without their per-call registry deserialisation.
    The caller guards the online errors.
    """
    from feast.protos.feast.types.EntityKey_pb2 import EntityKey as EntityKeyProto
    from feast.protos.feast.types.Value_pb2 import Value as ValueProto
    from feast.type_map import python_values_to_proto_values

    types = {f.name: f.dtype.to_value_type() for f in fv.features}
    protos = {
        name: python_values_to_proto_values([r[name] for r in rows], types[name])
        for name in view.feature_names
    }
    data = [
        (
            EntityKeyProto(
                join_keys=[view.join_key], entity_values=[ValueProto(int64_val=int(r[view.join_key]))]
            ),
            {name: protos[name][i] for name in view.feature_names},
            utc_timestamp(r[TIMESTAMP_FIELD]).to_pydatetime(),
            utc_timestamp(r[CREATED_FIELD]).to_pydatetime(),
        )
        for i, r in enumerate(rows)
    ]
    store._get_provider().online_write_batch(store.config, fv, data, progress=None)


@contextlib.contextmanager
def push_lock(
    store: Any,
    settings: OnlineStoreSettings,
    features_dir: Path,
    guard: Callable[[str], AbstractContextManager[None]],
) -> Iterator[None]:
    """Serialise a push's read-modify-write across processes (``FeatureClient.push_interactions``).

    A push reads the current rows, merges the events in and writes the rows back: two
    gateway replicas pushing for the same user or item at the same moment would otherwise
    each write a merge that lacks the other's events. SQLite (a local file, so one machine):
    an exclusive ``flock`` on ``<features>/push.lock``. Redis (possibly many machines): a
    Redis lock per project that expires after ``PUSH_LOCK_TTL_S`` if its holder dies.
    """
    if settings.kind == "redis":
        online = store._get_provider().online_store
        client = online._get_client(store.config.online_store)
        lock = client.lock(
            f"streamrec:{store.config.project}:push-lock",
            timeout=PUSH_LOCK_TTL_S,
            blocking_timeout=PUSH_LOCK_WAIT_S,
        )
        with guard("push lock"):
            acquired = lock.acquire()
        if not acquired:
            raise OnlineStoreUnavailableError(
                f"online store ({settings.describe()}): the push lock stayed taken for "
                f"{PUSH_LOCK_WAIT_S:g} s; another process is pushing or died holding it (it expires "
                f"after {PUSH_LOCK_TTL_S:g} s)"
            )
        try:
            yield
        finally:
            with contextlib.suppress(Exception):  # expired meanwhile: nothing left to release
                lock.release()
        return
    with exclusive_file_lock(features_dir / "push.lock"):
        yield
