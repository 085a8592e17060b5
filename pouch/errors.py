"""Core errors.

The core raises these; the CRI edge (``pouch.cri._instrument``) maps them to
gRPC status codes in one table.  Nothing here knows about gRPC.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Sequence


class PouchError(Exception):
    """Base for errors the CRI edge can report."""


class NotFound(PouchError):
    """The named object does not exist."""


class AlreadyExists(PouchError):
    """The name or id is taken."""


class InvalidArgument(PouchError):
    """The request is malformed; the message names the field."""


class FailedPrecondition(PouchError):
    """The object is not in a state that allows the call (start on EXITED)."""


class Unavailable(PouchError):
    """The daemon (or something it depends on) cannot serve the call now."""


class ResourceExhausted(PouchError):
    """A configured limit was reached."""


class DeadlineExceeded(PouchError):
    """An operation with its own time budget ran out of it (ExecSync's timeout)."""


class Unimplemented(PouchError):
    """The call is part of the API but not (yet) served."""


class RuntimeFailed(PouchError):
    """An external program (runc, conmon, a CNI plugin) exited non-zero."""

    def __init__(self, argv: Sequence[str], returncode: int, stderr: str) -> None:
        self.argv = tuple(argv)
        self.returncode = returncode
        self.stderr = stderr
        prog = self.argv[0] if self.argv else "?"
        super().__init__(f"{prog} exited with status {returncode}: {stderr.strip()}")


class RegistryUnavailable(Unavailable):
    """A registry failed to serve a pull; ``str()`` starts like cri-o's reason."""

    def __init__(self, message: str) -> None:
        super().__init__(f"RegistryUnavailable: {message}")
