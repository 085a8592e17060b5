"""pouch.image.registry against a real registry: Debian's docker-registry 2.8 on loopback.

The registry (tests/support/registry.py) runs open, with htpasswd Basic auth, or with
token auth trusting tests/support/tokenserver.py.  Images come from
tests/support/images.py.  Faults a real registry will not produce (a stalled body, a
trickle, a redirect to another host, a schema 1 manifest) come from tiny HTTP servers
written in this file, one per test, on 127.0.0.1.

Needs the Debian packages docker-registry and busybox-static, and PyPI pyjwt and
cryptography (for the token server).
"""

from __future__ import annotations

import base64
import contextlib
import functools
import gc
import hashlib
import json
import socket
from typing import TYPE_CHECKING

import pytest
import trio

from pouch.config import MirrorConfig, RegistryConfig
from pouch.errors import InvalidArgument, NotFound, RegistryUnavailable
from pouch.image import media
from pouch.image.reference import parse_reference
from pouch.image.registry import Credentials, RegistryClient, RegistryUnauthorized
from tests.support.images import (
    busybox_image,
    host_platform,
    multiarch_index,
    to_docker,
)
from tests.support.registry import Registry, push
from tests.support.tokenserver import TokenServer, push_with_token, token_registry

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

    from tests.support.images import Blob, Image

pytestmark = [pytest.mark.integration, pytest.mark.root]

USER, PASSWORD = "pouch", "s3cret"
HOST_PLATFORM = media.Platform.host()


# --- fixtures -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def registry() -> Iterator[Registry]:
    """An open registry with busybox as an image, an index and a Docker list."""
    with Registry() as reg:
        image = busybox_image()
        push(reg, "library/busybox", "latest", image)
        push(reg, "test/multi", "latest", multiarch_index(image))
        push(reg, "test/docker", "latest", to_docker(image))
        push(reg, "test/dockerlist", "latest", to_docker(multiarch_index(image)))
        yield reg


@pytest.fixture(scope="module")
def basic_registry() -> Iterator[Registry]:
    with Registry(auth=(USER, PASSWORD)) as reg:
        push(reg, "private/busybox", "latest", busybox_image())
        yield reg


@pytest.fixture(scope="module")
def token_setup() -> Iterator[tuple[TokenServer, Registry]]:
    server = TokenServer(users={USER: PASSWORD}, refresh_tokens={"refresh-1": USER})
    with server, token_registry(server) as reg:
        push_with_token(reg, server, "private/busybox", "latest", busybox_image())
        yield server, reg


@pytest.fixture
def token_server(token_setup: tuple[TokenServer, Registry]) -> Iterator[TokenServer]:
    server = token_setup[0]
    server.clear()
    yield server
    server.token_field = "token"


@contextlib.asynccontextmanager
async def open_client(
    config: RegistryConfig, *, stall_timeout: float = 30.0
) -> AsyncIterator[RegistryClient]:
    client = RegistryClient(config, stall_timeout=stall_timeout)
    try:
        yield client
    finally:
        await client.aclose()


def insecure(*hosts: str, **mirrors: tuple[str, ...]) -> RegistryConfig:
    return RegistryConfig(
        insecure=hosts, mirrors={k: MirrorConfig(endpoints=v) for k, v in mirrors.items()}
    )


