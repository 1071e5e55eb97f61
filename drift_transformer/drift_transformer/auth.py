"""Who may call the transformer, and what they may see: bearer tokens with scopes.

A copy of the predictor's `predictor/auth.py` (this environment does not import the core packages;
the core's `tests/test_predictor_edge.py` checks both read token files alike).

Scopes:

* `score` - the scoring routes (V1 predict, V2 infer, V2 gRPC ModelInfer);
* `explain` - explanations (reserved for the explanation endpoint);
* `debug` - the raw feature vectors in the answer (a card's 1/7/30-day history); without it an
  answer carries decision, score, reason codes and model version only.

Two sources of a caller's scopes, both off unless configured:

* a token file (`--token-file`): one line per token, `<token> <scope>[,<scope>...]`; `#` starts a
  comment. Callers send `Authorization: Bearer <token>`. Tokens are compared in constant time; a
  malformed file is refused at start (`TokenFileError`).
* the `x-fraud-scopes` header (`--trust-scope-header`), space- or comma-separated scope names, as
  the mesh sets it from the validated JWT's `scope` claim (Istio RequestAuthentication
  `outputClaimToHeaders`). Only safe when nothing but the mesh can reach the server: never on by
  default.

Without either, every caller has `score` and `explain` (loopback-only local use) and never `debug`.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_interceptor.exceptions import GrpcException

SCOPE_SCORE = "score"
SCOPE_EXPLAIN = "explain"
SCOPE_DEBUG = "debug"
SCOPES = (SCOPE_SCORE, SCOPE_EXPLAIN, SCOPE_DEBUG)
#: What a caller may do when no authentication is configured.
UNAUTHENTICATED_SCOPES = frozenset({SCOPE_SCORE, SCOPE_EXPLAIN})
#: Header carrying the caller's scopes as the mesh validated them.
SCOPE_HEADER = "x-fraud-scopes"
#: Shortest token accepted in a token file (random tokens: 32 hex characters or more are advised).
MIN_TOKEN_LENGTH = 16
_TOKEN_CHARACTERS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~+/=")


class TokenFileError(ValueError):
    """The token file cannot be used (unreadable, malformed line, unknown scope, duplicate token)."""


class AuthError(GrpcException):
    """A refused caller: HTTP 401 (no or malformed credentials) / 403 (credentials lack the scope),
    gRPC UNAUTHENTICATED / PERMISSION_DENIED."""

    def __init__(self, http_status: int, message: str) -> None:
        code = grpc.StatusCode.UNAUTHENTICATED if http_status == 401 else grpc.StatusCode.PERMISSION_DENIED
        super().__init__(details=message, status_code=code)
        self.http_status = http_status
        self.message = message

    def __str__(self) -> str:
        return self.message


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8")).digest()


def parse_scopes(text: str) -> frozenset[str]:
    """Known scope names in a space- or comma-separated list (unknown names are ignored)."""
    return frozenset(part for part in text.replace(",", " ").split() if part in SCOPES)


def read_token_file(path: Path | str) -> dict[bytes, frozenset[str]]:
    """SHA-256 of each token -> its scopes. TokenFileError naming the line for anything malformed."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise TokenFileError(f"token file {path}: cannot read it ({type(exc).__name__}: {exc})") from None
    tokens: dict[bytes, frozenset[str]] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        where = f"token file {path}, line {number}"
        if len(parts) != 2:
            raise TokenFileError(f"{where}: expected `<token> <scope>[,<scope>...]`, got {len(parts)} fields")
        token, scope_list = parts
        if len(token) < MIN_TOKEN_LENGTH or not set(token) <= _TOKEN_CHARACTERS:
            raise TokenFileError(
                f"{where}: a token has at least {MIN_TOKEN_LENGTH} characters from A-Z a-z 0-9 - . _ ~ + / ="
            )
        names = [name for name in scope_list.split(",") if name]
        unknown = sorted(set(names) - set(SCOPES))
        if not names or unknown:
            raise TokenFileError(f"{where}: unknown scope(s) {unknown or [scope_list]}; scopes are {list(SCOPES)}")
        digest = _digest(token)
        if digest in tokens:
            raise TokenFileError(f"{where}: the token is listed twice")
        tokens[digest] = frozenset(names)
    if not tokens:
        raise TokenFileError(f"token file {path}: holds no token")
    return tokens


@dataclass(frozen=True)
class Authorizer:
    """Resolves a request's scopes from its headers (lower-case names) and enforces a route's scope."""

    #: SHA-256 of each token -> scopes; None: no token file
    tokens: dict[bytes, frozenset[str]] | None = None
    trust_scope_header: bool = False
    _digests: tuple[tuple[bytes, frozenset[str]], ...] = field(init=False, repr=False, default=())

    def __post_init__(self) -> None:
        object.__setattr__(self, "_digests", tuple((self.tokens or {}).items()))

    @classmethod
    def from_options(cls, token_file: str | Path | None, trust_scope_header: bool) -> Authorizer:
        return cls(read_token_file(token_file) if token_file else None, trust_scope_header)

    @property
    def enabled(self) -> bool:
        return self.tokens is not None or self.trust_scope_header

    def describe(self) -> str:
        if not self.enabled:
            return "off (every caller may score; no debug scope)"
        sources = []
        if self.tokens is not None:
            sources.append(f"{len(self.tokens)} bearer token(s)")
        if self.trust_scope_header:
            sources.append(f"trusted {SCOPE_HEADER} header")
        return " + ".join(sources)

    def _token_scopes(self, token: str) -> frozenset[str] | None:
        presented = _digest(token)
        found: frozenset[str] | None = None
        for digest, scopes in self._digests:  # every entry compared: the time does not tell which matched
            if hmac.compare_digest(presented, digest):
                found = scopes
        return found

    def scopes(self, headers: Mapping[str, str]) -> frozenset[str]:
        """The caller's scopes; AuthError(401) when credentials are required and missing or wrong."""
        if not self.enabled:
            return UNAUTHENTICATED_SCOPES
        authorization = headers.get("authorization")
        if authorization is not None and self.tokens is not None:
            scheme, _, token = authorization.strip().partition(" ")
            token = token.strip()
            if scheme.lower() != "bearer" or not token or " " in token:
                raise AuthError(401, "malformed Authorization header; send `Authorization: Bearer <token>`")
            scopes = self._token_scopes(token)
            if scopes is None:
                raise AuthError(401, "unknown bearer token")
            return scopes
        if self.trust_scope_header and SCOPE_HEADER in headers:
            return parse_scopes(headers[SCOPE_HEADER])
        raise AuthError(401, "authentication required: send `Authorization: Bearer <token>`")

    def authorize(self, headers: Mapping[str, str], scope: str) -> frozenset[str]:
        """The caller's scopes if they include `scope`; AuthError 401/403 otherwise."""
        scopes = self.scopes(headers)
        if scope not in scopes:
            raise AuthError(403, f"the caller's credentials lack the `{scope}` scope")
        return scopes
