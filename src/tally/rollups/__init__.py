"""Pre-computed rollups of the additive measures at 1m, 1h and 1d."""
