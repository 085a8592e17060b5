"""A real registry on loopback: Debian's ``docker-registry`` behind a counting proxy.

`Registry` runs ``/usr/bin/docker-registry serve`` (distribution 2.8, Debian package
``docker-registry``) with filesystem storage in a temporary directory, listening on a
Unix socket. In front of it, a small threaded HTTP/1.1 proxy listens on 127.0.0.1 at a
port the kernel picks, so no two registries race for a port. The proxy:

- records every request it forwards (`Registry.requests`, `count`, `blob_fetches`), so a
  test can assert that a pull fetched each blob once; a request is recorded when its
  response head arrives, before the body is forwarded, so the record is there by the time
  the client has read the response;
- injects faults on demand (`fail`, `truncate`) for retry and error-mapping tests.

`push` uploads an `Image` or `Index` over the Docker Registry HTTP API v2 (distribution
spec/api.md). It talks to the Unix socket directly, so pushes do not show up in the
request records; `Registry.client()` gives the same uncounted access to tests.

Trio tests use `open_registry` and `push_async`; they run the blocking parts in a thread.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import dataclasses
import functools
import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Self

import httpx
import trio

from tests.support.images import Blob, Image, Index

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable
    from types import TracebackType

DOCKER_REGISTRY = Path("/usr/bin/docker-registry")
STOP_TIMEOUT = 10.0
_MAX_HEAD = 64 * 1024


class RegistryError(RuntimeError):
    """The registry failed to start, or refused a push."""


# --- htpasswd -----------------------------------------------------------------------------

_crypt_lock = threading.Lock()  # crypt() and crypt_gensalt() return static buffers


@functools.cache
def _libcrypt() -> ctypes.CDLL:
    # libxcrypt (libcrypt1, Priority: required in Debian) does bcrypt; no package needed.
    lib = ctypes.CDLL("libcrypt.so.1")
    lib.crypt_gensalt.restype = ctypes.c_char_p
    lib.crypt_gensalt.argtypes = [ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p, ctypes.c_int]
    lib.crypt.restype = ctypes.c_char_p
    lib.crypt.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
    return lib


def bcrypt_hash(password: str, *, cost: int = 5) -> str:
    """A ``$2b$`` bcrypt hash, the only scheme distribution's htpasswd auth accepts.

    Cost 5 keeps each authenticated request around a millisecond; Go's bcrypt takes 4+.
    """
    lib = _libcrypt()
    with _crypt_lock:
        salt = lib.crypt_gensalt(b"$2b$", cost, None, 0)  # NULL: salt from the OS RNG
        hashed = lib.crypt(password.encode(), salt) if salt else None
    if not hashed or not hashed.startswith(b"$2b$"):
        raise RegistryError("libcrypt failed to make a bcrypt hash")
    return str(hashed.decode())


# --- counting, fault-injecting proxy -------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Request:
    """One request the proxy saw."""

    method: str
    path: str  # without the query
    query: str
    status: int | None  # None: no response (the upstream connection failed)
    fault: bool = False  # answered or cut by an injected fault


@dataclasses.dataclass
class _Fault:
    method: str | None
    path: re.Pattern[str]
    status: int | None  # answer with this instead of forwarding
    truncate_after: int | None  # or forward, and cut the body after this many bytes
    times: int


class _Truncated(Exception):
    pass


class _Reader:
    """Buffered reads from a socket, framed the way HTTP/1.1 needs (RFC 9112)."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._buf = bytearray()

    def _fill(self) -> bool:
        data = self._sock.recv(256 * 1024)
        self._buf += data
        return bool(data)

    def head(self) -> bytes | None:
        """Up to and including the blank line; None on a clean EOF between messages."""
        while (end := self._buf.find(b"\r\n\r\n")) < 0:
            if self._buf.startswith(b"\x16\x03"):
                # A TLS ClientHello: clients that try HTTPS first (containers/image with
                # tls-verify=false) fall back to HTTP when the connection drops.
                raise OSError("TLS to a plain HTTP proxy")
            if len(self._buf) > _MAX_HEAD:
                raise OSError("message head too large")
            if not self._fill():
                if self._buf:
                    raise OSError("connection closed inside a message head")
                return None
        head = bytes(self._buf[: end + 4])
        del self._buf[: end + 4]
        return head

    def line(self) -> bytes:
        while (end := self._buf.find(b"\r\n")) < 0:
            if not self._fill():
                raise OSError("connection closed inside a chunked body")
        line = bytes(self._buf[: end + 2])
        del self._buf[: end + 2]
        return line

    def copy(self, n: int, send: Callable[[bytes], None]) -> None:
        while n > 0:
            if not self._buf and not self._fill():
                raise OSError("connection closed inside a body")
            chunk = bytes(self._buf[:n])
            del self._buf[: len(chunk)]
            n -= len(chunk)
            send(chunk)

    def copy_to_eof(self, send: Callable[[bytes], None]) -> None:
        while self._buf or self._fill():
            chunk = bytes(self._buf)
            self._buf.clear()
            send(chunk)

    def copy_body(self, headers: dict[str, str], send: Callable[[bytes], None]) -> bool:
        """Forward one body; False if it runs to EOF (the connection cannot be reused)."""
        if "chunked" in headers.get("transfer-encoding", "").lower():
            while True:
                line = self.line()
                send(line)
                size = int(line.split(b";")[0].strip(), 16)
                if size == 0:
                    while (trailer := self.line()) != b"\r\n":
                        send(trailer)
                    send(b"\r\n")
                    return True
                self.copy(size + 2, send)  # the data and its CRLF
        if "content-length" in headers:
            self.copy(int(headers["content-length"]), send)
            return True
        return False


