"""A local TLS server modelled on Kubeflow Trainer v2.3.0's status server (pkg/statusserver), for the tests.

What it checks, as the real one does: `POST` to `/apis/trainer.kubeflow.org/v1alpha1/namespaces/<ns>/trainjobs/
<name>/status` only; `Authorization: Bearer <token>` equal to the token file's content at the time of the request
(so a rotated token must be read again); a body of at most 64 KiB; JSON whose `trainerStatus` is valid against
the TrainJob CRD's `status.trainerStatus` schema (a copy of the v2.3.0 CRD in tests/data/crds), including the
CEL rule that `lastUpdatedTime` is present, and that lastUpdatedTime parses as RFC 3339. Failures answer with a
metav1.Status JSON body: 403 (token), 404 (path), 413 (size), 422 (invalid). A `mode` makes it misbehave on
valid requests: "ok" (200, the body echoed, the update recorded), "403", "422", "500", or "hang" (never
answers). Certificates are made with openssl by `make_certs`, for 127.0.0.1.
"""

from __future__ import annotations

import datetime
import json
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import jsonschema
import yaml

ROOT = Path(__file__).resolve().parents[2]
CRD = ROOT / "tests" / "data" / "crds" / "trainer.kubeflow.org_trainjobs.yaml"
MAX_BODY = 64 * 1024


def trainer_status_schema() -> dict:
    crd = yaml.safe_load(CRD.read_text())
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1alpha1"]
    return version["schema"]["openAPIV3Schema"]["properties"]["status"]["properties"]["trainerStatus"]


def make_certs(folder: Path) -> tuple[Path, Path, Path]:
    """A CA and a server certificate for 127.0.0.1 signed by it: (ca.crt, server.crt, server.key)."""
    folder.mkdir(parents=True, exist_ok=True)
    ca_key, ca, key, csr, crt = (folder / n for n in ("ca.key", "ca.crt", "server.key", "server.csr", "server.crt"))
    ext = folder / "san.ext"
    ext.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    run = lambda *a: subprocess.run(["openssl", *map(str, a)], check=True, capture_output=True)  # noqa: E731
    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", ca_key, "-out", ca, "-days", "1", "-subj", "/CN=ca")
    run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", csr, "-subj", "/CN=trainer-status")
    run("x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial", "-out", crt, "-days", "1",
        "-extfile", ext)  # fmt: skip
    return ca, crt, key


class StatusServer:
    def __init__(self, certs: tuple[Path, Path, Path], token_file: Path, namespace="team-a", name="job-1") -> None:
        import ssl

        self.path = f"/apis/trainer.kubeflow.org/v1alpha1/namespaces/{namespace}/trainjobs/{name}/status"
        self.token_file = token_file
        self.mode = "ok"
        self.updates: list[tuple[float, dict]] = []  # (monotonic time, trainerStatus) of accepted updates
        self.requests: list[tuple[float, int]] = []  # (monotonic time, status answered) of every request
        self.validator = jsonschema.Draft7Validator(trainer_status_schema())
        self._release = threading.Event()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # quiet
                pass

            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                code, body = server.handle(self)
                if code is None:  # hang: never answer, until the server closes
                    server._release.wait(120)
                    return
                server.requests.append((time.monotonic(), code))
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        ca, crt, key = certs
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(crt, key)
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.httpd.socket = context.wrap_socket(self.httpd.socket, server_side=True)
        self.url = f"https://127.0.0.1:{self.httpd.server_address[1]}{self.path}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    @staticmethod
    def status(code: int, reason: str, message: str) -> tuple[int, dict]:
        return code, {"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": reason,
                      "message": message, "code": code}  # fmt: skip

    def handle(self, req: BaseHTTPRequestHandler) -> tuple[int | None, dict]:
        if req.path != self.path:
            return self.status(404, "NotFound", f"no such path {req.path}")
        if req.headers.get("Authorization") != f"Bearer {self.token_file.read_text().strip()}":
            return self.status(403, "Forbidden", "token not valid for this TrainJob")
        size = int(req.headers.get("Content-Length", "0"))
        if size > MAX_BODY:
            return self.status(413, "RequestEntityTooLarge", f"body of {size} bytes")
        try:
            status = json.loads(req.rfile.read(size))["trainerStatus"]
        except (ValueError, KeyError, TypeError) as e:
            return self.status(422, "Invalid", f"not a trainerStatus update: {e}")
        problems = [e.message for e in self.validator.iter_errors(status)]
        if "lastUpdatedTime" not in status:
            problems.append("lastUpdatedTime is required when trainerStatus is present")
        else:
            try:
                datetime.datetime.fromisoformat(status["lastUpdatedTime"].replace("Z", "+00:00"))
            except (ValueError, AttributeError):
                problems.append(f"lastUpdatedTime {status['lastUpdatedTime']!r} is not RFC 3339")
        if problems:
            return self.status(422, "Invalid", "; ".join(problems))
        if self.mode == "hang":
            return None, {}
        if self.mode != "ok":
            return self.status(int(self.mode), "Injected", f"mode {self.mode}")
        self.updates.append((time.monotonic(), status))
        return 200, {"trainerStatus": status}

    def close(self) -> None:
        self._release.set()
        self.httpd.shutdown()
        self.httpd.server_close()
