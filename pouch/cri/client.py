"""A small synchronous client of pouchd, for the ``pouch`` command line.

It speaks grpcio, not grpclib: the command line is a plain blocking program
and has no event loop to host grpclib on.  The messages are the same
betterproto classes the daemon uses, so there are no generated grpcio stubs:
each call is ``channel.unary_unary(path, request_serializer=bytes,
response_deserializer=Response.FromString)``.

Every failure of a call is a `ClientError` carrying the gRPC status name and
the daemon's message.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Final, Self, TypeVar

import betterproto
import grpc  # type: ignore[import-untyped]  # grpcio ships no type hints

from pouch.cri._pb.pouch import v1 as pouch_pb
from pouch.cri._pb.runtime import v1 as cri

if TYPE_CHECKING:
    from collections.abc import Generator
    from types import TracebackType

M = TypeVar("M", bound=betterproto.Message)

#: Seconds a unary call may take, unless the method says otherwise.
DEFAULT_TIMEOUT: Final = 30.0

_RUNTIME: Final = "/runtime.v1.RuntimeService"
_IMAGES: Final = "/runtime.v1.ImageService"
_POUCH_IMAGES: Final = "/pouch.v1.Images"


class ClientError(Exception):
    """A call failed: the daemon answered with an error, or could not be reached.

    Attributes:
        code: the gRPC status name, ``NOT_FOUND`` say.
        details: the daemon's message (for UNAVAILABLE, maybe grpc's own).
    """

    def __init__(self, code: str, details: str) -> None:
        super().__init__(f"{code}: {details}")
        self.code = code
        self.details = details


def _client_error(exc: grpc.RpcError) -> ClientError:
    # A grpc.RpcError raised by a call is also a grpc.Call, with code() and details().
    code = exc.code()
    return ClientError(code.name if code is not None else "UNKNOWN", exc.details() or str(code))


class Client:
    """A connection to pouchd's unix socket; use as a context manager.

    Args:
        socket: the socket's path.
        timeout: seconds a unary call may take (pull and load have none).
    """

    def __init__(self, socket: str | os.PathLike[str], *, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.socket = os.path.abspath(socket)
        self.timeout = timeout
        # Connecting is lazy: a daemon that is not there fails the first call.
        self._channel = grpc.insecure_channel(f"unix://{self.socket}")

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _unary(
        self,
        path: str,
        request: betterproto.Message,
        response_type: type[M],
        *,
        timeout: float | None = DEFAULT_TIMEOUT,
    ) -> M:
        call = self._channel.unary_unary(
            path, request_serializer=bytes, response_deserializer=response_type.FromString
        )
        try:
            response: M = call(request, timeout=timeout)
        except grpc.RpcError as exc:
            raise _client_error(exc) from None
        return response

    # ---- CRI ----------------------------------------------------------------------

    def version(self) -> cri.VersionResponse:
        return self._unary(
            f"{_RUNTIME}/Version", cri.VersionRequest(), cri.VersionResponse, timeout=self.timeout
        )

    def list_images(self) -> list[cri.Image]:
        response = self._unary(
            f"{_IMAGES}/ListImages",
            cri.ListImagesRequest(),
            cri.ListImagesResponse,
            timeout=self.timeout,
        )
        return list(response.images)

    def image_status(self, image: str) -> cri.Image | None:
        """The image *image* names (a reference, an id or an id prefix), or None."""
        response = self._unary(
            f"{_IMAGES}/ImageStatus",
            cri.ImageStatusRequest(image=cri.ImageSpec(image=image)),
            cri.ImageStatusResponse,
            timeout=self.timeout,
        )
        # An unknown image is an empty response, not an error (cri-api ImageStatus).
        return response.image if response.image.id else None

    def remove_image(self, image: str) -> None:
        """Remove an image; removing one that is not there succeeds (cri-api)."""
        self._unary(
            f"{_IMAGES}/RemoveImage",
            cri.RemoveImageRequest(image=cri.ImageSpec(image=image)),
            cri.RemoveImageResponse,
            timeout=self.timeout,
        )

    def list_pod_sandboxes(self) -> list[cri.PodSandbox]:
        response = self._unary(
            f"{_RUNTIME}/ListPodSandbox",
            cri.ListPodSandboxRequest(),
            cri.ListPodSandboxResponse,
            timeout=self.timeout,
        )
        return list(response.items)

    def pod_sandbox_status(
        self, pod_sandbox_id: str, *, verbose: bool = False
    ) -> cri.PodSandboxStatusResponse:
        return self._unary(
            f"{_RUNTIME}/PodSandboxStatus",
            cri.PodSandboxStatusRequest(pod_sandbox_id=pod_sandbox_id, verbose=verbose),
            cri.PodSandboxStatusResponse,
            timeout=self.timeout,
        )

    def list_containers(
        self, *, state: int | None = None, pod_sandbox_id: str = ""
    ) -> list[cri.Container]:
        """Containers, of one state (a `ContainerState`) and of one pod (an id or prefix)."""
        flt = cri.ContainerFilter(pod_sandbox_id=pod_sandbox_id)
        if state is not None:
            # Set even when it is CONTAINER_CREATED, the enum's zero: the
            # filter is the presence of the wrapper message.
            flt.state = cri.ContainerStateValue(state=cri.ContainerState(state))
        response = self._unary(
            f"{_RUNTIME}/ListContainers",
            cri.ListContainersRequest(filter=flt),
            cri.ListContainersResponse,
            timeout=self.timeout,
        )
        return list(response.containers)

    def container_status(
        self, container_id: str, *, verbose: bool = False
    ) -> cri.ContainerStatusResponse:
        return self._unary(
            f"{_RUNTIME}/ContainerStatus",
            cri.ContainerStatusRequest(container_id=container_id, verbose=verbose),
            cri.ContainerStatusResponse,
            timeout=self.timeout,
        )

    # ---- streaming: each call answers with a single-use URL on the stream server -----

    def exec(
        self,
        container_id: str,
        cmd: list[str],
        *,
        tty: bool = False,
        stdin: bool = False,
        stdout: bool = True,
        stderr: bool = True,
    ) -> str:
        """The URL of an exec session running *cmd* in a running container."""
        response = self._unary(
            f"{_RUNTIME}/Exec",
            cri.ExecRequest(
                container_id=container_id,
                cmd=cmd,
                tty=tty,
                stdin=stdin,
                stdout=stdout,
                stderr=stderr,
            ),
            cri.ExecResponse,
            timeout=self.timeout,
        )
        return response.url

    def attach(
        self,
        container_id: str,
        *,
        tty: bool = False,
        stdin: bool = False,
        stdout: bool = True,
        stderr: bool = True,
    ) -> str:
        """The URL of an attach session to a running container's stdio."""
        response = self._unary(
            f"{_RUNTIME}/Attach",
            cri.AttachRequest(
                container_id=container_id, tty=tty, stdin=stdin, stdout=stdout, stderr=stderr
            ),
            cri.AttachResponse,
            timeout=self.timeout,
        )
        return response.url

    def port_forward(self, pod_sandbox_id: str, ports: list[int] | None = None) -> str:
        """The URL of a port-forward session into a ready pod.

        *ports* may be empty: over SPDY the client names the port per connection.
        """
        response = self._unary(
            f"{_RUNTIME}/PortForward",
            cri.PortForwardRequest(pod_sandbox_id=pod_sandbox_id, port=list(ports or [])),
            cri.PortForwardResponse,
            timeout=self.timeout,
        )
        return response.url

    # ---- pouch.v1 ---------------------------------------------------------------

    def pull(
        self, image: str, *, username: str = "", password: str = ""
    ) -> Generator[pouch_pb.PullProgress, None, None]:
        """Pull *image*, yielding its progress; the last message has the image id.

        Closing the iterator early cancels the call; the pull itself goes on
        in the daemon, and pulling again joins it.
        """
        call = self._channel.unary_stream(
            f"{_POUCH_IMAGES}/Pull",
            request_serializer=bytes,
            response_deserializer=pouch_pb.PullProgress.FromString,
        )
        request = pouch_pb.PullRequest(image=image, username=username, password=password)
        responses = call(request)
        try:
            yield from responses
        except grpc.RpcError as exc:
            raise _client_error(exc) from None
        finally:
            responses.cancel()  # a no-op once the call is over

    def load(self, path: str) -> list[pouch_pb.LoadedImage]:
        """Load the images of the archive at *path*, a path on the daemon's host."""
        response = self._unary(
            f"{_POUCH_IMAGES}/Load",
            pouch_pb.LoadRequest(path=path),
            pouch_pb.LoadResponse,
            timeout=None,  # an archive of gigabytes takes as long as it takes
        )
        return list(response.images)
