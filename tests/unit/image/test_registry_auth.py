"""Tests for pouch.image.registry without a network: challenges, endpoints, credentials.

The client tests at the end talk to an in-process fake registry through
``httpx.MockTransport`` (a fake, not a mock: it answers the way
distribution does), on Trio's autojump clock so token expiry takes no time.
The real registry is exercised by tests/integration/test_registry_client.py.
"""

from __future__ import annotations

import base64
import json

import attrs
import httpx
import pytest
import trio

from pouch.config import MirrorConfig, RegistryConfig
from pouch.errors import InvalidArgument, NotFound, RegistryUnavailable
from pouch.image import media
from pouch.image.reference import parse_reference
from pouch.image.registry import (
    Challenge,
    Credentials,
    Endpoint,
    RegistryClient,
    RegistryUnauthorized,
    endpoints_for,
    parse_www_authenticate,
)

# --- WWW-Authenticate ------------------------------------------------------------------------


def test_parse_docker_hub_bearer() -> None:
    header = (
        'Bearer realm="https://auth.docker.io/token",service="registry.docker.io",'
        'scope="repository:library/busybox:pull"'
    )
    assert parse_www_authenticate([header]) == (
        Challenge(
            "bearer",
            (
                ("realm", "https://auth.docker.io/token"),
                ("service", "registry.docker.io"),
                ("scope", "repository:library/busybox:pull"),
            ),
        ),
    )


def test_parse_basic() -> None:
    (challenge,) = parse_www_authenticate(['Basic realm="pouch-test"'])
    assert challenge.scheme == "basic"
    assert challenge.param("realm") == "pouch-test"
    assert challenge.param("service") is None


def test_parse_several_challenges_in_one_value() -> None:
    # RFC 9110 11.6.1: one header may list challenges, each with its params.
    header = 'Basic realm="a b", Bearer realm="https://t/token", service="s",scope="x:y:pull"'
    basic, bearer = parse_www_authenticate([header])
    assert basic == Challenge("basic", (("realm", "a b"),))
    assert bearer.scheme == "bearer"
    assert bearer.param("realm") == "https://t/token"
    assert bearer.param("service") == "s"
    assert bearer.param("scope") == "x:y:pull"


def test_parse_several_header_values_in_order() -> None:
    got = parse_www_authenticate(['Bearer realm="r"', 'Basic realm="b"'])
    assert [c.scheme for c in got] == ["bearer", "basic"]


def test_parse_scheme_and_names_case_insensitive_values_kept() -> None:
    (challenge,) = parse_www_authenticate(['BEARER Realm="HTTPS://Auth/Token",SERVICE=Reg'])
    assert challenge.scheme == "bearer"
    assert challenge.param("realm") == "HTTPS://Auth/Token"
    assert challenge.param("service") == "Reg"


def test_parse_quoted_string_escapes_and_commas() -> None:
    (challenge,) = parse_www_authenticate([r'Basic realm="say \"hi\", please", charset=UTF-8'])
    assert challenge.param("realm") == 'say "hi", please'
    assert challenge.param("charset") == "UTF-8"


def test_parse_unquoted_realm_url_is_accepted() -> None:
    # Not a token per the grammar, but some registries send it so.
    (challenge,) = parse_www_authenticate(["Bearer realm=https://auth.example/token,service=reg"])
    assert challenge.param("realm") == "https://auth.example/token"
    assert challenge.param("service") == "reg"


def test_parse_error_param_of_insufficient_scope() -> None:
    header = 'Bearer realm="r",service="s",scope="repository:a:pull",error="insufficient_scope"'
    (challenge,) = parse_www_authenticate([header])
    assert challenge.param("error") == "insufficient_scope"


def test_parse_token68() -> None:
    (challenge,) = parse_www_authenticate(["Negotiate YIIB+w==, Basic realm=x"])[:1]
    assert challenge == Challenge("negotiate", (("", "YIIB+w=="),))
    assert parse_www_authenticate(["Negotiate YIIB+w==, Basic realm=x"])[1].param("realm") == "x"


@pytest.mark.parametrize("header", ["", "   ", ", ,", '"quoted"'])
def test_parse_empty_or_garbage(header: str) -> None:
    assert parse_www_authenticate([header]) == ()


def test_parse_keeps_what_came_before_garbage() -> None:
    got = parse_www_authenticate(['Basic realm="x", "stray"'])
    assert got == (Challenge("basic", (("realm", "x"),)),)


def test_parse_scheme_without_params() -> None:
    assert parse_www_authenticate(["Basic"]) == (Challenge("basic"),)


# --- endpoints ---------------------------------------------------------------------------


def test_registry_defaults_to_https() -> None:
    assert endpoints_for(RegistryConfig(), "quay.io") == (Endpoint("https://quay.io"),)


