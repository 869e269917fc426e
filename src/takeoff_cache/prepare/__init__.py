"""Preparing a flight: the flight plan, its area, the tile download and the prepare job."""

# The zoom levels prepare downloads and builds when the request names none.
DEFAULT_ZOOMS = (16, 17)
