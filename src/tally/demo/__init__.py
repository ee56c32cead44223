"""Synthetic casino operator data (``tally demo``)."""
