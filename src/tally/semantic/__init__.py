"""The semantic layer: one definition per metric, used by every endpoint."""
