"""Scoring: the five Offsite-Tuning settings, recipe trade-offs, checkpoint selection on validation, reports."""
