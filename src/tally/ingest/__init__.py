"""Ingestion: validate → dedup → durable group commit; idempotency keys; quarantine."""
