"""The API key check both frontends share: Bearer parsing, constant-time compare, open paths.

Owns one rule: a request is authorized when no key is configured, or when it carries
``Authorization: Bearer <key>`` (HTTP header or gRPC metadata; the scheme is matched without
regard to case, RFC 9110 section 11.1) whose token equals the key, compared in constant time.
Also says which HTTP paths stay open with a key set. Must not log or echo the key.
"""

from __future__ import annotations

import hmac

OPEN_HTTP_PATHS = frozenset(
    {"/health", "/version", "/metrics", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"}
)
"""HTTP paths served without the key (probes, Prometheus, the API's own description)."""

WWW_AUTHENTICATE = 'Bearer realm="splitserve"'
"""The challenge every HTTP 401 carries (RFC 6750 section 3)."""


class ApiKeyCheck:
    """Compares presented credentials with the configured key (None: every request passes)."""

    def __init__(self, api_key: str | None) -> None:
        self._key = api_key.encode() if api_key else None

    def __repr__(self) -> str:  # never the key itself
        return f"ApiKeyCheck(required={self.required})"

    @property
    def required(self) -> bool:
        return self._key is not None

    def authorized(self, header: bytes | str | None) -> bool:
        """Whether an ``Authorization`` value (bytes, str or missing) carries the key."""
        if self._key is None:
            return True
        token = bearer_token(header)
        return token is not None and hmac.compare_digest(token, self._key)


def bearer_token(header: bytes | str | None) -> bytes | None:
    """The token of ``Bearer <token>`` (any case of ``Bearer``), else None."""
    if header is None:
        return None
    raw = header.encode("latin-1", "replace") if isinstance(header, str) else header
    scheme, _, token = raw.strip().partition(b" ")
    if scheme.lower() != b"bearer":
        return None
    token = token.strip()
    return token or None


def http_path_is_open(path: str) -> bool:
    """True for the paths served without the key (``OPEN_HTTP_PATHS``)."""
    return path in OPEN_HTTP_PATHS
