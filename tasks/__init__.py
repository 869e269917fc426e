"""Prefect tasks: thin wrappers around the library, one per build phase."""
