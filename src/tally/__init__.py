"""Tally: an analytics API for online gaming operators."""

from __future__ import annotations

__version__ = "0.1.0"