def test_insecure_registry_is_plain_http() -> None:
    config = RegistryConfig(insecure=("127.0.0.1:5000",))
    assert endpoints_for(config, "127.0.0.1:5000") == (Endpoint("http://127.0.0.1:5000"),)
    assert endpoints_for(config, "127.0.0.1:5001") == (Endpoint("https://127.0.0.1:5001"),)


def test_docker_hub_api_host() -> None:
    (endpoint,) = endpoints_for(RegistryConfig(), "docker.io")
    assert endpoint.url == "https://registry-1.docker.io"
    assert endpoint.api == "https://registry-1.docker.io/v2"
    assert not endpoint.mirror


def test_mirrors_first_in_order_then_registry() -> None:
    config = RegistryConfig(
        mirrors={
            "docker.io": MirrorConfig(
                endpoints=("https://m1.example", "http://m2.example:5000/v2/", "m3.example/prefix/")
            )
        }
    )
    assert endpoints_for(config, "docker.io") == (
        Endpoint("https://m1.example", mirror=True),
        # containerd's "/v2" suffix is the API root, not part of a prefix.
        Endpoint("http://m2.example:5000", mirror=True),
        Endpoint("https://m3.example/prefix", mirror=True),
        Endpoint("https://registry-1.docker.io"),
    )
    # Other registries get none of docker.io's mirrors.
    assert endpoints_for(config, "quay.io") == (Endpoint("https://quay.io"),)


def test_mirror_without_scheme_follows_insecure_list() -> None:
    config = RegistryConfig(
        mirrors={"r.example": MirrorConfig(endpoints=("mirror:5000", "other:5000"))},
        insecure=("mirror:5000",),
    )
    urls = [e.url for e in endpoints_for(config, "r.example")]
    assert urls == ["http://mirror:5000", "https://other:5000", "https://r.example"]


def test_mirror_path_prefix_in_api() -> None:
    config = RegistryConfig(mirrors={"quay.io": MirrorConfig(endpoints=("https://m/cache/v2",))})
    mirror = endpoints_for(config, "quay.io")[0]
    assert mirror.api == "https://m/cache/v2"
    assert str(mirror) == "https://m/cache"


@pytest.mark.parametrize(
    "bad", ["ftp://m.example", "https://m.example/?x=1", "https://user:pw@m.example", "http://"]
)
async def test_invalid_mirror_fails_at_construction(bad: str) -> None:
    config = RegistryConfig(mirrors={"docker.io": MirrorConfig(endpoints=(bad,))})
    with pytest.raises(InvalidArgument, match=r"mirror of docker\.io"):
        RegistryClient(config, stall_timeout=1)


# --- credentials -------------------------------------------------------------------------


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def test_credentials_username_password() -> None:
    assert Credentials(username="u", password="p").basic() == ("u", "p")


def test_credentials_auth_field() -> None:
    assert Credentials(auth=_b64("user:pa:ss")).basic() == ("user", "pa:ss")
    assert Credentials(auth=_b64("user:")).basic() == ("user", "")


def test_credentials_username_wins_over_auth() -> None:
    # containerd's ParseAuth order.
    creds = Credentials(username="u", password="p", auth=_b64("other:x"))
    assert creds.basic() == ("u", "p")


def test_credentials_without_basic() -> None:
    assert Credentials().basic() is None
    assert Credentials(identity_token="t").basic() is None
    assert Credentials(registry_token="t").basic() is None


@pytest.mark.parametrize("auth", ["not base64!", _b64("no-colon"), _b64(":pw"), "//79"])
def test_credentials_bad_auth_field(auth: str) -> None:
    with pytest.raises(InvalidArgument, match="invalid auth"):
        Credentials(auth=auth).basic()


def test_credentials_repr_hides_secrets() -> None:
    creds = Credentials("u", "hunter2", _b64("u:hunter2"), "idtok", "regtok")
    text = repr(creds)
    assert "u" in text
    for secret in ("hunter2", _b64("u:hunter2"), "idtok", "regtok"):
        assert secret not in text


def test_credentials_are_hashable_keys() -> None:
    assert len({Credentials("u", "p"), Credentials("u", "p"), Credentials("u", "q")}) == 2


# --- the client against an in-process fake ---------------------------------------------------

REF = parse_reference("reg.test/team/app:v1")
CONFIG = b'{"rootfs":{"type":"layers","diff_ids":[]}}'
LAYER = b"layer bytes"
MANIFEST = json.dumps(
    {
        "schemaVersion": 2,
        "mediaType": media.OCI_MANIFEST,
        "config": {
            "mediaType": media.OCI_CONFIG,
            "digest": media.sha256_digest(CONFIG),
            "size": len(CONFIG),
        },
        "layers": [
            {
                "mediaType": media.OCI_LAYER_GZIP,
                "digest": media.sha256_digest(LAYER),
                "size": len(LAYER),
            }
        ],
    }
).encode()
MANIFEST_DIGEST = media.sha256_digest(MANIFEST)
REALM = "https://auth.test/token"
HOST = media.Platform.host()


