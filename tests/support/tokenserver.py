"""A Bearer token server for tests, and a docker-registry that trusts it.

`TokenServer` implements the two token endpoints clients use (distribution
``docs/spec/auth/token.md`` and its OAuth2 flavour ``oauth.md``) on 127.0.0.1,
in a thread, at a port the kernel picks:

- ``GET /token?service=..&scope=..[&account=..]``, anonymous or with HTTP Basic
  credentials, answers ``{"token", "expires_in", "issued_at"}``;
- ``POST /token`` with a form ``grant_type=refresh_token`` (an identity token)
  or ``grant_type=password`` answers ``{"access_token", ...}``.

Tokens are JWTs signed ES256 by a key whose self-signed certificate rides in
the JWT header's ``x5c``: docker-registry 2.8 verifies that chain against its
``rootcertbundle`` (``registry/auth/token/token.go``, parseAndVerifyCertChain)
and checks ``iss``, ``aud`` (the service), ``exp``/``nbf`` and the ``access``
claim.  Every request is recorded (`requests`, `count`), so a test can assert
that a client cached its token.

`open_token_registry` starts a `tests.support.registry.Registry` whose config
has ``auth: token`` pointing at the server.  `Registry` writes its own config
and has no option for that, so it is given a wrapper as its binary that
rewrites the ``auth`` section and then execs the real docker-registry.  Pushes
go straight to the registry's socket with a push token minted here
(`push_with_token`).

Needs PyPI ``pyjwt`` and ``cryptography``.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import datetime
import functools
import http.server
import json
import secrets
import shutil
import stat
import sys
import tempfile
import threading
import time
import urllib.parse
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import httpx
import jwt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.support.registry import DOCKER_REGISTRY, Registry, push_with

if TYPE_CHECKING:
    from collections.abc import Iterator

    from tests.support.images import Image, Index

SERVICE = "pouch-test-registry"
ISSUER = "pouch-test-token-server"
STOP_TIMEOUT = 10.0

TokenField = Literal["token", "access_token", "both"]


@dataclasses.dataclass(frozen=True)
class TokenRequest:
    """One request the token server answered."""

    method: str
    grant_type: str | None  # POST only
    user: str | None  # authenticated user, None for anonymous
    service: str | None
    scopes: tuple[str, ...]
    status: int


class _Signer:
    """An ES256 key and its self-signed certificate, the registry's root of trust."""

    def __init__(self) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, ISSUER)])
        now = datetime.datetime.now(datetime.UTC)
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(self.key, hashes.SHA256())
        )
        der = self.cert.public_bytes(serialization.Encoding.DER)
        # x5c is standard base64 of DER, not base64url (RFC 7515 section 4.1.6).
        self.x5c = [base64.b64encode(der).decode("ascii")]

    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def sign(self, claims: dict[str, object]) -> str:
        return jwt.encode(claims, self.key, algorithm="ES256", headers={"x5c": self.x5c})


def _parse_scope(scope: str) -> tuple[str, str, list[str]] | None:
    # token.md "Scope": type:name:actions, where the name may hold a port's colon.
    kind, _, rest = scope.partition(":")
    name, _, actions = rest.rpartition(":")
    if not kind or not name:
        return None
    return kind, name, [a for a in actions.split(",") if a]


