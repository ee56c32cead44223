"""Storage backends behind one protocol (DuckDB embedded by default)."""
