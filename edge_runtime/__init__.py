"""Device side of offsite tuning: bundle, wire and training on the data owner's machine (no torch import)."""

__version__ = "0.1.0"
