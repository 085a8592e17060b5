"""Pull from an OCI distribution registry: resolve a reference, stream blobs.

The protocol is the OCI distribution spec (``spec.md``, "Pulling manifests"
and "Pulling blobs"), which is Docker's Registry HTTP API v2.  Two requests
matter::

    GET /v2/<name>/manifests/<tag or digest>    Accept: the manifest types
    GET /v2/<name>/blobs/<digest>               may redirect to a CDN

Endpoints.  An image ``host/path`` is looked for at the configured mirrors of
``host`` first, in order, then at ``host`` itself (containerd's registry
mirrors): HTTPS unless ``host`` is listed as insecure.  A mirror that cannot
be reached, answers 5xx, lacks the manifest or refuses our credentials is
skipped; the endpoint that served the manifest serves the blobs of that
image first.

Authentication.  Every endpoint is first asked anonymously; a 401 carries
``WWW-Authenticate`` challenges (RFC 9110 section 11.6.1).  ``Basic`` gets the
credentials as they are (RFC 7617); ``Bearer`` sends us to a token server
(distribution ``docs/spec/auth/token.md``, or its OAuth2 flavour
``oauth.md`` for identity tokens), whose token is cached per realm, service,
scope and credentials until shortly before it expires.

Everything here runs under Trio: httpx finds the running Trio loop through
sniffio and httpcore's Trio backend.  Timeouts are enforced twice, by httpx
per socket operation and by a Trio deadline around each request, so no call
can hang.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import re
from typing import TYPE_CHECKING, Final, Literal

import attrs
import httpx
import trio

import pouch
from pouch.errors import InvalidArgument, NotFound, PouchError, RegistryUnavailable
from pouch.image import media
from pouch.log import get_logger

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Mapping, Sequence
    from contextlib import AbstractAsyncContextManager

    from pouch.config import RegistryConfig
    from pouch.image.reference import ImageRef

__all__ = [
    "Challenge",
    "Credentials",
    "Endpoint",
    "RegistryClient",
    "RegistryUnauthorized",
    "Resolved",
    "endpoints_for",
    "parse_www_authenticate",
]

log = get_logger("pouch.image.registry")

#: Docker Hub's images are named ``docker.io/...``, but its API answers on
#: another host (the same mapping as containerd's ``docker.io`` host default).
DOCKER_HUB_DOMAIN: Final = "docker.io"
DOCKER_HUB_HOST: Final = "registry-1.docker.io"

#: Largest manifest or index accepted.  The OCI distribution spec lets a
#: registry refuse manifests over 4 MiB (spec.md, "Pushing Manifests"), so a
#: real one is never larger; this bounds what a hostile server can make us buffer.
MAX_MANIFEST_BYTES: Final = 4 * 1024 * 1024
#: Largest token-server answer accepted (a JWT with many claims is a few KiB).
MAX_TOKEN_BYTES: Final = 1024 * 1024
#: How much of an error body is read for its message.
MAX_ERROR_BYTES: Final = 64 * 1024
#: An index may point at an index (image-spec image-index.md allows it); a
#: chain longer than this is a loop or an attack, not an image.
MAX_INDEX_DEPTH: Final = 4

CONNECT_TIMEOUT: Final = 30.0
#: Bound on one whole manifest or token request, body included.
REQUEST_TIMEOUT: Final = 60.0

#: token.md: "expires_in ... When omitted, this defaults to 60 seconds."
TOKEN_DEFAULT_EXPIRES_IN: Final = 60
#: A token is dropped this long before it expires, so a request that starts
#: with it does not reach the registry just after it lapsed.
TOKEN_EXPIRY_MARGIN: Final = 10.0
#: oauth.md requires a client_id on the refresh-token grant; it names the client.
OAUTH_CLIENT_ID: Final = "pouch"

_USER_AGENT: Final = f"pouch/{pouch.__version__}"
# Passed on every request, so a caller's client with laxer defaults is bounded too.
_HTTP_TIMEOUT: Final = httpx.Timeout(REQUEST_TIMEOUT, connect=CONNECT_TIMEOUT)

# Docker schema 1 (manifest-v2-1.md) is signed JWS and was removed from
# Docker Hub in 2020; containerd and cri-o refuse it by default too.
_SCHEMA1_TYPES: Final = frozenset(
    {
        "application/vnd.docker.distribution.manifest.v1+json",
        "application/vnd.docker.distribution.manifest.v1+prettyjws",
    }
)

_Kind = Literal["unreachable", "server", "not_found", "unauthorized", "invalid", "stalled"]


class RegistryUnauthorized(RegistryUnavailable):
    """The registry refused the pull: 401 or 403 even after authenticating.

    The message carries the registry's own error message.  It is a
    `RegistryUnavailable` so the CRI edge reports it the way cri-o does.
    """


@attrs.frozen
class Credentials:
    """What the kubelet sends in a CRI ``AuthConfig`` (cri-api api.proto).

    Secrets are left out of ``repr()``, so logging a value never leaks them.
    """

    username: str = ""
    password: str = attrs.field(default="", repr=False)
    #: base64 of ``user:password``, as in a Docker ``config.json``.
    auth: str = attrs.field(default="", repr=False)
    #: An OAuth2 refresh token, exchanged at the token server (oauth.md).
    identity_token: str = attrs.field(default="", repr=False)
    #: A bearer token sent to the registry as it is.
    registry_token: str = attrs.field(default="", repr=False)

    def basic(self) -> tuple[str, str] | None:
        """The user name and password for Basic auth, if there are any.

        ``username`` wins over ``auth``, the order of containerd's
        ``ParseAuth``.

        Raises:
            InvalidArgument: ``auth`` is not base64 of ``user:password``.
        """
        if self.username:
            return self.username, self.password
        if not self.auth:
            return None
        try:
            decoded = base64.b64decode(self.auth.strip(), validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            raise InvalidArgument("invalid auth: not base64 of 'user:password'") from None
        user, colon, password = decoded.partition(":")
        if not colon or not user:
            raise InvalidArgument("invalid auth: not base64 of 'user:password'")
        return user, password


@attrs.frozen
class Resolved:
    """What a reference points at, down to this platform's manifest."""

    #: The reference asked for (tag and/or digest).
    ref: ImageRef
    #: Digest of what the tag or digest named, index or manifest: the repo digest.
    digest: str
    #: Digest of the platform-specific image manifest.
    manifest_digest: str
    manifest: media.Manifest
    manifest_bytes: bytes = attrs.field(repr=False)
    #: The index (or Docker manifest list) the reference named, if it named one.
    index_bytes: bytes | None = attrs.field(repr=False)
    #: The endpoint that served it, ``scheme://host[:port][/prefix]`` (for logs).
    endpoint: str


