"""The MLflow-backed :class:`ModelRegistry`: bundles, aliases, gated promotion, rollback.

Each bundle is one MLflow run (params, metrics, tags, the bundle as artifacts) and one
registered model version; see ``docs/adr/ADR-003-model-registry.md``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal

from streamrec.errors import ConfigError, RegistryError
from streamrec.paths import DataLayout
from streamrec.registry.aliases import CHAMPION, AliasHistory, check_alias
from streamrec.registry.cache import BundleCache
from streamrec.registry.events import EventLog, RegistryEvent
from streamrec.registry.gates import (
    GateResult,
    PromotionDecision,
    PromotionGateError,
    no_regression_gate,
    schema_gate,
)
from streamrec.registry.manifest import BundleManifest, read_manifest
from streamrec.registry.model import RegisteredModel
from streamrec.registry.registration import BundleRegistrar
from streamrec.registry.state import ServingState
from streamrec.registry.tracking import TrackingStore
from streamrec.registry.versions import TAG, ModelVersionInfo

log = logging.getLogger(__name__)


class ModelRegistry:
    """StreamRec's model registry on MLflow: bundles, aliases, gated promotion, rollback.

    Args:
        tracking_uri: MLflow tracking/registry URI. Default: ``$MLFLOW_TRACKING_URI`` if set
            (e.g. ``http://mlflow:5000``), else ``sqlite:///<data_dir>/mlflow.db`` with
            artifacts under ``<data_dir>/mlartifacts``.
        data_dir: StreamRec data directory (see :mod:`streamrec.paths`); also holds the
            download cache ``<data_dir>/models/registry/<model_name>/``.
        model_name: Registered model name (also the experiment name of the bundle runs).
        probe_timeout_s: Timeout of the reachability probe of an HTTP tracking server.

    Raises:
        RegistryError: the tracking server or database cannot be reached, naming the URI.

    Note:
        Once the probe passed, MLflow's own HTTP client retries failed requests with backoff
        (``MLFLOW_HTTP_REQUEST_MAX_RETRIES``, ``MLFLOW_HTTP_REQUEST_TIMEOUT``); a server that
        dies mid-operation can take minutes to surface, and is then reported as a
        :class:`RegistryError` with the registration rolled back.
    """

    def __init__(
        self,
        tracking_uri: str | None = None,
        data_dir: str | os.PathLike[str] | None = None,
        model_name: str = "streamrec",
        *,
        probe_timeout_s: float = 3.0,
    ) -> None:
        self.layout = DataLayout.at(data_dir)
        self.model_name = model_name
        self.probe_timeout_s = probe_timeout_s
        store = TrackingStore.resolve(tracking_uri, self.layout, probe_timeout_s)
        self.tracking_uri: str = store.uri
        self.artifact_root = self.layout.root / "mlartifacts"
        self.cache_dir = self.layout.models / "registry" / model_name
        self._client = store.connect()
        self._model = RegisteredModel(self._client, model_name)
        self._aliases = AliasHistory(self._model)
        self._state = ServingState(self._model)
        self._events = EventLog(self._model)
        self._cache = BundleCache(self._client, self.cache_dir)
        self._registrar = BundleRegistrar(self._model, self.tracking_uri, self.artifact_root)

    def _experiment(self) -> str:
        return self._registrar.experiment()

    def _resolve(self, version_or_alias: int | str) -> ModelVersionInfo:
        if isinstance(version_or_alias, int) or str(version_or_alias).isdigit():
            return self.get_version(int(version_or_alias))
        alias = str(version_or_alias)
        check_alias(alias)
        info = self.get(alias)
        if info is None:
            raise RegistryError(f"alias '{alias}' of model '{self.model_name}' is not set")
        return info

    # ---- registration ---------------------------------------------------------------------

    def register(
        self, bundle_dir: str | os.PathLike[str], *, run_name: str | None = None
    ) -> ModelVersionInfo:
        """Register a bundle as a new model version, all or nothing.

        Verifies the bundle, then in one MLflow run logs the config as params, the metrics,
        tags (git sha, data cutoff, feature schema version, eval set, bundle digest) and the
        bundle (``manifest.json`` and every file it lists; unlisted files stay behind) as
        artifacts under ``bundle/``, checks the upload, and creates a model
        version whose source is that artifact directory. If any step fails, the version (if
        created) is deleted and the run is marked ``FAILED``: nothing is half-registered and no
        alias moves. Registering the same bundle again (same manifest digest) returns the
        existing version.

        Args:
            bundle_dir: The bundle directory (with ``manifest.json``).
            run_name: MLflow run name; defaults to the manifest's name.

        Returns:
            The new (or existing identical) version.

        Raises:
            CorruptCheckpointError: the bundle does not verify; nothing was logged.
            RegistryError: MLflow failed midway; the registration was rolled back.
        """
        return self._registrar.register(bundle_dir, run_name=run_name)

    # ---- reading --------------------------------------------------------------------------

    def get_version(self, version: int) -> ModelVersionInfo:
        """The registered version ``version``.

        Raises:
            RegistryError: no such version.
        """
        return self._model.version(version)

    def get(self, alias: str) -> ModelVersionInfo | None:
        """The version an alias points at, or None when the alias is not set."""
        check_alias(alias)
        v = self._model.aliases().get(alias)
        return None if v is None else self.get_version(v)

    def aliases(self) -> dict[str, int]:
        """Every alias that is set, and the version it points at."""
        return self._model.aliases()

    def list_versions(self) -> list[ModelVersionInfo]:
        """All versions of the model, oldest first."""
        return self._model.versions()

    def download(self, version_or_alias: int | str, dst: str | os.PathLike[str] | None = None) -> Path:
        """A verified local copy of a registered bundle.

        Args:
            version_or_alias: A version number or an alias.
            dst: Target directory (must not exist, be empty, or already hold this exact bundle).
                Default: the cache ``<data_dir>/models/registry/<model>/v<N>-<digest>``, reused
                when it still verifies.

        Returns:
            The bundle directory.

        Raises:
            CorruptCheckpointError: the stored bundle does not verify (naming the file) or is
                not the bundle that was registered.
            RegistryError: the version or alias does not exist, or ``dst`` holds something else.
        """
        return self._cache.download(self._resolve(version_or_alias), dst)

    def model_age(
        self,
        alias: str = CHAMPION,
        *,
        reference: Literal["data_cutoff", "created_at"] = "data_cutoff",
        now: datetime | None = None,
    ) -> timedelta:
        """How old the model behind ``alias`` is.

        Args:
            alias: Which alias.
            reference: ``data_cutoff`` (age of the newest data it learned from; the default,
                what freshness alerts want) or ``created_at`` (time since training).
            now: The current time (UTC); injectable for tests.

        Raises:
            RegistryError: the alias is not set or the version lacks the timestamp.
        """
        info = self._resolve(alias)
        ts = info.data_cutoff if reference == "data_cutoff" else info.created_at
        if ts is None:
            raise RegistryError(
                f"version {info.version} has no {reference} tag; it was not registered by StreamRec"
            )
        return (now or datetime.now(UTC)) - ts

    # ---- aliases --------------------------------------------------------------------------

    def set_alias(self, alias: str, version: int, *, force: bool = False) -> ModelVersionInfo:
        """Point ``challenger`` or ``shadow`` at a version, without gates.

        The champion moves only through :meth:`promote` (gated) and :meth:`rollback`;
        ``force=True`` is the audited break-glass (recorded in the alias history).

        Raises:
            ConfigError: unknown alias, or ``champion`` without ``force``.
            RegistryError: no such version.
        """
        check_alias(alias)
        if alias == CHAMPION and not force:
            raise ConfigError(
                "the champion moves only through promote() (gated) or rollback(); force=True overrides"
            )
        info = self.get_version(version)
        reason = "forced" if alias == CHAMPION else "set"
        previous = self._aliases.move(alias, info.version, reason=reason)
        self.record_event(info.version, reason, alias, previous=previous)
        return self.get_version(info.version)

    def clear_alias(self, alias: str) -> None:
        """Remove ``challenger`` or ``shadow`` (e.g. when an experiment ends); not the champion."""
        check_alias(alias)
        if alias == CHAMPION:
            raise ConfigError("the champion cannot be cleared; promote another version or roll back")
        current = self._aliases.clear(alias)
        if current is not None:
            self.record_event(current, "cleared", alias)

    # ---- serving state ----------------------------------------------------------------------

    def serving_state(self) -> tuple[dict[str, int], dict[str, Any]]:
        """Every alias and every named state (e.g. the rollout), from one read of the registry."""
        return self._state.read()

    def write_state(self, name: str, value: dict[str, Any] | None) -> None:
        """Set (or with None remove) a named JSON state kept with the registered model.

        Raises:
            RegistryError: the registry could not be written.
        """
        self._state.write(name, value)

    # ---- history --------------------------------------------------------------------------

    def record_event(self, version: int, event: str, alias: str, **detail: Any) -> None:
        """Record one change (what, when, why, the numbers) as a tag of ``version``.

        Tags of the version that a change concerns, one per event: the record survives as long
        as the version does, and a registry server keeps it with no extra store.
        """
        self._events.record(version, event, alias, **detail)

    def history(self, limit: int | None = 50) -> list[RegistryEvent]:
        """Recorded changes, newest first (at most ``limit``)."""
        return self._events.history(limit)

    def rollback(self, alias: str = CHAMPION, reason: str = "") -> ModelVersionInfo:
        """Move ``alias`` back to the version it pointed at before the last promotion.

        Args:
            alias: The alias to move back.
            reason: Why (recorded in the history).

        Returns:
            The version the alias now points at.

        Raises:
            RegistryError: there is no previous version to go back to.
        """
        check_alias(alias)
        current, target = self._aliases.roll_back(alias)
        self.record_event(target, "rolled_back", alias, rolled_back_from=current, reason=reason)
        return self.get_version(target)

    # ---- promotion ------------------------------------------------------------------------

    def promote(
        self,
        version: int,
        *,
        to: str = CHAMPION,
        tolerance: float = 0.01,
        primary_metric: str = "ndcg@10",
        smoke_test: Callable[[Path], None] | None = None,
        allow_schema_change: bool = False,
        raise_on_refusal: bool = True,
        online: str | None = None,
    ) -> PromotionDecision:
        """Move ``to`` to ``version`` if it passes the gates, else leave every alias as it is.

        Gates, in order (the first failure stops; later gates are reported as skipped):

        1. *bundle*: the version downloads, verifies (files and digest) and ``smoke_test(path)``
           returns without raising (the caller loads the models and scores a smoke batch).
        2. *feature_schema*: :func:`schema_compatible` with the champion's manifest, unless
           ``allow_schema_change`` (after the feature pipeline was rolled out).
        3. *no_regression*: the candidate and champion share the evaluation set id and the
           primary metric, and no shared metric regresses by more than ``tolerance``
           (relative; lower-is-better metrics such as losses the other way). With ``online``,
           compared and reported but not refusing (an online experiment decided).

        With no champion yet, gates 2 and 3 pass. On success the previous holder of ``to`` is
        recorded in the alias history so :meth:`rollback` can restore it.

        Args:
            version: Candidate version.
            to: Target alias.
            tolerance: Allowed relative regression per metric, in ``[0, 1)``.
            primary_metric: Metric that must be present on both sides (reported first).
            smoke_test: Callable given the local, verified bundle directory.
            allow_schema_change: Skip the schema gate's refusal (recorded in the decision).
            raise_on_refusal: Raise :class:`PromotionGateError` on refusal instead of returning.
            online: The verdict of the online experiment the candidate won (e.g. the rollout's
                significant lift); it stands in for gate 3's refusal (ADR-012).

        Returns:
            The decision.

        Raises:
            PromotionGateError: (a :class:`~streamrec.errors.PromotionRefusedError`) a gate
                refused and ``raise_on_refusal``; the champion is unchanged.
            RegistryError: the registry could not be read or the alias not moved.
            ConfigError: bad alias or tolerance.
        """
        check_alias(to)
        if not 0 <= tolerance < 1:
            raise ConfigError(f"tolerance must be in [0, 1), got {tolerance}")
        cand = self.get_version(version)
        aliases = self._model.aliases()
        previous = aliases.get(to)
        champ_v = aliases.get(CHAMPION)
        champion = None if champ_v is None or champ_v == cand.version else self.get_version(champ_v)

        gate1, cand_manifest = self._bundle_gate(cand, smoke_test)
        champ_manifest = self._cache.manifest(champion) if champion is not None and cand_manifest else None
        gate2 = schema_gate(cand_manifest, champ_manifest, allow_schema_change=allow_schema_change)
        gate3, comparisons = no_regression_gate(
            cand_manifest,
            champ_manifest,
            earlier_passed=gate1.passed is True and gate2.passed is True,
            tolerance=tolerance,
            primary_metric=primary_metric,
            online=online,
        )
        gates = [gate1, gate2, gate3]

        accepted = all(g.passed is True for g in gates)
        champ_txt = f"champion v{champion.version}" if champion else "no champion"
        if accepted:
            prev = self._aliases.move(to, cand.version, reason="promoted")
            primary = next((c for c in comparisons if c.metric == primary_metric), None)
            gain = f", {primary_metric} {primary.relative_change:+.1%} vs {champ_txt}" if primary else ""
            was = "already there" if prev == cand.version else f"was {prev}"
            message = f"promoted {self.model_name} v{cand.version} to '{to}' ({was}){gain}"
            if online is not None and gate3.detail.startswith("decided online"):  # it would have refused
                message += f"; {gate3.detail}"
            log.info(message)
            self.record_event(
                cand.version,
                "promoted",
                to,
                previous=prev,
                metrics={c.metric: {"candidate": c.candidate, "champion": c.champion} for c in comparisons},
                message=message,
                **({"online": online, "no_regression": gate3.detail} if online is not None else {}),
            )
        else:
            failed = next(g for g in gates if g.passed is False)
            message = (
                f"promotion of {self.model_name} v{cand.version} to '{to}' refused at gate {failed.gate} "
                f"({failed.name}): {failed.detail}; '{to}' unchanged ({previous})"
            )
            log.warning(message)
            try:
                self._client.set_model_version_tag(
                    self.model_name, str(cand.version), f"{TAG}{to}.refused", message[:5000]
                )
            except Exception as err:  # pragma: no cover - audit tag only
                log.warning("could not tag the refusal: %s", err)
            self.record_event(cand.version, "refused", to, gate=failed.name, message=message)
        decision = PromotionDecision(
            accepted=accepted,
            version=cand.version,
            alias=to,
            previous_version=previous,
            champion_version=champion.version if champion else None,
            gates=tuple(gates),
            comparisons=tuple(comparisons),
            message=message,
        )
        if not accepted and raise_on_refusal:
            raise PromotionGateError(decision)
        return decision

    def _bundle_gate(
        self, cand: ModelVersionInfo, smoke_test: Callable[[Path], None] | None
    ) -> tuple[GateResult, BundleManifest | None]:
        """Gate 1, *bundle*: the version downloads, verifies and passes ``smoke_test``.

        Returns:
            The result, and the candidate's manifest (None when it did not download and verify).
        """
        cand_manifest: BundleManifest | None = None
        try:
            path = self.download(cand.version)
            cand_manifest = read_manifest(path)
            if smoke_test is not None:
                smoke_test(path)
            detail = "verified" + (" + smoke test" if smoke_test else " (no smoke test supplied)")
            return GateResult(1, "bundle", True, detail), cand_manifest
        except Exception as err:
            what = "smoke test" if cand_manifest is not None else "bundle verification"
            return GateResult(
                1, "bundle", False, f"{what} failed: {type(err).__name__}: {err}"
            ), cand_manifest
