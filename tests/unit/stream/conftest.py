"""Fixtures: a stream server on a fake backend, driven over in-memory connections."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from pouch.config import StreamConfig
from pouch.stream.server import StreamServer
from pouch.stream.session import SessionLimits, StreamRequest
from tests.unit.stream.fake_backend import FakeBackend

ADDRESS = "pouch.test:10250"


@pytest.fixture
async def backend(nursery):
    fake = FakeBackend(containers=("c1", "c2"), sandboxes=("p1",))
    await nursery.start(fake.run)
    return fake


@pytest.fixture
def limits():
    return SessionLimits()


@pytest.fixture
def server(backend, limits):
    s = StreamServer(StreamConfig(), backend, limits=limits)
    s.address = ADDRESS  # As serve() would; the tests connect in memory.
    return s


class Connector:
    def __init__(self, server: StreamServer, nursery: trio.Nursery) -> None:
        self.server = server
        self.nursery = nursery

    def path(self, request: StreamRequest) -> str:
        url = self.server.url(request)
        assert url.startswith(f"http://{ADDRESS}/")
        return url[len(f"http://{ADDRESS}") :]

    def connect(self) -> trio.abc.HalfCloseableStream:
        """A new client connection; the server handles the other end."""
        client, ours = trio.testing.memory_stream_pair()
        self.nursery.start_soon(self.server._handle, ours)
        return client


@pytest.fixture
def connector(server, nursery):
    return Connector(server, nursery)