# --- endpoints ---------------------------------------------------------------------------


@attrs.frozen
class Endpoint:
    """One place to pull a registry's repositories from."""

    #: ``scheme://host[:port][/prefix]``, without the ``/v2`` API root.
    url: str
    mirror: bool = False

    @property
    def api(self) -> str:
        """The API root; a repository's requests go below ``<api>/<path>/``."""
        return f"{self.url}/v2"

    def __str__(self) -> str:
        return self.url


def endpoints_for(config: RegistryConfig, domain: str) -> tuple[Endpoint, ...]:
    """The endpoints to try for images named ``domain/...``, in order.

    The configured mirrors of ``domain`` come first, then the registry itself:
    over HTTPS, or plain HTTP if ``domain`` is in ``config.insecure``.

    Raises:
        InvalidArgument: a mirror endpoint is not an ``http(s)://`` URL.
    """
    mirrors = config.mirrors.get(domain)
    out = [
        _parse_endpoint(text, config.insecure, what=f"mirror of {domain}")
        for text in (mirrors.endpoints if mirrors is not None else ())
    ]
    host = DOCKER_HUB_HOST if domain == DOCKER_HUB_DOMAIN else domain
    plain = domain in config.insecure or host in config.insecure
    out.append(Endpoint(f"{'http' if plain else 'https'}://{host}"))
    return tuple(out)


def _parse_endpoint(text: str, insecure: Sequence[str], *, what: str) -> Endpoint:
    # A bare "host:port" is allowed, with the scheme the insecure list implies.
    if "://" not in text:
        host = text.split("/", 1)[0]
        text = f"{'http' if host in insecure else 'https'}://{text}"
    try:
        url = httpx.URL(text)
    except httpx.InvalidURL as exc:
        raise InvalidArgument(f"invalid {what} {text!r}: {exc}") from None
    if url.scheme not in ("http", "https") or not url.host:
        raise InvalidArgument(f"invalid {what} {text!r}: want http(s)://host[:port][/path]")
    if url.query or url.fragment or url.userinfo:
        raise InvalidArgument(f"invalid {what} {text!r}: no query, fragment or user allowed")
    # containerd's hosts.toml accepts both "http://m/" and "http://m/v2/" for
    # one mirror (config docs: "/v2" is appended unless the path has it).
    path = url.path.rstrip("/").removesuffix("/v2")
    return Endpoint(f"{url.scheme}://{url.netloc.decode('ascii')}{path}", mirror=True)


# --- WWW-Authenticate ----------------------------------------------------------------------


@attrs.frozen
class Challenge:
    """One challenge of a ``WWW-Authenticate`` header."""

    #: Lowercase: schemes are case-insensitive (RFC 9110 section 11.1).
    scheme: str
    #: (name, value) pairs, names lowercase.
    params: tuple[tuple[str, str], ...] = ()

    def param(self, name: str) -> str | None:
        for key, value in self.params:
            if key == name:
                return value
        return None


