"""Helpers for the observability tests: a real Prometheus server, exposition parsing, the dashboard's PromQL,
the PodMonitor turned into the scrape config prometheus-operator would generate, CRD validation, and the
monitoring manifests as `k8s/render.py render JOB --part monitoring` prints them.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
MONITORING = ROOT / "k8s" / "monitoring"
DASHBOARD = MONITORING / "dashboard.json"
PODMONITOR = MONITORING / "podmonitor.yaml"
PODMONITOR_CRD = ROOT / "tests" / "data" / "crds" / "monitoring.coreos.com_podmonitors.yaml"
PROMETHEUS = "/usr/bin/prometheus"
DASHBOARD_KEY = "gnp-training.json"  # the ConfigMap key, deliberately not imported from k8s/render.py


# ---------------------------------------------------------------- metric names and the exposition format


def documented_metrics() -> dict[str, str]:
    """{name: type} of every row of trainer.metrics.METRICS, the exporter's one table."""
    from trainer.metrics import METRICS

    return {m.name: m.type for m in METRICS}


def series_names(documented: dict[str, str]) -> set[str]:
    """The sample names Prometheus stores for documented families (a histogram is _bucket/_sum/_count)."""
    out = set()
    for name, kind in documented.items():
        out |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"} if kind == "histogram" else {name}
    return out


_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)$")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def parse_exposition(text: str) -> tuple[dict[str, str], list[tuple[str, dict[str, str], float]]]:
    """Prometheus text format -> ({family: type} from the TYPE lines, [(sample name, labels, value)])."""
    types, samples = {}, []
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(maxsplit=3)
            types[name] = kind
        elif line and not line.startswith("#"):
            m = _SAMPLE.match(line)
            assert m, f"unparsable exposition line: {line!r}"
            labels = dict(_LABEL.findall(m.group(2) or ""))
            samples.append((m.group(1), labels, float(m.group(3))))
    return types, samples


def parse_help(text: str) -> dict[str, str]:
    """{family: help text} from the HELP lines of a Prometheus text exposition (escapes undone)."""
    out = {}
    for line in text.splitlines():
        if line.startswith("# HELP "):
            _, _, name, *rest = line.split(" ", 3)
            out[name] = re.sub(r"\\(.)", lambda m: "\n" if m.group(1) == "n" else m.group(1), rest[0] if rest else "")
    return out


def scrape(port: int, addr: str = "127.0.0.1") -> str:
    """GET http://addr:port/metrics."""
    with urllib.request.urlopen(f"http://{addr}:{port}/metrics", timeout=5) as r:
        return r.read().decode()


def free_ports(n: int) -> int:
    """A base port such that base .. base+n-1 are all free on 127.0.0.1 right now."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        if base + n > 65535:
            continue
        socks = []
        try:
            for p in range(base, base + n):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", p))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError(f"no {n} consecutive free ports found")


class StaticExporter:
    """Serves an exposition text on http://127.0.0.1:<port>/metrics (a stand-in exporter); `set_text` replaces
    it, as an exporter's output changes when e.g. a pod is replaced."""

    def __init__(self, text: str) -> None:
        import http.server
        import threading

        self.set_text(text)
        exporter = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                body = exporter.body
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def set_text(self, text: str) -> None:
        self.body = text.encode()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


# ---------------------------------------------------------------- the dashboard


def load_dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def dashboard_exprs(dash: dict) -> list[tuple[str, str, str]]:
    """(panel title, refId, expr) of every query target, rows' nested panels included."""
    out = []

    def walk(panels: list) -> None:
        for p in panels:
            for t in p.get("targets", []):
                if t.get("expr"):
                    out.append((p["title"], t["refId"], t["expr"]))
            walk(p.get("panels", []))

    walk(dash["panels"])
    return out


def variable_queries(dash: dict) -> dict[str, tuple[str, str, str]]:
    """{variable: (kind, query, what)} of every query variable: ("label_values", series selector, label) or
    ("query_result", PromQL expression, the variable's regex that extracts the value)."""
    out = {}
    for v in dash["templating"]["list"]:
        if v["type"] != "query":
            continue
        query = (v["query"] if isinstance(v["query"], str) else v["query"]["query"]).strip()
        if m := re.fullmatch(r"label_values\((.+),\s*([a-zA-Z_][a-zA-Z0-9_]*)\)", query):
            out[v["name"]] = ("label_values", m.group(1), m.group(2))
        elif m := re.fullmatch(r"query_result\((.+)\)", query, re.S):
            regex = v.get("regex") or ""
            assert re.fullmatch(r"/.+/", regex), f"variable {v['name']}: query_result needs a /regex/ to extract values"
            out[v["name"]] = ("query_result", m.group(1), regex[1:-1])
        else:
            raise AssertionError(f"variable {v['name']}: unsupported query {query!r}")
    return out


