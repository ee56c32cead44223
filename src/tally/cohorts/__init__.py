"""Funnels, retention and LTV (docs/cohorts.md)."""