# RFC 9110 section 5.6.2 (token), 5.6.4 (quoted-string) and 11.2 (token68).
_TOKEN: Final = r"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
_QUOTED: Final = r'"(?:[^"\\]|\\.)*"'
_SEP_RE: Final = re.compile(r"[\s,]*")
_SCHEME_RE: Final = re.compile(_TOKEN)
# An auth-param must end where the list element ends, or it is the scheme of
# the next challenge.  Unquoted values are taken up to the next comma, more
# leniently than the grammar: some servers leave realm URLs unquoted.
_PARAM_RE: Final = re.compile(rf"({_TOKEN})[ \t]*=[ \t]*({_QUOTED}|[^\s,\"]+)(?=[ \t]*(?:,|$))")
_TOKEN68_RE: Final = re.compile(r"[ \t]+([A-Za-z0-9._~+/-]+=*)(?=[ \t]*(?:,|$))")
_UNESCAPE_RE: Final = re.compile(r"\\(.)")


def parse_www_authenticate(values: Sequence[str]) -> tuple[Challenge, ...]:
    """Parse ``WWW-Authenticate`` header values into challenges, in order.

    The grammar is RFC 9110 section 11.6.1, ``#challenge``, where one header
    may hold several challenges and a challenge several parameters, all
    comma-separated.  Parsing is lenient: what follows a malformed part of a
    value is dropped, and what came before it is kept.
    """
    out: list[Challenge] = []
    for value in values:
        out.extend(_parse_challenges(value))
    return tuple(out)


def _skip_separators(value: str, pos: int) -> int:
    match = _SEP_RE.match(value, pos)
    return match.end() if match else pos


def _parse_challenges(value: str) -> list[Challenge]:
    out: list[Challenge] = []
    scheme: str | None = None
    params: list[tuple[str, str]] = []
    pos = _skip_separators(value, 0)
    while pos < len(value):
        if scheme is not None and (param := _PARAM_RE.match(value, pos)):
            name, raw = param.group(1, 2)
            if raw.startswith('"'):
                raw = _UNESCAPE_RE.sub(r"\1", raw[1:-1])
            params.append((name.lower(), raw))
            pos = param.end()
        elif start := _SCHEME_RE.match(value, pos):
            if scheme is not None:
                out.append(Challenge(scheme, tuple(params)))
            scheme, params = start.group().lower(), []
            pos = start.end()
            if token68 := _TOKEN68_RE.match(value, pos):
                # token68 has no name; keep it under one that no param can have.
                params.append(("", token68.group(1)))
                pos = token68.end()
        else:
            break
        pos = _skip_separators(value, pos)
    if scheme is not None:
        out.append(Challenge(scheme, tuple(params)))
    return out


# --- the client -------------------------------------------------------------------------------


class _EndpointError(Exception):
    """One endpoint failed; the next may do better.  Never leaves this module."""

    def __init__(self, kind: _Kind, message: str) -> None:
        super().__init__(message)
        self.kind: _Kind = kind
        self.message = message


@attrs.frozen
class _TokenKey:
    realm: str
    service: str
    scope: str
    # Part of the key: a token granted to one pod's credentials must never
    # serve another pod that has other (or no) credentials.
    creds: Credentials | None


@attrs.frozen
class _Token:
    value: str
    expires: float  # trio.current_time()


