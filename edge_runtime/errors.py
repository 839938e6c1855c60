"""The project's exception tree: every error a user can cause derives from OffsiteError."""

import logging


class OffsiteError(Exception):
    """Base of every error this project raises for bad input or an impossible request."""


class DataError(OffsiteError):
    """A data file is missing, malformed, or does not fit the task."""


class ConfigError(OffsiteError):
    """A configuration value is out of range or inconsistent with another."""


def refusal(error: Exception, what: str, log: logging.Logger) -> str:
    """Why handling `what` failed, as a one-line reason to report: the message of one of our errors (bad input),
    or, for anything else (a bug, or input no check foresaw), an internal error whose trace goes to `log`."""
    if isinstance(error, OffsiteError):
        return str(error)
    log.exception("internal error handling %s", what)
    return f"internal error handling {what}: {error!r}"[:500]
