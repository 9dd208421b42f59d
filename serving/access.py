"""Who may use which served model: with tenants, a request carries its tenant's bearer token (the controller's) and
sees only that tenant's models; another tenant's model is not found, as on the controller.

The Serve app gets the tokens' SHA-256 digests, never the tokens: its config is readable in Ray's dashboard.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def user_config(models: Mapping[str, str], owners: Mapping[str, str], tenant_tokens: Mapping[str, Iterable[str]]):
    """The deployments' user_config: model paths, each model's tenant, token digests -> tenant."""
    digests = {token_digest(token): tenant for tenant, tokens in tenant_tokens.items() for token in tokens}
    return {"models": dict(sorted(models.items())), "owners": dict(sorted(owners.items())), "tokens": digests}


class Unauthenticated(Exception):
    """No or an unknown bearer token where tenants are configured."""


@dataclass(frozen=True)
class Access:
    owners: dict[str, str] = field(default_factory=dict)
    tenants_by_digest: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_user_config(cls, config: Mapping[str, Any]) -> Access:
        return cls(dict(config.get("owners", {})), dict(config.get("tokens", {})))

    def tenant(self, token: str | None) -> str | None:
        """The caller's tenant from its bearer token (None: the request had none); None when no tenants are
        configured."""
        if not self.tenants_by_digest:
            return None
        tenant = self.tenants_by_digest.get(token_digest(token)) if token else None
        if tenant is None:
            raise Unauthenticated("send `Authorization: Bearer <token>` with your controller token")
        return tenant

    def visible(self, tenant: str | None, model_id: str) -> bool:
        return tenant is None or self.owners.get(model_id) == tenant
