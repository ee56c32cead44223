"""Authentication and authorisation: OAuth2 clients, JWTs, scopes, row-level policy."""