def closed_port() -> int:
    """A port nobody listens on (the kernel just handed it out)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def read_blob(
    client: RegistryClient, ref_text: str, desc: media.Descriptor, creds: Credentials | None
) -> bytes:
    ref = parse_reference(ref_text)
    async with client.open_blob(ref, desc, creds) as chunks:
        return b"".join([chunk async for chunk in chunks])


def descriptor(blob: Blob) -> media.Descriptor:
    return media.Descriptor(blob.media_type, blob.digest, blob.size)


# --- resolve ------------------------------------------------------------------------------


@pytest.mark.timeout(60)
async def test_resolve_by_tag(registry: Registry) -> None:
    image = busybox_image()
    registry.clear_requests()
    async with open_client(insecure(registry.host)) as client:
        resolved = await client.resolve(
            parse_reference(registry.ref("library/busybox")), None, HOST_PLATFORM
        )
    assert resolved.digest == resolved.manifest_digest == image.digest
    assert resolved.manifest_bytes == image.manifest_bytes
    assert resolved.index_bytes is None
    assert resolved.endpoint == registry.url
    assert resolved.manifest.media_type == media.OCI_MANIFEST
    assert resolved.manifest.config.digest == image.config.digest
    assert [d.digest for d in resolved.manifest.layers] == [
        layer.blob.digest for layer in image.layers
    ]
    assert registry.count("/v2/library/busybox/manifests/latest") == 1


@pytest.mark.timeout(60)
async def test_resolve_by_digest_and_by_tag_plus_digest(registry: Registry) -> None:
    image = busybox_image()
    async with open_client(insecure(registry.host)) as client:
        by_digest = parse_reference(registry.ref("library/busybox", image.digest))
        resolved = await client.resolve(by_digest, None, HOST_PLATFORM)
        assert resolved.ref == by_digest
        assert resolved.digest == resolved.manifest_digest == image.digest
        # Both: the digest is what is fetched (the tag could have moved).
        both = parse_reference(f"{registry.host}/library/busybox:gone@{image.digest}")
        assert (await client.resolve(both, None, HOST_PLATFORM)).digest == image.digest


@pytest.mark.timeout(60)
async def test_index_resolves_to_host_platform(registry: Registry) -> None:
    index = multiarch_index(busybox_image())
    async with open_client(insecure(registry.host)) as client:
        ref = parse_reference(registry.ref("test/multi"))
        resolved = await client.resolve(ref, None, HOST_PLATFORM)
        assert resolved.digest == index.digest
        assert resolved.index_bytes == index.manifest_bytes
        # multiarch_index puts the host's image last: first-entry pickers fail here.
        assert resolved.manifest_digest == index.image_for(host_platform()).digest
        assert resolved.manifest_bytes == index.image_for(host_platform()).manifest_bytes

        stub = index.images[0]
        foreign = media.Platform(stub.platform.os, stub.platform.architecture)
        other = await client.resolve(ref, None, foreign)
        assert other.manifest_digest == stub.digest
        assert other.digest == index.digest

        with pytest.raises(InvalidArgument, match=r"no image for platform linux/s390x.*offered"):
            await client.resolve(ref, None, media.Platform("linux", "s390x"))


@pytest.mark.timeout(60)
async def test_docker_schema2_manifest_and_list(registry: Registry) -> None:
    docker_list = to_docker(multiarch_index(busybox_image()))
    async with open_client(insecure(registry.host)) as client:
        listed = await client.resolve(
            parse_reference(registry.ref("test/dockerlist")), None, HOST_PLATFORM
        )
        single = await client.resolve(
            parse_reference(registry.ref("test/docker")), None, HOST_PLATFORM
        )
    assert listed.digest == docker_list.digest
    assert listed.index_bytes == docker_list.manifest_bytes
    assert listed.manifest_digest == docker_list.image_for(host_platform()).digest
    assert listed.manifest.media_type == media.DOCKER_MANIFEST
    assert single.digest == single.manifest_digest == to_docker(busybox_image()).digest
    assert single.manifest.media_type == media.DOCKER_MANIFEST
    assert single.manifest.layers[0].media_type == media.DOCKER_LAYER_GZIP


@pytest.mark.timeout(60)
async def test_unknown_tag_repo_and_blob_are_not_found(registry: Registry) -> None:
    async with open_client(insecure(registry.host)) as client:
        tag = registry.ref("library/busybox", "nope")
        with pytest.raises(NotFound, match=rf"failed to resolve {tag} at .*MANIFEST_UNKNOWN"):
            await client.resolve(parse_reference(tag), None, HOST_PLATFORM)
        repo = registry.ref("no/such/repo")
        with pytest.raises(NotFound, match=rf"failed to resolve {repo} at .*MANIFEST_UNKNOWN"):
            await client.resolve(parse_reference(repo), None, HOST_PLATFORM)
        missing = media.Descriptor(media.OCI_LAYER_GZIP, media.sha256_digest(b"absent"), 6)
        with pytest.raises(NotFound, match=r"failed to fetch blob sha256:.*BLOB_UNKNOWN"):
            await read_blob(client, registry.ref("library/busybox"), missing, None)


# --- blobs --------------------------------------------------------------------------------


@pytest.mark.timeout(60)
async def test_blobs_stream_with_correct_bytes(registry: Registry) -> None:
    image = busybox_image()
    ref = parse_reference(registry.ref("library/busybox"))
    registry.clear_requests()
    chunks_seen: dict[str, int] = {}
    async with open_client(insecure(registry.host)) as client:
        resolved = await client.resolve(ref, None, HOST_PLATFORM)
        for desc in (resolved.manifest.config, *resolved.manifest.layers):
            digest = hashlib.sha256()
            size = 0
            async with client.open_blob(ref, desc, None) as chunks:
                async for chunk in chunks:
                    digest.update(chunk)
                    size += len(chunk)
                    chunks_seen[desc.digest] = chunks_seen.get(desc.digest, 0) + 1
            assert f"sha256:{digest.hexdigest()}" == desc.digest
            assert size == desc.size
            assert registry.blob_fetches(desc.digest) == 1
    layer = image.layers[0].blob
    assert resolved.manifest.layers[0].digest == layer.digest
    # About 1 MiB of busybox arrives as it is read, not in one piece.
    assert layer.size > 512 * 1024
    assert chunks_seen[layer.digest] > 1


@pytest.mark.timeout(60)
async def test_blob_consumer_may_stop_early(registry: Registry) -> None:
    layer = busybox_image().layers[0].blob
    async with open_client(insecure(registry.host)) as client:
        ref = parse_reference(registry.ref("library/busybox"))
        async with client.open_blob(ref, descriptor(layer), None) as chunks:
            async for _ in chunks:
                break
        # The pool is still usable after an abandoned response.
        assert await read_blob(client, str(ref), descriptor(layer), None) == layer.read_bytes()
    # Nothing of the abandoned response is left for the garbage collector:
    # Trio would warn about a suspended httpx body generator here.
    gc.collect()


# --- Basic auth ---------------------------------------------------------------------------


def _auth_field(user: str, password: str) -> str:
    return base64.b64encode(f"{user}:{password}".encode()).decode()


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "creds",
    [Credentials(username=USER, password=PASSWORD), Credentials(auth=_auth_field(USER, PASSWORD))],
    ids=["username-password", "auth-field"],
)
async def test_basic_auth(basic_registry: Registry, creds: Credentials) -> None:
    image = busybox_image()
    ref = parse_reference(basic_registry.ref("private/busybox"))
    async with open_client(insecure(basic_registry.host)) as client:
        resolved = await client.resolve(ref, creds, HOST_PLATFORM)
        assert resolved.digest == image.digest
        layer = image.layers[0].blob
        assert await read_blob(client, str(ref), descriptor(layer), creds) == layer.read_bytes()


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "creds",
    [None, Credentials(username=USER, password="wrong"), Credentials(auth=_auth_field("x", "y"))],
    ids=["anonymous", "wrong-password", "wrong-auth-field"],
)
async def test_basic_auth_refused_with_registry_message(
    basic_registry: Registry, creds: Credentials | None
) -> None:
    ref = basic_registry.ref("private/busybox")
    async with open_client(insecure(basic_registry.host)) as client:
        with pytest.raises(RegistryUnauthorized) as info:
            await client.resolve(parse_reference(ref), creds, HOST_PLATFORM)
    message = str(info.value)
    assert message.startswith(f"RegistryUnavailable: failed to resolve {ref} at ")
    # The registry's own words (distribution's errcode UNAUTHORIZED).
    assert "HTTP 401: UNAUTHORIZED: authentication required" in message


# --- Bearer tokens ------------------------------------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("field", ["token", "access_token"])
async def test_bearer_token_flow_and_cache(
    token_setup: tuple[TokenServer, Registry], token_server: TokenServer, field: str
) -> None:
    registry = token_setup[1]
    token_server.token_field = field  # type: ignore[assignment]
    image = busybox_image()
    ref = parse_reference(registry.ref("private/busybox"))
    creds = Credentials(username=USER, password=PASSWORD)
    async with open_client(insecure(registry.host)) as client:
        first = await client.resolve(ref, creds, HOST_PLATFORM)
        second = await client.resolve(ref, creds, HOST_PLATFORM)
        layer = image.layers[0].blob
        assert await read_blob(client, str(ref), descriptor(layer), creds) == layer.read_bytes()
    assert first.digest == second.digest == image.digest
    (request,) = token_server.requests()
    assert request.method == "GET"
    assert request.user == USER
    assert request.service == "pouch-test-registry"
    assert request.scopes == ("repository:private/busybox:pull",)


@pytest.mark.timeout(60)
async def test_bearer_identity_token_refresh_grant(
    token_setup: tuple[TokenServer, Registry], token_server: TokenServer
) -> None:
    registry = token_setup[1]
    ref = parse_reference(registry.ref("private/busybox"))
    async with open_client(insecure(registry.host)) as client:
        resolved = await client.resolve(ref, Credentials(identity_token="refresh-1"), HOST_PLATFORM)
    assert resolved.digest == busybox_image().digest
    (request,) = token_server.requests()
    assert (request.method, request.grant_type, request.user) == ("POST", "refresh_token", USER)


@pytest.mark.timeout(60)
async def test_bearer_registry_token_used_as_is(
    token_setup: tuple[TokenServer, Registry], token_server: TokenServer
) -> None:
    registry = token_setup[1]
    token = token_server.mint("someone", [("repository", "private/busybox", ["pull"])])
    ref = parse_reference(registry.ref("private/busybox"))
    async with open_client(insecure(registry.host)) as client:
        resolved = await client.resolve(ref, Credentials(registry_token=token), HOST_PLATFORM)
    assert resolved.digest == busybox_image().digest
    assert token_server.requests() == []


@pytest.mark.timeout(60)
async def test_bearer_anonymous_gets_insufficient_scope(
    token_setup: tuple[TokenServer, Registry], token_server: TokenServer
) -> None:
    registry = token_setup[1]
    ref = registry.ref("private/busybox")
    async with open_client(insecure(registry.host)) as client:
        with pytest.raises(RegistryUnauthorized, match="UNAUTHORIZED: authentication required"):
            await client.resolve(parse_reference(ref), None, HOST_PLATFORM)
    # An anonymous token was issued; it grants nothing, and is not asked for twice.
    assert [r.user for r in token_server.requests()] == [None]


@pytest.mark.timeout(60)
async def test_bearer_wrong_password_reports_token_server(
    token_setup: tuple[TokenServer, Registry], token_server: TokenServer
) -> None:
    registry = token_setup[1]
    ref = registry.ref("private/busybox")
    async with open_client(insecure(registry.host)) as client:
        with pytest.raises(RegistryUnauthorized) as info:
            await client.resolve(
                parse_reference(ref), Credentials(username=USER, password="no"), HOST_PLATFORM
            )
    message = str(info.value)
    assert f"token server {token_server.realm} refused a token" in message
    assert "HTTP 401: invalid username or password" in message


# --- endpoints: mirrors, insecure ---------------------------------------------------------


@pytest.mark.timeout(60)
async def test_mirror_fall_through_for_docker_io(registry: Registry) -> None:
    dead = f"http://127.0.0.1:{closed_port()}"
    config = insecure(**{"docker.io": (dead, registry.url)})
    image = busybox_image()
    registry.clear_requests()
    async with open_client(config) as client:
        ref = parse_reference("docker.io/library/busybox:latest")
        resolved = await client.resolve(ref, None, HOST_PLATFORM)
        assert resolved.endpoint == registry.url
        assert resolved.digest == image.digest
        # The blob goes to the mirror that served the manifest, not the dead one first.
        layer = image.layers[0].blob
        assert await read_blob(client, str(ref), descriptor(layer), None) == layer.read_bytes()
    assert registry.blob_fetches(layer.digest) == 1


@pytest.mark.timeout(60)
@pytest.mark.parametrize("status", [404, 401, 500, 503])
async def test_mirror_failure_falls_through_to_registry(registry: Registry, status: int) -> None:
    # Two names for one registry: "localhost" as the mirror, 127.0.0.1 as itself.
    mirror = f"http://localhost:{registry.port}"
    config = insecure(registry.host, **{registry.host: (mirror,)})
    registry.clear_requests()
    registry.fail("/v2/library/busybox/manifests/latest", status=status)
    async with open_client(config) as client:
        ref = parse_reference(registry.ref("library/busybox"))
        resolved = await client.resolve(ref, None, HOST_PLATFORM)
    assert resolved.endpoint == registry.url
    statuses = [r.status for r in registry.requests() if "/manifests/" in r.path]
    assert statuses == [status, 200]


@pytest.mark.timeout(60)
async def test_not_found_at_every_endpoint(registry: Registry) -> None:
    mirror = f"http://localhost:{registry.port}"
    config = insecure(registry.host, **{registry.host: (mirror,)})
    ref = registry.ref("library/busybox", "missing")
    async with open_client(config) as client:
        with pytest.raises(NotFound) as info:
            await client.resolve(parse_reference(ref), None, HOST_PLATFORM)
    message = str(info.value)
    assert message.startswith(f"failed to resolve {ref} at {registry.url}: manifest missing")
    assert f"tried first: {mirror}: manifest missing not found" in message


@pytest.mark.timeout(60)
async def test_unreachable_everywhere_names_endpoints() -> None:
    host = f"127.0.0.1:{closed_port()}"
    mirror = f"http://127.0.0.1:{closed_port()}"
    config = insecure(host, **{host: (mirror,)})
    async with open_client(config) as client:
        with pytest.raises(RegistryUnavailable) as info:
            await client.resolve(parse_reference(f"{host}/a/b:c"), None, HOST_PLATFORM)
    message = str(info.value)
    assert message.startswith(
        f"RegistryUnavailable: failed to resolve {host}/a/b:c at http://{host}:"
    )
    assert "ConnectError" in message
    assert f"tried first: {mirror}: " in message


@pytest.mark.timeout(60)
async def test_https_by_default_fails_cleanly_against_plain_http(registry: Registry) -> None:
    ref = registry.ref("library/busybox")
    with trio.fail_after(20):
        async with open_client(RegistryConfig()) as client:
            with pytest.raises(RegistryUnavailable) as info:
                await client.resolve(parse_reference(ref), None, HOST_PLATFORM)
    message = str(info.value)
    assert f"failed to resolve {ref} at https://{registry.host}:" in message
    assert "ConnectError" in message


# --- misbehaving servers --------------------------------------------------------------------


async def _read_head(stream: trio.SocketStream) -> tuple[str, str, dict[str, str]]:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = await stream.receive_some(65536)
        if not chunk or len(data) > 65536:
            raise OSError("no request head")
        data += chunk
    lines = data.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")
    method, target, _ = lines[0].split(" ", 2)
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return method, target, headers


async def _serve_one(handler: Callable[..., Awaitable[None]], stream: trio.SocketStream) -> None:
    async with stream:
        with contextlib.suppress(OSError, trio.BrokenResourceError, trio.ClosedResourceError):
            method, target, headers = await _read_head(stream)
            await handler(stream, method, target, headers)


@contextlib.asynccontextmanager
async def serve_http(
    handler: Callable[[trio.SocketStream, str, str, dict[str, str]], Awaitable[None]],
) -> AsyncIterator[str]:
    """A one-request-per-connection HTTP server on 127.0.0.1; yields ``host:port``."""
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(
            functools.partial(
                trio.serve_tcp, functools.partial(_serve_one, handler), 0, host="127.0.0.1"
            )
        )
        yield f"127.0.0.1:{listeners[0].socket.getsockname()[1]}"
        nursery.cancel_scope.cancel()


def _head(status: str, headers: dict[str, str]) -> bytes:
    lines = [f"HTTP/1.1 {status}", *(f"{k}: {v}" for k, v in headers.items()), "", ""]
    return "\r\n".join(lines).encode()


PAYLOAD = bytes(range(256)) * 4
PAYLOAD_DESC = media.Descriptor(media.OCI_LAYER_GZIP, media.sha256_digest(PAYLOAD), len(PAYLOAD))


@pytest.mark.timeout(30)
async def test_stalled_body_fails_within_stall_timeout() -> None:
    async def stall(stream: trio.SocketStream, *_: object) -> None:
        await stream.send_all(_head("200 OK", {"Content-Length": str(len(PAYLOAD))}))
        await stream.send_all(PAYLOAD[:100])
        await trio.sleep_forever()

    async with serve_http(stall) as host, open_client(insecure(host), stall_timeout=1) as client:
        got: list[bytes] = []

        async def consume(chunks: AsyncIterator[bytes]) -> None:
            async for chunk in chunks:
                got.append(chunk)

        started = trio.current_time()
        async with client.open_blob(parse_reference(f"{host}/a/b:c"), PAYLOAD_DESC, None) as it:
            with pytest.raises(RegistryUnavailable, match="made no progress for 1 s"):
                await consume(it)
        elapsed = trio.current_time() - started
    assert b"".join(got) == PAYLOAD[:100]
    assert 1.0 <= elapsed < 3.0


@pytest.mark.timeout(30)
async def test_caller_cancel_mid_body_leaves_nothing_behind() -> None:
    async def stall(stream: trio.SocketStream, *_: object) -> None:
        await stream.send_all(_head("200 OK", {"Content-Length": str(len(PAYLOAD))}))
        await stream.send_all(PAYLOAD[:100])
        await trio.sleep_forever()

    async with serve_http(stall) as host, open_client(insecure(host), stall_timeout=10) as client:
        ref = parse_reference(f"{host}/a/b:c")
        with trio.move_on_after(0.5) as scope:
            async with client.open_blob(ref, PAYLOAD_DESC, None) as chunks:
                async for _ in chunks:
                    pass
        assert scope.cancelled_caught
    gc.collect()  # no suspended httpx generator left to warn about


@pytest.mark.timeout(30)
async def test_silent_server_fails_within_stall_timeout() -> None:
    async def silent(stream: trio.SocketStream, *_: object) -> None:
        await trio.sleep_forever()

    async with serve_http(silent) as host, open_client(insecure(host), stall_timeout=1) as client:
        started = trio.current_time()
        with pytest.raises(RegistryUnavailable, match=rf"at http://{host}: .*no response for 1 s"):
            await read_blob(client, f"{host}/a/b:c", PAYLOAD_DESC, None)
        assert trio.current_time() - started < 3.0


@pytest.mark.timeout(30)
async def test_slow_but_moving_body_completes() -> None:
    data = PAYLOAD[:8]
    desc = media.Descriptor(media.OCI_LAYER_GZIP, media.sha256_digest(data), len(data))

    async def trickle(stream: trio.SocketStream, *_: object) -> None:
        await stream.send_all(_head("200 OK", {"Content-Length": str(len(data))}))
        for i in range(len(data)):
            await trio.sleep(0.3)
            await stream.send_all(data[i : i + 1])

    async with serve_http(trickle) as host, open_client(insecure(host), stall_timeout=1) as client:
        started = trio.current_time()
        assert await read_blob(client, f"{host}/a/b:c", desc, None) == data
        # 8 bytes at 0.3 s each: well past the 1 s stall timeout in total.
        assert trio.current_time() - started >= 2.0


@pytest.mark.timeout(30)
async def test_body_longer_than_descriptor_is_cut() -> None:
    async def too_long(stream: trio.SocketStream, *_: object) -> None:
        # No Content-Length: the body runs to the close, and only counting can tell.
        await stream.send_all(_head("200 OK", {"Connection": "close"}))
        await stream.send_all(PAYLOAD + b"extra")

    async with serve_http(too_long) as host, open_client(insecure(host)) as client:
        with pytest.raises(RegistryUnavailable, match=f"sent more than the {len(PAYLOAD)} bytes"):
            await read_blob(client, f"{host}/a/b:c", PAYLOAD_DESC, None)
    gc.collect()  # as in test_blob_consumer_may_stop_early


@pytest.mark.timeout(30)
async def test_redirect_to_other_host_drops_authorization() -> None:
    seen: dict[str, dict[str, str]] = {}

    async def cdn(stream: trio.SocketStream, _: str, target: str, headers: dict[str, str]) -> None:
        seen["cdn"] = headers
        await stream.send_all(_head("200 OK", {"Content-Length": str(len(PAYLOAD))}) + PAYLOAD)

    async with serve_http(cdn) as cdn_host:

        async def origin(
            stream: trio.SocketStream, _: str, target: str, headers: dict[str, str]
        ) -> None:
            if "authorization" not in headers:
                body = b'{"errors":[{"code":"UNAUTHORIZED","message":"authentication required"}]}'
                challenge = {"WWW-Authenticate": 'Basic realm="r"'}
                head = _head("401 Unauthorized", {**challenge, "Content-Length": str(len(body))})
                await stream.send_all(head + body)
                return
            seen["origin"] = headers
            location = f"http://{cdn_host}/signed{target}?sig=abc"
            await stream.send_all(
                _head("307 Temporary Redirect", {"Location": location, "Content-Length": "0"})
            )

        async with serve_http(origin) as host, open_client(insecure(host)) as client:
            creds = Credentials(username="u", password="p")
            assert await read_blob(client, f"{host}/a/b:c", PAYLOAD_DESC, creds) == PAYLOAD
    assert seen["origin"]["authorization"].startswith("Basic ")
    assert "authorization" not in seen["cdn"]


def _manifest_server(body: bytes, content_type: str) -> Callable[..., Awaitable[None]]:
    async def serve(stream: trio.SocketStream, *_: object) -> None:
        head = _head("200 OK", {"Content-Type": content_type, "Content-Length": str(len(body))})
        await stream.send_all(head + body)

    return serve


@pytest.mark.timeout(30)
async def test_manifest_digest_mismatch_is_refused() -> None:
    image: Image = busybox_image()
    wanted = media.sha256_digest(b"something else")
    server = _manifest_server(image.manifest_bytes, media.OCI_MANIFEST)
    async with serve_http(server) as host, open_client(insecure(host)) as client:
        with pytest.raises(InvalidArgument, match=rf"manifest {wanted} has digest {image.digest}"):
            await client.resolve(parse_reference(f"{host}/a/b@{wanted}"), None, HOST_PLATFORM)


@pytest.mark.timeout(30)
async def test_docker_schema1_is_unsupported() -> None:
    body = json.dumps({"schemaVersion": 1, "name": "a/b", "tag": "c", "fsLayers": []}).encode()
    server = _manifest_server(body, "application/vnd.docker.distribution.manifest.v1+prettyjws")
    async with serve_http(server) as host, open_client(insecure(host)) as client:
        with pytest.raises(InvalidArgument, match="Docker schema 1, which is not supported"):
            await client.resolve(parse_reference(f"{host}/a/b:c"), None, HOST_PLATFORM)


@pytest.mark.timeout(30)
async def test_oversized_manifest_is_refused() -> None:
    body = b" " * (4 * 1024 * 1024 + 1)
    server = _manifest_server(body, media.OCI_MANIFEST)
    async with serve_http(server) as host, open_client(insecure(host)) as client:
        with pytest.raises(InvalidArgument, match="more than 4194304 allowed"):
            await client.resolve(parse_reference(f"{host}/a/b:c"), None, HOST_PLATFORM)
