"""The project's exception tree: every error a user can cause derives from OffsiteError."""


class OffsiteError(Exception):
    """Base of every error this project raises for bad input or an impossible request."""


class DataError(OffsiteError):
    """A data file is missing, malformed, or does not fit the task."""


class ConfigError(OffsiteError):
    """A configuration value is out of range or inconsistent with another."""
