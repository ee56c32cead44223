"""Metric alerts and RTP drift (CONTRACT §11), evaluated as data is applied."""
