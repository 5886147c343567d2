"""The feature store: one definition of every feature for training and serving.

* :mod:`~streamrec.features.spec` — feature metadata (the single source of truth);
* :mod:`~streamrec.features.pipeline` — batch feature computation as of a cutoff;
* :mod:`~streamrec.features.client` — :class:`FeatureClient` (build, apply, materialize,
  training sets, online reads, pushes, embeddings, item table, consistency check);
* :mod:`~streamrec.features.item_table` — the in-memory item arrays of the ranker;
* :mod:`~streamrec.features.defaults` — :func:`apply_defaults`, used by training and serving.

Importing this package does not import Feast; the client imports it on first use.
"""

from streamrec.features.defaults import DefaultContext, apply_defaults
from streamrec.features.item_table import ItemFeatureTable

__all__ = ["DefaultContext", "FeatureClient", "ItemFeatureTable", "apply_defaults"]


def __getattr__(name: str) -> object:
    if name == "FeatureClient":
        from streamrec.features.client import FeatureClient

        return FeatureClient
    raise AttributeError(name)