class RegistryClient:
    """Resolves references and streams blobs from registries and their mirrors.

    One client serves the whole daemon: it keeps the HTTP connection pool,
    the challenges each endpoint answered with, the bearer tokens, and which
    endpoint served each repository last.

    Args:
        config: mirrors and insecure hosts.
        stall_timeout: a blob download fails when no byte arrived for this
            many seconds; a slow transfer that keeps moving is never cut.
        http: the HTTP client to use; by default one is made, and closed by
            `aclose`.

    Raises:
        InvalidArgument: a configured mirror endpoint is not a URL.
    """

    def __init__(
        self,
        config: RegistryConfig,
        *,
        stall_timeout: float,
        http: httpx.AsyncClient | None = None,
    ) -> None:
        if stall_timeout <= 0:
            raise InvalidArgument(f"invalid stall timeout {stall_timeout!r}: must be positive")
        # Parse every mirror now: a typo in the config fails at start-up,
        # not at the first pull.
        self._endpoints = {domain: endpoints_for(config, domain) for domain in config.mirrors}
        self._config = config
        self._stall_timeout = stall_timeout
        self._own_http = http is None
        self._http = http or httpx.AsyncClient(
            timeout=_HTTP_TIMEOUT,
            headers={"User-Agent": _USER_AGENT},
        )
        self._challenges: dict[str, tuple[Challenge, ...]] = {}
        self._tokens: dict[_TokenKey, _Token] = {}
        self._token_locks: dict[_TokenKey, trio.Lock] = {}
        # (domain, path) -> the endpoint that served its last manifest.
        self._served_by: dict[tuple[str, str], Endpoint] = {}

    async def aclose(self) -> None:
        """Close the connection pool, unless the caller passed its own client."""
        if self._own_http:
            await self._http.aclose()

    # --- public ---------------------------------------------------------------------------

    async def resolve(
        self, ref: ImageRef, creds: Credentials | None, platform: media.Platform
    ) -> Resolved:
        """Find what ``ref`` names, down to the image manifest for ``platform``.

        A tag is looked up and the answer's digest computed (that digest, not
        the ``Docker-Content-Digest`` header, is the repo digest); a digest is
        fetched and verified.  An index is narrowed to ``platform``'s entry.

        Args:
            ref: the image; with both a tag and a digest, the digest is used.
            creds: credentials for the registry, or None for anonymous.
            platform: the platform to pick from an index.

        Returns:
            The manifest and what led to it.

        Raises:
            NotFound: no endpoint has the manifest.
            RegistryUnauthorized: the registry refused the credentials.
            RegistryUnavailable: no endpoint could be reached or answered sanely;
                the message names each endpoint tried and its error.
            InvalidArgument: the manifest is unsupported (Docker schema 1, an
                unknown media type), has no entry for ``platform`` or does not
                match its digest, or ``creds.auth`` is not base64 ``user:password``.

        Cancellation: nothing to undo; cached tokens stay valid.
        """
        if creds is not None:
            creds.basic()  # a malformed auth field is the caller's error, not the registry's
        failures: list[tuple[Endpoint, _EndpointError]] = []
        for endpoint in self._endpoints_of(ref.domain):
            try:
                resolved = await self._resolve_at(endpoint, ref, creds, platform)
            except _EndpointError as exc:
                failures.append((endpoint, exc))
                log.warning(
                    "failed to resolve at endpoint",
                    ref=str(ref),
                    endpoint=str(endpoint),
                    error=exc.message,
                )
                continue
            self._remember(ref, endpoint)
            log.debug(
                "resolved",
                ref=str(ref),
                endpoint=str(endpoint),
                digest=resolved.digest,
                manifest_digest=resolved.manifest_digest,
            )
            return resolved
        raise _final_error(f"resolve {ref}", failures)

    def open_blob(
        self, ref: ImageRef, desc: media.Descriptor, creds: Credentials | None
    ) -> AbstractAsyncContextManager[AsyncIterator[bytes]]:
        """Open the blob ``desc`` of ``ref``'s repository; iterate for its bytes.

        Entering the context sends the request (following redirects) and
        waits for the response head; the iterator then yields chunks as they
        arrive.  The endpoint that served ``ref``'s last manifest is asked
        first, then the others in order.  The digest is *not* verified here
        (the content store's writer does), but more than ``desc.size`` bytes,
        or fewer, is an error.

        Raises:
            NotFound: no endpoint has the blob.
            RegistryUnavailable: every endpoint failed, the transfer broke, or
                no byte arrived for ``stall_timeout`` seconds (on entering, or
                while iterating).
            InvalidArgument: ``desc.digest`` or ``creds.auth`` is malformed, or
                the response is longer than ``desc.size`` says.

        Cancellation: the response is closed; nothing else to undo.
        """
        return self._open_blob(ref, desc, creds)

    # --- resolve --------------------------------------------------------------------------

    def _endpoints_of(self, domain: str) -> tuple[Endpoint, ...]:
        endpoints = self._endpoints.get(domain)
        if endpoints is None:
            endpoints = endpoints_for(self._config, domain)
        return endpoints

    def _remember(self, ref: ImageRef, endpoint: Endpoint) -> None:
        key = (ref.domain, ref.path)
        self._served_by.pop(key, None)  # re-insert: the dict stays in LRU order
        self._served_by[key] = endpoint
        while len(self._served_by) > 4096:
            del self._served_by[next(iter(self._served_by))]

    async def _resolve_at(
        self,
        endpoint: Endpoint,
        ref: ImageRef,
        creds: Credentials | None,
        platform: media.Platform,
    ) -> Resolved:
        reference = ref.digest or ref.tag
        assert reference is not None  # ImageRef guarantees a tag or a digest
        body, media_type = await self._get_manifest(endpoint, ref, creds, reference, ref.digest)
        digest = ref.digest or media.sha256_digest(body)
        index_bytes: bytes | None = None
        manifest_digest = digest
        depth = 0
        try:
            while media_type in media.INDEX_TYPES:
                depth += 1
                if depth > MAX_INDEX_DEPTH:
                    raise _EndpointError("invalid", f"indexes nest deeper than {MAX_INDEX_DEPTH}")
                if index_bytes is None:
                    index_bytes = body
                index = media.parse_index(body, media_type)
                entry = media.select_platform(index, platform)
                # The index names its entries by digest: fetch from the same
                # endpoint (a mirror that has the index has its children) and
                # verify against the index's digest and size.
                body, media_type = await self._get_manifest(
                    endpoint, ref, creds, entry.digest, entry.digest
                )
                if len(body) != entry.size:
                    raise _EndpointError(
                        "invalid",
                        f"manifest {entry.digest} has {len(body)} bytes,"
                        f" the index says {entry.size}",
                    )
                manifest_digest = entry.digest
            manifest = media.parse_manifest(body, media_type)
        except InvalidArgument as exc:
            raise _EndpointError("invalid", str(exc)) from exc
        return Resolved(
            ref=ref,
            digest=digest,
            manifest_digest=manifest_digest,
            manifest=manifest,
            manifest_bytes=body,
            index_bytes=index_bytes,
            endpoint=str(endpoint),
        )

    async def _get_manifest(
        self,
        endpoint: Endpoint,
        ref: ImageRef,
        creds: Credentials | None,
        reference: str,
        digest: str | None,
    ) -> tuple[bytes, str]:
        """GET one manifest; verify it against ``digest`` if given.  Returns body, media type."""
        url = f"{endpoint.api}/{ref.path}/manifests/{reference}"
        headers = {"Accept": ", ".join(media.MANIFEST_ACCEPT)}
        with trio.move_on_after(REQUEST_TIMEOUT) as scope:
            response = await self._send(endpoint, ref, creds, url, headers, _HTTP_TIMEOUT)
            try:
                if response.status_code != 200:
                    raise await _status_error(response, f"manifest {reference}")
                body = await _read_bounded(response, MAX_MANIFEST_BYTES, f"manifest {reference}")
            except httpx.HTTPError as exc:
                raise _EndpointError("unreachable", _describe(exc)) from exc
            finally:
                await _close(response)
        if scope.cancelled_caught:
            raise _EndpointError(
                "unreachable", f"manifest {reference}: timed out after {REQUEST_TIMEOUT:g} s"
            )
        if digest is not None:
            _verify(body, digest, f"manifest {reference}")
        else:
            # spec.md: Docker-Content-Digest is informational for a tag; the
            # digest of the bytes received is what the tag named.
            header = response.headers.get("docker-content-digest")
            computed = media.sha256_digest(body)
            if header and header.startswith("sha256:") and header != computed:
                log.warning(
                    "registry's Docker-Content-Digest differs from the manifest's digest",
                    ref=str(ref),
                    endpoint=str(endpoint),
                    header=header,
                    computed=computed,
                )
        return body, _manifest_type(body, response.headers.get("content-type"), reference)

    # --- blobs ----------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _open_blob(
        self, ref: ImageRef, desc: media.Descriptor, creds: Credentials | None
    ) -> AsyncIterator[AsyncIterator[bytes]]:
        media.check_digest(desc.digest, what="blob digest")
        if creds is not None:
            creds.basic()  # as in resolve: a malformed auth field is an InvalidArgument
        endpoints = self._endpoints_of(ref.domain)
        first = self._served_by.get((ref.domain, ref.path))
        if first is not None and first in endpoints:
            endpoints = (first, *(e for e in endpoints if e != first))
        failures: list[tuple[Endpoint, _EndpointError]] = []
        for endpoint in endpoints:
            try:
                response = await self._get_blob(endpoint, ref, desc, creds)
            except _EndpointError as exc:
                failures.append((endpoint, exc))
                log.warning(
                    "failed to fetch blob at endpoint",
                    ref=str(ref),
                    endpoint=str(endpoint),
                    digest=desc.digest,
                    error=exc.message,
                )
                continue
            stream = _BlobStream(response, desc, f"{ref.name} at {endpoint}", self._stall_timeout)
            try:
                yield stream
            finally:
                await stream.aclose()
            return
        raise _final_error(f"fetch blob {desc.digest} of {ref}", failures)

    async def _get_blob(
        self,
        endpoint: Endpoint,
        ref: ImageRef,
        desc: media.Descriptor,
        creds: Credentials | None,
    ) -> httpx.Response:
        url = f"{endpoint.api}/{ref.path}/blobs/{desc.digest}"
        # Blobs are compressed already; identity keeps a proxy or CDN from
        # wrapping them in a Content-Encoding we would have to undo.
        headers = {"Accept-Encoding": "identity"}
        # httpx's own read timeout is a backstop; _BlobStream's Trio deadline
        # is what reports a stall.
        timeout = httpx.Timeout(
            REQUEST_TIMEOUT, connect=CONNECT_TIMEOUT, read=2 * self._stall_timeout
        )
        # Waiting for the response head is waiting for bytes too.
        with trio.move_on_after(self._stall_timeout) as scope:
            response = await self._send(endpoint, ref, creds, url, headers, timeout)
        if scope.cancelled_caught:
            raise _EndpointError(
                "stalled", f"blob {desc.digest}: no response for {self._stall_timeout:g} s"
            )
        try:
            if response.status_code != 200:
                raise await _status_error(response, f"blob {desc.digest}")
            length = response.headers.get("content-length")
            if length is not None and length.isdigit() and int(length) > desc.size:
                raise _EndpointError(
                    "invalid",
                    f"blob {desc.digest} has {length} bytes, its descriptor says {desc.size}",
                )
        except BaseException:
            await _close(response)
            raise
        return response

    # --- requests and authentication ------------------------------------------------------

    async def _send(
        self,
        endpoint: Endpoint,
        ref: ImageRef,
        creds: Credentials | None,
        url: str,
        headers: Mapping[str, str],
        http_timeout: httpx.Timeout,
    ) -> httpx.Response:
        """GET ``url``, authenticating as the endpoint asks, following redirects.

        Blob requests are redirected to storage or a CDN (spec.md "Pulling
        blobs": "a 307 Temporary Redirect ... to the blob's location"); some
        mirrors redirect manifest requests too.

        Returns a streaming response that is not a 401 or 403; the caller closes it.
        """
        authorization = await self._authorization(endpoint, ref, creds)
        for attempt in range(2):
            request = self._http.build_request("GET", url, headers=headers, timeout=http_timeout)
            if authorization is not None:
                request.headers["Authorization"] = authorization
            try:
                # httpx drops Authorization on a redirect to another origin
                # (httpx _client.py, _redirect_headers): a CDN's pre-signed URL
                # must not get, and would reject, the registry's credentials.
                response = await self._http.send(request, stream=True, follow_redirects=True)
            except (httpx.HTTPError, httpx.InvalidURL) as exc:
                raise _EndpointError("unreachable", _describe(exc)) from exc
            if response.status_code not in (401, 403):
                return response
            try:
                detail = await _error_detail(response)
            finally:
                await _close(response)
            # 403 is a decision, not a request for credentials (RFC 9110 15.5.4).
            if response.status_code == 403 or response.history:
                raise _EndpointError("unauthorized", f"access denied: {detail}")
            challenges = parse_www_authenticate(response.headers.get_list("www-authenticate"))
            if attempt == 1 or not challenges:
                raise _EndpointError("unauthorized", f"authentication failed: {detail}")
            if authorization is not None:
                # What we sent was refused: a cached token may have been
                # revoked or expired early, so do not offer it again.
                self._forget_tokens(endpoint, ref, creds)
            self._challenges[endpoint.url] = challenges
            retry = await self._authorization(endpoint, ref, creds)
            # Nothing new to offer (anonymous against Basic, or the same
            # password twice): the answer would be the same.
            if retry is None or retry == authorization:
                raise _EndpointError("unauthorized", f"authentication failed: {detail}")
            authorization = retry
        raise AssertionError("unreachable")  # pragma: no cover

    async def _authorization(
        self, endpoint: Endpoint, ref: ImageRef, creds: Credentials | None
    ) -> str | None:
        """The Authorization header the endpoint's last challenges call for."""
        challenges = self._challenges.get(endpoint.url, ())
        # Bearer first, as containerd's docker authorizer prefers it: a token
        # is scoped to the repository, Basic credentials are not.
        for challenge in challenges:
            if challenge.scheme == "bearer":
                return f"Bearer {await self._token(challenge, ref, creds)}"
        for challenge in challenges:
            if challenge.scheme == "basic" and creds is not None:
                basic = creds.basic()
                if basic is not None:
                    return _basic_header(*basic)
        return None

    def _token_key(
        self, challenge: Challenge, ref: ImageRef, creds: Credentials | None
    ) -> _TokenKey:
        realm = challenge.param("realm")
        if not realm:
            raise _EndpointError("unauthorized", "bearer challenge has no realm")
        # The scope is ours, not the challenge's: we only ever pull, and the
        # challenge of a manifest request need not name the repository.
        return _TokenKey(realm, challenge.param("service") or "", ref.repository_scope(), creds)

    def _forget_tokens(self, endpoint: Endpoint, ref: ImageRef, creds: Credentials | None) -> None:
        for challenge in self._challenges.get(endpoint.url, ()):
            if challenge.scheme == "bearer" and challenge.param("realm"):
                self._tokens.pop(self._token_key(challenge, ref, creds), None)

    async def _token(self, challenge: Challenge, ref: ImageRef, creds: Credentials | None) -> str:
        if creds is not None and creds.registry_token:
            return creds.registry_token
        key = self._token_key(challenge, ref, creds)
        # One fetch per key at a time: the layers of one pull all want the
        # same token at once, and the token server should see one request.
        lock = self._token_locks.setdefault(key, trio.Lock())
        async with lock:
            cached = self._tokens.get(key)
            if cached is not None and cached.expires > trio.current_time():
                return cached.value
            value, expires_in = await self._fetch_token(key, creds)
            margin = min(TOKEN_EXPIRY_MARGIN, expires_in / 2)
            self._tokens[key] = _Token(value, trio.current_time() + expires_in - margin)
        self._prune_tokens()
        return value

    def _prune_tokens(self) -> None:
        if len(self._tokens) < 256:
            return
        now = trio.current_time()
        for key, token in list(self._tokens.items()):
            if token.expires <= now:
                del self._tokens[key]
        for key, lock in list(self._token_locks.items()):
            if key not in self._tokens and not lock.locked():
                del self._token_locks[key]

    async def _fetch_token(self, key: _TokenKey, creds: Credentials | None) -> tuple[str, float]:
        """Ask the token server; returns the token and its lifetime in seconds."""
        where = f"token server {key.realm}"
        basic = creds.basic() if creds is not None else None
        with trio.move_on_after(REQUEST_TIMEOUT) as scope:
            try:
                if creds is not None and creds.identity_token:
                    # oauth.md "Refresh token format": POST a form.
                    form = {
                        "grant_type": "refresh_token",
                        "refresh_token": creds.identity_token,
                        "service": key.service,
                        "scope": key.scope,
                        "client_id": OAUTH_CLIENT_ID,
                    }
                    request = self._http.build_request(
                        "POST", key.realm, data=form, timeout=_HTTP_TIMEOUT
                    )
                else:
                    # token.md "Requesting a Token": GET with service and scope,
                    # and Basic credentials (account names the user) if we have them.
                    params = {"scope": key.scope}
                    if key.service:
                        params["service"] = key.service
                    headers = {}
                    if basic is not None:
                        params["account"] = basic[0]
                        headers["Authorization"] = _basic_header(*basic)
                    request = self._http.build_request(
                        "GET", key.realm, params=params, headers=headers, timeout=_HTTP_TIMEOUT
                    )
                response = await self._http.send(request, stream=True, follow_redirects=True)
                try:
                    if response.status_code != 200:
                        detail = await _error_detail(response)
                        kind: _Kind = "server" if response.status_code >= 500 else "unauthorized"
                        raise _EndpointError(kind, f"{where} refused a token: {detail}")
                    body = await _read_bounded(response, MAX_TOKEN_BYTES, f"{where} answer")
                finally:
                    await _close(response)
            except (httpx.HTTPError, httpx.InvalidURL) as exc:
                raise _EndpointError("unreachable", f"{where}: {_describe(exc)}") from exc
        if scope.cancelled_caught:
            raise _EndpointError("unreachable", f"{where}: timed out after {REQUEST_TIMEOUT:g} s")
        return _parse_token(body, where)


