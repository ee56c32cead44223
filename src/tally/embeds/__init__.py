"""Embeddable widgets (CONTRACT §9): signed embed tokens and the charts they draw."""
