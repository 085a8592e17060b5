"""Tests for pouch.image.reference: Docker-style reference parsing."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pouch.errors import InvalidArgument
from pouch.image.reference import ImageRef, is_digest, is_image_id, parse_reference

SHA256 = "sha256:" + "0123456789abcdef" * 4
SHA512 = "sha512:" + "0123456789abcdef" * 8
HEX64 = "a" * 64


@pytest.mark.parametrize(
    ("text", "domain", "path", "tag", "digest"),
    [
        # Docker Hub defaults (normalize.go).
        ("busybox", "docker.io", "library/busybox", "latest", None),
        ("busybox:1.36", "docker.io", "library/busybox", "1.36", None),
        ("user/img", "docker.io", "user/img", "latest", None),
        ("user/img:v1", "docker.io", "user/img", "v1", None),
        ("library/busybox", "docker.io", "library/busybox", "latest", None),
        ("docker.io/busybox", "docker.io", "library/busybox", "latest", None),
        ("docker.io/library/busybox", "docker.io", "library/busybox", "latest", None),
        ("index.docker.io/busybox", "docker.io", "library/busybox", "latest", None),
        ("index.docker.io/user/img:x", "docker.io", "user/img", "x", None),
        ("registry-1.docker.io/library/busybox", "docker.io", "library/busybox", "latest", None),
        ("library/a/b", "docker.io", "library/a/b", "latest", None),
        ("a/b/c/d", "docker.io", "a/b/c/d", "latest", None),
        # Other registries, ports, localhost, IP addresses.
        ("quay.io/coreos/etcd", "quay.io", "coreos/etcd", "latest", None),
        ("gcr.io/pause:3.9", "gcr.io", "pause", "3.9", None),
        ("127.0.0.1:5000/busybox", "127.0.0.1:5000", "busybox", "latest", None),
        ("127.0.0.1:5000/a/b:t", "127.0.0.1:5000", "a/b", "t", None),
        ("localhost:5000/img:tag", "localhost:5000", "img", "tag", None),
        ("localhost/img", "localhost", "img", "latest", None),
        ("[::1]:5000/img", "[::1]:5000", "img", "latest", None),
        (
            "my-registry.example.com:443/team/app",
            "my-registry.example.com:443",
            "team/app",
            "latest",
            None,
        ),
        # A first component with a capital letter is a host (splitDockerDomain).
        ("Registry/img", "Registry", "img", "latest", None),
        # Without a '/', "localhost:5000" is a Hub image named localhost, tag 5000.
        ("localhost:5000", "docker.io", "library/localhost", "5000", None),
        ("localhost", "docker.io", "library/localhost", "latest", None),
        # Digests: no default tag when pinned, and tag plus digest are both kept.
        (f"busybox@{SHA256}", "docker.io", "library/busybox", None, SHA256),
        (f"busybox:1.36@{SHA256}", "docker.io", "library/busybox", "1.36", SHA256),
        (f"localhost:5000/img:t@{SHA512}", "localhost:5000", "img", "t", SHA512),
        # Separators allowed by the grammar; tags may use capitals.
        ("a.b_c__d-e--f", "docker.io", "library/a.b_c__d-e--f", "latest", None),
        ("img:Latest_1.0-rc", "docker.io", "library/img", "Latest_1.0-rc", None),
        ("img:_", "docker.io", "library/img", "_", None),
        ("img:" + "t" * 128, "docker.io", "library/img", "t" * 128, None),
        # Only the whole string being 64 hex is an id; as a name it is fine.
        (f"{HEX64}:latest", "docker.io", f"library/{HEX64}", "latest", None),
        ("a" * 63, "docker.io", "library/" + "a" * 63, "latest", None),
    ],
)
def test_parse_normalises(
    text: str, domain: str, path: str, tag: str | None, digest: str | None
) -> None:
    ref = parse_reference(text)
    assert ref == ImageRef(domain, path, tag, digest)


@pytest.mark.parametrize(
    ("text", "full", "familiar"),
    [
        ("busybox", "docker.io/library/busybox:latest", "busybox:latest"),
        ("user/img:tag", "docker.io/user/img:tag", "user/img:tag"),
        ("library/a/b", "docker.io/library/a/b:latest", "library/a/b:latest"),
        # Dropping docker.io here would turn the first component into a registry.
        ("docker.io/localhost/x", "docker.io/localhost/x:latest", "docker.io/localhost/x:latest"),
        ("docker.io/a.b/c", "docker.io/a.b/c:latest", "docker.io/a.b/c:latest"),
        ("docker.io/library/a.b", "docker.io/library/a.b:latest", "a.b:latest"),
        ("quay.io/x/y:1", "quay.io/x/y:1", "quay.io/x/y:1"),
        ("localhost:5000/img", "localhost:5000/img:latest", "localhost:5000/img:latest"),
        (f"busybox@{SHA256}", f"docker.io/library/busybox@{SHA256}", f"busybox@{SHA256}"),
        (
            f"busybox:1@{SHA256}",
            f"docker.io/library/busybox:1@{SHA256}",
            f"busybox:1@{SHA256}",
        ),
    ],
)
def test_str_and_familiar(text: str, full: str, familiar: str) -> None:
    ref = parse_reference(text)
    assert str(ref) == full
    assert ref.familiar() == familiar
    assert parse_reference(familiar) == ref


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("", "reference is empty"),
        ("Foo:", "tag is empty"),
        ("busybox:", "tag is empty"),
        ("localhost:5000/img:", "tag is empty"),
        ("img:-bad", 'invalid tag "-bad"'),
        ("img:.x", 'invalid tag ".x"'),
        ("img:a:b", 'invalid tag "a:b"'),
        ("img:" + "t" * 129, "invalid tag"),
        ("img:caf\u00e9", "invalid tag"),
        ("Foo", "repository name must be lowercase"),
        ("user/Img", "repository name must be lowercase"),
        ("quay.io/Team/app", "repository name must be lowercase"),
        ("busybox@", "digest is empty"),
        ("busybox@sha256:abc", "invalid sha256 digest: want 64 lowercase hex"),
        ("busybox@sha256:" + "A" * 64, "want 64 lowercase hex"),
        ("busybox@sha256:" + "g" * 64, "want 64 lowercase hex"),
        ("busybox@sha512:" + "a" * 64, "want 128 lowercase hex"),
        ("busybox@md5:" + "a" * 32, 'unsupported digest algorithm "md5"'),
        ("busybox@sha256", 'invalid digest "sha256"'),
        ("busybox@:abc", 'invalid digest ":abc"'),
        (f"busybox@{SHA256}@{SHA256}", "invalid sha256 digest"),
        (HEX64, "image id"),
        ("sha256:" + HEX64, "image id"),
        ("a/" + "b" * 254, "longer than 255 characters"),
        ("quay.io/" + "b" * 248, "longer than 255 characters"),
        ("a//b", "empty component"),
        ("docker.io//b", "empty component"),
        ("/busybox", "empty component"),
        ("user/", "empty component"),
        ("docker.io/", "repository name is empty"),
        (":tag", "repository name is empty"),
        (f"@{SHA256}", "repository name is empty"),
        ("-busybox", 'invalid repository path component "-busybox"'),
        ("busybox-", 'invalid repository path component "busybox-"'),
        ("_busybox", "invalid repository path component"),
        (".busybox", "invalid repository path component"),
        ("a..b", "invalid repository path component"),
        ("a___b", "invalid repository path component"),
        ("a._b", "invalid repository path component"),
        ("bus box", 'invalid repository path component "bus box"'),
        (" busybox", "invalid repository path component"),
        ("busybox ", "invalid repository path component"),
        ("busybox\n", 'invalid repository path component "busybox\\n"'),
        ("caf\u00e9", "invalid repository path component"),
        ("localhost:port/img", 'invalid registry domain "localhost:port"'),
        ("-bad.io/img", 'invalid registry domain "-bad.io"'),
        ("bad-.io/img", "invalid registry domain"),
        ("a..io/img", "invalid registry domain"),
        ("[::1/img", "invalid registry domain"),
        ("img:tag/x", "invalid registry domain"),
    ],
)
def test_parse_rejects(text: str, reason: str) -> None:
    with pytest.raises(InvalidArgument) as excinfo:
        parse_reference(text)
    message = str(excinfo.value)
    # The message always quotes what the caller wrote, as Go's %q would.
    assert message.startswith(f"invalid image reference {json.dumps(text, ensure_ascii=False)}: ")
    assert reason in message


def test_longest_name_is_accepted() -> None:
    ref = parse_reference("a/" + "b" * 243)
    assert len(ref.name) == 255


def test_name_and_scope() -> None:
    ref = parse_reference(f"localhost:5000/team/app:v2@{SHA256}")
    assert ref.name == "localhost:5000/team/app"
    assert ref.repository_scope() == "repository:team/app:pull"
    assert parse_reference("busybox").repository_scope() == "repository:library/busybox:pull"


def test_with_digest_keeps_tag() -> None:
    ref = parse_reference("busybox:1.36")
    pinned = ref.with_digest(SHA256)
    assert pinned == ImageRef("docker.io", "library/busybox", "1.36", SHA256)
    assert ref.digest is None


def test_with_digest_rejects_bad_digest() -> None:
    with pytest.raises(
        InvalidArgument,
        match=r'^invalid image reference "docker\.io/library/busybox:latest@sha256:x": '
        r"invalid sha256 digest",
    ):
        parse_reference("busybox").with_digest("sha256:x")


@pytest.mark.parametrize(
    ("domain", "path", "tag", "digest", "reason"),
    [
        ("docker.io", "busybox", "latest", None, "must be written library/busybox"),
        ("index.docker.io", "library/busybox", "latest", None, "must be written 'docker.io'"),
        ("docker.io", "library/busybox", None, None, "neither tag nor digest"),
        ("docker.io", "library/Busybox", "latest", None, "must be lowercase"),
        ("", "library/busybox", "latest", None, 'invalid registry domain ""'),
    ],
)
def test_direct_construction_is_checked(
    domain: str, path: str, tag: str | None, digest: str | None, reason: str
) -> None:
    with pytest.raises(InvalidArgument, match=r"^invalid image reference ") as excinfo:
        ImageRef(domain, path, tag, digest)
    assert reason in str(excinfo.value)


def test_refs_are_hashable_values() -> None:
    a = parse_reference("busybox")
    b = parse_reference("docker.io/library/busybox:latest")
    assert a == b
    assert {a: 1}[b] == 1


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (HEX64, True),
        ("sha256:" + HEX64, True),
        ("0123456789abcdef" * 4, True),
        ("A" * 64, False),
        ("a" * 63, False),
        ("a" * 65, False),
        ("sha512:" + HEX64, False),
        ("sha256:" + "a" * 63, False),
        (HEX64 + "\n", False),
        ("busybox", False),
        ("", False),
    ],
)
def test_is_image_id(text: str, expected: bool) -> None:
    assert is_image_id(text) is expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (SHA256, True),
        (SHA512, True),
        ("sha384:" + "a" * 96, True),
        ("sha256:" + "A" * 64, False),
        ("sha256:" + "a" * 63, False),
        ("sha256:" + "a" * 65, False),
        ("sha512:" + "a" * 64, False),
        ("md5:" + "a" * 32, False),
        (HEX64, False),
        ("sha256:", False),
        (":" + HEX64, False),
        ("", False),
    ],
)
def test_is_digest(text: str, expected: bool) -> None:
    assert is_digest(text) is expected


# Generators for the grammar's valid strings, kept short enough that the
# 255-character name limit is never the reason a case fails.
_alnum = st.text("abcdefghijklmnopqrstuvwxyz0123456789", min_size=1, max_size=6)
_separator = st.sampled_from([".", "_", "__", "-", "--", "---"])
_path_component = st.builds(
    lambda first, rest: first + "".join(sep + part for sep, part in rest),
    _alnum,
    st.lists(st.tuples(_separator, _alnum), max_size=3),
)
_path = st.lists(_path_component, min_size=1, max_size=4).map("/".join)
_domain_component = st.from_regex(r"[a-zA-Z0-9]([a-zA-Z0-9-]{0,8}[a-zA-Z0-9])?", fullmatch=True)
_host = st.one_of(
    st.lists(_domain_component, min_size=2, max_size=3).map(".".join),
    st.just("localhost"),
    st.just("[::1]"),
    st.just("index.docker.io"),
    st.just("docker.io"),
)
_domain = st.one_of(
    st.none(),
    st.builds(
        lambda host, port: host if port is None else f"{host}:{port}",
        _host,
        st.one_of(st.none(), st.integers(0, 65535)),
    ),
)
_tag = st.one_of(st.none(), st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,20}", fullmatch=True))
_digest = st.one_of(
    st.none(),
    st.text("0123456789abcdef", min_size=64, max_size=64).map("sha256:".__add__),
    st.text("0123456789abcdef", min_size=128, max_size=128).map("sha512:".__add__),
)


@st.composite
def _reference_text(draw: st.DrawFn) -> str:
    domain = draw(_domain)
    text = draw(_path)
    if domain is not None:
        text = f"{domain}/{text}"
    elif "/" in text:
        # Without a domain, a first component with a '.' or named localhost
        # *is* the domain (splitDockerDomain); give the path an explicit one.
        first = text.split("/", 1)[0]
        if "." in first or first == "localhost":
            text = f"docker.io/{text}"
    if (tag := draw(_tag)) is not None:
        text += f":{tag}"
    if (digest := draw(_digest)) is not None:
        text += f"@{digest}"
    return text


# database=None: no .hypothesis example store is written into the work tree.
@settings(database=None, max_examples=300, deadline=None)
@given(_reference_text())
def test_round_trip(text: str) -> None:
    ref = parse_reference(text)
    assert str(parse_reference(str(ref))) == str(ref)
    assert parse_reference(str(ref)) == ref
    assert parse_reference(ref.familiar()) == ref
    assert ImageRef(ref.domain, ref.path, ref.tag, ref.digest) == ref
