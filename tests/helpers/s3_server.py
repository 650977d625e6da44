"""A real S3-compatible server on the loopback address for the tests: moto's standalone server in
its own process (not an in-process mock of the client), reached through a ``LoopbackProxy`` that a
test can take down and bring back (moto keeps its objects in memory, so the server itself must not
restart). Clients find it the way users point theirs at an S3-compatible store: AWS_ENDPOINT_URL."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from tests.helpers.loopback_proxy import LoopbackProxy
from trainer.distributed import free_port

POLICY = '{"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}'
UNSIGNED_SETUP_CALLS = 3  # the IAM user, its policy and its key are made before the server checks signatures


class S3Server:
    """The server, checking every request's signature (as a real store does) against one IAM user
    whose keys are in ``env``."""

    def __init__(self) -> None:
        self.port = free_port()
        moto = Path(sys.executable).parent / "moto_server"
        env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": str(UNSIGNED_SETUP_CALLS)}
        self.proc = subprocess.Popen([str(moto), "-H", "127.0.0.1", "-p", str(self.port)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, start_new_session=True, env=env)
        deadline = time.time() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                if time.time() > deadline or self.proc.poll() is not None:
                    self.proc.kill()
                    raise RuntimeError("moto_server did not start") from None
                time.sleep(0.2)
        self.proxy = LoopbackProxy(self.port)
        iam = self._client("iam", {"aws_access_key_id": "setup", "aws_secret_access_key": "setup"})
        iam.create_user(UserName="trainer")
        iam.put_user_policy(UserName="trainer", PolicyName="s3", PolicyDocument=POLICY)
        key = iam.create_access_key(UserName="trainer")["AccessKey"]
        self.credentials = {"AWS_ACCESS_KEY_ID": key["AccessKeyId"], "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"],
                            "AWS_DEFAULT_REGION": "us-east-1"}

    def _client(self, service: str, keys: dict[str, str]):
        import boto3

        return boto3.client(service, endpoint_url=f"http://127.0.0.1:{self.port}", region_name="us-east-1", **keys)

    @property
    def env(self) -> dict[str, str]:
        """What a client process needs: the endpoint (through the proxy) and credentials."""
        return {**self.credentials, "AWS_ENDPOINT_URL": self.proxy.url}

    def make_bucket(self, name: str) -> str:
        keys = {"aws_access_key_id": self.credentials["AWS_ACCESS_KEY_ID"],
                "aws_secret_access_key": self.credentials["AWS_SECRET_ACCESS_KEY"]}
        self._client("s3", keys).create_bucket(Bucket=name)
        return f"s3://{name}"

    def stop(self) -> None:
        self.proxy.down()
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def client_env(server: S3Server) -> dict[str, str]:
    """This process's environment with the server's endpoint and credentials (for subprocesses)."""
    return {**os.environ, **server.env}
