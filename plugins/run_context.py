"""MLflow run-context provider: every run started where the plugin is installed records its version."""

from mlflow.tracking.context.abstract_context import RunContextProvider


class SelpruneRunContextProvider(RunContextProvider):
    """Adds ``selprune.plugin_version`` to new runs, so an audit can tell which code touched them."""

    def in_context(self) -> bool:
        return True

    def tags(self) -> dict:
        from mlflow_selprune._version import __version__

        return {"selprune.plugin_version": __version__}
