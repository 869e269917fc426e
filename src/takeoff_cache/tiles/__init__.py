"""The tile corpus: MBTiles files, the selection of an area's tiles, area geometry."""