class _BlobStream:
    """Chunks of a blob response as they arrive, with stall and size checks.

    A class rather than an async generator: the caller may stop early, and
    an abandoned generator would be finalized by the garbage collector.
    """

    def __init__(
        self, response: httpx.Response, desc: media.Descriptor, where: str, stall: float
    ) -> None:
        self._response = response
        # Decoded, in case a server ignores our "Accept-Encoding: identity":
        # the blob is the entity, a Content-Encoding only wraps it in transit
        # (RFC 9110 section 8.4).  Chunks come as the socket delivers them.
        self._chunks = response.aiter_bytes()
        self._desc = desc
        self._what = f"blob {desc.digest} of {where}"
        self._stall = stall
        self.received = 0

    def __aiter__(self) -> _BlobStream:
        return self

    async def __anext__(self) -> bytes:
        while True:
            # The deadline covers one read, not the transfer: a slow blob
            # that keeps moving is never cut off, a silent one is.
            with trio.move_on_after(self._stall) as scope:
                try:
                    chunk = await self._chunks.__anext__()
                except StopAsyncIteration:
                    if self.received < self._desc.size:
                        short = f"ended after {self.received} of {self._desc.size} bytes"
                        raise self._fail(short) from None
                    raise
                except httpx.ReadTimeout as exc:
                    raise self._stalled() from exc
                except httpx.HTTPError as exc:
                    raise self._fail(_describe(exc)) from exc
            if scope.cancelled_caught:
                raise self._stalled()
            self.received += len(chunk)
            if self.received > self._desc.size:
                raise self._fail(f"sent more than the {self._desc.size} bytes of its descriptor")
            if chunk:
                return chunk

    def _stalled(self) -> RegistryUnavailable:
        return self._fail(f"made no progress for {self._stall:g} s")

    def _fail(self, reason: str) -> RegistryUnavailable:
        return RegistryUnavailable(f"failed to fetch {self._what}: {reason}")

    async def aclose(self) -> None:
        await _close(self._response, self._chunks)


