"""Model bundles: everything one trained model version needs to serve, in one directory.

Layout (roles as recorded in the registry manifest)::

    two_tower/            weights.pt + model.json   (streamrec.models.io; weights_only loading)
    item_vectors.npy      two-tower item embeddings (row = item index)
    tt_index/             FAISS index over item_vectors
    cf_user_factors.npy   ALS factors (CF source), cf_item_factors.npy
    train.npz             binary training matrix (seen items; CF fold-in and affinity)
    covisit.npz           co-visitation neighbours (optional: bundles trained before it lack it)
    user_ids.npy          raw user id of each user index
    item_ids.npy          raw item id of each item index
    vocab.json            category and creator vocabularies the ranker's sparse ids refer to
    ranker/               DCN-V2 weights + model.json
    settings.json         retrieval settings, ranker feature layout, ALS config
    manifest.json         registry manifest (metrics, data cutoff, feature schema, file hashes)

Only arrays, JSON and tensors: nothing is unpickled when a bundle loads.
"""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import scipy.sparse as sp
from torch import nn

from streamrec.data.ids import IdMap
from streamrec.errors import CorruptCheckpointError
from streamrec.evaluation.baselines import ALS, ALSConfig
from streamrec.features.item_table import ItemFeatureTable
from streamrec.models.io import load_model, save_model
from streamrec.models.scoring import RankerScorer
from streamrec.models.two_tower import TwoTowerModel
from streamrec.retrieval.affinity import AffinitySource
from streamrec.retrieval.cf import CFSource
from streamrec.retrieval.config import RetrievalSettings
from streamrec.retrieval.covisit import CovisitSource
from streamrec.retrieval.index import load_index, save_index
from streamrec.retrieval.new_arrivals import NewArrivalsSource
from streamrec.retrieval.trending import TrendingConfig, TrendingSource

#: role -> path inside the bundle (files and directories).
ROLES: dict[str, str] = {
    "two_tower_weights": "two_tower/weights.pt",
    "two_tower_meta": "two_tower/model.json",
    "item_vectors": "item_vectors.npy",
    "tt_index": "tt_index/index.faiss",
    "tt_index_meta": "tt_index/index.json",
    "cf_user_factors": "cf_user_factors.npy",
    "cf_item_factors": "cf_item_factors.npy",
    "train_matrix": "train.npz",
    "user_ids": "user_ids.npy",
    "item_ids": "item_ids.npy",
    "vocab": "vocab.json",
    "ranker_weights": "ranker/weights.pt",
    "ranker_meta": "ranker/model.json",
    "settings": "settings.json",
}
#: Optional roles: written when the model has the part, served when the bundle has the file.
OPTIONAL_ROLES: dict[str, str] = {"covisit": "covisit.npz"}


def save_bundle(
    dst: str | os.PathLike[str],
    *,
    users: IdMap,
    train: sp.csr_matrix,
    two_tower: nn.Module,
    item_vectors: npt.NDArray[np.float32],
    tt_index: Any,
    cf: CFSource,
    ranker: nn.Module,
    table: ItemFeatureTable,
    settings: RetrievalSettings,
    als_config: ALSConfig,
    ranker_layout: dict[str, Any],
    covisit: CovisitSource | None = None,
) -> dict[str, str]:
    """Write a bundle directory; returns the role -> relative path map for the manifest.

    ``covisit`` (optional) is the co-visitation source; without it the bundle serves the other
    sources only.
    """
    d = Path(dst)
    d.mkdir(parents=True, exist_ok=True)
    save_model(two_tower, d / "two_tower")
    np.save(d / "item_vectors.npy", np.ascontiguousarray(item_vectors, dtype=np.float32))
    save_index(tt_index, d / "tt_index")
    np.save(d / "cf_user_factors.npy", cf.model.user_factors)
    np.save(d / "cf_item_factors.npy", cf.model.item_factors)
    sp.save_npz(d / "train.npz", sp.csr_matrix(train))
    np.save(d / "user_ids.npy", users.raw_ids)
    np.save(d / "item_ids.npy", table.item_ids)
    (d / "vocab.json").write_text(
        json.dumps({"categories": table.category_vocab, "creators": table.creator_vocab})
    )
    save_model(ranker, d / "ranker")
    roles = dict(ROLES)
    if covisit is not None:
        covisit.save(d / OPTIONAL_ROLES["covisit"])
        roles["covisit"] = OPTIONAL_ROLES["covisit"]
    (d / "settings.json").write_text(
        json.dumps(
            {
                # A source that is off is not written: code from before it can still read the
                # bundle (its settings refuse unknown keys).
                "retrieval": settings.model_dump(
                    mode="json", exclude=None if settings.new_arrivals.enabled else {"new_arrivals"}
                ),
                "als": als_config.model_dump(mode="json"),
                "ranker_layout": ranker_layout,
            },
            indent=2,
        )
    )
    missing = [p for p in roles.values() if not (d / p).exists()]
    if missing:
        raise CorruptCheckpointError(f"bundle {d} is incomplete after writing: missing {missing}")
    return roles


