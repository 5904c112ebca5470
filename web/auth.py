"""API-key authentication with roles (``read``, ``operator``) for the HTTP API and the dashboard.

Keys come from ``http.api_keys`` in the configuration. Programs send the key as ``X-API-Key: <key>`` or
``Authorization: Bearer <key>``. Browsers log in once on ``/login`` with a key and get a session cookie
(``lt_session``: key name, expiry and an HMAC-SHA256 keyed with that API key; HttpOnly, SameSite=Strict), so the key
itself is never stored in the browser and removing a key from the configuration ends its sessions.
Form posts from the dashboard also carry a CSRF token derived from the session.

No key → 401; a valid key whose role is too low → 403. With no keys configured every protected endpoint answers 401.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from dataclasses import dataclass

from fastapi import HTTPException, Request

from lesiontrack.config.settings import HttpSettings

ROLES = {"read": 0, "operator": 1}
SESSION_COOKIE = "lt_session"
SESSION_SECONDS = 12 * 3600


@dataclass(frozen=True)
class Principal:
    """Who is calling: the configured key's name (logged as the actor) and its role."""

    name: str
    role: str
    via: str = "key"  # "key" (header) or "session" (cookie)

    def allows(self, role: str) -> bool:
        return ROLES[self.role] >= ROLES[role]

    @property
    def actor(self) -> str:
        return f"api:{self.name}"


class KeyRing:
    """The configured API keys; compares in constant time."""

    def __init__(self, http: HttpSettings) -> None:
        self._keys = [(k.name, k.key.get_secret_value(), k.role) for k in http.api_keys]

    @property
    def empty(self) -> bool:
        return not self._keys

    def by_key(self, presented: str) -> Principal | None:
        found = None
        for name, secret, role in self._keys:
            if hmac.compare_digest(secret.encode(), presented.encode()):
                found = Principal(name, role)
        return found

    def _secret(self, name: str) -> tuple[str, str] | None:
        for n, secret, role in self._keys:
            if n == name:
                return secret, role
        return None

    # -- browser sessions -------------------------------------------------------------------------
    def make_session(self, principal: Principal, now: float | None = None) -> str:
        found = self._secret(principal.name)
        if found is None:
            raise KeyError(principal.name)
        expiry = int((now or time.time()) + SESSION_SECONDS)
        payload = f"{principal.name}.{expiry}"
        return f"{payload}.{_sign(found[0], payload)}"

    def by_session(self, token: str, now: float | None = None) -> Principal | None:
        try:
            name, expiry_s, sig = token.rsplit(".", 2)
            expiry = int(expiry_s)
        except ValueError:
            return None
        found = self._secret(name)
        if found is None or expiry < (now or time.time()):
            return None
        if not hmac.compare_digest(_sign(found[0], f"{name}.{expiry}"), sig):
            return None
        return Principal(name, found[1], via="session")

    def csrf_token(self, session_token: str) -> str:
        name = session_token.split(".", 1)[0]
        found = self._secret(name)
        return _sign(found[0] if found else "", "csrf:" + session_token)


def _sign(secret: str, payload: str) -> str:
    return hmac.new(
        hashlib.sha256(("lesiontrack-session:" + secret).encode()).digest(), payload.encode(), hashlib.sha256
    ).hexdigest()


def presented_key(request: Request) -> str | None:
    key = request.headers.get("x-api-key")
    if key:
        return key.strip()
    auth = request.headers.get("authorization", "")
    if auth.lower().startswith("bearer "):
        return auth[7:].strip()
    return None


def identify(request: Request) -> Principal | None:
    """The caller, from a key header or the dashboard session cookie (None if neither is valid)."""
    keys: KeyRing = request.app.state.keys
    key = presented_key(request)
    if key:
        return keys.by_key(key)
    token = request.cookies.get(SESSION_COOKIE)
    if token:
        return keys.by_session(token)
    return None


def _require(request: Request, role: str) -> Principal:
    principal = identify(request)
    if principal is None:
        keys: KeyRing = request.app.state.keys
        detail = "no API keys configured (http.api_keys)" if keys.empty else "missing or invalid API key"
        raise HTTPException(status_code=401, detail=detail, headers={"WWW-Authenticate": 'Bearer realm="lesiontrack"'})
    if not principal.allows(role):
        raise HTTPException(status_code=403, detail=f"role '{principal.role}' may not do this (needs '{role}')")
    request.state.principal = principal
    return principal


def require_read(request: Request) -> Principal:
    """FastAPI dependency: any valid key (read or operator)."""
    return _require(request, "read")


def require_operator(request: Request) -> Principal:
    """FastAPI dependency: an operator key (retry, re-analyse)."""
    return _require(request, "operator")