class TokenServer:
    """Issues registry tokens over HTTP on 127.0.0.1; use as a context manager.

    Args:
        users: user name -> password accepted as Basic credentials (GET) or by the
            password grant (POST).
        refresh_tokens: identity token -> user name, for the refresh-token grant.
        public: repositories anyone may pull without credentials.
        expires_in: lifetime of the tokens issued, in seconds.
        token_field: which JSON field carries the token on GET answers
            (POST answers always use ``access_token``, as oauth.md says).
    """

    def __init__(
        self,
        *,
        users: dict[str, str] | None = None,
        refresh_tokens: dict[str, str] | None = None,
        public: frozenset[str] = frozenset(),
        expires_in: int = 300,
        token_field: TokenField = "token",
    ) -> None:
        self.users = dict(users or {})
        self.refresh_tokens = dict(refresh_tokens or {})
        self.public = public
        self.expires_in = expires_in
        self.token_field = token_field
        self.signer = _Signer()
        self._lock = threading.Lock()
        self._requests: list[TokenRequest] = []
        self._server: http.server.ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # lifecycle

    def __enter__(self) -> TokenServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def start(self) -> TokenServer:
        handler = functools.partial(_Handler, self)
        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, name="token-server"
        )
        self._thread.daemon = True
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the socket. Idempotent."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(STOP_TIMEOUT)
            self._thread = None

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("token server is not running")
        return int(self._server.server_address[1])

    @property
    def realm(self) -> str:
        return f"http://127.0.0.1:{self.port}/token"

    # what it saw

    def requests(self) -> list[TokenRequest]:
        with self._lock:
            return list(self._requests)

    def count(self, *, status: int | None = 200) -> int:
        """How many requests were answered (with `status`, None for any)."""
        return sum(1 for r in self.requests() if status is None or r.status == status)

    def clear(self) -> None:
        with self._lock:
            self._requests.clear()

    def _record(self, request: TokenRequest) -> None:
        with self._lock:
            self._requests.append(request)

    # tokens

    def mint(
        self,
        subject: str,
        access: list[tuple[str, str, list[str]]],
        *,
        expires_in: int | None = None,
        audience: str = SERVICE,
    ) -> str:
        """A signed registry token granting `access`: (type, name, actions) triples."""
        now = int(time.time())
        claims: dict[str, object] = {
            "iss": ISSUER,
            "sub": subject,
            "aud": audience,
            "exp": now + (expires_in if expires_in is not None else self.expires_in),
            "nbf": now - 1,
            "iat": now,
            "jti": secrets.token_hex(8),
            "access": [{"type": t, "name": n, "actions": a} for t, n, a in access],
        }
        return self.signer.sign(claims)

    def grant(self, user: str | None, scopes: list[str]) -> list[tuple[str, str, list[str]]]:
        """What `user` (None: anonymous) gets of what `scopes` ask for."""
        out = []
        for scope in scopes:
            parsed = _parse_scope(scope)
            if parsed is None or parsed[0] != "repository":
                continue
            kind, name, actions = parsed
            allowed = {"pull", "push"} if user is not None else set()
            if name in self.public:
                allowed.add("pull")
            granted = [a for a in actions if a in allowed]
            if granted:
                out.append((kind, name, granted))
        return out

    def registry_auth(self, rootcertbundle: Path) -> dict[str, object]:
        """The ``auth`` section of a docker-registry config that trusts this server."""
        return {
            "token": {
                "realm": self.realm,
                "service": SERVICE,
                "issuer": ISSUER,
                "rootcertbundle": str(rootcertbundle),
            }
        }


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, so clients may reuse the connection

    def __init__(self, server_state: TokenServer, *args: object, **kwargs: object) -> None:
        self.state = server_state
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]  # socketserver's untyped args

    def log_message(self, format: str, *args: object) -> None:
        pass  # quiet: pytest shows stderr of failing tests, and this is noise

    def _answer(self, status: int, doc: dict[str, object], request: TokenRequest) -> None:
        body = json.dumps(doc).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        if status == 401:
            self.send_header("WWW-Authenticate", 'Basic realm="pouch-token-server"')
        self.end_headers()
        self.wfile.write(body)
        self.state._record(dataclasses.replace(request, status=status))

    def _basic_user(self) -> tuple[str | None, bool]:
        """(user, ok): the Basic user if the credentials are right; ok False if wrong."""
        header = self.headers.get("Authorization", "")
        if not header.lower().startswith("basic "):
            return None, True
        try:
            user, _, password = base64.b64decode(header[6:]).decode().partition(":")
        except ValueError:
            return None, False
        if self.state.users.get(user) != password:
            return None, False
        return user, True

    def do_GET(self) -> None:  # token.md "Requesting a Token"
        url = urllib.parse.urlsplit(self.path)
        query = urllib.parse.parse_qs(url.query)
        user, ok = self._basic_user()
        scopes = query.get("scope", [])
        record = TokenRequest("GET", None, user, _first(query, "service"), tuple(scopes), 0)
        if url.path != "/token":
            self._answer(404, {"details": "not found"}, record)
            return
        if not ok:
            self._answer(401, {"details": "invalid username or password"}, record)
            return
        token = self.state.mint(user or "", self.state.grant(user, scopes))
        doc: dict[str, object] = {
            "expires_in": self.state.expires_in,
            "issued_at": datetime.datetime.now(datetime.UTC).isoformat(),
        }
        if self.state.token_field in ("token", "both"):
            doc["token"] = token
        if self.state.token_field in ("access_token", "both"):
            doc["access_token"] = token
        self._answer(200, doc, record)

    def do_POST(self) -> None:  # oauth.md "Getting a token"
        length = int(self.headers.get("Content-Length") or 0)
        form = urllib.parse.parse_qs(self.rfile.read(length).decode())
        grant_type = _first(form, "grant_type")
        scopes = " ".join(form.get("scope", [])).split()  # oauth.md: space-separated
        record = TokenRequest("POST", grant_type, None, _first(form, "service"), tuple(scopes), 0)
        user: str | None = None
        if grant_type == "refresh_token":
            user = self.state.refresh_tokens.get(_first(form, "refresh_token") or "")
        elif grant_type == "password":
            name = _first(form, "username") or ""
            if self.state.users.get(name) == _first(form, "password"):
                user = name
        if user is None or not _first(form, "client_id"):
            self._answer(401, {"error": "invalid_grant", "error_description": "denied"}, record)
            return
        record = dataclasses.replace(record, user=user)
        token = self.state.mint(user, self.state.grant(user, scopes))
        doc: dict[str, object] = {
            "access_token": token,
            "expires_in": self.state.expires_in,
            "scope": " ".join(scopes),
        }
        self._answer(200, doc, record)