def align_table(
    table: ItemFeatureTable, item_ids: npt.NDArray[np.int64], vocab: dict[str, list[str]]
) -> ItemFeatureTable:
    """The item table re-ordered to a bundle's item index, ids re-coded to its vocabularies.

    Serving loads the latest item features, whose row order and creator coding can differ from
    the bundle's (items added since training, new creators). Rows of items missing from the
    table get neutral values (no categories, unknown creator, not promoted, not flagged).
    """
    rows = table.index_of(item_ids)
    have = rows >= 0
    safe = np.where(have, rows, 0)
    n = item_ids.size
    dense = np.where(have[:, None], table.dense[safe], 0.0).astype(np.float32)
    cat_map = {c: i for i, c in enumerate(vocab["categories"])}
    code = np.asarray([cat_map.get(c, -1) for c in table.category_vocab] + [-1], dtype=np.int64)
    creator_map = {c: i for i, c in enumerate(vocab["creators"])}
    ccode = np.asarray([creator_map.get(c, -1) for c in table.creator_vocab] + [-1], dtype=np.int64)
    lengths = np.where(have, table.categories_indptr[safe + 1] - table.categories_indptr[safe], 0)
    indptr = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(lengths, out=indptr[1:])
    parts = [
        table.categories_indices[table.categories_indptr[r] : table.categories_indptr[r + 1]]
        for r in rows[have]
    ]
    old = np.concatenate(parts) if parts else np.empty(0, np.int64)
    new_codes = code[old]
    indices = np.where(new_codes >= 0, new_codes, 0).astype(np.int32)
    cid = np.where(have, code[np.where(table.category_id[safe] >= 0, table.category_id[safe], -1)], -1)
    crid = np.where(have, ccode[np.where(table.creator_id[safe] >= 0, table.creator_id[safe], -1)], -1)
    return replace(
        table,
        item_ids=np.asarray(item_ids, dtype=np.int64),
        dense=np.ascontiguousarray(dense),
        category_id=cid.astype(np.int32),
        categories_indptr=indptr,
        categories_indices=indices,
        creator_id=crid.astype(np.int32),
        published_at=np.where(have, table.published_at[safe], 0),
        promoted=np.where(have, table.promoted[safe], False),
        flagged=np.where(have, table.flagged[safe], False),
        trending_updated_at=np.where(have, table.trending_updated_at[safe], 0),
        embedding=np.zeros((n, 0), np.float32),
        embedding_version=np.full(n, "none", dtype=object),
        category_vocab=list(vocab["categories"]),
        creator_vocab=list(vocab["creators"]),
        _lut=None,
        _map=None,
    )


class LoadedBundle:
    """A bundle loaded for serving: the retrieval models, the ranker and the settings."""

    def __init__(self, path: str | os.PathLike[str], *, device: str = "cpu") -> None:
        from streamrec.funnel.core import RetrievalModels

        d = Path(path)
        missing = [p for p in ROLES.values() if not (d / p).exists()]
        if missing:
            raise CorruptCheckpointError(
                f"bundle {d} lacks {', '.join(missing)}: retrain, or pick another model version"
            )
        try:
            self.settings_raw = json.loads((d / "settings.json").read_text())
            self.vocab: dict[str, list[str]] = json.loads((d / "vocab.json").read_text())
            users = IdMap(np.load(d / "user_ids.npy", allow_pickle=False))
            self.item_ids: npt.NDArray[np.int64] = np.load(d / "item_ids.npy", allow_pickle=False)
            train = sp.csr_matrix(sp.load_npz(d / "train.npz"))
            item_vectors = np.load(d / "item_vectors.npy", allow_pickle=False)
            uf = np.load(d / "cf_user_factors.npy", allow_pickle=False)
            itf = np.load(d / "cf_item_factors.npy", allow_pickle=False)
            # pydantic's ValidationError is a ValueError: settings this code cannot read (a
            # newer version's) are a bundle it cannot serve, not a crash.
            self.settings = RetrievalSettings.model_validate(self.settings_raw["retrieval"])
            als_cfg = ALSConfig.model_validate(self.settings_raw["als"])
        except (OSError, ValueError, KeyError, json.JSONDecodeError) as err:
            raise CorruptCheckpointError(
                f"bundle {d} cannot be read ({err}): retrain or pick another version"
            ) from err
        self.path = d
        two_tower = load_model(d / "two_tower", "cpu", expected=TwoTowerModel)
        tt_index = load_index(d / "tt_index")
        cf = CFSource(ALS.from_factors(train, uf, itf, als_cfg), index=None)
        self.ranker = RankerScorer.from_path(d / "ranker", device)
        covisit_path = d / OPTIONAL_ROLES["covisit"]
        self.covisit = (
            CovisitSource.load(covisit_path, self.settings.covisit, seen=train)
            if covisit_path.exists()
            else None
        )
        self.train = train
        self.users = users
        self._parts = (users, train, two_tower, item_vectors, tt_index, cf)
        self._retrieval_models_cls = RetrievalModels

    def retrieval_models(
        self, table: ItemFeatureTable, trending_items: npt.ArrayLike, trending_times: Any
    ) -> Any:
        """The retrieval models over an aligned item table, trending seeded from recent events."""
        users, train, two_tower, item_vectors, tt_index, cf = self._parts
        affinity = AffinitySource(train, table.category_lists())
        trending = TrendingSource.from_events(
            len(table),
            trending_items,
            trending_times,
            config=TrendingConfig(half_life_hours=self.settings.trending_half_life_hours),
            seen=train,
        )
        new_arrivals = (  # nothing stored: built from the item table's publication times
            NewArrivalsSource(table.published_at, self.settings.new_arrivals, seen=train)
            if self.settings.new_arrivals.enabled
            else None
        )
        return self._retrieval_models_cls(
            users, train, two_tower, item_vectors, tt_index, cf, affinity, trending, self.covisit, new_arrivals
        )
