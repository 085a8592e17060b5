"""Parse and normalise Docker-style image references.

The grammar is the one of the distribution ``reference`` package
(``regexp.go``), and the normalisation is the one of its ``normalize.go``,
which Docker, containerd and cri-o all share::

    reference        := name [ ":" tag ] [ "@" digest ]
    name             := [domain "/"] path
    domain           := host [":" port-number]
    host             := domain-name | "[" IPv6address "]"
    domain-name      := domain-component ["." domain-component]*
    domain-component := /([a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])/
    port-number      := /[0-9]+/
    path             := path-component ["/" path-component]*
    path-component   := alpha-numeric [separator alpha-numeric]*
    alpha-numeric    := /[a-z0-9]+/
    separator        := /[_.]|__|[-]+/
    tag              := /[\\w][\\w.-]{0,127}/
    digest           := algorithm ":" hex

This module is pure: no I/O, no clock, nothing async.
"""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Final

from pouch.errors import InvalidArgument

__all__ = ["ImageRef", "is_digest", "is_image_id", "parse_reference"]

DEFAULT_DOMAIN: Final = "docker.io"
DEFAULT_TAG: Final = "latest"

# Docker Hub's official images live under this namespace; "busybox" is
# "library/busybox" (normalize.go, officialRepoPrefix).
_OFFICIAL_PREFIX: Final = "library/"

# Names people write for Docker Hub.  normalize.go only folds
# "index.docker.io"; "registry-1.docker.io" is the host the Hub's API actually
# answers on and shows up in copied pull specs, so it is folded too.
_LEGACY_DOMAINS: Final = frozenset({"index.docker.io", "registry-1.docker.io"})

# regexp.go, NameTotalLengthMax: counted over "domain/path" after normalisation.
_NAME_MAX: Final = 255

# The grammar's \w is Go's, which is ASCII only; spell the classes out so
# Python's Unicode-aware \w cannot let "caf\u00e9" through.
_DOMAIN_COMPONENT: Final = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_DOMAIN_RE: Final = re.compile(
    rf"(?:{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})*|\[[a-fA-F0-9:]+\])(?::[0-9]+)?"
)
_PATH_COMPONENT_RE: Final = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*")
_TAG_RE: Final = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
_IMAGE_ID_RE: Final = re.compile(r"(?:sha256:)?[a-f0-9]{64}")

# go-digest's grammar for any digest, used only to tell "malformed" from
# "well-formed but an algorithm we do not implement".
_ANY_DIGEST_RE: Final = re.compile(r"[a-z0-9]+(?:[.+_-][a-z0-9]+)*:[a-zA-Z0-9=_-]+")

# Hex length per algorithm: go-digest registers exactly these three, and
# requires lowercase hex of the full length (Algorithm.Validate).
_DIGEST_HEX_LEN: Final = {"sha256": 64, "sha384": 96, "sha512": 128}