def _first(query: dict[str, list[str]], key: str) -> str | None:
    values = query.get(key)
    return values[0] if values else None


# --- a registry that trusts the token server ------------------------------------------------

_WRAPPER = """#!{python}
# Written by tests/support/tokenserver.py: docker-registry with token auth.
import json, os, sys
path = sys.argv[-1]
with open(path) as f:
    config = json.load(f)
config["auth"] = json.loads({auth!r})
with open(path, "w") as f:
    json.dump(config, f)
os.execv({binary!r}, [{binary!r}, *sys.argv[1:]])
"""


@contextlib.contextmanager
def token_registry(server: TokenServer, *, binary: Path = DOCKER_REGISTRY) -> Iterator[Registry]:
    """A started `Registry` that demands tokens from `server`."""
    workdir = Path(tempfile.mkdtemp(prefix="pouch-token-registry-"))
    try:
        bundle = workdir / "root.pem"
        bundle.write_bytes(server.signer.cert_pem())
        wrapper = workdir / "docker-registry"
        wrapper.write_text(
            _WRAPPER.format(
                python=sys.executable,
                auth=json.dumps(server.registry_auth(bundle)),
                binary=str(binary),
            )
        )
        wrapper.chmod(wrapper.stat().st_mode | stat.S_IXUSR)
        with Registry(binary=wrapper) as registry:
            yield registry
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def push_with_token(
    registry: Registry,
    server: TokenServer,
    repo: str,
    tag: str | None,
    item: Image | Index,
    *,
    http_timeout: float = 120.0,
) -> str:
    """`tests.support.registry.push` for a token registry: same socket, a push token."""
    token = server.mint("pusher", [("repository", repo, ["pull", "push"])])
    transport = httpx.HTTPTransport(uds=str(registry.socket_path))
    with httpx.Client(
        transport=transport,
        base_url=registry.url,
        headers={"Authorization": f"Bearer {token}"},
        timeout=http_timeout,
    ) as client:
        return push_with(client, repo, tag, item)
