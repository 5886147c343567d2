"""One exception hierarchy for StreamRec.

Every error a user can cause derives from :class:`StreamRecError` and carries a message that
says what went wrong *and what to do about it*. The CLI prints these as one line and exits
non-zero; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class StreamRecError(Exception):
    """Base class of every error StreamRec raises on purpose."""

    exit_code: int = 1


class ConfigError(StreamRecError):
    """A configuration file or flag is invalid (unknown key, wrong type, missing value)."""

    exit_code = 2


class DataError(StreamRecError):
    """Input data cannot be read or does not look like the declared format."""


class DataNotFoundError(DataError):
    """A path or dataset that was asked for does not exist."""


class DataContractError(DataError):
    """Too many rows failed the data contract (schema drift or corruption).

    The run stops *after* writing the quarantine and the validation report, so the bad rows
    can be inspected.
    """


class FeatureStoreError(StreamRecError):
    """The feature store is misconfigured or a feature build failed."""


class MissingFeatureColumnsError(FeatureStoreError):
    """A feature build found its input without the columns it needs."""


class OnlineStoreUnavailableError(FeatureStoreError):
    """The online store (SQLite or Redis) cannot be reached.

    Serving catches this to fall back to stale or default features.
    """


class InvalidPayloadError(StreamRecError):
    """A pushed event or API payload is malformed; nothing was written."""


class ModelError(StreamRecError):
    """A model could not be trained, loaded or scored."""


class TrainingDataError(ModelError):
    """The training window is empty, too small, or has no positives."""


class CorruptCheckpointError(ModelError):
    """A checkpoint or bundle on disk cannot be loaded."""


class RegistryError(StreamRecError):
    """The model registry (MLflow) is unreachable or inconsistent."""


class PromotionRefusedError(RegistryError):
    """A candidate model failed a promotion gate; the champion is unchanged."""


class ServingError(StreamRecError):
    """A serving stage failed in a way that the fallback chain should handle."""


class StageVersionMismatchError(ServingError):
    """A request met stages of two model versions (cluster replicas mid-reload or out of step).

    Never a missing retrieval source: the whole request goes to the fallback level.
    """


class InjectedFaultError(ServingError):
    """A fault switched on in the Serve config's ``faults`` block (fault tests); turn it off there."""
