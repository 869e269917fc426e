"""Localizing against a cache: locate, the self-test and the coverage map."""
