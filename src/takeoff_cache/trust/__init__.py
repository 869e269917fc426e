"""Keys, the signed manifest and the one reader of a cache's files."""
