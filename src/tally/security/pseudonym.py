"""Keyed pseudonymisation of ``player_id`` at ingest, for producers that cannot alias players
themselves (``TALLY_PSEUDONYMISE_KEY``).

With ``TALLY_PSEUDONYMISE_SCOPE=brand`` (the default) each brand (tenant) gets its own key,
derived from the one master key with HKDF-SHA256 (RFC 5869, ``info`` = a label and the tenant
id), so the same player id under two brands gives unrelated pseudonyms and one brand's
pseudonyms say nothing about another's; distinct counts across brands then count such an id
once per brand. With ``deployment`` every brand shares one derived key, for platforms whose
player ids are global (one person, several brands). A pseudonym is
``base64url(HMAC-SHA256(tenant_key, player_id))`` cut to 22 characters: 132 bits, so among
a billion players of one brand the chance of any two sharing a pseudonym is about 10^-22.
The mapping is deterministic (the same player always gets the same pseudonym, so distinct
counts, funnels and retention are unchanged) and one-way without the key.
"""

from __future__ import annotations

import base64
import hmac

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from pydantic import SecretStr

from tally.config_values import MIN_KEY_LENGTH

PSEUDONYM_LENGTH = 22  # base64url characters: 132 bits of the 256-bit HMAC
_INFO = b"tally/player_id-pseudonym/v1/"  # + the tenant id: one key per brand
_DEPLOYMENT = b"tally/player_id-pseudonym/v1:deployment"  # one key for every brand
SCOPES = ("brand", "deployment")


class Pseudonymiser:
    """``pseudonym(tenant_id, player_id)``; tenant keys are derived once and kept."""

    def __init__(self, master_key: bytes, per_brand: bool = True) -> None:
        if len(master_key) < MIN_KEY_LENGTH:
            raise ValueError(f"the pseudonymisation key needs at least {MIN_KEY_LENGTH} bytes")
        self._master = master_key
        self._per_brand = per_brand
        self._tenant_keys: dict[str, bytes] = {}

    def tenant_key(self, tenant_id: str) -> bytes:
        scope = tenant_id if self._per_brand else ""
        key = self._tenant_keys.get(scope)
        if key is None:
            hkdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=None,
                        info=(_INFO + scope.encode()) if self._per_brand else _DEPLOYMENT)
            key = self._tenant_keys[scope] = hkdf.derive(self._master)
        return key

    def pseudonym(self, tenant_id: str, player_id: str) -> str:
        return _encode(hmac.digest(self.tenant_key(tenant_id), player_id.encode(), "sha256"))

    def column(self, tenant_ids: list[str], player_ids: list[str | None]) -> list[str | None]:
        """The ``player_id`` column of a batch, pseudonymised (missing ids stay missing)."""
        keys = {tenant: self.tenant_key(tenant) for tenant in set(tenant_ids)}
        digest = hmac.digest
        return [None if player is None else _encode(digest(keys[tenant], player.encode(),
                                                           "sha256"))
                for tenant, player in zip(tenant_ids, player_ids, strict=True)]

    def __repr__(self) -> str:  # never show the key
        return "Pseudonymiser(<key>)"


def _encode(mac: bytes) -> str:
    return base64.urlsafe_b64encode(mac).decode()[:PSEUDONYM_LENGTH]


def pseudonymiser_for(key: SecretStr | None, scope: str = "brand") -> Pseudonymiser | None:
    """The deployment's pseudonymiser (``TALLY_PSEUDONYMISE_KEY``, ``…_SCOPE``), or None."""
    if key is None:
        return None
    return Pseudonymiser(key.get_secret_value().encode(), per_brand=scope == "brand")