# --- helpers ----------------------------------------------------------------------------------


def _basic_header(user: str, password: str) -> str:
    # RFC 7617 section 2.1: user-pass in UTF-8, then base64.
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode("ascii")


async def _close(response: httpx.Response, chunks: AsyncIterator[bytes] | None = None) -> None:
    """Close ``response`` and finish ``chunks``, an iterator over its body.

    Closing drops or returns the connection without network I/O; shielded
    so a cancelled caller cannot leave the response (and its socket) open.

    httpx and httpcore read a body through a chain of nested async
    generators.  One abandoned part-way stays suspended, and Trio warns
    ("Async generator ... was garbage collected before it had been
    exhausted", a ResourceWarning) when the garbage collector finds it;
    closing the outermost does not close the ones inside it.  Once the
    response is closed, one more step makes the innermost read fail, and that
    error unwinds and finishes every level.  The step runs in a cancelled
    scope, so it cannot block either way.
    """
    with trio.CancelScope(shield=True):
        await response.aclose()
    if chunks is None:
        return
    with trio.CancelScope() as scope:
        scope.cancel()
        # Chunks h11 had already buffered come out first; a body cannot
        # have many of them left once the socket is closed.
        for _ in range(1024):
            try:
                await chunks.__anext__()
            except (StopAsyncIteration, httpx.HTTPError, httpx.StreamError):
                return