def variable_values(prom: Prometheus, spec: tuple[str, str, str], values: dict[str, str]) -> list[str]:
    """A query variable's options as Grafana's Prometheus data source computes them, `values` substituted:
    label_values asks the label-values API with the selector as match[]; query_result runs an instant query,
    writes each series as `{label="value", ...} value timestamp` and keeps the regex's first group."""
    kind, query, what = spec
    query = substitute(query, values)
    if kind == "label_values":
        return sorted(prom.api(f"label/{what}/values", **{"match[]": query}))
    data = prom.api("query", query=query)
    found = set()
    for r in data["result"]:
        labels = ",".join(f'{k}="{v}"' for k, v in sorted(r["metric"].items()))
        line = f"{r['metric'].get('__name__', '')}{{{labels}}} {r['value'][1]} {int(float(r['value'][0]) * 1000)}"
        if m := re.search(what, line):
            found.add(m.group(1) if m.groups() else m.group(0))
    return sorted(found)


def substitute(expr: str, values: dict[str, str]) -> str:
    """Replace Grafana variables ($name, ${name}) by `values`; unknown `$...` (e.g. regex `$1`) stay."""

    def repl(m: re.Match) -> str:
        name = m.group(1) or m.group(2)
        return values.get(name, m.group(0))

    return re.sub(r"\$\{(\w+)\}|\$(\w+)", repl, expr)


