"""Loading the stages a replica serves: the trained recommender, popularity or the no-op floor."""

from __future__ import annotations

import gc
import importlib
import logging
import time
from typing import Any

from streamrec.data.catalogue import CatalogueView
from streamrec.errors import ConfigError
from streamrec.funnel.fallback import BatchTopN
from streamrec.funnel.stages import Stages
from streamrec.service.args import ServeArgs

log = logging.getLogger(__name__)

#: Import path of the trained recommender's factory.
RECOMMENDER_FACTORY = "streamrec.funnel.recommender:build_stages"


def import_object(path: str) -> Any:
    """Import ``module:attribute`` (``module.attribute`` accepted too).

    Raises:
        ModuleNotFoundError: the module does not exist.
        ConfigError: the attribute does not exist.
    """
    module, _, attr = path.partition(":") if ":" in path else path.rpartition(".")
    mod = importlib.import_module(module)
    try:
        return getattr(mod, attr)
    except AttributeError:
        raise ConfigError(f"'{module}' has no attribute '{attr}' (from '{path}')") from None


class LoadedStages:
    """A stages object and how it came to be.

    Attributes:
        stages: The object implementing :class:`~streamrec.funnel.stages.Stages`.
        kind: ``recommender``, ``popularity``, ``noop`` or ``custom``.
        version: Model version (``model_version`` of the stages when they have one).
        note: Why a fallback was chosen, when one was.
        loaded_at: Epoch seconds.
        load_seconds: Time the factory took.
    """

    def __init__(self, stages: Stages, kind: str, note: str = "", load_seconds: float = 0.0) -> None:
        self.stages = stages
        self.kind = kind
        self.version = str(getattr(stages, "model_version", kind))
        self.note = note
        self.loaded_at = time.time()
        self.load_seconds = load_seconds

    def describe(self) -> dict[str, Any]:
        """Facts for ``/readyz`` and ``/v1/admin/status``."""
        out: dict[str, Any] = {
            "kind": self.kind,
            "model_version": self.version,
            "source_names": list(self.stages.source_names),
            "loaded_at": self.loaded_at,
            "load_seconds": round(self.load_seconds, 3),
        }
        if self.note:
            out["note"] = self.note
        describe = getattr(self.stages, "describe", None)
        if callable(describe):
            out["details"] = describe()
        return out


def _popularity(args: ServeArgs) -> Stages:
    from streamrec.funnel.popularity import PopularityStages

    return PopularityStages.from_data_dir(args.data_dir, **args.popularity)


def load_stages(args: ServeArgs, version: int | None = None) -> LoadedStages:
    """Build the stages object chosen by ``args`` (runs in each replica; may take seconds).

    ``version`` pins the trained recommender to that registry version (a hot reload's) instead
    of whatever the ``champion`` alias names when this replica gets to it.

    ``auto`` tries the trained recommender (imported lazily: it may not exist yet) and falls back
    to popularity with a logged warning when the module or a trained bundle is missing.

    Raises:
        StreamRecError: the chosen stages cannot load (``auto`` never raises for a missing
            recommender; it still raises when even popularity cannot load, e.g. no data).
    """
    t0 = time.perf_counter()
    if args.factory:
        stages = import_object(args.factory)(args.data_dir, **args.factory_kwargs)
        return LoadedStages(stages, "custom", load_seconds=time.perf_counter() - t0)
    if args.stages == "noop":
        from streamrec.funnel.noop import NoopStages

        return LoadedStages(NoopStages(tuple(args.noop_sources)), "noop")
    if args.stages == "popularity":
        return LoadedStages(_popularity(args), "popularity", load_seconds=time.perf_counter() - t0)
    try:
        factory = import_object(RECOMMENDER_FACTORY)
        pinned = {} if version is None else {"version": version}
        stages = factory(args.data_dir, **{"rerank": args.rerank, **pinned, **args.factory_kwargs})
        check = getattr(stages, "self_check", None)
        if callable(check):
            check()  # a bundle that loads but cannot answer a request must not serve
        apply = getattr(stages, "apply_catalogue", None)
        if callable(apply):
            apply(CatalogueView(args.data_dir).state)  # the catalogue changes since the bundle
        return LoadedStages(stages, "recommender", load_seconds=time.perf_counter() - t0)
    except ModuleNotFoundError as err:
        if args.stages == "recommender":
            raise ConfigError(
                f"stages 'recommender' requested but {RECOMMENDER_FACTORY} is missing: {err}"
            ) from err
        note = f"{RECOMMENDER_FACTORY} is not available ({err}); serving popularity"
    except Exception as err:
        if args.stages == "recommender":
            raise
        note = f"the trained recommender could not load ({type(err).__name__}: {err}); serving popularity"
    log.warning(note)
    stages = _popularity(args)
    return LoadedStages(stages, "popularity", note=note, load_seconds=time.perf_counter() - t0)


def settle_heap() -> None:
    """Collect once, then exempt every object alive now from garbage collection (``gc.freeze``).

    A loaded replica holds ~500k Python objects (model, feature-store registry, item table);
    one full collection over them takes ~280 ms here, a latency spike for every request in
    flight whenever the collector decides to run one. Frozen objects are never scanned. Call it
    after loading stages and after every reload commit: it first unfreezes, so stages replaced
    by the previous reload can be collected (until then their reference cycles stay in memory,
    one bundle's worth at most). The collection itself blocks the replica for a few hundred
    milliseconds, once per load or reload instead of at random under traffic.
    """
    gc.unfreeze()
    gc.collect()
    gc.freeze()


def reload_args(args: ServeArgs, loaded: LoadedStages | None) -> ServeArgs:
    """The arguments a hot reload loads with.

    Once the trained recommender serves, a reload must load it again or be refused: ``auto``
    would silently fall back to popularity on a bad bundle.
    """
    if loaded is not None and loaded.kind == "recommender" and args.stages == "auto":
        return args.model_copy(update={"stages": "recommender"})
    return args


def load_fallback(args: ServeArgs, local: LoadedStages | None) -> LoadedStages | None:
    """In-process popularity stages as the gateway's last funnel level (None when pointless or off).

    With ``auto`` a popularity primary (no model yet) becomes the recommender at the first
    promotion's reload, which must find its fallback level (and deadline, breaker) in place.
    """
    if not args.fallback or args.stages == "noop":
        return None
    if local is not None and local.kind == "popularity" and args.stages == "popularity":
        return None  # the primary is popularity for good, in-process: nothing to fall back to
    return load_stages(args.model_copy(update={"stages": "popularity", "factory": None}))


def load_batch(args: ServeArgs, version: int | None) -> BatchTopN:
    """The batch level of a gateway without local stages: ``version``'s (else the champion's) lists."""
    if args.stages not in ("auto", "recommender") or args.factory:
        return BatchTopN.empty()
    from streamrec.paths import resolve_data_dir
    from streamrec.service.reload import champion_version

    try:
        version = champion_version(args.data_dir) if version is None else version
    except Exception as err:  # no registry yet: no batch level until a model is promoted
        log.info("no batch fallback yet (%s)", err)
        return BatchTopN.empty()
    if version is None:
        return BatchTopN.empty()
    return BatchTopN.load(resolve_data_dir(args.data_dir), f"v{version}")