def _parse_head(head: bytes) -> tuple[list[str], dict[str, str], list[str]]:
    lines = head.decode("latin-1").split("\r\n")[:-2]
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return lines[0].split(" ", 2), headers, lines


class _Proxy:
    def __init__(self, upstream: Callable[[], socket.socket]) -> None:
        self._upstream = upstream
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._requests: list[Request] = []
        self._faults: list[_Fault] = []
        self._conns: set[socket.socket] = set()
        self._thread = threading.Thread(target=self._accept_loop, name="registry-proxy")
        self._thread.daemon = True
        self._thread.start()

    def close(self) -> None:
        # shutdown() wakes a thread blocked in accept() on Linux; close() alone does not.
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        self._thread.join(STOP_TIMEOUT)
        with self._lock:
            conns = list(self._conns)
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)

    def requests(self) -> list[Request]:
        with self._lock:
            return list(self._requests)

    def clear(self) -> None:
        with self._lock:
            self._requests.clear()

    def add_fault(self, fault: _Fault) -> None:
        with self._lock:
            self._faults.append(fault)

    def _record(self, request: Request) -> None:
        with self._lock:
            self._requests.append(request)

    def _take_fault(self, method: str, path: str) -> _Fault | None:
        with self._lock:
            for fault in self._faults:
                if fault.method in (None, method) and fault.path.fullmatch(path):
                    fault.times -= 1
                    if fault.times <= 0:
                        self._faults.remove(fault)
                    return fault
        return None

    def _accept_loop(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            thread = threading.Thread(target=self._serve, args=(conn,), name="registry-proxy-conn")
            thread.daemon = True
            thread.start()

    def _serve(self, client: socket.socket) -> None:
        with self._lock:
            self._conns.add(client)
        upstream: socket.socket | None = None
        try:
            with contextlib.suppress(OSError, ValueError, _Truncated):
                upstream = self._upstream()
                self._exchange_all(client, upstream)
        finally:
            with self._lock:
                self._conns.discard(client)
            client.close()
            if upstream is not None:
                upstream.close()

    def _exchange_all(self, client: socket.socket, upstream: socket.socket) -> None:
        """Forward request/response pairs until either side closes (no pipelining)."""
        from_client, from_upstream = _Reader(client), _Reader(upstream)
        while (head := from_client.head()) is not None:
            (method, target, _), headers, lines = _parse_head(head)
            path, _, query = target.partition("?")
            if headers.get("expect", "").lower() == "100-continue":
                # Answer the expectation here, so the body comes before we forward.
                client.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
                lines = [line for line in lines if not line.lower().startswith("expect:")]
                head = "\r\n".join([*lines, "", ""]).encode("latin-1")
            fault = self._take_fault(method, path)
            if fault is not None and fault.status is not None:
                from_client.copy_body(headers, lambda _chunk: None)
                self._record(Request(method, path, query, fault.status, fault=True))
                body = json.dumps({"errors": [{"code": "UNAVAILABLE", "message": "fault"}]})
                client.sendall(
                    f"HTTP/1.1 {fault.status} Injected Fault\r\nContent-Type: application/json"
                    f"\r\nContent-Length: {len(body)}\r\n\r\n{body}".encode()
                )
                continue
            upstream.sendall(head)
            from_client.copy_body(headers, upstream.sendall)
            while True:
                rhead = from_upstream.head()
                if rhead is None:
                    self._record(Request(method, path, query, None))
                    return
                (_, code, *_), rheaders, _ = _parse_head(rhead)
                status = int(code)
                if status >= 200 or status == 101:
                    break
                client.sendall(rhead)  # interim 1xx: the final response follows
            truncating = fault is not None and fault.truncate_after is not None
            self._record(Request(method, path, query, status, fault=truncating))
            client.sendall(rhead)
            send: Callable[[bytes], None] = client.sendall
            if fault is not None and fault.truncate_after is not None:
                send = _budget(client, fault.truncate_after)
            if method == "HEAD" or status in (204, 304):
                reusable = True
            else:
                reusable = from_upstream.copy_body(rheaders, send)
            if truncating:
                raise _Truncated  # nothing past the cut: the client sees a short body
            if not reusable or "close" in (
                headers.get("connection", "").lower() + rheaders.get("connection", "").lower()
            ):
                return


def _budget(sock: socket.socket, limit: int) -> Callable[[bytes], None]:
    sent = 0

    def send(chunk: bytes) -> None:
        nonlocal sent
        room = limit - sent
        sock.sendall(chunk[:room])
        sent += min(room, len(chunk))
        if sent >= limit:
            raise _Truncated

    return send


# --- the registry ----------------------------------------------------------------------------


class Registry:
    """A docker-registry process for one test, behind a counting proxy on 127.0.0.1.

    Use as ``with Registry() as registry:``. `url` and `host` name the proxy; use them in
    image references (``f"{registry.host}/library/busybox:latest"``) and point clients at
    plain HTTP. With `auth`, the registry requires HTTP Basic credentials (htpasswd, bcrypt).

    Args:
        auth: (user, password) to require, or None for an open registry.
        binary: the docker-registry executable.
        startup_timeout: seconds to wait for ``/v2/`` to answer.
    """

    def __init__(
        self,
        *,
        auth: tuple[str, str] | None = None,
        binary: Path = DOCKER_REGISTRY,
        startup_timeout: float = 30.0,
    ) -> None:
        self.auth = auth
        self._binary = binary
        self._startup_timeout = startup_timeout
        self._tmp: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._proxy: _Proxy | None = None

    # lifecycle

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> Self:
        """Start the registry and the proxy; return once ``/v2/`` answers.

        Raises:
            RegistryError: the binary is missing, exits, or does not answer in time.
        """
        if self._tmp is not None:
            raise RegistryError("registry already started")
        if not self._binary.exists():
            raise RegistryError(f"{self._binary} is missing: apt-get install -y docker-registry")
        self._tmp = Path(tempfile.mkdtemp(prefix="pouch-registry-"))
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self) -> None:
        assert self._tmp is not None
        config: dict[str, object] = {
            "version": "0.1",
            "log": {"level": "info", "formatter": "text", "accesslog": {"disabled": False}},
            "storage": {
                "filesystem": {"rootdirectory": str(self.storage)},
                "delete": {"enabled": True},
                "maintenance": {"uploadpurging": {"enabled": False}},
            },
            "http": {"net": "unix", "addr": str(self.socket_path), "secret": secrets.token_hex()},
        }
        if self.auth is not None:
            user, password = self.auth
            htpasswd = self._tmp / "htpasswd"
            htpasswd.write_text(f"{user}:{bcrypt_hash(password)}\n")
            config["auth"] = {"htpasswd": {"realm": "pouch-test", "path": str(htpasswd)}}
        config_path = self._tmp / "config.yml"
        config_path.write_text(json.dumps(config))  # JSON is YAML
        # REGISTRY_* variables override the config file: keep the caller's out.
        env = {k: v for k, v in os.environ.items() if not k.startswith("REGISTRY_")}
        with (self._tmp / "registry.log").open("wb") as log:
            self._proc = subprocess.Popen(
                [str(self._binary), "serve", str(config_path)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,  # a terminal's ^C goes to pytest, which stops us
            )
        self._wait_ready()
        self._proxy = _Proxy(self._connect_upstream)

    def _connect_upstream(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(str(self.socket_path))
        except OSError:
            sock.close()
            raise
        return sock

    def _wait_ready(self) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + self._startup_timeout
        transport = httpx.HTTPTransport(uds=str(self.socket_path))
        with httpx.Client(transport=transport, base_url="http://registry", timeout=5) as client:
            while True:
                if self._proc.poll() is not None:
                    raise RegistryError(
                        f"docker-registry exited with {self._proc.returncode}:\n{self.logs()}"
                    )
                # Connect by hand first: httpcore leaks the socket of a failed Unix connect,
                # and the ResourceWarning would fail some later test.
                with contextlib.suppress(OSError):
                    self._connect_upstream().close()
                    with contextlib.suppress(httpx.TransportError):
                        if client.get("/v2/").status_code in (200, 401):
                            return
                if time.monotonic() > deadline:
                    raise RegistryError(f"docker-registry did not answer:\n{self.logs()}")
                time.sleep(0.02)

    def stop(self) -> None:
        """Stop the registry and the proxy and delete the storage. Idempotent."""
        if self._proxy is not None:
            self._proxy.close()
            self._proxy = None
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(STOP_TIMEOUT)
            self._proc = None
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    # where it is

    def _require(self) -> tuple[Path, _Proxy]:
        if self._tmp is None or self._proxy is None:
            raise RegistryError("registry is not running")
        return self._tmp, self._proxy

    @property
    def port(self) -> int:
        return self._require()[1].port

    @property
    def host(self) -> str:
        """``127.0.0.1:PORT``, the registry part of an image reference."""
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    def ref(self, repo: str, tag: str = "latest") -> str:
        """An image reference: ``ref("a/b", "v1")``, or a digest: ``ref("a/b", "sha256:..")``."""
        sep = "@" if tag.startswith("sha256:") else ":"
        return f"{self.host}/{repo}{sep}{tag}"

    @property
    def storage(self) -> Path:
        if self._tmp is None:
            raise RegistryError("registry is not running")
        return self._tmp / "storage"

    @property
    def socket_path(self) -> Path:
        if self._tmp is None:
            raise RegistryError("registry is not running")
        return self._tmp / "registry.sock"

    def logs(self) -> str:
        """The registry's log so far (access log and messages)."""
        if self._tmp is None:
            return ""
        with contextlib.suppress(FileNotFoundError):
            return (self._tmp / "registry.log").read_text(errors="replace")
        return ""

    def client(self, *, auth: bool = True, timeout: float = 30.0) -> httpx.Client:
        """An httpx client straight to the registry's socket: not counted, no faults.

        With `auth` (the default) it sends the registry's credentials, if it has any.
        """
        transport = httpx.HTTPTransport(uds=str(self.socket_path))
        return httpx.Client(
            transport=transport,
            # The Host header decides the Location URLs the registry returns: keep it the
            # proxy's, so they are valid for anyone.
            base_url=self.url,
            auth=httpx.BasicAuth(*self.auth) if auth and self.auth else None,
            timeout=timeout,
        )

    # what the proxy saw

    def requests(self) -> list[Request]:
        """Every request that came through `url`, oldest first."""
        return self._require()[1].requests()

    def clear_requests(self) -> None:
        self._require()[1].clear()

    def counts(self) -> collections.Counter[tuple[str, str]]:
        """How many times each (method, path) was requested."""
        return collections.Counter((r.method, r.path) for r in self.requests())

    def count(self, path: str, method: str = "GET") -> int:
        """How many `method` requests `path` got; `path` is a regex matched whole."""
        pattern = re.compile(path)
        return sum(1 for r in self.requests() if r.method == method and pattern.fullmatch(r.path))

    def blob_fetches(self, digest: str, method: str = "GET") -> int:
        """How many times any repository's blob `digest` was requested."""
        suffix = f"/blobs/{digest}"
        return sum(1 for r in self.requests() if r.method == method and r.path.endswith(suffix))

    # faults

    def fail(
        self, path: str, *, status: int = 503, method: str | None = "GET", times: int = 1
    ) -> None:
        """Answer the next `times` matching requests with `status` instead of forwarding.

        `path` is a regex matched against the whole path; `method` None matches any.
        """
        fault = _Fault(method, re.compile(path), status, None, times)
        self._require()[1].add_fault(fault)

    def truncate(
        self, path: str, *, after: int, method: str | None = "GET", times: int = 1
    ) -> None:
        """Forward the next `times` matching requests, but cut the response body after
        `after` bytes and close the connection."""
        fault = _Fault(method, re.compile(path), None, after, times)
        self._require()[1].add_fault(fault)


# --- push --------------------------------------------------------------------------------------


def _check(response: httpx.Response, expected: int, what: str) -> httpx.Response:
    if response.status_code != expected:
        raise RegistryError(
            f"failed to {what}: {response.request.method} {response.request.url.path} "
            f"answered {response.status_code}: {response.text[:500]}"
        )
    return response


def push_blob(client: httpx.Client, repo: str, blob: Blob) -> None:
    """Upload one blob unless the repository has it (api.md "Pushing An Image").

    POST opens an upload session, one PUT with ``?digest=`` sends the whole blob.
    """
    head = client.head(f"/v2/{repo}/blobs/{blob.digest}")
    if head.status_code == 200:
        return
    _check(head, 404, f"check blob {blob.digest}")
    started = _check(client.post(f"/v2/{repo}/blobs/uploads/"), 202, "start an upload")
    url = client.base_url.join(started.headers["location"])
    url = url.copy_merge_params({"digest": blob.digest})
    content = blob.data if blob.data is not None else blob.chunks()
    put = client.put(
        url,
        content=content,
        # An explicit length keeps httpx from chunking a file blob.
        headers={"content-type": "application/octet-stream", "content-length": str(blob.size)},
    )
    _check(put, 201, f"upload blob {blob.digest}")
    if put.headers.get("docker-content-digest") != blob.digest:
        raise RegistryError(f"registry stored blob {blob.digest} under another digest")


def push_manifest(client: httpx.Client, repo: str, reference: str, manifest: Blob) -> None:
    """PUT a manifest, image or index, under a tag or its digest."""
    put = client.put(
        f"/v2/{repo}/manifests/{reference}",
        content=manifest.read_bytes(),
        headers={"content-type": manifest.media_type},
    )
    _check(put, 201, f"put manifest {reference}")
    if put.headers.get("docker-content-digest") != manifest.digest:
        raise RegistryError(f"registry stored manifest {manifest.digest} under another digest")


def push_with(client: httpx.Client, repo: str, tag: str | None, item: Image | Index) -> str:
    """Push `item` with `client` (base URL the registry); return the top manifest digest."""
    images = item.images if isinstance(item, Index) else (item,)
    for image in images:
        for blob in image.blobs:
            push_blob(client, repo, blob)
        if isinstance(item, Index):
            # distribution checks that an index's children exist, so they go first.
            push_manifest(client, repo, image.digest, image.manifest)
    push_manifest(client, repo, tag or item.digest, item.manifest)
    return item.digest


def push(
    registry: Registry,
    repo: str,
    tag: str | None,
    item: Image | Index,
    *,
    http_timeout: float = 120.0,
) -> str:
    """Push an image, or an index and its images, as ``repo:tag`` (or by digest only).

    Goes straight to the registry's socket, so it is not counted by the proxy.

    Returns:
        The digest of the image manifest or index.
    """
    with registry.client(timeout=http_timeout) as client:
        return push_with(client, repo, tag, item)


# --- trio --------------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def open_registry(
    *, auth: tuple[str, str] | None = None, startup_timeout: float = 30.0
) -> AsyncIterator[Registry]:
    """`Registry` for trio tests; start and stop run in a worker thread.

    Cancellation: start and stop are bounded (`startup_timeout`, `STOP_TIMEOUT`) and not
    abandoned, so a cancel waits for them and never leaks a process.
    """
    registry = Registry(auth=auth, startup_timeout=startup_timeout)
    await trio.to_thread.run_sync(registry.start)
    try:
        yield registry
    finally:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(registry.stop)


async def push_async(
    registry: Registry,
    repo: str,
    tag: str | None,
    item: Image | Index,
    *,
    http_timeout: float = 120.0,
) -> str:
    """`push` in a worker thread; each HTTP call is bounded by `http_timeout`."""
    return await trio.to_thread.run_sync(
        functools.partial(push, registry, repo, tag, item, http_timeout=http_timeout)
    )