async def _read_bounded(response: httpx.Response, limit: int, what: str) -> bytes:
    length = response.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise _EndpointError("invalid", f"{what} is {length} bytes, more than {limit} allowed")
    body = bytearray()
    chunks = response.aiter_bytes()
    try:
        async for chunk in chunks:
            body += chunk
            if len(body) > limit:
                raise _EndpointError("invalid", f"{what} is larger than {limit} bytes")
    finally:
        await _close(response, chunks)
    return bytes(body)


async def _status_error(response: httpx.Response, what: str) -> _EndpointError:
    detail = await _error_detail(response)
    status = response.status_code
    if status == 404:
        return _EndpointError("not_found", f"{what} not found: {detail}")
    if status >= 500 or status == 429:
        return _EndpointError("server", f"failed to get {what}: {detail}")
    return _EndpointError("server", f"failed to get {what}: unexpected {detail}")


async def _error_detail(response: httpx.Response) -> str:
    """``HTTP <status>`` and what the server said about it, for messages."""
    body = bytearray()
    chunks = response.aiter_bytes()
    try:
        with contextlib.suppress(httpx.HTTPError):
            async for chunk in chunks:
                body += chunk
                if len(body) >= MAX_ERROR_BYTES:
                    break
    finally:
        await _close(response, chunks)
    said = _server_message(bytes(body[:MAX_ERROR_BYTES]))
    head = f"HTTP {response.status_code}"
    return f"{head}: {said}" if said else f"{head} {response.reason_phrase}".rstrip()


