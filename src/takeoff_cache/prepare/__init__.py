"""Preparing a flight: the flight plan, its area, the tile download and the prepare job."""
