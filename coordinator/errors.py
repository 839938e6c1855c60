"""Errors of the model owner's side, under the project's one base class."""

from edge_runtime.errors import ConfigError, DataError, OffsiteError

__all__ = ["ArchitectureError", "ConfigError", "DataError", "ModelSourceError", "OffsiteError"]


class ArchitectureError(OffsiteError):
    """The model's architecture has no spec in the registry."""


class ModelSourceError(OffsiteError):
    """A model name or path cannot be resolved or loaded."""