def _server_message(body: bytes) -> str:
    # spec.md "Error Codes": {"errors": [{"code", "message", "detail"}]};
    # token servers answer {"details": ...} (Docker) or OAuth2's
    # {"error", "error_description"} (RFC 6749 section 5.2).
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        text = body.decode("utf-8", "replace").strip()
        return " ".join(text.split())[:200]
    if not isinstance(doc, dict):
        return ""
    errors = doc.get("errors")
    if isinstance(errors, list):
        parts = []
        for err in errors:
            if isinstance(err, dict):
                code, message = err.get("code"), err.get("message")
                parts.append(": ".join(str(p) for p in (code, message) if p))
        return "; ".join(p for p in parts if p)
    for keys in (("error", "error_description"), ("details",), ("message",)):
        values = [str(doc[k]) for k in keys if doc.get(k)]
        if values:
            return ": ".join(values)
    return ""


def _describe(exc: Exception) -> str:
    # httpx's messages rarely say what failed ("All connection attempts
    # failed"); the class name does.
    name = type(exc).__name__
    text = str(exc) or repr(exc)
    return f"{name}: {text}"


def _verify(body: bytes, digest: str, what: str) -> None:
    try:
        hasher = media.hasher(digest)
    except InvalidArgument as exc:
        raise _EndpointError("invalid", str(exc)) from exc
    hasher.update(body)
    algorithm = digest.partition(":")[0]
    computed = f"{algorithm}:{hasher.hexdigest()}"
    if computed != digest:
        # spec.md "Pulling manifests": a client MUST verify the content it
        # asked for by digest; a mismatch is a corrupt or lying endpoint.
        raise _EndpointError("invalid", f"{what} has digest {computed}")


def _manifest_type(body: bytes, content_type: str | None, what: str) -> str:
    try:
        media_type = media.media_type_of(body, content_type)
        doc = json.loads(body)
    except (InvalidArgument, ValueError) as exc:
        raise _EndpointError("invalid", f"manifest {what}: {exc}") from exc
    if media_type in _SCHEMA1_TYPES or (isinstance(doc, dict) and doc.get("schemaVersion") == 1):
        raise _EndpointError(
            "invalid",
            f"manifest {what} is Docker schema 1, which is not supported: "
            "push the image again with a current client",
        )
    if media_type not in media.INDEX_TYPES | media.MANIFEST_TYPES:
        raise _EndpointError(
            "invalid", f"manifest {what} has unsupported media type {media_type!r}"
        )
    return media_type


def _parse_token(body: bytes, where: str) -> tuple[str, float]:
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise _EndpointError("unauthorized", f"{where} answered invalid JSON: {exc}") from exc
    if not isinstance(doc, dict):
        raise _EndpointError("unauthorized", f"{where} answered no JSON object")
    # token.md: "token"; oauth.md: "access_token"; servers may send both.
    token = doc.get("token") or doc.get("access_token")
    if not isinstance(token, str) or not token:
        raise _EndpointError("unauthorized", f"{where} answered no token")
    expires_in = doc.get("expires_in")
    if isinstance(expires_in, bool) or not isinstance(expires_in, int | float) or expires_in <= 0:
        expires_in = TOKEN_DEFAULT_EXPIRES_IN
    return token, float(expires_in)


def _final_error(action: str, failures: Sequence[tuple[Endpoint, _EndpointError]]) -> PouchError:
    """The error for the caller once every endpoint failed.

    The last endpoint is the registry itself, so its answer decides the
    kind; the message lists every endpoint's answer when there were several.
    """
    last_endpoint, last = failures[-1]
    message = f"failed to {action} at {last_endpoint}: {last.message}"
    if len(failures) > 1:
        tried = "; ".join(f"{endpoint}: {err.message}" for endpoint, err in failures[:-1])
        message += f" (tried first: {tried})"
    if last.kind == "not_found":
        return NotFound(message)
    if last.kind == "invalid":
        return InvalidArgument(message)
    if last.kind == "unauthorized":
        return RegistryUnauthorized(message)
    return RegistryUnavailable(message)
