"""The tamper-evident audit log (CONTRACT §6): who asked what, with what outcome — no PII.

``entry`` (canonical lines, hash chain), ``merkle`` (RFC 9162 tree heads), ``checkpoints``
(Ed25519-signed tree heads in ``meta.sqlite3``), ``log`` (the server's appender), ``verify``
(read-only verification, also while serving), ``record`` (what a request leaves in the log) and
``middleware`` (the one place requests are recorded). See docs/security.md "Audit log".
"""
