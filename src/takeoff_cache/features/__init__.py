"""Local features of a cache's tiles: extracted at build time, kept per tile, flown as one file."""
