"""Validated YAML profiles of real devices (memory, compute, execution providers)."""