def render_monitoring(job: str = "fashion-mnist-demo") -> tuple[str, list[dict]]:
    """`k8s/render.py render JOB --part monitoring` run as a user runs it: (its stdout, the parsed documents)."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "k8s" / "render.py"), "render", job, "--part", "monitoring"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, f"render --part monitoring exited {proc.returncode}: {proc.stderr}"
    return proc.stdout, [d for d in yaml.safe_load_all(proc.stdout) if d]


# ------------------------------------------ CRD validation (the CRDs in tests/data/crds; no API server here)


def crd_schema(crd_path: Path, api_version: str, strict: bool = True) -> dict:
    """The openAPIV3Schema of `api_version` in a CRD file; strict closes every object that lists properties."""
    crd = next(doc for doc in yaml.safe_load_all(crd_path.read_text()) if doc)
    version = api_version.split("/")[1]
    schema = copy.deepcopy(
        next(v["schema"]["openAPIV3Schema"] for v in crd["spec"]["versions"] if v["name"] == version)
    )
    if strict:
        _close(schema)
    return schema


def _close(node) -> None:
    if isinstance(node, dict):
        if (
            node.get("type") == "object"
            and "properties" in node
            and "additionalProperties" not in node
            and not node.get("x-kubernetes-preserve-unknown-fields")
        ):
            node["additionalProperties"] = False
        for child in node.values():
            _close(child)
    elif isinstance(node, list):
        for child in node:
            _close(child)


def cr_errors(cr: dict, schema: dict) -> list[str]:
    """Validation errors of a custom resource against its CRD schema, as 'path: message'."""
    import jsonschema

    return [f"{'.'.join(map(str, e.path))}: {e.message}" for e in jsonschema.Draft7Validator(schema).iter_errors(cr)]


# ---------------------------------------------------------------- PodMonitor -> Prometheus scrape config


def _sanitize(name: str) -> str:
    return re.sub(r"[^a-zA-Z0-9_]", "_", name)


_RELABEL_KEYS = {
    "sourceLabels": "source_labels",
    "targetLabel": "target_label",
    "separator": "separator",
    "regex": "regex",
    "modulus": "modulus",
    "replacement": "replacement",
    "action": "action",
}


def podmonitor_scrape_configs(pm: dict, pods: list[dict], interval: str) -> list[dict]:
    """The scrape jobs prometheus-operator generates for PodMonitor `pm`, with Kubernetes service discovery
    replaced by static targets that carry the same `__meta_kubernetes_*` labels.

    `pods`: [{"namespace", "name", "node", "container", "labels": {...}, "ports": {port name: "host:port"}}].
    Like the operator: keep pods matching spec.selector (matchLabels and Exists/DoesNotExist/In), keep the
    endpoint's port name, set namespace/container/pod/job/endpoint, then the user's relabelings.
    """
    name, monitor_ns = pm["metadata"]["name"], pm["metadata"].get("namespace", "default")
    selector = pm["spec"]["selector"]
    targets = []
    for pod in pods:
        for port_name, address in pod["ports"].items():
            labels = {
                "__meta_kubernetes_namespace": pod["namespace"],
                "__meta_kubernetes_pod_name": pod["name"],
                "__meta_kubernetes_pod_node_name": pod["node"],
                "__meta_kubernetes_pod_container_name": pod["container"],
                "__meta_kubernetes_pod_container_port_name": port_name,
            }
            for key, value in pod["labels"].items():
                labels[f"__meta_kubernetes_pod_label_{_sanitize(key)}"] = value
                labels[f"__meta_kubernetes_pod_labelpresent_{_sanitize(key)}"] = "true"
            targets.append({"targets": [address], "labels": labels})
    keep = []
    for key, value in (selector.get("matchLabels") or {}).items():
        s = _sanitize(key)
        keep.append(
            {
                "action": "keep",
                "source_labels": [f"__meta_kubernetes_pod_label_{s}", f"__meta_kubernetes_pod_labelpresent_{s}"],
                "regex": f"({re.escape(value)});true",
            }
        )
    for expr in selector.get("matchExpressions") or []:
        s, op = _sanitize(expr["key"]), expr["operator"]
        if op == "Exists":
            keep.append(
                {"action": "keep", "source_labels": [f"__meta_kubernetes_pod_labelpresent_{s}"], "regex": "true"}
            )
        elif op == "DoesNotExist":
            keep.append(
                {"action": "drop", "source_labels": [f"__meta_kubernetes_pod_labelpresent_{s}"], "regex": "true"}
            )
        elif op == "In":
            keep.append(
                {
                    "action": "keep",
                    "source_labels": [f"__meta_kubernetes_pod_label_{s}"],
                    "regex": "|".join(re.escape(v) for v in expr["values"]),
                }
            )
        else:
            raise NotImplementedError(f"selector operator {op} is not emulated")
    jobs = []
    for i, ep in enumerate(pm["spec"]["podMetricsEndpoints"]):
        relabel = [
            *keep,
            {
                "action": "keep",
                "source_labels": ["__meta_kubernetes_pod_container_port_name"],
                "regex": re.escape(ep["port"]),
            },
            {"source_labels": ["__meta_kubernetes_namespace"], "target_label": "namespace"},
            {"source_labels": ["__meta_kubernetes_pod_container_name"], "target_label": "container"},
            {"source_labels": ["__meta_kubernetes_pod_name"], "target_label": "pod"},
            {"target_label": "job", "replacement": f"{monitor_ns}/{name}"},
            {"target_label": "endpoint", "replacement": ep["port"]},
        ]
        for r in ep.get("relabelings") or []:
            relabel.append({_RELABEL_KEYS[k]: (v.lower() if k == "action" else v) for k, v in r.items()})
        jobs.append(
            {
                "job_name": f"podMonitor/{monitor_ns}/{name}/{i}",
                "honor_labels": bool(ep.get("honorLabels")),
                "scrape_interval": interval,
                "scrape_timeout": interval,
                "metrics_path": ep.get("path", "/metrics"),
                "static_configs": targets,
                "relabel_configs": relabel,
            }
        )
    return jobs


# ---------------------------------------------------------------- the Prometheus server


class Prometheus:
    """Debian's prometheus binary on 127.0.0.1:`port`, storing under `workdir`; stop() ends it by PID."""

    def __init__(self, workdir: Path, port: int, scrape_configs: list[dict], interval: str = "1s") -> None:
        if not Path(PROMETHEUS).is_file():
            raise FileNotFoundError(
                f"{PROMETHEUS} is missing: `make setup` installs Debian's prometheus package "
                f"(apt-get install -y prometheus)"
            )
        self.url = f"http://127.0.0.1:{port}"
        workdir.mkdir(parents=True, exist_ok=True)
        config = workdir / "prometheus.yml"
        config.write_text(
            yaml.safe_dump(
                {
                    "global": {"scrape_interval": interval, "evaluation_interval": interval},
                    "scrape_configs": scrape_configs,
                },
                sort_keys=False,
            )
        )
        if shutil.which("promtool"):  # a clear message for a bad config instead of an exit code
            check = subprocess.run(["promtool", "check", "config", str(config)], capture_output=True, text=True)
            assert check.returncode == 0, f"promtool rejected the scrape config:\n{check.stdout}{check.stderr}"
        self.log_path = workdir / "prometheus.log"
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            [
                PROMETHEUS,
                f"--config.file={config}",
                f"--storage.tsdb.path={workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )

    def wait_ready(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"prometheus exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"prometheus not ready after {timeout}s:\n{self.log_tail()}")

    def api(self, path: str, **params) -> dict:
        """GET /api/v1/<path>?params; returns `data` (asserts status success)."""
        query = urllib.parse.urlencode(params, doseq=True)
        with urllib.request.urlopen(f"{self.url}/api/v1/{path}?{query}", timeout=10) as r:
            body = json.load(r)
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str, at: float | None = None) -> list[dict]:
        """Instant query; [{metric: {labels}, value: float}] (vector or scalar results)."""
        params = {"query": expr} | ({"time": f"{at:.3f}"} if at is not None else {})
        data = self.api("query", **params)
        if data["resultType"] == "scalar":
            return [{"metric": {}, "value": float(data["result"][1])}]
        return [{"metric": r["metric"], "value": float(r["value"][1])} for r in data["result"]]

    def log_tail(self, n: int = 30) -> str:
        return "\n".join(self.log_path.read_text().splitlines()[-n:])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
