"""A real S3-compatible server on the loopback address for the tests: moto's standalone server in
its own process (``benchmarks.object_store.LoopbackS3Server``, not an in-process mock of the
client), reached through a ``LoopbackProxy`` that a test can take down and bring back (moto keeps
its objects in memory, so the server itself must not restart). Clients find it the way users point
theirs at an S3-compatible store: AWS_ENDPOINT_URL."""

from __future__ import annotations

from benchmarks.object_store import LoopbackS3Server
from tests.helpers.loopback_proxy import LoopbackProxy


class S3Server(LoopbackS3Server):
    def __init__(self) -> None:
        super().__init__()
        self.proxy = LoopbackProxy(self.port)

    @property
    def env(self) -> dict[str, str]:
        """What a client process needs: the endpoint (through the proxy) and the credentials."""
        return {**self.credentials, "AWS_ENDPOINT_URL": self.proxy.url}

    def stop(self) -> None:
        self.proxy.down()
        super().stop()
