"""API tokens: made once, stored as their sha256, checked in constant time."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from worker.db.models import ApiToken, utc_now

__all__ = ["TokenInfo", "create_token", "list_tokens", "revoke_token", "token_is_valid"]


@dataclass(frozen=True, slots=True)
class TokenInfo:
    """A token as `papscan token list` shows it (never the token itself)."""

    name: str
    created_at: datetime
    revoked_at: datetime | None


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def create_token(s: Session, name: str) -> str:
    """Store a new token named `name` and return it (the only time it is seen).

    Raises:
        ValueError: the name is empty, too long, or names a token not revoked.
    """
    name = name.strip()
    if not name or len(name) > 64:
        raise ValueError("a token name must have 1 to 64 characters.")
    taken = s.scalar(select(ApiToken.id).where(ApiToken.name == name, _active()))
    if taken is not None:
        raise ValueError(f"a token named {name!r} exists; revoke it first or pick another name.")
    token = "papscan_" + secrets.token_urlsafe(32)
    s.add(ApiToken(name=name, token_sha256=_digest(token), created_at=utc_now()))
    s.flush()
    return token


def list_tokens(s: Session) -> list[TokenInfo]:
    """Every token's name and dates, oldest first."""
    rows = s.execute(
        select(ApiToken.name, ApiToken.created_at, ApiToken.revoked_at).order_by(ApiToken.id)
    )
    return [TokenInfo(*row) for row in rows]


def revoke_token(s: Session, name: str) -> int:
    """Revoke the tokens named `name` that are not yet revoked; return how many."""
    found = list(s.scalars(select(ApiToken).where(ApiToken.name == name.strip(), _active())))
    for token in found:
        token.revoked_at = utc_now()
    return len(found)


def token_is_valid(s: Session, token: str) -> bool:
    """Whether `token` is a stored, unrevoked token.

    Every active hash is compared with `hmac.compare_digest`, without stopping early.
    """
    digest = _digest(token)
    valid = False
    for stored in s.scalars(select(ApiToken.token_sha256).where(_active())):
        valid |= hmac.compare_digest(stored, digest)
    return valid


def _active():
    return ApiToken.revoked_at.is_(None)
