"""A minimal Kubernetes API server stand-in, so ``kubectl`` can drive pouchd's streams.

`ApiServer` listens on 127.0.0.1 (plain HTTP; kubectl accepts ``http://`` server
URLs) and answers just what ``kubectl exec``, ``attach`` and ``port-forward`` ask
for:

- discovery (``/version``, ``/api``, ``/apis``, ``/api/v1``), legacy JSON only,
  so kubectl does not try aggregated discovery;
- ``GET /api/v1/namespaces/default/pods/<name>``: a Running pod whose containers
  are the ones registered with `ApiServer.add_pod`;
- the streaming subresources ``pods/<name>/exec``, ``/attach`` and
  ``/portforward``, as SPDY upgrades (``POST``) or WebSocket upgrades
  (``GET``).  Like the API server plus the kubelet, the stand-in asks the CRI
  for a stream URL (Exec, Attach or PortForward through the grpcio client of
  ``cri_api.v1``, against the daemon under test), sends the client's upgrade
  request to that URL with the path rewritten, and then copies bytes both
  ways until both sides are done.  The upgrade response is read on its way
  back and recorded in `ApiServer.upgrades`, so a test can tell which
  transport and protocol were used.

Everything runs in threads: the stand-in is driven by a subprocess (kubectl)
and by synchronous tests.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import uuid
from typing import TYPE_CHECKING, Self
from urllib.parse import parse_qs, urlsplit

import attrs
import grpc
import h11
from cri_api.v1 import api_pb2, api_pb2_grpc

if TYPE_CHECKING:
    from pathlib import Path
    from types import TracebackType

NAMESPACE = "default"
_MAX_HEAD = 64 * 1024
_COPY = 256 * 1024


@attrs.define
class ContainerRef:
    name: str
    container_id: str
    tty: bool = False
    stdin: bool = False
    stdin_once: bool = False


@attrs.define
class PodRef:
    name: str
    sandbox_id: str
    containers: list[ContainerRef]
    uid: str = attrs.field(factory=lambda: str(uuid.uuid4()))


@attrs.define
class Upgrade:
    """One streaming request as it went through the stand-in."""

    subresource: str  # exec, attach, portforward
    transport: str  # spdy, websocket
    status: int = 0  # pouch's answer
    protocol: str = ""  # X-Stream-Protocol-Version or Sec-WebSocket-Protocol chosen
    url: str = ""


class ApiServer:
    """See the module doc.  Use as a context manager; ``url`` once started."""

    def __init__(self, cri_socket: Path) -> None:
        self.cri_socket = cri_socket
        self.pods: dict[str, PodRef] = {}
        self.upgrades: list[Upgrade] = []
        self.requests: list[str] = []
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._threads: list[threading.Thread] = []
        self._stopping = threading.Event()
        self._channel: grpc.Channel | None = None

    # -- lifecycle ------------------------------------------------------------

    def __enter__(self) -> Self:
        self._channel = grpc.insecure_channel(f"unix://{self.cri_socket}")
        self._sock = socket.create_server(("127.0.0.1", 0))
        thread = threading.Thread(target=self._accept_loop, name="apiserver", daemon=True)
        thread.start()
        self._threads.append(thread)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stopping.set()
        if self._sock is not None:
            self._sock.close()
        if self._channel is not None:
            self._channel.close()

    @property
    def url(self) -> str:
        assert self._sock is not None
        return f"http://127.0.0.1:{self._sock.getsockname()[1]}"

    def kubeconfig(self, path: Path) -> Path:
        """Write a kubeconfig for this server (namespace ``default``, no credentials)."""
        path.write_text(
            json.dumps(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "clusters": [{"name": "pouch", "cluster": {"server": self.url}}],
                    "users": [{"name": "pouch", "user": {}}],
                    "contexts": [
                        {
                            "name": "pouch",
                            "context": {
                                "cluster": "pouch",
                                "user": "pouch",
                                "namespace": NAMESPACE,
                            },
                        }
                    ],
                    "current-context": "pouch",
                }
            )
        )
        return path

    def add_pod(self, name: str, sandbox_id: str, containers: list[ContainerRef]) -> PodRef:
        pod = PodRef(name, sandbox_id, containers)
        self.pods[name] = pod
        return pod

    # -- serving --------------------------------------------------------------

    def _accept_loop(self) -> None:
        assert self._sock is not None
        while not self._stopping.is_set():
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            thread = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            thread.start()

    def _serve(self, conn: socket.socket) -> None:
        """HTTP/1.1 with keep-alive, until the client closes or upgrades."""
        with conn:
            h = h11.Connection(h11.SERVER, max_incomplete_event_size=_MAX_HEAD)
            while True:
                request, trailing = _next_request(conn, h)
                if request is None:
                    return
                target = request.target.decode("latin-1")
                method = request.method.decode()
                with self._lock:
                    self.requests.append(f"{method} {target}")
                headers = {k.decode().lower(): v.decode("latin-1") for k, v in request.headers}
                if "upgrade" in headers:
                    self._upgrade(conn, method, target, list(request.headers), headers, trailing)
                    return
                status, body = self._answer(method, target)
                payload = json.dumps(body).encode()
                conn.sendall(
                    h.send(
                        h11.Response(
                            status_code=status,
                            headers=[
                                ("Content-Type", "application/json"),
                                ("Content-Length", str(len(payload))),
                            ],
                        )
                    )
                    + h.send(h11.Data(data=payload))
                    + h.send(h11.EndOfMessage())
                )
                try:
                    h.start_next_cycle()
                except h11.LocalProtocolError:
                    return

    def _answer(self, method: str, target: str) -> tuple[int, object]:
        path = urlsplit(target).path
        if method != "GET":
            return 405, _status(405, "MethodNotAllowed", f"{method} not supported")
        if path == "/version":
            return 200, {
                "major": "1",
                "minor": "32",
                "gitVersion": "v1.32.0-pouch-standin",
                "platform": "linux/amd64",
            }
        if path == "/api":
            return 200, {
                "kind": "APIVersions",
                "versions": ["v1"],
                "serverAddressByClientCIDRs": [
                    {"clientCIDR": "0.0.0.0/0", "serverAddress": self.url.removeprefix("http://")}
                ],
            }
        if path == "/apis":
            return 200, {"kind": "APIGroupList", "apiVersion": "v1", "groups": []}
        if path == "/api/v1":
            return 200, _resources()
        prefix = f"/api/v1/namespaces/{NAMESPACE}/pods/"
        if path.startswith(prefix) and "/" not in path[len(prefix) :]:
            pod = self.pods.get(path[len(prefix) :])
            if pod is None:
                return 404, _status(404, "NotFound", f'pods "{path[len(prefix) :]}" not found')
            return 200, _pod_json(pod)
        return 404, _status(404, "NotFound", "the server could not find the requested resource")

    # -- streaming -------------------------------------------------------------

    def _upgrade(
        self,
        conn: socket.socket,
        method: str,
        target: str,
        raw_headers: list[tuple[bytes, bytes]],
        headers: dict[str, str],
        trailing: bytes,
    ) -> None:
        parts = urlsplit(target)
        query = parse_qs(parts.query)
        prefix = f"/api/v1/namespaces/{NAMESPACE}/pods/"
        name, _, subresource = parts.path.removeprefix(prefix).partition("/")
        transport = "websocket" if headers.get("upgrade", "").lower() == "websocket" else "spdy"
        record = Upgrade(subresource, transport)
        with self._lock:
            self.upgrades.append(record)
        pod = self.pods.get(name)
        if pod is None or subresource not in ("exec", "attach", "portforward"):
            _plain(conn, 404, "not found")
            return
        try:
            record.url = self._stream_url(pod, subresource, query)
        except grpc.RpcError as exc:
            _plain(conn, 500, f"{exc.code().name}: {exc.details()}")
            return
        except LookupError as exc:
            _plain(conn, 400, str(exc))
            return
        url = urlsplit(record.url)
        assert url.hostname is not None
        upstream = socket.create_connection((url.hostname, url.port or 80))
        upstream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with upstream:
            lines = [f"{method} {url.path}{'?' + url.query if url.query else ''} HTTP/1.1"]
            lines.append(f"Host: {url.netloc}")
            for k, v in raw_headers:
                if k.lower() != b"host":
                    lines.append(f"{k.decode('latin-1')}: {v.decode('latin-1')}")
            upstream.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + trailing)
            # The upgrade response passes through here: note what pouch chose.
            head, rest = _read_head(upstream)
            record.status, response_headers = _parse_response_head(head)
            record.protocol = response_headers.get(
                "x-stream-protocol-version", response_headers.get("sec-websocket-protocol", "")
            )
            conn.sendall(head + rest)
            _splice(conn, upstream)

    def _stream_url(self, pod: PodRef, subresource: str, query: dict[str, list[str]]) -> str:
        assert self._channel is not None
        rt = api_pb2_grpc.RuntimeServiceStub(self._channel)
        if subresource == "portforward":
            ports = [int(p) for value in query.get("ports", []) for p in value.split(",")]
            response = rt.PortForward(
                api_pb2.PortForwardRequest(pod_sandbox_id=pod.sandbox_id, port=ports), timeout=10
            )
            return str(response.url)
        wanted = query.get("container", [pod.containers[0].name])[0]
        container = next((c for c in pod.containers if c.name == wanted), None)
        if container is None:
            raise LookupError(f"container {wanted} is not valid for pod {pod.name}")

        def flag(name: str) -> bool:
            return query.get(name, ["false"])[0].lower() in ("true", "1")

        if subresource == "exec":
            response = rt.Exec(
                api_pb2.ExecRequest(
                    container_id=container.container_id,
                    cmd=query.get("command", []),
                    tty=flag("tty"),
                    stdin=flag("stdin"),
                    stdout=flag("stdout"),
                    stderr=flag("stderr"),
                ),
                timeout=10,
            )
        else:
            response = rt.Attach(
                api_pb2.AttachRequest(
                    container_id=container.container_id,
                    tty=flag("tty"),
                    stdin=flag("stdin"),
                    stdout=flag("stdout"),
                    stderr=flag("stderr"),
                ),
                timeout=10,
            )
        return str(response.url)


# --- helpers -----------------------------------------------------------------


def _next_request(conn: socket.socket, h: h11.Connection) -> tuple[h11.Request | None, bytes]:
    request = None
    while True:
        event = h.next_event()
        if event is h11.NEED_DATA:
            try:
                data = conn.recv(65536)
            except OSError:
                return None, b""
            h.receive_data(data)
            continue
        if isinstance(event, h11.Request):
            request = event
            continue
        if isinstance(event, h11.Data):
            continue
        if isinstance(event, h11.EndOfMessage) or event is h11.PAUSED:
            return request, bytes(h.trailing_data[0])
        return None, b""


def _read_head(sock: socket.socket) -> tuple[bytes, bytes]:
    buf = b""
    while b"\r\n\r\n" not in buf:
        data = sock.recv(65536)
        if not data:
            break
        buf += data
    head, sep, rest = buf.partition(b"\r\n\r\n")
    return head + sep, rest


def _parse_response_head(head: bytes) -> tuple[int, dict[str, str]]:
    lines = head.decode("latin-1").split("\r\n")
    try:
        status = int(lines[0].split()[1])
    except (IndexError, ValueError):
        return 0, {}
    headers = {}
    for line in lines[1:]:
        if ":" in line:
            k, _, v = line.partition(":")
            headers[k.strip().lower()] = v.strip()
    return status, headers


def _splice(a: socket.socket, b: socket.socket) -> None:
    """Copy both ways; pass each side's end on as a half-close."""
    # Small frames (a status, a FIN) must not wait for delayed ACKs (Nagle).
    for s in (a, b):
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def copy(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(_COPY):
                dst.sendall(data)
        except OSError:
            pass
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    other = threading.Thread(target=copy, args=(b, a), daemon=True)
    other.start()
    copy(a, b)
    other.join()


def _plain(conn: socket.socket, status: int, text: str) -> None:
    body = (text + "\n").encode()
    with contextlib.suppress(OSError):
        conn.sendall(
            f"HTTP/1.1 {status} X\r\nContent-Type: text/plain\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
            + body
        )


def _status(code: int, reason: str, message: str) -> dict[str, object]:
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }


def _resources() -> dict[str, object]:
    def res(name: str, kind: str, verbs: list[str], namespaced: bool = True) -> dict[str, object]:
        return {
            "name": name,
            "singularName": "",
            "namespaced": namespaced,
            "kind": kind,
            "verbs": verbs,
        }

    return {
        "kind": "APIResourceList",
        "groupVersion": "v1",
        "resources": [
            res("pods", "Pod", ["get", "list"]) | {"shortNames": ["po"], "singularName": "pod"},
            res("pods/attach", "PodAttachOptions", ["create", "get"]),
            res("pods/exec", "PodExecOptions", ["create", "get"]),
            res("pods/portforward", "PodPortForwardOptions", ["create", "get"]),
            res("pods/log", "Pod", ["get"]),
            res("namespaces", "Namespace", ["get"], namespaced=False),
        ],
    }


def _pod_json(pod: PodRef) -> dict[str, object]:
    return {
        "kind": "Pod",
        "apiVersion": "v1",
        "metadata": {
            "name": pod.name,
            "namespace": NAMESPACE,
            "uid": pod.uid,
            "resourceVersion": "1",
            "creationTimestamp": "2024-01-01T00:00:00Z",
        },
        "spec": {
            "nodeName": "pouch-node",
            "containers": [
                {
                    "name": c.name,
                    "image": "busybox",
                    "stdin": c.stdin,
                    "stdinOnce": c.stdin_once,
                    "tty": c.tty,
                }
                for c in pod.containers
            ],
        },
        "status": {
            "phase": "Running",
            "conditions": [{"type": "Ready", "status": "True"}],
            "containerStatuses": [
                {
                    "name": c.name,
                    "ready": True,
                    "restartCount": 0,
                    "image": "busybox",
                    "imageID": "",
                    "containerID": f"pouch://{c.container_id}",
                    "started": True,
                    "state": {"running": {"startedAt": "2024-01-01T00:00:00Z"}},
                }
                for c in pod.containers
            ],
        },
    }