@attrs.define
class FakeRegistry:
    """Answers like distribution: one repository, Basic or Bearer auth, a token server."""

    auth: str = "none"  # "none", "basic" or "bearer"
    expires_in: int | None = 60
    blobs: dict[str, bytes] = attrs.field(factory=dict)
    token_requests: list[httpx.Request] = attrs.field(factory=list)
    requests: list[httpx.Request] = attrs.field(factory=list)
    issued: set[str] = attrs.field(factory=lambda: {"reg-token"})

    def handle(self, request: httpx.Request) -> httpx.Response:
        if request.url.host == "auth.test":
            self.token_requests.append(request)
            token = f"tok-{len(self.token_requests)}"
            self.issued.add(token)
            doc: dict[str, object] = {"token": token}
            if self.expires_in is not None:
                doc["expires_in"] = self.expires_in
            return httpx.Response(200, json=doc)
        self.requests.append(request)
        given = request.headers.get("authorization")
        if self.auth == "basic" and given != "Basic " + _b64("u:p"):
            return self._unauthorized('Basic realm="fake"')
        if self.auth == "bearer" and given not in {f"Bearer {t}" for t in self.issued}:
            scope = f"repository:{REF.path}:pull"
            return self._unauthorized(f'Bearer realm="{REALM}",service="fake",scope="{scope}"')
        prefix = f"/v2/{REF.path}/"
        path = request.url.path
        if path in (prefix + "manifests/v1", prefix + f"manifests/{MANIFEST_DIGEST}"):
            return httpx.Response(
                200, content=MANIFEST, headers={"content-type": media.OCI_MANIFEST}
            )
        if path.startswith(prefix + "blobs/"):
            data = self.blobs.get(path.rsplit("/", 1)[1])
            if data is not None:
                return httpx.Response(200, content=data)
        err = {"errors": [{"code": "MANIFEST_UNKNOWN", "message": "manifest unknown"}]}
        return httpx.Response(404, json=err)

    @staticmethod
    def _unauthorized(challenge: str) -> httpx.Response:
        err = {"errors": [{"code": "UNAUTHORIZED", "message": "authentication required"}]}
        return httpx.Response(401, json=err, headers={"www-authenticate": challenge})


def _client(fake: FakeRegistry) -> tuple[RegistryClient, httpx.AsyncClient]:
    http = httpx.AsyncClient(transport=httpx.MockTransport(fake.handle))
    return RegistryClient(RegistryConfig(), http=http, stall_timeout=10), http


async def test_anonymous_resolve_no_auth() -> None:
    fake = FakeRegistry()
    client, http = _client(fake)
    async with http:
        resolved = await client.resolve(REF, None, HOST)
    assert resolved.digest == resolved.manifest_digest == MANIFEST_DIGEST
    assert resolved.manifest_bytes == MANIFEST
    assert resolved.index_bytes is None
    assert resolved.endpoint == "https://reg.test"
    assert [r.url.path for r in fake.requests] == ["/v2/team/app/manifests/v1"]
    accept = fake.requests[0].headers["accept"]
    assert all(t in accept for t in media.MANIFEST_ACCEPT)


async def test_bearer_token_cached_until_expiry(autojump_clock: trio.testing.MockClock) -> None:
    fake = FakeRegistry(auth="bearer", expires_in=60)
    client, http = _client(fake)
    async with http:
        await client.resolve(REF, None, HOST)
        token_request = fake.token_requests[0]
        assert token_request.url.params["scope"] == "repository:team/app:pull"
        assert token_request.url.params["service"] == "fake"
        assert "authorization" not in token_request.headers  # anonymous token
        # The endpoint's challenge is remembered: the token goes out up front.
        fake.requests.clear()
        await client.resolve(REF, None, HOST)
        assert len(fake.token_requests) == 1
        assert len(fake.requests) == 1
        # 60 s lifetime less the 10 s margin: still cached at 45 s, not at 51 s.
        await trio.sleep(45)
        await client.resolve(REF, None, HOST)
        assert len(fake.token_requests) == 1
        await trio.sleep(6)
        await client.resolve(REF, None, HOST)
        assert len(fake.token_requests) == 2


async def test_bearer_token_default_lifetime(autojump_clock: trio.testing.MockClock) -> None:
    # token.md: no expires_in means 60 s.
    fake = FakeRegistry(auth="bearer", expires_in=None)
    client, http = _client(fake)
    async with http:
        await client.resolve(REF, None, HOST)
        await trio.sleep(49)
        await client.resolve(REF, None, HOST)
        assert len(fake.token_requests) == 1
        await trio.sleep(2)
        await client.resolve(REF, None, HOST)
        assert len(fake.token_requests) == 2


