"""Webhooks out of Tally (CONTRACT §8): signing secrets per client, Standard Webhooks
signatures, and delivery to a guarded destination with retries."""