@dataclasses.dataclass(frozen=True, slots=True)
class ImageRef:
    """A normalised image reference, such as ``docker.io/library/busybox:latest``.

    Build one with :func:`parse_reference`.  Direct construction is checked
    against the same grammar *and* the normal form (Docker Hub is
    ``docker.io``, official images carry ``library/``, and a tag or digest is
    present), so ``parse_reference(str(ref)) == ref`` holds for every instance
    and two spellings of one image never compare unequal.

    Attributes:
        domain: Registry host with optional port, e.g. ``docker.io`` or
            ``127.0.0.1:5000``.
        path: Repository path inside the registry, e.g. ``library/busybox``.
        tag: Tag, or ``None`` for a digest-only reference.
        digest: Content digest ``algorithm:hex``, or ``None``.

    Raises:
        InvalidArgument: A field breaks the grammar or is not normalised.
    """

    domain: str
    path: str
    tag: str | None = None
    digest: str | None = None

    def __post_init__(self) -> None:
        reason = _find_problem(self.domain, self.path, self.tag, self.digest)
        if reason is not None:
            raise _invalid(str(self), reason)

    @property
    def name(self) -> str:
        """The repository name, ``domain/path``, without tag or digest."""
        return f"{self.domain}/{self.path}"

    def __str__(self) -> str:
        text = self.name
        if self.tag is not None:
            text += f":{self.tag}"
        if self.digest is not None:
            text += f"@{self.digest}"
        return text

    def familiar(self) -> str:
        """Return the short form a user would type, e.g. ``busybox:latest``.

        This is normalize.go's ``FamiliarString``: the Docker Hub domain is
        dropped, and so is ``library/`` when nothing else is left of the path.
        Unlike ``FamiliarString``, the domain is kept when dropping it would
        change the meaning, so ``parse_reference(ref.familiar()) == ref``.
        """
        text = self.name
        if self.domain == DEFAULT_DOMAIN:
            short = self.path.removeprefix(_OFFICIAL_PREFIX)
            # "library/a/b" keeps its prefix: "a/b" would read back as user "a".
            if "/" in short:
                short = self.path
            # Drop the domain only if the result reads back the same way:
            # "docker.io/localhost/x" or "docker.io/a.b/c" would otherwise turn
            # into a registry "localhost" or "a.b" (FamiliarString has that flaw).
            if _split_domain(short)[0] == DEFAULT_DOMAIN:
                text = short
        if self.tag is not None:
            text += f":{self.tag}"
        if self.digest is not None:
            text += f"@{self.digest}"
        return text

    def with_digest(self, digest: str) -> ImageRef:
        """Return this reference pinned to ``digest``, keeping the tag.

        The tag stays because ``name:tag@digest`` is what kubelet and
        ``crictl images --digests`` show after a pull by tag (distribution's
        ``WithDigest`` keeps a tag too).

        Args:
            digest: ``algorithm:hex``, e.g. ``sha256:`` and 64 lowercase hex.

        Returns:
            A new reference; this one is unchanged.

        Raises:
            InvalidArgument: ``digest`` is malformed or its algorithm unsupported.
        """
        return dataclasses.replace(self, digest=digest)

    def repository_scope(self) -> str:
        """Return the registry token scope for pulling, ``repository:<path>:pull``.

        The scope names the path only: the token server belongs to one
        registry, so the domain is implied (distribution's token auth spec).
        """
        return f"repository:{self.path}:pull"


def parse_reference(text: str) -> ImageRef:
    """Parse and normalise an image reference.

    ``busybox`` becomes ``docker.io/library/busybox:latest``, ``user/img``
    becomes ``docker.io/user/img:latest``, and ``index.docker.io`` or
    ``registry-1.docker.io`` become ``docker.io``.  The first path component
    is a registry only if it contains ``.`` or ``:``, is ``localhost``, or has
    an uppercase letter (a repository path never may, so normalize.go reads it
    as a host).  ``latest`` is added only when there is neither a tag nor a
    digest; a reference with both keeps both.

    Args:
        text: The reference as a user or the kubelet wrote it.

    Returns:
        The normalised reference.

    Raises:
        InvalidArgument: ``text`` is not a valid reference.  The message
            quotes ``text`` and says what is wrong with it.
    """
    if not text:
        raise _invalid(text, "reference is empty")
    # normalize.go rejects a bare 64-hex string, which is an image id, not a
    # Hub repository.  "sha256:<hex>" is refused too, although normalize.go
    # would read it as repository "library/sha256" tagged with the hex: the
    # kubelet sends image ids in that form, and keeping ids and references
    # disjoint means is_image_id() and parse_reference() never both accept.
    if is_image_id(text):
        raise _invalid(
            text, "cannot be a 64-character hex string: that is an image id, not a repository"
        )

    # The digest goes first: it contains a ':' that is not a tag separator.
    remainder, at, digest_part = text.partition("@")
    digest = digest_part if at else None

    # A tag separator is a ':' after the last '/'; earlier ones are ports.
    slash = remainder.rfind("/")
    colon = remainder.find(":", slash + 1)
    tag: str | None = None
    if colon != -1:
        remainder, tag = remainder[:colon], remainder[colon + 1 :]

    domain, path = _split_domain(remainder)
    if not path:
        raise _invalid(text, "repository name is empty")
    if domain in _LEGACY_DOMAINS:
        domain = DEFAULT_DOMAIN
    if domain == DEFAULT_DOMAIN and "/" not in path:
        path = _OFFICIAL_PREFIX + path
    if tag is None and digest is None:
        tag = DEFAULT_TAG

    # Check here, not only in ImageRef.__post_init__, so the message quotes
    # what the caller wrote rather than the normalised form.
    reason = _find_problem(domain, path, tag, digest)
    if reason is not None:
        raise _invalid(text, reason)
    return ImageRef(domain, path, tag, digest)


