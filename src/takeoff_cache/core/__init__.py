"""What every other part stands on: names, paths, files written safely, tiles' arithmetic."""
