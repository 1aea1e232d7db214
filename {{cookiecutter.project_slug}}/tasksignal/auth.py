"""Who is calling the JSON API: a bearer token, or the user logged in to this site.

A request that sends ``Authorization`` is judged by that header alone, so a bad token is
never rescued by a session cookie; without the header the session decides. Token
requests need no CSRF token (a browser never adds that header by itself); session
requests keep Django's CSRF protection for unsafe methods, checked here because the API
views are exempt from the middleware's own check.

Tokens are made with :func:`create_token` (or ``manage.py create_api_token``). A web
process remembers the user behind a token, with that user's permissions, for
``TASKSIGNAL_TOKEN_CACHE_SECONDS`` (default 5): most API requests then cost no database
round trip to authenticate. So a deleted token, a deactivated user or a withdrawn
permission stops working within that many seconds, not at once.

>>> hash_secret("tsk_example")[:16]
'20746b998d2b7f3b'
"""

import hashlib
import secrets
import threading
import time
from dataclasses import dataclass
from typing import Any, cast

from django.contrib.auth import get_user_model
from django.http import HttpRequest, HttpResponse
from django.middleware.csrf import CsrfViewMiddleware

from tasksignal import conf, sql
from tasksignal.models import ApiToken

#: Start of every secret, so a leaked token is recognisable (secret scanners, logs).
TOKEN_PREFIX = "tsk_"  # noqa: S105 - a public marker, not a secret
#: Longest ``Authorization`` credential worth hashing; real secrets are 47 characters.
MAX_SECRET_LENGTH = 200
#: Most tokens a web process remembers (a bound on memory, not a tuning knob).
TOKEN_CACHE_SIZE = 1000


class AuthenticationFailed(Exception):
    """No usable credentials: the API answers 401 with ``WWW-Authenticate: Bearer``."""

    def __init__(self, message: str, *, invalid_token: bool = False) -> None:
        super().__init__(message)
        self.message = message
        self.invalid_token = invalid_token

    @property
    def challenge(self) -> str:
        """The ``WWW-Authenticate`` header value (RFC 6750)."""
        return 'Bearer error="invalid_token"' if self.invalid_token else "Bearer"


@dataclass(frozen=True)
class Caller:
    """The user behind a request, and whether a token (rather than a session) vouched."""

    user: Any  # an instance of AUTH_USER_MODEL
    by_token: bool


def hash_secret(secret: str) -> str:
    """The stored form of a secret: its SHA-256, hex encoded."""
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def create_token(user: Any, name: str = "") -> tuple[ApiToken, str]:
    """Make a token for ``user``; return the row and the secret (the only time it exists)."""
    secret = TOKEN_PREFIX + secrets.token_urlsafe(32)
    token = ApiToken.objects.create(
        user=user, name=name, key_hash=hash_secret(secret), prefix=secret[:12]
    )
    return token, secret


class TokenCache:
    """The users behind recently seen tokens, each for ``TASKSIGNAL_TOKEN_CACHE_SECONDS``.

    A user object keeps Django's permission cache, so a cached token also spares the
    permission queries. Only tokens that worked are remembered: a new token works at once.
    """

    def __init__(self) -> None:
        self._users: dict[str, tuple[object, float]] = {}
        self._lock = threading.Lock()

    def user(self, key_hash: str) -> Any:
        """The active user whose token has this hash, or ``None``."""
        now = time.monotonic()
        cached = self._users.get(key_hash)
        if cached is not None and cached[1] > now:
            return cached[0]
        users = get_user_model().objects.raw(sql.user_by_token(), [key_hash])
        user = next(iter(users), None)
        if user is None or not user.is_active:
            self._users.pop(key_hash, None)
            return None
        with self._lock:
            if len(self._users) >= TOKEN_CACHE_SIZE:
                self._users.clear()
            self._users[key_hash] = (user, now + conf.get("TASKSIGNAL_TOKEN_CACHE_SECONDS"))
        return user

    def clear(self) -> None:
        """Forget every token (tests, or a process that must see a revocation now)."""
        self._users.clear()


#: The token cache of this process.
tokens = TokenCache()


def user_for_secret(secret: str) -> Any:
    """The active user whose token has this secret, or ``None``.

    The secret is looked up by its hash, so comparing hashes in the database leaks
    nothing useful about the secret through timing.
    """
    if not secret or len(secret) > MAX_SECRET_LENGTH or not secret.isascii():
        return None
    return tokens.user(hash_secret(secret))


def authenticate(request: HttpRequest) -> Caller:
    """Return the :class:`Caller` of ``request``; raise :class:`AuthenticationFailed`."""
    header = request.META.get("HTTP_AUTHORIZATION")
    if header is not None:
        scheme, _, secret = header.strip().partition(" ")
        if scheme.lower() != "bearer":
            raise AuthenticationFailed("unsupported authorization scheme; use 'Bearer <token>'")
        user = user_for_secret(secret.strip())
        if user is None:
            raise AuthenticationFailed("invalid or revoked API token", invalid_token=True)
        return Caller(user, by_token=True)
    user = getattr(request, "user", None)
    if user is None or not user.is_authenticated:
        raise AuthenticationFailed(
            "authentication required: send 'Authorization: Bearer <token>' or log in"
        )
    return Caller(user, by_token=False)


class _CsrfCheck(CsrfViewMiddleware):
    """Django's CSRF check, answering why a request fails instead of a 403 page."""

    def _reject(self, request: HttpRequest, reason: str) -> Any:  # the reason, not a response
        return reason


def _unused(request: HttpRequest) -> HttpResponse:
    """Stands for the view and the next middleware, which the check never calls."""
    return HttpResponse()


def csrf_failure(request: HttpRequest) -> str | None:
    """Why ``request`` fails Django's CSRF check, or ``None`` if it passes."""
    check = _CsrfCheck(_unused)
    check.process_request(request)
    return cast("str | None", check.process_view(request, _unused, (), {}))
