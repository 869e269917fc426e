"""Prefect flows composed from the phase tasks."""
