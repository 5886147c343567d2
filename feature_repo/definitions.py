"""Feast definitions of StreamRec: entities, sources, feature views, push sources, services.

Generated from :mod:`streamrec.features.spec`, the single source of feature metadata; nothing
but Feast object definitions lives in this folder. Offline sources are folders under
``$STREAMREC_FEATURES_DIR/offline/`` (default: the ``features/`` folder of ``$STREAMREC_HOME``
or ``./.streamrec``), so ``feast apply`` registers the sources of that data directory::

    STREAMREC_FEATURES_DIR=/path/to/data/features feast -c feature_repo apply

``streamrec features apply --data-dir D`` does the same without the environment variable.
"""

from __future__ import annotations

from feast import Entity, FeatureService, FeatureView, Field, FileSource, PushSource, ValueType
from feast.data_format import ParquetFormat
from feast.types import Array, Bool, Float32, Int64, String

from streamrec.features import spec

_TYPES = {
    "int64": Int64,
    "float32": Float32,
    "string": String,
    "bool": Bool,
    "int64_list": Array(Int64),
    "float32_list": Array(Float32),
    "string_list": Array(String),
}

FEATURES_DIR = spec.features_dir_from_env()

user = Entity(
    name="user",
    join_keys=["user_id"],
    value_type=ValueType.INT64,
    description=spec.ENTITIES["user"].description,
)
item = Entity(
    name="item",
    join_keys=["item_id"],
    value_type=ValueType.INT64,
    description=spec.ENTITIES["item"].description,
)
_ENTITY = {"user": user, "item": item}

SOURCES: dict[str, FileSource] = {}
PUSH_SOURCES: dict[str, PushSource] = {}
FEATURE_VIEWS: dict[str, FeatureView] = {}

for _v in spec.VIEWS:
    SOURCES[_v.name] = FileSource(
        name=f"{_v.name}_source",
        path=str(FEATURES_DIR / _v.offline_dir),
        file_format=ParquetFormat(),
        timestamp_field=spec.TIMESTAMP_FIELD,
        created_timestamp_column=spec.CREATED_FIELD,
        description=f"Offline rows of {_v.name}.",
    )
    _source: FileSource | PushSource = SOURCES[_v.name]
    if _v.push_source:
        PUSH_SOURCES[_v.name] = PushSource(name=_v.push_source, batch_source=SOURCES[_v.name])
        _source = PUSH_SOURCES[_v.name]
    FEATURE_VIEWS[_v.name] = FeatureView(
        name=_v.name,
        entities=[_ENTITY[_v.entity]],
        ttl=_v.ttl,
        schema=[
            Field(name=f.name, dtype=_TYPES[f.dtype], description=f.description, tags={"owner": f.owner})
            for f in _v.features
        ],
        source=_source,
        online=True,
        description=_v.description,
        owner=_v.owner,
        tags={"mode": _v.mode, **_v.tags},
    )

FEATURE_SERVICES: dict[str, FeatureService] = {
    _name: FeatureService(name=_name, features=[FEATURE_VIEWS[n] for n in _views], description=_desc)
    for _name, (_desc, _views) in spec.SERVICES.items()
}

# `feast apply` collects the Feast objects bound to module-level names: bind each one.
for _name, _obj in [
    *((f"{n}_source", o) for n, o in SOURCES.items()),
    *((f"{n}_push", o) for n, o in PUSH_SOURCES.items()),
    *((f"{n}_view", o) for n, o in FEATURE_VIEWS.items()),
    *((f"{n}_service", o) for n, o in FEATURE_SERVICES.items()),
]:
    globals()[_name] = _obj

#: Everything ``FeatureClient.apply`` registers.
ALL_OBJECTS: list = [
    user,
    item,
    *SOURCES.values(),
    *PUSH_SOURCES.values(),
    *FEATURE_VIEWS.values(),
    *FEATURE_SERVICES.values(),
]
