"""The MLflow layer between the core and the commands: :mod:`~prunebench.tracking.schema` names what is
tracked, :mod:`~prunebench.tracking.store` connects to a store, :mod:`~prunebench.tracking.runs` runs the
lifecycle. The core never imports this package (docs/architecture.md)."""
