"""The MLflow registered model a :class:`ModelRegistry` manages: its versions, aliases and tags."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from streamrec.errors import RegistryError
from streamrec.registry.versions import ModelVersionInfo

if TYPE_CHECKING:
    from mlflow import MlflowClient


class RegisteredModel:
    """Reads of one registered model by name, through a shared MLflow client.

    Args:
        client: The MLflow client (shared with the registry's other parts).
        name: Registered model name.
    """

    def __init__(self, client: MlflowClient, name: str) -> None:
        self.client = client
        self.name = name

    def ensure(self) -> None:
        """Create the registered model if it does not exist yet."""
        from mlflow.exceptions import MlflowException

        try:
            self.client.get_registered_model(self.name)
        except MlflowException as err:
            if err.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
            self.client.create_registered_model(
                self.name, description="StreamRec bundles (see docs/adr/ADR-003-model-registry.md)"
            )

    def fetch(self) -> Any | None:
        """The MLflow registered model, or None before the first registration."""
        from mlflow.exceptions import MlflowException

        try:
            return self.client.get_registered_model(self.name)
        except MlflowException as err:
            if err.error_code == "RESOURCE_DOES_NOT_EXIST":
                return None
            raise RegistryError(f"cannot read registered model '{self.name}': {err}") from None

    def aliases(self) -> dict[str, int]:
        """Every alias that is set, and the version it points at."""
        rm = self.fetch()
        return {} if rm is None else {a: int(v) for a, v in (rm.aliases or {}).items()}

    def tags(self) -> dict[str, str]:
        """The registered model's tags."""
        rm = self.fetch()
        return {} if rm is None else dict(rm.tags or {})

    def version(self, version: int) -> ModelVersionInfo:
        """The registered version ``version``.

        Raises:
            RegistryError: no such version.
        """
        from mlflow.exceptions import MlflowException

        try:
            mv = self.client.get_model_version(self.name, str(version))
        except MlflowException as err:
            raise RegistryError(f"model '{self.name}' has no version {version} ({err.error_code})") from None
        return ModelVersionInfo.from_mlflow(mv)

    def versions(self) -> list[ModelVersionInfo]:
        """All versions of the model, oldest first."""
        try:
            mvs = self.client.search_model_versions(f"name = '{self.name}'")
        except Exception as err:
            raise RegistryError(f"cannot list versions of '{self.name}': {err}") from None
        return sorted((ModelVersionInfo.from_mlflow(mv) for mv in mvs), key=lambda i: i.version)
