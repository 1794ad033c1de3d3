"""Images to predictions on any backend: the one prediction path, tiles, flip ensembles, temporal alignment."""
