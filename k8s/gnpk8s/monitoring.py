"""Monitoring manifests: the PodMonitor (k8s/monitoring/podmonitor.yaml, verbatim) and the Grafana dashboard
ConfigMap rendered from k8s/monitoring/dashboard.json. The PrometheusRule of alerts is alerts.py's."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from .errors import UserError
from .spec import K8S_DIR, ROOT

MONITORING_DIR = K8S_DIR / "monitoring"
MONITORING_FILES = ("podmonitor.yaml",)  # applied verbatim
DASHBOARD_FILE = MONITORING_DIR / "dashboard.json"  # rendered into the Grafana sidecar's ConfigMap
DASHBOARD_KEY = "gnp-training.json"  # the file name the sidecar writes into Grafana's dashboard folder


def monitoring_texts(namespace: str | None = None) -> list[str]:
    """k8s/monitoring/podmonitor.yaml (comments kept), placed in `namespace` and selecting only it when one is
    given, then the dashboard ConfigMap rendered from dashboard.json (apply them once per namespace)."""
    out = []
    for fname in MONITORING_FILES:
        path = MONITORING_DIR / fname
        if not path.is_file():
            raise UserError(f"{path.relative_to(ROOT)} is missing")
        out.append(_in_namespace(path.read_text(), namespace) if namespace else path.read_text())
    out.append(dashboard_configmap())
    return out


def _in_namespace(text: str, namespace: str) -> str:
    """The PodMonitor text in `namespace`, selecting pods there only (namespaceSelector.matchNames): a
    tenant's monitor, not `any: true`, which reads every namespace's pods."""
    name_line = "  name: gnp-training\n"
    spec_line = "spec:\n"
    if name_line not in text or spec_line not in text:
        raise UserError("k8s/monitoring/podmonitor.yaml: expected `  name: gnp-training` and `spec:` lines")
    text = text.replace(name_line, f"{name_line}  namespace: {namespace}\n", 1)
    return text.replace(spec_line, f"{spec_line}  namespaceSelector:\n    matchNames: [{namespace}]\n", 1)


def dashboard_configmap(path: Path | None = None) -> str:
    """The ConfigMap that Grafana's dashboard sidecar imports, carrying dashboard.json byte for byte.

    A YAML literal block keeps the JSON readable in `kubectl get -o yaml` and diffs; its chomping indicator
    is chosen so that the loaded value ends exactly as the file does.
    """
    path = path or DASHBOARD_FILE  # read at call time: tests point it elsewhere
    where = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
    if not path.is_file():
        raise UserError(f"{where} is missing")
    text = path.read_text()
    try:
        dash = json.loads(text)
    except ValueError as e:
        raise UserError(f"{where}: not valid JSON ({e}); expected a Grafana dashboard model") from None
    if not isinstance(dash, dict) or "panels" not in dash:
        raise UserError(f"{where}: expected a Grafana dashboard model (a JSON object with `panels`)")
    stripped = text.rstrip("\n")
    chomp = "-" if stripped == text else ("" if stripped + "\n" == text else "+")
    body = "".join(f"    {line}\n" if line else "\n" for line in stripped.split("\n"))
    body += "\n" * (len(text) - len(stripped) - 1)  # the newlines beyond one, kept by "+"
    return (
        f"# Rendered from {where} by k8s/render.py (--part monitoring); edit the JSON, not this.\n"
        "# Grafana's dashboard sidecar (kube-prometheus-stack grafana.sidecar.dashboards: label\n"
        '# grafana_dashboard, labelValue "1") imports it. Apply it in Grafana\'s namespace unless the\n'
        "# sidecar's searchNamespace is ALL.\n"
        "apiVersion: v1\n"
        "kind: ConfigMap\n"
        "metadata:\n"
        "  name: gnp-training-dashboard\n"
        "  labels:\n"
        '    grafana_dashboard: "1"\n'
        "    app.kubernetes.io/name: gnp-trainer\n"
        "    app.kubernetes.io/component: monitoring\n"
        "data:\n"
        f"  {DASHBOARD_KEY}: |{chomp}\n" + body
    )


def podmonitor_ports() -> list[str] | None:
    """Port names the PodMonitor scrapes (None when the file is absent)."""
    path = MONITORING_DIR / "podmonitor.yaml"
    if not path.is_file():
        return None
    doc = yaml.safe_load(path.read_text())
    return [str(e.get("port")) for e in doc.get("spec", {}).get("podMetricsEndpoints", []) if e.get("port")]