def is_image_id(text: str) -> bool:
    """Tell whether ``text`` is an image id: 64 lowercase hex, maybe ``sha256:``-prefixed.

    Args:
        text: Any string, e.g. a CRI ``ImageSpec.image``.

    Returns:
        ``True`` for an image id; such strings are never valid references.
    """
    return _IMAGE_ID_RE.fullmatch(text) is not None


def is_digest(text: str) -> bool:
    """Tell whether ``text`` is a digest this module accepts, e.g. ``sha256:<64 hex>``.

    Args:
        text: Any string.

    Returns:
        ``True`` if ``text`` has a supported algorithm (sha256, sha384,
        sha512) and lowercase hex of that algorithm's length.
    """
    return _digest_problem(text) is None


def _split_domain(name: str) -> tuple[str, str]:
    """Split ``name`` (no tag, no digest) into domain and path, as splitDockerDomain does."""
    first, slash, rest = name.partition("/")
    if slash and ("." in first or ":" in first or first == "localhost" or first.lower() != first):
        return first, rest
    return DEFAULT_DOMAIN, name


def _find_problem(domain: str, path: str, tag: str | None, digest: str | None) -> str | None:
    """Return why these fields are not a normalised reference, or ``None`` if they are."""
    # Tag and digest first: for "Foo:" the empty tag is the mistake the user
    # made, not the capital letter.
    if tag is not None:
        if not tag:
            return "tag is empty"
        if _TAG_RE.fullmatch(tag) is None:
            return f"invalid tag {_quote(tag)}: must match [A-Za-z0-9_][A-Za-z0-9_.-]{{0,127}}"
    if digest is not None and (reason := _digest_problem(digest)) is not None:
        return reason
    if tag is None and digest is None:
        return "reference has neither tag nor digest"

    if _DOMAIN_RE.fullmatch(domain) is None:
        return f"invalid registry domain {_quote(domain)}"
    if not path:
        return "repository name is empty"
    for component in path.split("/"):
        if not component:
            return "repository path has an empty component (leading, trailing or double '/')"
        if _PATH_COMPONENT_RE.fullmatch(component) is None:
            if _PATH_COMPONENT_RE.fullmatch(component.lower()) is not None:
                return "repository name must be lowercase"
            return (
                f"invalid repository path component {_quote(component)}: must be lowercase"
                " letters and digits, separated by '.', '_', '__' or dashes"
            )

    # Normal form, so equal images compare equal (only reachable by direct
    # construction: parse_reference normalises before it gets here).
    if domain in _LEGACY_DOMAINS:
        return f"registry domain {_quote(domain)} must be written {DEFAULT_DOMAIN!r}"
    if domain == DEFAULT_DOMAIN and "/" not in path:
        return f"official {DEFAULT_DOMAIN} repositories must be written {_OFFICIAL_PREFIX}{path}"

    if len(domain) + 1 + len(path) > _NAME_MAX:
        return f"repository name is longer than {_NAME_MAX} characters"
    return None


def _digest_problem(digest: str) -> str | None:
    """Return why ``digest`` is unacceptable, or ``None`` if it is fine."""
    if not digest:
        return "digest is empty"
    algorithm, colon, hex_part = digest.partition(":")
    if not colon:
        return f"invalid digest {_quote(digest)}: want algorithm:hex"
    expected = _DIGEST_HEX_LEN.get(algorithm)
    if expected is None:
        if _ANY_DIGEST_RE.fullmatch(digest) is None:
            return f"invalid digest {_quote(digest)}: want algorithm:hex"
        return f"unsupported digest algorithm {_quote(algorithm)}"
    # Lowercase only: digests are compared as strings, so "ABC" and "abc"
    # would otherwise name one blob twice (go-digest rejects uppercase too).
    if len(hex_part) != expected or not all(c in "0123456789abcdef" for c in hex_part):
        return f"invalid {algorithm} digest: want {expected} lowercase hex characters"
    return None


def _quote(text: str) -> str:
    # Go's %q, near enough: the offending text may hold quotes, spaces or
    # control characters, and must not break the log line it ends up in.
    return json.dumps(text, ensure_ascii=False)


def _invalid(reference: str, reason: str) -> InvalidArgument:
    return InvalidArgument(f"invalid image reference {_quote(reference)}: {reason}")