async def test_bearer_tokens_are_per_credentials() -> None:
    fake = FakeRegistry(auth="bearer")
    client, http = _client(fake)
    async with http:
        await client.resolve(REF, Credentials("u", "p"), HOST)
        await client.resolve(REF, None, HOST)
        await client.resolve(REF, Credentials("u", "p"), HOST)
    assert len(fake.token_requests) == 2
    first, second = fake.token_requests
    assert first.headers["authorization"] == "Basic " + _b64("u:p")
    assert first.url.params["account"] == "u"
    assert "authorization" not in second.headers


async def test_identity_token_uses_oauth_refresh_grant() -> None:
    fake = FakeRegistry(auth="bearer")
    client, http = _client(fake)
    async with http:
        await client.resolve(REF, Credentials(identity_token="refresh-me"), HOST)
    (request,) = fake.token_requests
    assert request.method == "POST"
    form = dict(httpx.QueryParams(request.content.decode()))
    assert form == {
        "grant_type": "refresh_token",
        "refresh_token": "refresh-me",
        "service": "fake",
        "scope": "repository:team/app:pull",
        "client_id": "pouch",
    }


async def test_refused_cached_token_is_fetched_again() -> None:
    fake = FakeRegistry(auth="bearer")
    client, http = _client(fake)
    async with http:
        await client.resolve(REF, None, HOST)
        fake.issued.discard("tok-1")  # revoked before its expiry
        await client.resolve(REF, None, HOST)
    assert len(fake.token_requests) == 2
    assert fake.requests[-1].headers["authorization"] == "Bearer tok-2"


async def test_registry_token_used_as_is() -> None:
    fake = FakeRegistry(auth="bearer")
    client, http = _client(fake)
    async with http:
        await client.resolve(REF, Credentials(registry_token="reg-token"), HOST)
    assert fake.token_requests == []
    assert fake.requests[-1].headers["authorization"] == "Bearer reg-token"


async def test_basic_auth_after_challenge() -> None:
    fake = FakeRegistry(auth="basic")
    client, http = _client(fake)
    async with http:
        await client.resolve(REF, Credentials(auth=_b64("u:p")), HOST)
        await client.resolve(REF, Credentials(auth=_b64("u:p")), HOST)
    # Anonymous, then Basic; the second resolve sends Basic straight away.
    assert [r.headers.get("authorization") is not None for r in fake.requests] == [
        False,
        True,
        True,
    ]


async def test_basic_wrong_password_is_unauthorized_with_registry_message() -> None:
    fake = FakeRegistry(auth="basic")
    client, http = _client(fake)
    async with http:
        with pytest.raises(RegistryUnauthorized) as info:
            await client.resolve(REF, Credentials("u", "wrong"), HOST)
    message = str(info.value)
    assert message.startswith("RegistryUnavailable: failed to resolve reg.test/team/app:v1")
    assert "UNAUTHORIZED: authentication required" in message
    # Anonymous, then the password once: the same password is not sent twice.
    assert len(fake.requests) == 2


async def test_basic_without_credentials_is_unauthorized() -> None:
    fake = FakeRegistry(auth="basic")
    client, http = _client(fake)
    async with http:
        with pytest.raises(RegistryUnauthorized, match="authentication required"):
            await client.resolve(REF, None, HOST)
    assert len(fake.requests) == 1


async def test_unknown_tag_is_not_found() -> None:
    fake = FakeRegistry()
    client, http = _client(fake)
    ref = parse_reference("reg.test/team/app:nope")
    async with http:
        with pytest.raises(NotFound, match=r"reg\.test/team/app:nope.*MANIFEST_UNKNOWN"):
            await client.resolve(ref, None, HOST)


async def test_blob_size_checked_both_ways() -> None:
    long_desc = media.Descriptor(media.OCI_LAYER_GZIP, media.sha256_digest(b"x" * 10), 10)
    fake = FakeRegistry(blobs={long_desc.digest: b"x" * 11})
    client, http = _client(fake)
    async with http:
        # Content-Length says 11: refused before any byte is handed out.
        with pytest.raises(InvalidArgument, match="has 11 bytes"):
            async with client.open_blob(REF, long_desc, None):
                pass
        fake.blobs[long_desc.digest] = b"x" * 9
        async with client.open_blob(REF, long_desc, None) as chunks:
            with pytest.raises(RegistryUnavailable, match="ended after 9 of 10 bytes"):
                _ = [c async for c in chunks]
        fake.blobs[long_desc.digest] = b"x" * 10
        async with client.open_blob(REF, long_desc, None) as chunks:
            assert b"".join([c async for c in chunks]) == b"x" * 10
